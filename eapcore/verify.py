"""Checking a run's estimates against exact patching, and the circuit's complement.

For the top-k edges of a run (by ``|score|``, as :func:`~eapcore.select.top_n` ranks them), the exact
effect of removing each edge alone from the full graph (:mod:`eapcore.exact`: the loss change, in the
units and sign of the scores) next to its score; how well the two agree; and the faithfulness of the
circuit's complement (every real edge not in the circuit), which is near 0 when the circuit holds
everything the task needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from eapcore import exact
from eapcore.circuit import Circuit, Scores
from eapcore.correlation import pearson, spearman
from eapcore.evaluate import CircuitEvaluator
from eapcore.select import top_n


@dataclass(frozen=True)
class EdgeCheck:
    edge: str  # "a0.h1->a2.h3<q>"
    estimate: float  # the run's score
    exact: float  # the loss change when the edge alone is removed


@dataclass(frozen=True)
class Verification:
    """``edges`` in the run's ranking order; ``note`` says when k was clamped to the graph's size."""

    k: int
    edges: tuple[EdgeCheck, ...]
    pearson: float
    spearman: float
    sign_agreement: float  # fraction of edges whose estimate and exact effect have the same sign (0 matches 0 only)
    complement_faithfulness: float
    note: str | None = None

    def worst(self, n: int = 5) -> tuple[EdgeCheck, ...]:
        """The ``n`` edges with the largest |estimate − exact|, worst first."""
        return tuple(sorted(self.edges, key=lambda e: -abs(e.estimate - e.exact))[:n])


def complement(circuit: Circuit) -> Circuit:
    """Every real edge not in ``circuit`` (all nodes kept)."""
    graph = circuit.graph
    return Circuit(graph, graph.real_edge_mask & ~circuit.edges.cpu(), torch.ones(graph.n_forward, dtype=torch.bool))


def check_top_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top-k must be a positive integer, got {k!r}; e.g. 50")


def verify(
    evaluator: CircuitEvaluator, scores: Scores, k: int, circuit: Circuit | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Verification:
    """Verify the top-``k`` edges of ``scores`` (``k`` beyond the graph's edges is clamped, with a note).
    The complement is that of ``circuit`` (default: the top-k circuit, pruned). ``progress(done, total)``
    is called after each of the k removals and the complement's evaluation; raise from it to stop."""
    graph = evaluator.graph
    check_top_k(k)
    note = None
    if k > graph.n_edges:
        note = f"top-k {k} is more than the graph's {graph.n_edges} edges; verified all {graph.n_edges}"
        k = graph.n_edges
    chosen = top_n(scores, k, prune=False).edges
    order = torch.argsort(scores.edges.detach().float().cpu()[chosen].abs().nan_to_num(nan=-torch.inf),
                          descending=True, stable=True)
    rows, cols = (t[order].tolist() for t in chosen.nonzero(as_tuple=True))
    tick = None if progress is None else (lambda done, _: progress(done, k + 1))
    effects = exact.edge_effects(evaluator, list(zip(rows, cols)), tick)
    estimates = scores.edges.detach().cpu().double()[rows, cols]
    rest = evaluator.faithfulness(complement(top_n(scores, k) if circuit is None else circuit))
    if progress is not None:
        progress(k + 1, k + 1)
    return Verification(
        k,
        tuple(EdgeCheck(graph.edge_name(r, c), float(e), float(x)) for r, c, e, x in zip(rows, cols, estimates, effects)),
        pearson(estimates, effects),
        spearman(estimates, effects),
        float((estimates.sign() == effects.sign()).double().mean()),
        rest,
        note,
    )
