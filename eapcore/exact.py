"""Exact effects of removing edges from the full graph: the ground truth that attribution estimates.

The effect of removing a set of edges is ``sign · (m(full − removed) − m(full))``, with ``m`` the mean
metric over the examples and ``sign = −1`` when higher is better: the change of the loss, in the metric's
units, positive when the removal hurts (the sign and units of attribution scores). A removed edge carries
what the evaluator's intervention gives it (the corrupted output under patching).

Removals are evaluated by :meth:`~eapcore.evaluate.CircuitEvaluator.without`: on the sparse engine several
at once, stacked along the batch, each computing only what lies after the input it changes
(:mod:`eapcore.removals`); on the hooked engine one circuit evaluation each.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from eapcore.circuit import Circuit
from eapcore.evaluate import CircuitEvaluator
from eapcore.removals import Removal


def loss_changes(
    evaluator: CircuitEvaluator, removals: Sequence[Removal], progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """``[len(removals)]`` float64: the effect of each removal (an edge ``(row, col)``, or all of a node's
    outgoing edges ``(row, None)``) from the full graph. ``progress(done, total)`` is called once per
    removal, in order, as they are evaluated; raise from it to stop."""
    sign = -1.0 if evaluator.metric.higher_is_better else 1.0
    base = evaluator.evaluate(Circuit.full(evaluator.graph)).double().mean().item()
    reported = 0

    def tick(done: int, total: int) -> None:  # removal × batch units -> removals
        nonlocal reported
        while progress is not None and reported < done * len(removals) // total:
            reported += 1
            progress(reported, len(removals))

    return sign * (evaluator.without(removals, tick).mean(1) - base)


def edge_effects(
    evaluator: CircuitEvaluator, edges: Sequence[tuple[int, int]], progress: Callable[[int, int], None] | None = None
) -> torch.Tensor:
    """``[len(edges)]`` float64: the effect of removing each edge ``(row, col)`` alone."""
    real = evaluator.graph.real_edge_mask
    for row, col in edges:
        if not bool(real[row, col]):
            raise ValueError(f"({row}, {col}) is not an edge of the graph: {evaluator.graph.edge_name(row, col)} runs "
                             "backwards in time")
    return loss_changes(evaluator, [(int(r), int(c)) for r, c in edges], progress)


def node_effects(
    evaluator: CircuitEvaluator, rows: Sequence[int] | None = None, progress: Callable[[int, int], None] | None = None
) -> torch.Tensor:
    """``[len(rows)]`` float64 (default: every source node): the effect of removing each node's outgoing edges."""
    rows = range(evaluator.graph.n_forward) if rows is None else rows
    return loss_changes(evaluator, [(int(r), None) for r in rows], progress)


def edge_scores(evaluator: CircuitEvaluator, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """``[n_forward n_backward]`` float64: every real edge's effect (0 elsewhere), the ``exact`` method's scores."""
    graph = evaluator.graph
    rows, cols = graph.real_edge_mask.nonzero(as_tuple=True)
    scores = torch.zeros(graph.n_forward, graph.n_backward, dtype=torch.float64)
    scores[rows, cols] = edge_effects(evaluator, list(zip(rows.tolist(), cols.tolist())), progress)
    return scores
