"""Exact effects of removing edges from the full graph: the ground truth that attribution estimates.

The effect of removing a set of edges is ``sign · (m(full − removed) − m(full))``, with ``m`` the mean
metric over the examples and ``sign = −1`` when higher is better: the change of the loss, in the metric's
units, positive when the removal hurts (the sign and units of attribution scores). A removed edge carries
what the evaluator's intervention gives it (the corrupted output under patching).

Each removal is one evaluation of a circuit through :class:`~eapcore.evaluate.CircuitEvaluator` (its node
by node path where the model allows), not one batched pass over several removals.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

from eapcore.circuit import Circuit
from eapcore.evaluate import CircuitEvaluator


def loss_changes(
    evaluator: CircuitEvaluator, removals: Iterable[torch.Tensor], total: int,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """``[total]`` float64: the effect of removing each of the ``total`` masks of ``removals`` (``[n_forward
    n_backward]`` bool, made one at a time) from the full graph. ``progress(done, total)`` is called after
    each removal; raise from it to stop."""
    graph = evaluator.graph
    sign = -1.0 if evaluator.metric.higher_is_better else 1.0
    full = Circuit.full(graph)
    base = evaluator.evaluate(full).double().mean().item()
    out = torch.zeros(total, dtype=torch.float64)
    for i, removed in enumerate(removals):
        kept = graph.real_edge_mask & ~removed.cpu()
        out[i] = sign * (evaluator.evaluate(Circuit(graph, kept, full.nodes)).double().mean().item() - base)
        if progress is not None:
            progress(i + 1, total)
    return out


def edge_effects(
    evaluator: CircuitEvaluator, edges: Sequence[tuple[int, int]], progress: Callable[[int, int], None] | None = None
) -> torch.Tensor:
    """``[len(edges)]`` float64: the effect of removing each edge ``(row, col)`` alone."""
    real = evaluator.graph.real_edge_mask

    def one(row: int, col: int) -> torch.Tensor:
        if not bool(real[row, col]):
            raise ValueError(f"({row}, {col}) is not an edge of the graph: {evaluator.graph.edge_name(row, col)} runs "
                             "backwards in time")
        mask = torch.zeros_like(real)
        mask[row, col] = True
        return mask

    return loss_changes(evaluator, (one(r, c) for r, c in edges), len(edges), progress)


def node_effects(
    evaluator: CircuitEvaluator, rows: Sequence[int] | None = None, progress: Callable[[int, int], None] | None = None
) -> torch.Tensor:
    """``[len(rows)]`` float64 (default: every source node): the effect of removing each node's outgoing edges."""
    graph = evaluator.graph
    rows = range(graph.n_forward) if rows is None else rows

    def outgoing(row: int) -> torch.Tensor:
        mask = torch.zeros_like(graph.real_edge_mask)
        mask[row] = graph.real_edge_mask[row]
        return mask

    return loss_changes(evaluator, (outgoing(r) for r in rows), len(rows), progress)


def edge_scores(evaluator: CircuitEvaluator, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """``[n_forward n_backward]`` float64: every real edge's effect (0 elsewhere), the ``exact`` method's scores."""
    graph = evaluator.graph
    rows, cols = graph.real_edge_mask.nonzero(as_tuple=True)
    scores = torch.zeros(graph.n_forward, graph.n_backward, dtype=torch.float64)
    scores[rows, cols] = edge_effects(evaluator, list(zip(rows.tolist(), cols.tolist())), progress)
    return scores
