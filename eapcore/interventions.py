"""What an ablated (out-of-circuit) edge carries: the corrupted run's output, zero, or a mean.

``patching``: each source's output on the corrupted prompt; ``zero``: 0; ``mean``: each source's
mean output over every non-pad position of a reference dataset; ``mean-positional``: the mean per
source and position (the reference prompts must all have one length). Each is a subclass of
:class:`Intervention` with its own :meth:`~Intervention.ablated`; :data:`INTERVENTIONS` lists their names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from eapcore.data import Batch, DataError, TokenizedPairs
from eapcore.graph import Graph
from eapcore.models import model_device, model_dtype
from eapcore.recording import new_buffer, source_outputs


class Intervention:
    """An intervention, with anything it needs (means) computed by :meth:`build`.

    ``corrupted_run``: what ablated sources carry is the corrupted run's own output, so a forward pass
    over the corrupted prompt records it (the attribution and evaluation passes use that run)."""

    name: ClassVar[str]
    corrupted_run: ClassVar[bool] = False

    @classmethod
    def build(cls, model: Any, graph: Graph, reference: TokenizedPairs | None, batch_size: int) -> "Intervention":
        return cls()

    def ablated(self, model: Any, graph: Graph, batch: Batch, window: slice | None = None) -> torch.Tensor:
        """What each source of ``window`` (default all) carries when ablated, ``[rows batch pos d_model]``
        (a fresh tensor)."""
        raise NotImplementedError


class Patching(Intervention):
    name = "patching"
    corrupted_run = True

    def ablated(self, model: Any, graph: Graph, batch: Batch, window: slice | None = None) -> torch.Tensor:
        return source_outputs(model, graph, batch, batch.corrupted, window)[0]


class Zero(Intervention):
    name = "zero"

    def ablated(self, model: Any, graph: Graph, batch: Batch, window: slice | None = None) -> torch.Tensor:
        return new_buffer(model, graph, batch, window).zero_()


@dataclass(frozen=True, eq=False)
class Mean(Intervention):
    """``means``: ``[n_forward d_model]``, over every real position of the reference's clean prompts."""

    means: torch.Tensor
    name: ClassVar[str] = "mean"
    positional: ClassVar[bool] = False

    @classmethod
    def build(cls, model: Any, graph: Graph, reference: TokenizedPairs | None, batch_size: int) -> "Intervention":
        if reference is None:
            raise ValueError(f"the {cls.name!r} intervention needs a reference dataset to average over")
        return cls(mean_outputs(model, graph, reference, cls.positional, batch_size))

    def ablated(self, model: Any, graph: Graph, batch: Batch, window: slice | None = None) -> torch.Tensor:
        out = new_buffer(model, graph, batch, window)
        out[:] = self.means[window or slice(0, graph.n_forward), None, None, :]
        return out


@dataclass(frozen=True, eq=False)
class MeanPositional(Mean):
    """``means``: ``[n_forward pos d_model]``, per position over the reference's clean prompts."""

    name: ClassVar[str] = "mean-positional"
    positional: ClassVar[bool] = True

    def ablated(self, model: Any, graph: Graph, batch: Batch, window: slice | None = None) -> torch.Tensor:
        if batch.n_pos > self.means.shape[1]:
            raise DataError(
                f"mean-positional ablation has means for {self.means.shape[1]} positions but the prompts have "
                f"{batch.n_pos}; use a reference dataset with prompts of length {batch.n_pos}, or 'mean'"
            )
        out = new_buffer(model, graph, batch, window)
        out[:] = self.means[window or slice(0, graph.n_forward), None, : batch.n_pos, :]
        return out


_KINDS: dict[str, type[Intervention]] = {k.name: k for k in (Patching, Zero, Mean, MeanPositional)}
INTERVENTIONS = tuple(_KINDS)


def make_intervention(
    kind: str, model: Any, graph: Graph, reference: TokenizedPairs | None, batch_size: int = 32
) -> Intervention:
    """Build ``kind``; the means come from the clean prompts of ``reference``."""
    if kind not in _KINDS:
        raise ValueError(f"unknown intervention {kind!r}; choose one of {', '.join(INTERVENTIONS)}")
    return _KINDS[kind].build(model, graph, reference, batch_size)


def mean_outputs(model: Any, graph: Graph, data: TokenizedPairs, positional: bool, batch_size: int) -> torch.Tensor:
    """Mean source outputs over the clean prompts' real (non-pad) positions, in the model's dtype. The sums
    are taken in float32 (float64 for a float64 model): in float16 a BOS "massive activation" of a few
    thousand summed over a batch passes 65504, and in bfloat16 a running total rounds later batches away."""
    lengths = data.data.lengths
    if positional and bool((lengths != lengths[0]).any()):
        raise DataError(
            f"mean-positional ablation needs reference prompts of one token length, but lengths range from "
            f"{int(lengths.min())} to {int(lengths.max())}; use 'mean' or prompts of equal length"
        )
    dtype = model_dtype(model)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    total = None
    for batch in data.batches(batch_size, model_device(model)):
        outs, _ = source_outputs(model, graph, batch, batch.clean)
        outs = outs.to(wide)
        real = (torch.arange(batch.n_pos, device=outs.device)[None, :] < batch.lengths[:, None]).to(wide)
        part = (outs * real[None, :, :, None]).sum(1) if positional else torch.einsum("fbpd,bp->fd", outs, real)
        total = part if total is None else total + part
    count = len(data) if positional else float(lengths.sum())
    return (total / count).to(dtype)
