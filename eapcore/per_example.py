"""A circuit's metric and faithfulness for every prompt pair, and a bootstrap interval for the data set's.

Pair i's faithfulness is ``(m_i(C) − m_i(∅)) / (m_i(full) − m_i(∅))``, NaN where its clean and empty
metrics coincide (to 1e-6 relative: float rounding). The data set's faithfulness stays the ratio of means (MIB's definition), not the mean
of the pairs' values; its 95% interval resamples pairs with replacement (seeded) and recomputes the ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eapcore.circuit import Circuit
from eapcore.evaluate import CircuitEvaluator, normalized


@dataclass(frozen=True)
class PerExample:
    """``[n_examples]`` float64 tensors in the data's order: the metric under the circuit, on the clean
    and the corrupted run, under the empty circuit, and each pair's faithfulness. ``faithfulness`` is the
    data set's (ratio of means); ``interval`` its bootstrap (low, high), NaN where no resample defines it."""

    metric: torch.Tensor
    clean: torch.Tensor
    corrupted: torch.Tensor
    empty: torch.Tensor
    pair_faithfulness: torch.Tensor
    faithfulness: float
    interval: tuple[float, float]


def normalized_or_nan(m: torch.Tensor, clean: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """``(m − empty) / (clean − empty)`` elementwise; NaN where clean and empty coincide."""
    span = clean - empty
    same = span.abs() <= 1e-6 * torch.maximum(clean.abs(), empty.abs()).clamp_min(1.0)
    return torch.where(same, torch.nan, (m - empty) / span)


def bootstrap_interval(
    metric: torch.Tensor, clean: torch.Tensor, empty: torch.Tensor, n_resamples: int = 1000, level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of the ratio of means over ``n_resamples`` resamples of the pairs (``[n]`` each)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(metric)
    chunk = max(1, 2**22 // n)  # resamples drawn at once: at most 4M indices in memory
    values = []
    for start in range(0, n_resamples, chunk):
        idx = torch.randint(0, n, (min(chunk, n_resamples - start), n), generator=gen)
        values.append(normalized_or_nan(metric[idx].mean(1), clean[idx].mean(1), empty[idx].mean(1)))
    values = torch.cat(values)
    tail = (1 - level) / 2
    low, high = torch.nanquantile(values, torch.tensor([tail, 1 - tail], dtype=values.dtype)).tolist()
    return low, high


def per_example(
    evaluator: CircuitEvaluator, circuit: Circuit, n_resamples: int = 1000, level: float = 0.95, seed: int = 0,
) -> PerExample:
    """Evaluate ``circuit`` pair by pair (one evaluation of the circuit and one of the empty circuit)."""
    clean, corrupted = (t.double() for t in evaluator.example_baseline())
    metric = evaluator.evaluate(circuit).double()
    empty = evaluator.evaluate(Circuit.empty(evaluator.graph)).double()
    value = normalized(metric.mean().item(), clean.mean().item(), empty.mean().item())
    return PerExample(metric, clean, corrupted, empty, normalized_or_nan(metric, clean, empty), value,
                      bootstrap_interval(metric, clean, empty, n_resamples, level, seed))
