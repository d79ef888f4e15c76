"""How Explore draws its graph: the picked node (a searchable picker; ringed in the graph and drilled
into below it), nodes outside the circuit faded or hidden, edge labels. The same style draws the PNG.

Keys: ``node`` (the picked node or ``None``), ``graph_faded`` and ``edge_labels`` (bools); their widgets
are ``w_node``, ``w_graph_faded`` and ``w_edge_labels``.
"""

from __future__ import annotations

import streamlit as st

from eapcore.circuit import Circuit
from eapcore.graph import Graph
from ui import state
from ui.layout import GraphStyle


def style() -> GraphStyle:
    """The session's graph style (for the PNG as well as the page)."""
    s = st.session_state
    return GraphStyle(bool(s.get("graph_faded", False)), bool(s.get("edge_labels", False)), s.get("node"))


def pick(node: str | None) -> None:
    """Make ``node`` the picked one (the picker follows when it is next drawn)."""
    st.session_state.node = node
    st.session_state.pop("w_node", None)


def controls(graph: Graph, circuit: Circuit) -> GraphStyle:
    """The node picker and the drawing toggles, on one row; returns the style they set."""
    s = st.session_state
    if s.get("node") not in graph.node_names:
        s.node = None
    members = {graph.src_nodes[i] for i in circuit.nodes.nonzero().flatten().tolist()} | {"logits"}
    state.widget_value("w_node", "node")
    state.widget_value("w_graph_faded", "graph_faded")
    state.widget_value("w_edge_labels", "edge_labels")
    c1, c2, c3 = st.columns([3, 1.6, 1.2], vertical_alignment="bottom")
    c1.selectbox("Find a node", graph.node_names, key="w_node", index=None, placeholder="type a name: a1.h2, m0, input",
                 format_func=lambda n: n if n in members else f"{n} (outside the circuit)",
                 on_change=lambda: setattr(s, "node", s.w_node),
                 help="Rings the node in the graph and shows what it does below the graph")
    c2.toggle("Show nodes outside the circuit", key="w_graph_faded",
              on_change=lambda: setattr(s, "graph_faded", s.w_graph_faded),
              help="Faded, in their places; off: hidden (they keep their places, so nothing moves)")
    c3.toggle("Edge labels", key="w_edge_labels", on_change=lambda: setattr(s, "edge_labels", s.w_edge_labels),
              help="Write each edge's score on it")
    return style()
