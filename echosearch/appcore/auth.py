"""Who uses the app: loopback trust, password or OIDC login, the sign-in throttle, the actor of the access log.

The server (:mod:`echosearch.serve.auth`) applies the same rules to its HTTP API and reads the same settings.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import ipaddress
import json
import math
import os
import re
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from echosearch.errors import ConfigError
from echosearch.serve.login_guard import Limits, LoginGuard

if TYPE_CHECKING:
    from echosearch.appcore.data import AppIndex

PASSWORD_ENV = "ECHOSEARCH_APP_PASSWORD"
USER_ENV = "ECHOSEARCH_APP_USER"
REPLAY_S = 24 * 3600  # how far back sign-ins are replayed into the throttle on start


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; everything else exposes the app to a network."""
    if host.strip().lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def secrets_files(app_dir: Path | None = None) -> list[Path]:
    """Where Streamlit reads ``secrets.toml``: global, project (cwd) and beside the app script."""
    files = [Path.home() / ".streamlit" / "secrets.toml", Path.cwd() / ".streamlit" / "secrets.toml"]
    if app_dir is not None:
        files.append(app_dir / ".streamlit" / "secrets.toml")
    return files


def oidc_configured(app_dir: Path | None = None) -> bool:
    """Whether a ``secrets.toml`` Streamlit will read has an ``[auth]`` section (OIDC ``st.login``)."""
    for f in secrets_files(app_dir):
        try:
            text = f.read_text()
        except OSError:
            continue
        if re.search(r"^\s*\[\s*auth\s*[\].]", text, flags=re.MULTILINE):
            return True
    return False


def auth_mode(app_dir: Path | None = None) -> str:
    """``oidc``, ``password`` (``ECHOSEARCH_APP_PASSWORD``) or ``none``."""
    if oidc_configured(app_dir):
        return "oidc"
    if os.environ.get(PASSWORD_ENV):
        return "password"
    return "none"


def check_serve_safety(host: str, app_dir: Path | None = None) -> str:
    """Refuse a non-loopback address without authentication; returns the auth mode."""
    mode = auth_mode(app_dir)
    if not is_loopback(host) and mode == "none":
        raise ConfigError(f"refusing to listen on {host} without authentication: configure OIDC (an [auth] "
                          f"section in .streamlit/secrets.toml) or set {PASSWORD_ENV} (see docs/app.md)")
    if mode == "oidc":
        try:
            import authlib  # noqa: F401
        except ImportError as exc:
            raise ConfigError("OIDC login needs Authlib: pip install 'Authlib>=1.3.2'") from exc
    return mode


def check_password(given: str, expected: str | None = None) -> bool:
    """Constant-time comparison with ``ECHOSEARCH_APP_PASSWORD`` (False when none is set)."""
    want = expected if expected is not None else os.environ.get(PASSWORD_ENV, "")
    if not want:
        return False
    a = hashlib.sha256(given.encode()).digest()
    b = hashlib.sha256(want.encode()).digest()
    return hmac.compare_digest(a, b)


def local_actor() -> str:
    """Who uses a loopback app without login: ``ECHOSEARCH_APP_USER`` or the OS account of the server."""
    name = os.environ.get(USER_ENV)
    if name:
        return name
    try:
        return f"local:{getpass.getuser()}"
    except (OSError, KeyError):
        return "local"


def login_guard(app: AppIndex, limits: Limits | None = None, clock: Callable[[], float] = time.time) -> LoginGuard:
    """The sign-in throttle of this app process, with the recent sign-ins of the access log replayed, so
    a restart does not reset it."""
    guard = LoginGuard(limits, clock)
    # a count in a row can be older than one window; a day back covers any realistic one
    since = datetime.fromtimestamp(clock() - REPLAY_S, timezone.utc).replace(tzinfo=None)
    events = app.access_events(("login", "login_failed"), since)
    guard.replay((at.replace(tzinfo=timezone.utc).timestamp(), action, actor, json.loads(detail or "{}").get("client"))
                 for at, action, actor, detail in events)
    return guard


def password_login(app: AppIndex, guard: LoginGuard, name: str, password: str,
                   client: str | None = None) -> tuple[bool, str]:
    """Check a password sign-in through ``guard`` and log it (``login``, ``login_failed``, or ``login_locked``
    when refused unchecked); returns (signed in, message for the user)."""
    who = name.strip()
    detail: dict[str, Any] = {"method": "password", **({"client": client} if client else {})}
    decision = guard.attempt(who, client, lambda: bool(who) and check_password(password))
    if decision.ok:
        app.log(who, "login", detail)
        return True, ""
    wait = math.ceil(decision.retry_after_s)
    retry = (f"Too many failed sign-ins: try again in {wait} s (after "
             f"{datetime.fromtimestamp(guard.clock() + wait, timezone.utc):%H:%M:%S} UTC).")
    if decision.locked:
        app.log(who or "?", "login_locked", {**detail, "retry_after_s": wait})
        return False, retry
    app.log(who or "?", "login_failed", detail)
    return False, "Wrong name or password." + (f" {retry}" if wait > 0 else "")
