"""The session's runs as the pages show them: a table of how each was made, a control to remove one,
and circuit files imported as runs (read like the Export page's import: never unpickled)."""

from __future__ import annotations

from typing import Any

import streamlit as st

from eapcore.models import model_graph
from eapcore.select import EDGES, unit_of
from ui import cache, exports, state
from ui.provenance import run_details


COLUMNS = ("run", "explored", "model", "method", "IG steps", "level", "intervention", "metric", "data", "pairs")


def runs() -> dict[str, dict[str, Any]]:
    """The session's runs: key -> ``{"label", "scores"}``, in the order they were made."""
    return st.session_state.get("runs", {})


def edge_runs() -> list[str]:
    """Keys of the runs with edge scores (those whose circuits are chosen by edge)."""
    return [key for key, run in runs().items() if unit_of(run["scores"]) == EDGES]


def label(key: str) -> str:
    return runs()[key]["label"]


def labels() -> dict[str, str]:
    """key -> label of every run, e.g. as a widget's ``format_func`` (``labels().get``: a snapshot, since
    formatting may happen outside the script run)."""
    return {key: run["label"] for key, run in runs().items()}


def table() -> list[dict[str, str]]:
    """One row per run: its label, how it was made, and the data it was attributed on (this session's data,
    by name, when the fingerprints agree)."""
    s = st.session_state
    now = s.pairs.fingerprint() if s.get("pairs") is not None else None
    rows = []
    for key, run in runs().items():
        details = run_details(run["scores"].provenance)
        if now is not None and run["scores"].provenance.get("data") == now:
            details["data"] = f"{s.get('data_label')} (this session's)"
        row = {"run": run["label"], "explored": "✓" if key == s.get("scores_key") else "", **details}
        rows.append({name: row.get(name, "") for name in COLUMNS})
    return rows


def show_and_remove() -> None:
    """The runs' table, and a control that removes one of them (the one Explore shows: the latest other
    run is shown instead)."""
    s = st.session_state
    if not runs():
        st.info("No runs yet: run an attribution, or import circuit files below.")
        return
    st.dataframe(table(), hide_index=True, width="stretch")
    keys = list(runs())
    if s.get("w_remove_run") not in keys:
        s.w_remove_run = keys[-1]
    c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
    c1.selectbox("Run to remove", keys, key="w_remove_run", format_func=labels().get)
    if c2.button("Remove this run", icon=":material/delete:", key="remove_run"):
        gone = label(s.w_remove_run)
        state.remove_run(s.w_remove_run)
        st.toast(f"Removed {gone}", icon=":material/delete:")
        st.rerun()


def import_file(upload: Any) -> str:
    """Add an uploaded ``.pt``/``.json`` circuit file to the session's runs (checked against the loaded model's
    graph; a file imported before keeps its run); returns the run's key. A bad file raises ``ValueError``
    naming it and saying what is wrong."""
    expected = model_graph(cache.get_model(st.session_state.model_spec))
    try:
        scores, _, key = exports.read_circuit(upload.name, upload.getvalue(), expected)
    except Exception as e:  # noqa: BLE001 - every reason a file is refused, shown with its name
        raise ValueError(f"{upload.name} was not imported: {e}") from None
    state.add_run(scores, key, f"imported {upload.name}")
    return key
