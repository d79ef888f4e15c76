"""Task metrics with one signature: ``fn(logits, batch, clean_logits) -> [batch]``.

``logits`` and ``clean_logits`` are the read-out logits ``[batch d_vocab]`` (each example's last real
token); ``clean_logits`` is the unpatched clean run's (for KL). Each metric knows whether higher is
better; attribution differentiates the loss (the metric signed so that lower is better). A
:class:`Metric` hands its function float32 logits when the model runs in half precision (float64 stays
float64): softmaxes, log-probability differences and means over answers are then not rounded to 8 or
11 bits (the logits are only ``[batch d_vocab]``, so the cast is cheap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from eapcore.data import Batch

MetricFn = Callable[[torch.Tensor, Batch, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class Metric:
    name: str
    fn: MetricFn
    higher_is_better: bool = True
    needs_clean_logits: bool = False

    def __call__(self, logits: torch.Tensor, batch: Batch, clean_logits: torch.Tensor | None = None) -> torch.Tensor:
        """``[batch]``, computed from float32 (or float64) logits."""
        return self.fn(_wide(logits), batch, None if clean_logits is None else _wide(clean_logits))

    def loss(self, logits: torch.Tensor, batch: Batch, clean_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Summed over the batch, signed so that lower is better."""
        value = self(logits, batch, clean_logits).sum()
        return -value if self.higher_is_better else value


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits as float32 (differentiable); float32 and float64 as they are."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _masked_mean(values: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    ids, mask = ids.to(values.device), mask.to(values.device)
    picked = values.gather(1, ids) * mask
    return picked.sum(1) / mask.sum(1)


def logit_diff(logits: torch.Tensor, batch: Batch, clean_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Mean logit of the correct answers minus mean logit of the incorrect ones."""
    return _masked_mean(logits, batch.correct, batch.correct_mask) - _masked_mean(
        logits, batch.incorrect, batch.incorrect_mask
    )


def prob_diff(logits: torch.Tensor, batch: Batch, clean_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Probability mass on the correct answers minus mass on the incorrect ones."""
    probs = logits.softmax(-1)
    mass = lambda ids, mask: (probs.gather(1, ids.to(probs.device)) * mask.to(probs.device)).sum(1)  # noqa: E731
    return mass(batch.correct, batch.correct_mask) - mass(batch.incorrect, batch.incorrect_mask)


def kl_div(logits: torch.Tensor, batch: Batch, clean_logits: torch.Tensor | None = None) -> torch.Tensor:
    """KL(clean || this run) at the read-out position; 0 for the clean run itself."""
    if clean_logits is None:
        raise ValueError("kl_div needs the clean run's logits")
    clean_logp = clean_logits.log_softmax(-1)
    return (clean_logp.exp() * (clean_logp - logits.log_softmax(-1))).sum(-1)


METRICS: dict[str, Metric] = {
    "logit_diff": Metric("logit_diff", logit_diff),
    "prob_diff": Metric("prob_diff", prob_diff),
    "kl_div": Metric("kl_div", kl_div, higher_is_better=False, needs_clean_logits=True),
}


def get_metric(metric: str | Metric | MetricFn) -> Metric:
    """A :class:`Metric` by name, as given, or wrapping a callable (higher is better)."""
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)} or pass a callable")
        return METRICS[metric]
    if callable(metric):
        return Metric(getattr(metric, "__name__", "custom"), metric)
    raise TypeError(f"metric must be a name, a Metric or a callable, got {type(metric).__name__}")


def readout(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``[batch pos d_vocab]`` -> ``[batch d_vocab]`` at each example's last real token."""
    return logits[torch.arange(logits.shape[0], device=logits.device), lengths.to(logits.device) - 1]
