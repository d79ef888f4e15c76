"""Circuit sizes: how many units a circuit of these scores can hold, the size the explorer opens with,
the slider's grid of sizes and the curve's finer grid.

Edge-level scores choose circuits by edge; node- and neuron-level scores choose them by node
(:func:`eapcore.select.unit_of`), so their sizes count nodes: the graph's source nodes that have a score
(``input``, heads, MLPs; ``logits`` is always in and never counted).
"""

from __future__ import annotations

import math

from eapcore.circuit import Scores
from eapcore.curve import fine_percents, size_for_percent
from eapcore.select import EDGES, NODES, unit_of


def unit_count(scores: Scores) -> int:
    """How many edges (or scored nodes) a circuit of these scores can hold."""
    if unit_of(scores) == NODES:
        return int((~scores.nodes.isnan()).sum())
    return scores.graph.n_edges


def default_size(scores: Scores) -> int:
    """The size the explorer opens with: 5% of the edges (at least 20), or 20% of the nodes (at least 3)."""
    total = unit_count(scores)
    if unit_of(scores) == NODES:
        return min(total, max(round(total * 0.2), 3))
    return min(total, max(round(total * 0.05), 20))


def log_grid(n_max: int, n_points: int = 120, dense_until: int = 300) -> list[int]:
    """Slider positions ``0..n_max``: every integer for small graphs, else a log-spaced set of integers
    (always including 0, 1 and ``n_max``)."""
    if n_max <= dense_until:
        return list(range(n_max + 1))
    values = {0, 1, n_max}
    for i in range(n_points):
        values.add(int(round(math.exp(math.log(n_max) * i / (n_points - 1)))))
    return sorted(v for v in values if 0 <= v <= n_max)


def sizes_for_percents(scores: Scores, percents: tuple[float, ...]) -> list[int]:
    """Circuit sizes (edges, or nodes) for percentages of the graph, as MIB counts them."""
    return [size_for_percent(unit_count(scores), p) for p in percents]


def fine_grid(scores: Scores) -> tuple[tuple[float, ...], list[int]]:
    """(percents, sizes) of the curve's finer grid: log-spaced percentages for edges; for nodes every
    whole node count (a percentage grid would repeat the same few sizes), on a log grid past 300."""
    if unit_of(scores) == EDGES:
        percents = fine_percents()
        return percents, sizes_for_percents(scores, percents)
    total = unit_count(scores)
    sizes = [n for n in log_grid(total) if n > 0]
    return tuple(100 * n / total for n in sizes), sizes
