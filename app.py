"""EAP-IG circuit explorer: `streamlit run app.py` (opens on the demo model with the IOI task)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from eapcore.threads import configure_threads  # noqa: E402
from ui import cache, sessions, state, url, widgets  # noqa: E402

st.set_page_config(page_title="EAP-IG circuit explorer", page_icon=str(widgets.FAVICON), layout="wide")
configure_threads()
state.init_defaults()

PAGES = [
    st.Page("pages/model.py", title="Model", icon=":material/memory:", default=True),
    st.Page("pages/data.py", title="Data", icon=":material/table:"),
    st.Page("pages/attribute.py", title="Attribute", icon=":material/calculate:"),
    st.Page("pages/explore.py", title="Explore", icon=":material/hub:"),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare_arrows:"),
    st.Page("pages/export.py", title="Export", icon=":material/download:"),
]
page = st.navigation(PAGES)
st.session_state.page = page.url_path or "model"  # the default page's path is ""
url.restore()  # a reload or a link: the run and size in the URL
status = st.sidebar.empty()
with status.container():
    widgets.sidebar_status()
with st.sidebar:
    sessions.sidebar()
state.show_interrupted()  # on whichever page comes next: a cancelled or interrupted attribution says so
url.show_note()
with cache.queue_notice(st.empty()):  # a wait for the model (another session's run) says so and can be left
    page.run()
with status.container():  # again, with what the page changed (a page that stops early keeps the first)
    widgets.sidebar_status()
url.sync()
