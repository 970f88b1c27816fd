"""echosearch app entry point: ``echosearch serve --index DIR`` (or ``streamlit run app/main.py -- --index DIR``)."""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

APP_DIR = Path(__file__).resolve().parent
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))

import ui  # noqa: E402  (needs APP_DIR on sys.path)

st.set_page_config(page_title="echosearch", page_icon="🫀", layout="wide")  # an emoji: nothing fetched from outside

who = ui.require_login()
pages = [
    st.Page(ui.PAGES["search"], title="Search", icon=":material/search:", default=True),
    st.Page(ui.PAGES["patient"], title="Patient timeline", icon=":material/timeline:"),
    st.Page(ui.PAGES["audit"], title="Identity audit", icon=":material/fact_check:"),
    st.Page(ui.PAGES["index"], title="Index status", icon=":material/database:"),
]
nav = st.navigation(pages)
with st.sidebar:
    st.caption(f"Index: `{ui.index_dir().name}`" + (" (through its server)" if ui.app_index().remote else ""))
    st.caption(f"Signed in as **{who}**; searches, patient views and decisions are logged.")
    if st.user.get("is_logged_in"):
        st.button("Sign out", on_click=st.logout)
    elif st.session_state.get("actor") and ui.auth.auth_mode(APP_DIR) == "password" and st.button("Sign out"):
        st.session_state.clear()
        st.rerun()
nav.run()
