"""The view in the URL, so that a reload or a link on the same server opens it again: the page is the
URL's path (Streamlit's navigation: ``/explore``), the selected run and the circuit size are its query
parameters (``?run=run:3f2a...&size=40``).

- :func:`sync` (every run, after the page) writes ``run`` and ``size`` from the session.
- :func:`restore` (a browser session's first run) reads them. The run is looked up in this session's runs,
  then among the attribution runs made on this server: their scores in the process-wide results cache
  (:func:`ui.cache.results`) and their model, data and label kept beside them (:func:`remember`). A run
  that is not there (the cache keeps the last 32 runs and a restart empties it; imported circuits and runs
  loaded from a session file live only in the browser session that loaded them) is named in a note, and
  the page opens without it, on the session's defaults; so does a size that does not fit the run.

Keys: ``url_restored`` (the first run has looked), ``url_note`` (what could not be restored, shown once).
"""

from __future__ import annotations

import streamlit as st

from eapcore.sizes import unit_count
from ui import cache, state

PARAMS = ("run", "size")


def remember(key: str, label: str) -> None:
    """Keep what a link to the attribution run ``key`` (just made with the session's model and data) needs."""
    s = st.session_state
    cache.views().put(key, cache.RunView(s.model_spec, s.pairs, s.data_label, s.metric, label))


def restore() -> None:
    """On a browser session's first run, open the run and size that the URL names."""
    s = st.session_state
    if s.get("url_restored"):
        return
    s.url_restored = True
    key, size = st.query_params.get("run"), st.query_params.get("size")
    if key and key != s.get("scores_key"):
        if key in s.get("runs", {}):
            state.select_run(key)
        else:
            scores, view = cache.results().get(key), cache.views().get(key)
            if scores is None or view is None:
                s.url_note = (f"The link names the run `{key}`, which this server does not hold: it keeps the last 32 "
                              "attribution runs made on it until it restarts, and imported circuits or runs loaded from "
                              "a session file only in the browser session that loaded them. Run the attribution "
                              "again, or load the saved session (sidebar).")
                return
            s.model_spec = view.model_spec
            state.set_data(view.pairs, view.data_label, view.metric)
            state.set_scores(scores, key, view.label)
    if size is not None and s.get("scores") is not None:
        total = unit_count(s.scores)
        if size.isdigit() and int(size) <= total:
            s.n_edges = int(size)
        else:
            s.url_note = (f"The link's circuit size `{size}` does not fit this run (0 to {total:,}); showing the "
                          "default size.")


def show_note() -> None:
    note = st.session_state.pop("url_note", None)
    if note:
        st.info(note, icon=":material/link_off:")


def sync() -> None:
    """Write the selected run and the circuit size into the URL (and drop them when there is no run)."""
    s = st.session_state
    want = {}
    if s.get("scores_key"):
        want["run"] = s.scores_key
        if s.get("n_edges") is not None:
            want["size"] = str(s.n_edges)
    for name in PARAMS:
        if name in want and st.query_params.get(name) != want[name]:
            st.query_params[name] = want[name]
        elif name not in want and name in st.query_params:
            del st.query_params[name]
