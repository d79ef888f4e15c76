"""Hand edits of the current circuit on Explore: force-include or exclude edges and nodes
(:mod:`eapcore.edits`), and the edits an imported circuit file recorded.

Key: ``edits`` (:class:`~eapcore.edits.Edits`, checked against the graph before it is stored); widgets
``w_edit_include`` and ``w_edit_exclude``; ``edit_error`` holds a refused edit's message for one run.
"""

from __future__ import annotations

from functools import partial

import streamlit as st
import torch

from eapcore.circuit import Circuit, Scores
from eapcore.edits import Edits, apply_edits, from_provenance
from eapcore.graph import Graph
from eapcore.names import edge_names
from eapcore.select import NODES, top, unit_of
from ui import cache, state

ALL_EDGES_UP_TO = 5000  # larger graphs offer the circuit's edges and those of the picked node (any name can be typed)
HOW = ("Edits apply to the top circuit before pruning: an included edge is added; an included node is wired to "
       "`input`, `logits` and the circuit's nodes; an excluded edge is removed; an excluded node loses all its "
       "edges. The circuit is then pruned as usual.")


def options(graph: Graph, circuit: Circuit, picked: str | None, chosen: Edits) -> list[str]:
    """What the edit pickers offer: every source node, then the graph's edges (for a large graph, the
    circuit's edges and the picked node's), and whatever is chosen now."""
    names = [n for n in graph.node_names if n != "logits"]
    if graph.n_edges <= ALL_EDGES_UP_TO:
        edges = edge_names(graph)
    else:
        touching = circuit.edges.clone()
        if picked in graph.src_index:
            touching[graph.src_index[picked]] = True
        cols = [c for c, n in enumerate(graph.dst_node_of_column) if n == picked]
        touching[:, cols] = True
        rows, cols = (touching & graph.real_edge_mask).nonzero(as_tuple=True)
        edges = [graph.edge_name(r, c) for r, c in zip(rows.tolist(), cols.tolist())]
    return list(dict.fromkeys(names + edges + list(chosen.include) + list(chosen.exclude)))


def _apply(graph: Graph) -> None:
    """``on_change`` of either picker: store the edits if they are valid, else keep the old ones and say why."""
    s = st.session_state
    try:
        new = Edits(tuple(s.w_edit_include), tuple(s.w_edit_exclude))
        new.check(graph)
    except ValueError as e:
        s.edit_error = f"Edit not applied: {e}"
        old = s.get("edits") or Edits()
        s.w_edit_include, s.w_edit_exclude = list(old.include), list(old.exclude)
        return
    s.edits = new


def set_edits(edits: Edits) -> None:
    """Replace the session's edits (the pickers follow when they are next drawn)."""
    st.session_state.edits = edits
    for key in ("w_edit_include", "w_edit_exclude"):
        st.session_state.pop(key, None)


def editor(graph: Graph, circuit: Circuit, picked: str | None) -> None:
    """Two searchable multiselects (force include, exclude) and a button that clears them."""
    s = st.session_state
    chosen = s.get("edits") or Edits()
    names = options(graph, circuit, picked, chosen)
    s.setdefault("w_edit_include", list(chosen.include))
    s.setdefault("w_edit_exclude", list(chosen.exclude))
    c1, c2 = st.columns(2)
    kwargs = dict(options=names, on_change=partial(_apply, graph), accept_new_options=True, select_all=False)
    c1.multiselect("Force include (edges or nodes)", key="w_edit_include", placeholder="e.g. a1.h2 or input->a1.h2<q>",
                   help="Type to search; names as in the .json circuit format", **kwargs)
    c2.multiselect("Exclude (edges or nodes)", key="w_edit_exclude", placeholder="e.g. m0 or a0.h1->logits",
                   help="Excluding a node removes every edge into and out of it", **kwargs)
    if s.get("edit_error"):
        st.error(s.pop("edit_error"), icon=":material/error:")
    st.caption(HOW)
    if chosen and st.button("Clear the edits", icon=":material/undo:", key="clear_edits"):
        set_edits(Edits())
        st.rerun()


def explore_imported(scores: Scores, circuit: Circuit, key: str, name: str) -> None:
    """Select an imported circuit file's scores for Explore. A file that recorded edits on a top-n selection
    comes back live (that size, ranking and edits: the same circuit, still editable); any other is shown
    as it was saved (pinned, no edits) until the size is changed."""
    again = rederive(scores, circuit)
    if again is not None:
        n, absolute, changes = again
        state.set_scores(scores, key, f"imported {name}", n)
        st.session_state.absolute = absolute
        st.session_state.pop("w_absolute", None)
        set_edits(changes)
        return
    size = circuit.n_nodes if unit_of(scores) == NODES else circuit.n_edges
    state.set_scores(scores, key, f"imported {name}", size, pinned={"circuit": circuit, "name": name})
    set_edits(Edits())


def rederive(scores: Scores, circuit: Circuit) -> tuple[int, bool, Edits] | None:
    """``(size, absolute, edits)`` that make ``circuit`` again from ``scores`` when the file recorded a
    top-n selection and edits (so Explore shows it as a live, editable circuit); ``None`` otherwise.
    Raises ``ValueError`` when the recorded edits do not fit the graph."""
    edits = from_provenance(scores.provenance, scores.graph)
    how = scores.provenance.get("selection")
    if not edits or not isinstance(how, dict) or how.get("method") not in ("top_n", "by_nodes"):
        return None
    n, absolute = how.get("n"), how.get("absolute", True)
    if isinstance(n, bool) or not isinstance(n, int) or not isinstance(absolute, bool):
        return None
    try:
        again = apply_edits(top(scores, n, absolute, prune=False), edits).circuit
    except ValueError:
        return None
    return (n, absolute, edits) if torch.equal(again.edges.cpu(), circuit.edges.cpu()) else None


def summary(now: cache.Evaluation, before: cache.Evaluation, dropped: tuple[str, ...]) -> str:
    """One line on what the edits changed against the unedited top circuit."""
    def faith(e: cache.Evaluation) -> str:
        return "undefined" if e.faithfulness is None else f"{e.faithfulness:.4f}"

    edges, nodes = now.circuit.n_edges - before.circuit.n_edges, now.circuit.n_nodes - before.circuit.n_nodes
    line = (f"Edited: {edges:+,} edges, {nodes:+} nodes against the unedited top circuit (faithfulness "
            f"{faith(before)} → {faith(now)}).")
    if dropped:
        line += f" Included but pruned away (no path from input to logits): {', '.join(dropped[:8])}."
    return line


def delta(now: cache.Evaluation, before: cache.Evaluation) -> dict[str, str]:
    """The faithfulness change that Explore's metric row shows under the edited circuit's."""
    if now.faithfulness is None or before.faithfulness is None:
        return {}
    return {"Faithfulness": f"{now.faithfulness - before.faithfulness:+.4f} vs unedited"}
