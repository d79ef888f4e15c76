"""Pearson and Spearman correlation of two score vectors, and ranks with ties averaged.

NaN where a correlation is undefined (fewer than two values, or one side constant).
"""

from __future__ import annotations

import torch


def ranks(values: torch.Tensor) -> torch.Tensor:
    """``[n]`` float64 ranks of ``values`` ``[n]``, 1 for the smallest; tied values share their average rank."""
    order = torch.argsort(values, stable=True)
    _, group, counts = torch.unique_consecutive(values[order], return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # 1-based rank of each group's last member
    out = torch.empty(len(values), dtype=torch.float64)
    out[order] = (last - (counts - 1) / 2)[group]
    return out


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson's r of two ``[n]`` vectors, in float64."""
    a, b = a.double().flatten(), b.double().flatten()
    if len(a) != len(b):
        raise ValueError(f"correlation needs vectors of one length, got {len(a)} and {len(b)}")
    if len(a) < 2:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    scale = float(a.norm() * b.norm())
    return float((a @ b) / scale) if scale > 0 else float("nan")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation: Pearson's r of the ranks (ties averaged)."""
    return pearson(ranks(a.flatten()), ranks(b.flatten()))
