"""Comparing K attribution runs (score sets) on one graph and one data set.

For each run: its faithfulness curve at the MIB sizes (pruned top-n circuits, :mod:`eapcore.curve`) with
CPR and CMD (linear axis). For each pair of runs: the overlap of the circuits at each size (intersection
over union of their edges; 1 when both are empty), Spearman's correlation of the edges' ranking values
over all real edges, and the edges whose ranks differ most. Ranking values are what :func:`~eapcore.select.top_n` ranks by: ``|score|``
when ``absolute`` (else the score), NaN last.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Callable, Mapping, Sequence

import torch

from eapcore.circuit import Scores
from eapcore.correlation import ranks, spearman
from eapcore.curve import MIB_PERCENTS, Curve, curve_circuits, curve_metrics, edges_for_percent
from eapcore.evaluate import CircuitEvaluator
from eapcore.schema import describe, fits

Pair = tuple[str, str]


@dataclass(frozen=True)
class Disagreement:
    """An edge and its rank in each of two runs (1 = ranked first; ties share their average rank)."""

    edge: str
    rank_a: float
    rank_b: float
    score_a: float
    score_b: float


@dataclass(frozen=True)
class Comparison:
    """``curves``, keyed by run label; ``overlap`` (one value per size), ``spearman`` and
    ``disagreements`` (largest rank difference first), keyed by pairs of labels in the order given."""

    labels: tuple[str, ...]
    percents: tuple[float, ...]
    sizes: tuple[int, ...]
    curves: dict[str, Curve]
    overlap: dict[Pair, tuple[float, ...]]
    spearman: dict[Pair, float]
    disagreements: dict[Pair, tuple[Disagreement, ...]]


def check_comparable(runs: Mapping[str, Scores]) -> None:
    """Refuse runs made for different graphs or on different prompt pairs (by the data fingerprint in
    their provenance, where both have one); the message names both runs."""
    if not runs:
        raise ValueError("nothing to compare: give at least one run")
    for (a, sa), (b, sb) in combinations(runs.items(), 2):
        if not fits(sa.graph.cfg, sb.graph.cfg):
            raise ValueError(
                f"runs {a} and {b} are for different graphs ({describe(sa.graph.cfg)} and {describe(sb.graph.cfg)}); "
                "compare runs made on one model"
            )
        da, db = sa.provenance.get("data"), sb.provenance.get("data")
        if da and db and da != db:
            raise ValueError(
                f"runs {a} and {b} were attributed on different data (fingerprints {da} and {db}); compare runs "
                "made on the same prompt pairs"
            )


def ranking_values(scores: Scores, absolute: bool = True) -> torch.Tensor:
    """``[n_edges]`` float32: each real edge's ranking value (row-major order), NaN as −inf."""
    values = scores.edges.detach().float().cpu()[scores.graph.real_edge_mask]
    return torch.nan_to_num(values.abs() if absolute else values, nan=-torch.inf)


def disagreements(a: Scores, b: Scores, n: int = 10, absolute: bool = True) -> tuple[Disagreement, ...]:
    """The ``n`` edges whose ranks in ``a`` and ``b`` differ most (ties: the better-ranked edge first)."""
    graph = a.graph
    va, vb = ranking_values(a, absolute), ranking_values(b, absolute)
    ra, rb = len(va) + 1 - ranks(va), len(vb) + 1 - ranks(vb)  # 1 = first
    order = torch.argsort(torch.minimum(ra, rb), stable=True)
    order = order[torch.argsort((ra - rb).abs()[order], descending=True, stable=True)][:n]
    rows, cols = graph.real_edge_mask.nonzero(as_tuple=True)
    sa, sb = a.edges.detach().cpu()[rows, cols], b.edges.detach().cpu()[rows, cols]
    return tuple(
        Disagreement(graph.edge_name(int(rows[i]), int(cols[i])), float(ra[i]), float(rb[i]), float(sa[i]), float(sb[i]))
        for i in order.tolist()
    )


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Intersection over union of two bool masks; 1 when both are empty."""
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def compare(
    evaluator: CircuitEvaluator, runs: Mapping[str, Scores], percents: Sequence[float] = MIB_PERCENTS,
    absolute: bool = True, n_disagreements: int = 10, progress: Callable[[int, int], None] | None = None,
) -> Comparison:
    """Compare ``runs`` (label -> scores) on ``evaluator``'s model and data; circuits that several runs share
    are evaluated once. ``progress(done, total)`` is called after each curve point (``len(runs) ×
    len(percents)``); raise from it to stop."""
    check_comparable(runs)
    for label, scores in runs.items():
        if scores.graph != evaluator.graph:
            raise ValueError(f"run {label} is for {describe(scores.graph.cfg)} but the model has "
                             f"{describe(evaluator.graph.cfg)}; load the model the run was made for")
    labels, n = tuple(runs), len(percents)
    kept = {label: curve_circuits(runs[label], percents, absolute) for label in labels}
    metrics = curve_metrics(evaluator, [c for label in labels for c in kept[label]], progress)
    sizes = tuple(edges_for_percent(evaluator.graph, p) for p in percents)
    clean, empty = evaluator.baseline().clean, evaluator.empty_metric()
    curves = {label: Curve.of_metrics(percents, sizes, metrics[i * n:(i + 1) * n], clean, empty, absolute)
              for i, label in enumerate(labels)}
    pairs = list(combinations(labels, 2))
    return Comparison(
        labels, tuple(percents), sizes, curves,
        {(a, b): tuple(iou(x.edges, y.edges) for x, y in zip(kept[a], kept[b])) for a, b in pairs},
        {(a, b): spearman(ranking_values(runs[a], absolute), ranking_values(runs[b], absolute)) for a, b in pairs},
        {(a, b): disagreements(runs[a], runs[b], n_disagreements, absolute) for a, b in pairs},
    )
