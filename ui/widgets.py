"""Small Streamlit renderers shared by the pages: the circuit graph, metric rows with their definitions,
the sidebar status, page guards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

from eapcore.circuit import Circuit, Scores
from ui.graph_html import pyvis_html
from ui.layout import THEMES, GraphStyle

GRAPH_HEIGHT = 640
FAVICON = Path(__file__).resolve().parent.parent / "assets" / "favicon.png"

# What the numbers mean, shown as each metric's help (the "?" next to its label).
FAITHFULNESS_HELP = (
    "f(C) = (m(C) − m(∅)) / (m(full) − m(∅)): the circuit's metric m(C), with every edge outside it ablated, "
    "normalised so that the empty circuit scores 0 and the full model 1. Undefined when m(full) = m(∅) "
    "(the corruption does not change the metric)."
)
CPR_HELP = ("CPR = ∫₀¹ f(k) dk: the area under the faithfulness curve over the fraction k of the graph kept "
            "(MIB's sizes, trapezoid rule). Higher is better; 1 = the top circuits recover the model at every size.")
CMD_HELP = ("CMD = ∫₀¹ |1 − f(k)| dk: the area between the faithfulness curve and 1 (MIB's sizes, trapezoid "
            "rule). Lower is better; 0 = every top circuit behaves exactly like the full model.")


def theme() -> str:
    """``light`` or ``dark``: the theme the user's browser shows (Streamlit follows the user's setting)."""
    kind = getattr(st.context.theme, "type", None)
    return kind if kind in THEMES else "light"


def show_graph(scores: Scores, circuit: Circuit, height: int = GRAPH_HEIGHT, max_edges: int = 600,
               style: GraphStyle = GraphStyle()) -> None:
    """The circuit as an interactive pyvis graph in an iframe (renders offline: no CDN), in the theme's
    colours, drawn as ``style`` says (its legend is in the picture)."""
    note = st.empty()  # always present, so that the elements below keep their places between reruns
    if circuit.n_edges > max_edges:
        note.caption(f"Drawing the {max_edges} edges with the largest |score| of {circuit.n_edges}.")
    page = pyvis_html(scores, circuit, height_px=height, max_edges=max_edges, theme=theme(), style=style)
    st.iframe(page, height=height, alt="circuit graph")
    st.caption("Bottom: `input`; top: `logits`; every node keeps its place whatever the circuit. Hover a node or an "
               "edge for its score; drag to pan, scroll or pinch to zoom.")


def sidebar_status() -> None:
    """The session's model, data and scores, in the current container (the app puts it in the sidebar)."""
    s = st.session_state
    st.markdown("**Session**")
    spec = s.get("model_spec")
    st.caption(f"Model: `{spec.name if spec else '-'}`")
    pairs = s.get("pairs")
    st.caption(f"Data: {s.get('data_label', '-')} ({len(pairs) if pairs is not None else 0} pairs), metric `{s.get('metric', '-')}`")
    runs = s.get("runs", {})
    more = f" (1 of {len(runs)} runs)" if len(runs) > 1 else ""
    st.caption(f"Scores: {s.get('scores_label', 'none yet')}{more}")


def run_picker(label: str = "Run") -> None:
    """A select box over the session's runs; picking one selects it (Explore and Export then show it).
    Draws nothing while the session has at most one run."""
    from ui import state

    s = st.session_state
    runs = s.get("runs", {})
    if len(runs) < 2 or s.get("scores_key") not in runs:
        return
    keys = list(runs)
    s["w_run"] = s.scores_key  # the widget follows the selection made elsewhere (a new run, an import)
    st.selectbox(label, keys, key="w_run", format_func=lambda k: runs[k]["label"],
                 on_change=lambda: state.select_run(s.w_run),
                 help="Every attribution of this session (and imported circuits); pick the one to explore")


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


def metric_row(values: dict[str, Any], helps: dict[str, str] | None = None, deltas: dict[str, str] | None = None) -> None:
    """One ``st.metric`` per item, side by side; ``helps`` gives some of them a definition, ``deltas`` a change."""
    helps, deltas = helps or {}, deltas or {}
    for col, (label, value) in zip(st.columns(len(values)), values.items()):
        col.metric(label, value, help=helps.get(label), delta=deltas.get(label))
