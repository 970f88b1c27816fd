"""Shared presentation helpers of the pages: cached resources, login, clips, labels. No domain logic here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import streamlit as st

from echosearch.appcore import auth
from echosearch.appcore.data import AppIndex, clip_html, open_app_index
from echosearch.appcore.launch import resolve_index
from echosearch.errors import EchosearchError
from echosearch.serve.login_guard import LoginGuard

APP_DIR = Path(__file__).resolve().parent
MAX_CHOICES = 2000  # longer lists become a search box
PAGES = {"search": "app_pages/search.py", "patient": "app_pages/patient.py", "audit": "app_pages/audit.py",
         "index": "app_pages/index_status.py"}


# ---- resources shared by every session of this process -------------------------------------------------
def index_dir() -> Path:
    return resolve_index(sys.argv[1:]).resolve()


@st.cache_resource(show_spinner="Opening the index ...")
def _app_index(path: str) -> AppIndex:
    return open_app_index(path)


def app_index() -> AppIndex:
    """The process-wide index (through the index's server when one runs, see ``open_app_index``); stops the
    page with a readable message when it cannot be opened."""
    try:
        return _app_index(str(index_dir()))
    except EchosearchError as exc:
        st.error(f"Cannot open the index: {exc}")
        st.stop()
        raise  # unreachable; for type checkers


@st.cache_resource(show_spinner=False)
def _login_guard(path: str) -> LoginGuard:
    return auth.login_guard(_app_index(path))


def client_address() -> str | None:
    """The browser's address when Streamlit knows it (None on loopback, e.g. behind a local reverse proxy)."""
    try:
        ip = st.context.ip_address
    except Exception:  # no client context (bare mode, tests)
        return None
    return ip if isinstance(ip, str) and ip else None


# ---- who is using the app -------------------------------------------------------------------------------
def _listening_on_loopback() -> bool:
    addr = st.get_option("server.address")
    return bool(addr) and auth.is_loopback(str(addr))


def require_login() -> str:
    """The actor name for the audit trail; shows a login and stops the run until one is known."""
    if st.session_state.get("actor"):
        return str(st.session_state["actor"])
    mode = auth.auth_mode(APP_DIR)
    if mode == "oidc":
        if not st.user.is_logged_in:
            st.title("echosearch")
            st.write("Sign in to use this echocardiography archive.")
            st.button("Sign in", on_click=st.login, type="primary")
            st.stop()
        actor = str(st.user.get("email") or st.user.get("name") or st.user.get("sub") or "oidc-user")
        st.session_state["actor"] = actor
        return actor
    if mode == "password":
        st.title("echosearch")
        with st.form("login"):
            name = st.text_input("Your name (recorded in the access log)")
            password = st.text_input("Password", type="password")
            ok = st.form_submit_button("Sign in", type="primary")
        if ok:
            guard = _login_guard(str(index_dir()))
            signed_in, message = auth.password_login(app_index(), guard, name, password, client_address())
            if signed_in:
                st.session_state["actor"] = name.strip()
                st.rerun()
            st.error(message)
        st.stop()
    if not _listening_on_loopback():
        st.error("This app is reachable from the network but no login is configured. Start it with "
                 "`echosearch serve` (127.0.0.1 by default) or configure a login (see docs/app.md).")
        st.stop()
    actor = auth.local_actor()
    st.session_state["actor"] = actor
    return actor


def actor() -> str:
    return str(st.session_state.get("actor") or auth.local_actor())


def log_once(key: str, action: str, detail: dict[str, Any]) -> None:
    """Append to the access log once per distinct ``key`` in this session (reruns do not repeat it)."""
    seen = st.session_state.setdefault("_logged", set())
    if key in seen:
        return
    app_index().log(actor(), action, detail)
    seen.add(key)


# ---- display ------------------------------------------------------------------------------------------
def patient_label(pseudonym: str | None, raw_id: str | None = None) -> str:
    """Pseudonym, plus the raw ID only when the index was built with raw identifiers (opt-in)."""
    if pseudonym is None:
        return "unknown patient"
    return f"{pseudonym} ({raw_id})" if raw_id else str(pseudonym)


def fmt_date(value: Any) -> str:
    return value.isoformat() if hasattr(value, "isoformat") else ("no date" if value is None else str(value))


def clip(video_key: int | None, caption: str | None = None) -> None:
    """A looping, muted preview of the prepared (sector-masked) frames of a video."""
    if video_key is None:
        st.caption("no clip")
        return
    try:
        with st.spinner("Preparing clip ..."):
            data, mime = app_index().clip(int(video_key))
    except Exception as exc:  # a clip that cannot be shown must not break the page
        st.caption(f"clip unavailable: {exc}")
        return
    st.html(clip_html(data, mime))  # inline data: URI, never a /media/ URL (see clip_html)
    if caption:
        st.caption(caption)


def open_patient(pseudonym: str) -> None:
    """Go to the patient page for ``pseudonym``."""
    st.session_state["patient_request"] = pseudonym
    st.switch_page(PAGES["patient"])


def first_video_of(studies_videos: Any, study_key: int, view: str | None = None) -> int | None:
    """A video of a study, preferring ``view`` (rows from ``AppIndex.study_videos``)."""
    rows = studies_videos.filter(studies_videos["study_key"] == study_key)
    if rows.height == 0:
        return None
    if view is not None:
        same = rows.filter(rows["view"] == view)
        if same.height:
            return int(same["video_key"][0])
    return int(rows["video_key"][0])
