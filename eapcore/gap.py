"""The gap that faithfulness divides by, and when it is too small to mean anything.

Faithfulness is (m(C) − m(∅)) / (m(full) − m(∅)). When the clean run and the empty circuit (or the
corrupted run) give (nearly) the same metric, the corruption does not change the model's behaviour on
the data, and every faithfulness, CPR and CMD is a ratio of rounding noise.
"""

from __future__ import annotations

# Gaps at or below max(ABS, REL x the larger |metric|) are "no gap": faithfulness is undefined.
ABS, REL = 1e-6, 1e-4
# Gaps below this fraction of the larger |metric| are worth a warning before anything is run.
WARN_REL = 0.01


def no_gap(full: float, empty: float) -> bool:
    """Whether ``full`` and ``empty`` coincide up to rounding, leaving faithfulness undefined."""
    return abs(full - empty) <= max(ABS, REL * max(abs(full), abs(empty)))


def faithfulness(value: float, full: float, empty: float) -> float | None:
    """(value − empty) / (full − empty), or ``None`` when the gap is no gap."""
    if no_gap(full, empty):
        return None
    return (value - empty) / (full - empty)


def gap_warning(clean: float, corrupted: float, metric: str) -> str | None:
    """A sentence for a data set whose clean and corrupted metrics (nearly) coincide, else ``None``."""
    gap = clean - corrupted
    scale = max(abs(clean), abs(corrupted))
    if not no_gap(clean, corrupted) and abs(gap) >= WARN_REL * scale:
        return None
    share = f" ({abs(gap) / scale:.2%} of {scale:.4g})" if scale > 0 else ""
    return (f"The clean and corrupted prompts give almost the same {metric}: they differ by {gap:.3g}{share}. "
            "Faithfulness divides by this gap, so every faithfulness, CPR and CMD on this data would be noise "
            "(shown as undefined when the gap vanishes). Check that the corrupted prompts change the answer.")
