"""What an ablated (out-of-circuit) edge carries: the corrupted run's output, zero, or a mean.

``patching``: each source's output on the corrupted prompt; ``zero``: 0; ``mean``: each source's
mean output over every non-pad position of a reference dataset; ``mean-positional``: the mean per
source and position (the reference prompts must all have one length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from eapcore.data import Batch, DataError, TokenizedPairs
from eapcore.graph import Graph
from eapcore.models import model_device, model_dtype
from eapcore.sites import source_major, sources

INTERVENTIONS = ("patching", "zero", "mean", "mean-positional")


def row_windows(graph: Graph, chunks: int) -> list[slice]:
    """Split the source rows into at most ``chunks`` contiguous windows of roughly equal size, cut at
    source-group boundaries (input, each attention layer, each MLP)."""
    starts = [s.rows.start for s in sources(graph)]
    if not 1 <= chunks <= len(starts):
        raise ValueError(f"chunks must be between 1 and {len(starts)} (the source groups of this model), got {chunks}")
    cuts = sorted({min(starts, key=lambda a: abs(a - k * graph.n_forward / chunks)) for k in range(chunks)})
    return [slice(a, b) for a, b in zip(cuts, cuts[1:] + [graph.n_forward])]


def recorders(
    graph: Graph, out: torch.Tensor, sign: float | None = None, window: slice | None = None
) -> list[tuple[str, Callable]]:
    """Forward hooks that write (``sign=None``) or add ``sign`` times each source's output into ``out``
    ``[rows batch pos d_model]``, which holds the source rows of ``window`` (default: all)."""
    window = window or slice(0, graph.n_forward)

    def make(rows: slice) -> Callable:
        local = slice(rows.start - window.start, rows.stop - window.start)

        def hook(t: torch.Tensor, hook: Any) -> None:
            value = source_major(t).to(out.device)  # a model split over devices writes to one buffer
            if sign is None:
                out[local] = value
            else:
                out[local] += sign * value
        return hook

    return [(s.hook, make(s.rows)) for s in sources(graph) if window.start <= s.rows.start and s.rows.stop <= window.stop]


def new_buffer(model: Any, graph: Graph, batch: Batch, window: slice | None = None) -> torch.Tensor:
    """An uninitialised ``[rows batch pos d_model]`` buffer (rows of ``window``, default all) in the
    model's dtype and device."""
    window = window or slice(0, graph.n_forward)
    B, P = batch.clean.shape
    shape = (window.stop - window.start, B, P, model.cfg.d_model)
    return torch.empty(shape, dtype=model_dtype(model), device=model_device(model))


def source_outputs(
    model: Any, graph: Graph, batch: Batch, tokens: torch.Tensor, window: slice | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sources' outputs on ``tokens`` (no gradient): ``([rows batch pos d_model], logits)``."""
    out = new_buffer(model, graph, batch, window)
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=recorders(graph, out, window=window))
    return out, logits


@dataclass(frozen=True, eq=False)
class Intervention:
    """An intervention with its means (``[n_forward d_model]`` or ``[n_forward pos d_model]``) computed."""

    kind: str = "patching"
    means: torch.Tensor | None = None

    def ablated(self, model: Any, graph: Graph, batch: Batch, window: slice | None = None) -> torch.Tensor:
        """What each source of ``window`` (default all) carries when ablated, ``[rows batch pos d_model]``
        (a fresh tensor)."""
        if self.kind == "patching":
            return source_outputs(model, graph, batch, batch.corrupted, window)[0]
        out = new_buffer(model, graph, batch, window)
        window = window or slice(0, graph.n_forward)
        if self.kind == "zero":
            return out.zero_()
        if self.kind == "mean":
            out[:] = self.means[window, None, None, :]
            return out
        if batch.n_pos > self.means.shape[1]:
            raise DataError(
                f"mean-positional ablation has means for {self.means.shape[1]} positions but the prompts have "
                f"{batch.n_pos}; use a reference dataset with prompts of length {batch.n_pos}, or 'mean'"
            )
        out[:] = self.means[window, None, : batch.n_pos, :]
        return out


def make_intervention(
    kind: str, model: Any, graph: Graph, reference: TokenizedPairs | None, batch_size: int = 32
) -> Intervention:
    """Build ``kind``; the means come from the clean prompts of ``reference``."""
    if kind not in INTERVENTIONS:
        raise ValueError(f"unknown intervention {kind!r}; choose one of {', '.join(INTERVENTIONS)}")
    if kind in ("patching", "zero"):
        return Intervention(kind)
    if reference is None:
        raise ValueError(f"the {kind!r} intervention needs a reference dataset to average over")
    return Intervention(kind, mean_outputs(model, graph, reference, kind == "mean-positional", batch_size))


def mean_outputs(model: Any, graph: Graph, data: TokenizedPairs, positional: bool, batch_size: int) -> torch.Tensor:
    """Mean source outputs over the clean prompts' real (non-pad) positions."""
    lengths = data.data.lengths
    if positional and bool((lengths != lengths[0]).any()):
        raise DataError(
            f"mean-positional ablation needs reference prompts of one token length, but lengths range from "
            f"{int(lengths.min())} to {int(lengths.max())}; use 'mean' or prompts of equal length"
        )
    total = None
    for batch in data.batches(batch_size, model_device(model)):
        outs, _ = source_outputs(model, graph, batch, batch.clean)
        real = (torch.arange(batch.n_pos, device=outs.device)[None, :] < batch.lengths[:, None]).to(outs.dtype)
        part = (outs * real[None, :, :, None]).sum(1) if positional else torch.einsum("fbpd,bp->fd", outs, real)
        total = part if total is None else total + part
    count = len(data) if positional else float(lengths.sum())
    return total / count
