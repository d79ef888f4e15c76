"""Choosing a circuit from scores: top-n, threshold, greedy growth from the logits, node-level top-n,
the top circuit at the scores' own level (:func:`top`), and pruning to the part that lies on
input-to-logits paths.

All functions return a new :class:`Circuit` and never mutate their inputs. Masks are
``[n_forward, n_backward]`` bool and only ever mark real edges.
"""

from __future__ import annotations

import heapq
from functools import lru_cache

import torch

from eapcore.circuit import Circuit, Scores
from eapcore.graph import Graph
from eapcore.schema import describe

EDGES, NODES = "edges", "nodes"


@lru_cache(maxsize=16)
def column_node(graph: Graph) -> torch.Tensor:
    """``[n_backward]`` long: the source row whose input each column is; ``n_forward`` for ``logits``."""
    col_node = torch.full((graph.n_backward,), graph.n_forward, dtype=torch.long)
    rows, cols = graph.forward_to_backward.nonzero(as_tuple=True)
    col_node[cols] = rows
    return col_node


def edges_to_nodes(circuit: Circuit) -> torch.Tensor:
    """``[n_forward]`` bool: source nodes with at least one in-circuit outgoing edge."""
    return circuit.edges.any(dim=1)


def _check_n(n: int, limit: int, what: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= limit:
        raise ValueError(
            f"n={n!r} is out of range: there are {limit} {what}; choose an integer 0 <= n <= {limit}"
        )


def _real_values(scores: Scores, absolute: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices ``[n_edges]`` of the real edges (row-major) and their ranking values; NaN ranks last."""
    graph = scores.graph
    flat_idx = graph.real_edge_mask.flatten().nonzero().squeeze(1)
    values = scores.edges.detach().float().cpu().flatten()[flat_idx]
    if absolute:
        values = values.abs()
    return flat_idx, torch.nan_to_num(values, nan=-torch.inf)


def _finish(graph: Graph, edges: torch.Tensor, do_prune: bool) -> Circuit:
    circuit = Circuit(graph, edges, edges.any(dim=1))
    return prune(circuit) if do_prune else circuit


def top_n(scores: Scores, n: int, absolute: bool = True, prune: bool = True) -> Circuit:
    """The ``n`` real edges with the largest score (``|score|`` when ``absolute``); ties go to the
    earlier edge in row-major order. Before pruning the circuit has exactly ``n`` edges."""
    graph = scores.graph
    _check_n(n, graph.n_edges, f"edges in the graph ({describe(graph.cfg)})")
    flat_idx, values = _real_values(scores, absolute)
    order = torch.sort(values, descending=True, stable=True).indices[:n]
    edges = torch.zeros(graph.n_forward * graph.n_backward, dtype=torch.bool)
    edges[flat_idx[order]] = True
    return _finish(graph, edges.view(graph.n_forward, graph.n_backward), prune)


def threshold(scores: Scores, t: float, absolute: bool = True, prune: bool = True) -> Circuit:
    """Real edges whose score (``|score|`` when ``absolute``) is ``>= t``; NaN scores are never kept."""
    graph = scores.graph
    values = scores.edges.detach().float().cpu()
    if absolute:
        values = values.abs()
    return _finish(graph, (values >= t) & graph.real_edge_mask, prune)


def greedy(scores: Scores, n: int, absolute: bool = True, prune: bool = True) -> Circuit:
    """Grow a circuit backwards from ``logits``: repeatedly add the best edge whose child node is
    already in; a newly reached parent makes its own incoming edges candidates. Every real edge is
    reachable this way, so any ``0 <= n <= n_edges`` gives exactly ``n`` edges before pruning."""
    graph = scores.graph
    _check_n(n, graph.n_edges, f"edges reachable from logits in the graph ({describe(graph.cfg)})")
    B = graph.n_backward
    flat_idx, values = _real_values(scores, absolute)
    flat_values = torch.full((graph.n_forward * B,), -torch.inf)
    flat_values[flat_idx] = values
    real, f2b = graph.real_edge_mask, graph.forward_to_backward

    heap: list[tuple[float, int]] = []

    def push_into(cols: torch.Tensor) -> None:
        rows, sub = real[:, cols].nonzero(as_tuple=True)
        cand = rows * B + cols[sub]
        for key, idx in zip((-flat_values[cand]).tolist(), cand.tolist()):
            heapq.heappush(heap, (key, idx))

    push_into(torch.tensor([graph.logits_column]))
    reached: set[int] = set()
    chosen: list[int] = []
    while len(chosen) < n:
        _, idx = heapq.heappop(heap)
        chosen.append(idx)
        parent = idx // B
        if parent not in reached:
            reached.add(parent)
            push_into(f2b[parent].nonzero().squeeze(1))
    edges = torch.zeros(graph.n_forward * B, dtype=torch.bool)
    edges[torch.tensor(chosen, dtype=torch.long)] = True
    return _finish(graph, edges.view(graph.n_forward, B), prune)


def by_nodes(scores: Scores, n: int, absolute: bool = True, prune: bool = True) -> Circuit:
    """Keep the ``n`` best-scored nodes of ``scores.nodes`` (``[n_forward]``; NaN = unscored, always
    kept) and every real edge between kept nodes (edges into ``logits`` are always allowed)."""
    graph = scores.graph
    if scores.nodes is None:
        raise ValueError(
            "by_nodes needs node scores, but scores.nodes is None; run node-level attribution "
            "or select edges with top_n/threshold/greedy"
        )
    node_scores = scores.nodes.detach().float().cpu()
    scored = ~node_scores.isnan()
    _check_n(n, int(scored.sum()), "scored (non-NaN) nodes")
    values = node_scores.abs() if absolute else node_scores
    values = values.masked_fill(~scored, -torch.inf)
    kept = ~scored
    kept[torch.sort(values, descending=True, stable=True).indices[:n]] = True
    kept_col = torch.cat([kept, kept.new_ones(1)])[column_node(graph)]
    edges = graph.real_edge_mask & kept[:, None] & kept_col[None, :]
    return _finish(graph, edges, prune)


def unit_of(scores: Scores) -> str:
    """What circuits of these scores are chosen by: ``edges`` for edge-level scores, ``nodes`` for node- or
    neuron-level ones (their edge scores are all zero)."""
    level = scores.provenance.get("level", "edge")
    return NODES if level in ("node", "neuron") and scores.nodes is not None else EDGES


def top(scores: Scores, n: int, absolute: bool = True, prune: bool = True) -> Circuit:
    """The top-``n`` circuit at the scores' level, pruned unless ``prune=False`` (the selection that hand
    edits apply to): ``n`` edges for edge-level scores (:func:`top_n`), ``n`` nodes for node- and
    neuron-level ones (:func:`by_nodes`)."""
    if unit_of(scores) == NODES:
        return by_nodes(scores, n, absolute=absolute, prune=prune)
    return top_n(scores, n, absolute=absolute, prune=prune)


def selection(scores: Scores, n: int, absolute: bool = True) -> dict:
    """How :func:`top` chose a circuit, as exported files record it."""
    how = "by_nodes" if unit_of(scores) == NODES else "top_n"
    return {"method": how, "n": n, "absolute": absolute, "pruned": True}


def _prune_edges(graph: Graph, edges: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    """Drop edges until every edge joins two live nodes; a live node has an outgoing edge and (unless
    it is ``input``) an incoming one. ``edges`` ``[n_forward, n_backward]``, ``nodes`` ``[n_forward]``.
    Works on the list of kept edges, so each round costs O(kept edges)."""
    F = graph.n_forward
    rows, cols = edges.nonzero(as_tuple=True)
    child = column_node(graph)[cols]  # F for logits
    while True:
        has_out = torch.zeros(F, dtype=torch.bool)
        has_out[rows] = True
        has_in = torch.zeros(F + 1, dtype=torch.bool)
        has_in[child] = True
        has_in[0] = has_in[F] = True  # input needs no parent; logits is always in
        live = torch.cat([nodes & has_out & has_in[:F], has_in[F:]])
        keep = live[rows] & live[child]
        if keep.all():
            break
        rows, cols, child = rows[keep], cols[keep], child[keep]
    pruned = torch.zeros_like(edges)
    pruned[rows, cols] = True
    return pruned


def prune(circuit: Circuit) -> Circuit:
    """Keep only nodes and edges on a path from ``input`` to ``logits``. Nodes excluded by
    ``circuit.nodes`` (or with no neuron in) lose their edges; the node mask is then derived from
    the edges: a source node is in iff it keeps an outgoing edge."""
    graph = circuit.graph
    nodes = circuit.nodes.cpu().clone()
    if circuit.neurons is not None:
        nodes &= circuit.neurons.cpu().any(dim=1)
    edges = _prune_edges(graph, circuit.edges.cpu() & graph.real_edge_mask, nodes)
    kept = edges.any(dim=1)
    neurons = None if circuit.neurons is None else circuit.neurons.cpu() & kept[:, None]
    return Circuit(graph, edges, kept, neurons)
