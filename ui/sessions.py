"""The whole exploration as one file (:mod:`eapcore.session`): saved from and loaded into the browser
session, from the sidebar on every page.

A saved session holds the model spec, the prompt pairs with their label and metric, every run (its
attribution settings and scores), the selected run, the circuit size and ranking, the hand edits, the
picked node and the page. Loading checks the whole file first (:func:`eapcore.session.load_session`, never
unpickled) against the loaded model's graph, then loads the session's model; only then is the browser
session replaced, so a refused file changes nothing. Runs lacking attribution settings (circuit files from
other tools) are left out of a saved session, which says so; an imported circuit shown as it was saved
comes back as the top circuit of its size. Keys: ``page`` (the page shown, set by ``app.py``),
``session_error``, ``session_loaded`` (the upload applied last).
"""

from __future__ import annotations

import io
from typing import Any

import streamlit as st

from eapcore.edits import Edits
from eapcore.models import model_graph
from eapcore.session import Run, Session, load_session, save_session
from ui import cache, current, edits, graph_view, state

PAGES = ("model", "data", "attribute", "explore", "export")


def _get(s: Any, key: str, default: Any = None) -> Any:
    """``s[key]`` or ``default``: works on ``st.session_state`` and on AppTest's view of it."""
    return s[key] if key in s else default


def snapshot(s: Any) -> tuple[Session, list[str]]:
    """The session held in ``s`` (``st.session_state``), and the labels of runs left out (no settings)."""
    if _get(s, "pairs") is None:
        raise ValueError("there are no prompt pairs")
    spec = s["model_spec"]
    graph = model_graph(cache.get_model(spec))
    runs, left_out = [], []
    for key, run in _get(s, "runs", {}).items():
        settings = current.spec_of(run["scores"])
        if settings is None or run["scores"].graph.cfg != graph.cfg:
            left_out.append(run["label"])
            continue
        runs.append(Run(settings, run["scores"], run["label"], key))
    keys = [r.key for r in runs]
    selected = keys.index(s["scores_key"]) if _get(s, "scores_key") in keys else None
    size = _get(s, "n_edges") if selected is not None else None
    node = _get(s, "node")
    session = Session(
        graph, spec, s["pairs"], _get(s, "data_label", ""), _get(s, "metric", "logit_diff"), tuple(runs), selected,
        size, bool(_get(s, "absolute", True)), _get(s, "edits") or Edits(), node if node in graph.node_names else None,
        _get(s, "page"),
    )
    return session, left_out


def to_bytes(session: Session) -> bytes:
    buffer = io.BytesIO()
    save_session(buffer, session)
    return buffer.getvalue()


def read(name: str, blob: bytes) -> Session:
    """Check an uploaded session file against the loaded model's graph, then load the session's model and
    check that its graph is the file's; raises ``ValueError`` (the engine's message) otherwise."""
    source = io.BytesIO(blob)
    source.name = name
    session = load_session(source, expected=model_graph(cache.get_model(st.session_state.model_spec)))
    model = cache.get_model(session.model)  # the session's own model (the same graph: checked above)
    if model_graph(model).cfg != session.graph.cfg:
        raise ValueError(f"{name}: the session's model {session.model.name!r} does not have the graph the file was "
                         "saved with; load the model it was saved with")
    return session


def apply(session: Session) -> str | None:
    """Replace the browser session with ``session``; returns the page to open (or ``None``)."""
    s = st.session_state
    s.model_spec = session.model
    state.set_data(session.pairs, session.data_label, session.metric)
    state.clear_scores()
    s.runs = {run.key: {"label": run.label, "scores": run.scores} for run in session.runs}
    if session.selected is not None:
        chosen = session.runs[session.selected]
        state.set_scores(chosen.scores, chosen.key, chosen.label, session.size)
    s.absolute = session.absolute
    s.pop("w_absolute", None)
    edits.set_edits(session.edits)
    graph_view.pick(session.node)
    return session.page if session.page in PAGES else None


def sidebar() -> None:
    """Save the session (a download) and load one (an upload), in the current container."""
    s = st.session_state
    with st.expander("Save or load the session", icon=":material/save:"):
        try:
            session, left_out = snapshot(s)
        except Exception as e:  # noqa: BLE001 - no model or no data to save (the page says more)
            st.caption(f"Nothing to save yet: {str(e)[:160]}")
        else:
            st.download_button("Save session", lambda: to_bytes(session), "eapcore-session.zip", "application/zip",
                               on_click="ignore", icon=":material/download:", key="save_session",
                               help="Model, data, every run, the selected run and size, edits, the picked node")
            if left_out:
                st.caption(f"Left out (no attribution settings): {', '.join(left_out)}.")
        upload = st.file_uploader("Load a session", type=["zip"], key="w_session_file",
                                  help="A file saved here; it replaces this session (checked first, never unpickled)")
        if upload is not None and s.get("session_loaded") != upload.file_id:
            s.session_loaded, s.session_error = upload.file_id, None
            page = None
            try:
                page = apply(read(upload.name, upload.getvalue()))
            except Exception as e:  # noqa: BLE001 - shown while this file stays selected; the session is kept
                s.session_error = f"{upload.name} was not loaded: {e}"
            else:
                st.toast(f"Loaded the session from {upload.name}", icon=":material/check:")
                if page is not None:
                    st.switch_page(f"pages/{page}.py")
        if upload is not None and s.get("session_error"):
            st.error(s.session_error, icon=":material/error:")
