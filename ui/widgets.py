"""Small Streamlit renderers shared by the pages: the pyvis embed, the sidebar status, page guards."""

from __future__ import annotations

from typing import Any

import streamlit as st

from eapcore import render
from eapcore.circuit import Circuit, Scores

GRAPH_HEIGHT = 640


def show_graph(scores: Scores, circuit: Circuit, height: int = GRAPH_HEIGHT, max_edges: int = 600) -> None:
    """The circuit as an interactive pyvis graph in an iframe (renders offline: no CDN)."""
    if circuit.n_edges > max_edges:
        st.caption(f"Drawing the {max_edges} edges with the largest |score| of {circuit.n_edges}.")
    page = render.pyvis_html(scores, circuit, height_px=height, max_edges=max_edges)
    st.iframe(page, height=height, alt="circuit graph")
    st.caption(
        "Bottom: `input`; top: `logits`. Nodes: grey input, orange heads, teal MLPs, red logits. "
        "Edges: blue q, green k, purple v, grey other; dark and solid = positive score, light and dashed = "
        "negative; width = |score|. Hover an edge for its score; drag to pan, scroll to zoom."
    )


def sidebar_status() -> None:
    s = st.session_state
    with st.sidebar:
        st.markdown("**Session**")
        spec = s.get("model_spec")
        st.caption(f"Model: `{spec.name if spec else '-'}`")
        pairs = s.get("pairs")
        st.caption(f"Data: {s.get('data_label', '-')} ({len(pairs) if pairs is not None else 0} pairs), metric `{s.get('metric', '-')}`")
        st.caption(f"Scores: {s.get('scores_label', 'none yet')}")


def need(*keys: str) -> bool:
    """Show an info box and return False when a required session key is missing."""
    s = st.session_state
    messages = {
        "pairs": ("No prompt pairs yet.", "pages/data.py", "Choose data"),
        "scores": ("No scores yet: run an attribution (or import a circuit on the Export page).", "pages/attribute.py", "Attribute"),
    }
    for key in keys:
        if s.get(key) is None:
            text, page, label = messages[key]
            st.info(text)
            st.page_link(page, label=label, icon=":material/arrow_forward:")
            return False
    return True


def metric_row(values: dict[str, Any]) -> None:
    for col, (label, value) in zip(st.columns(len(values)), values.items()):
        col.metric(label, value)
