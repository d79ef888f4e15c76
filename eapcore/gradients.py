"""The split attribution backend: gradient passes shared by the gradient-based methods.

Each pass runs the clean prompt with one part of the model interpolated between its ablated and its
clean value, backpropagates the loss, and turns every gradient it needs into scores with one matrix
product: edges ``[n_forward n_backward]`` from gradients at destination inputs, or neurons
``[n_forward d_model]`` from gradients at the sources' own outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from eapcore.data import Batch
from eapcore.graph import Graph
from eapcore.metrics import Metric, readout
from eapcore.recording import token_embeddings
from eapcore.sites import Destination, Source, destinations, per_column, source_major, sources, stream_hook


@dataclass(frozen=True)
class Delta:
    """Δ = ``delta`` = ablated − clean source outputs for the source rows ``[start, start + len(values))``;
    ``values``: ``[rows batch pos d_model]``."""

    start: int
    values: torch.Tensor

    @property
    def stop(self) -> int:
        return self.start + self.values.shape[0]

    def clip(self, rows: slice) -> slice:
        """``rows`` restricted to this window (possibly empty)."""
        return slice(max(rows.start, self.start), max(min(rows.stop, self.stop), max(rows.start, self.start)))

    def take(self, rows: slice) -> torch.Tensor:
        return self.values[rows.start - self.start : rows.stop - self.start]


@dataclass
class Accumulator:
    """Where scores are summed: ``edges`` ``[n_forward n_backward]`` or ``neurons`` ``[n_forward d_model]``."""

    graph: Graph
    level: str
    edges: torch.Tensor
    neurons: torch.Tensor

    def add_edges(self, dst: Destination, rows: slice, delta: Delta, grad: torch.Tensor, weight: float) -> None:
        """scores[rows, dst.cols] += Σ_{batch,pos,d} Δ[rows] · grad, for the rows ``dst`` reads and
        ``delta`` holds."""
        rows = delta.clip(slice(rows.start, min(rows.stop, dst.n_sources)))
        n = rows.stop - rows.start
        if n <= 0:
            return
        g = per_column(grad).to(delta.values)  # a gradient summed in float32 meets Δ in the model's dtype
        g = g.permute(0, 1, 3, 2).reshape(-1, g.shape[2])
        block = delta.take(rows).reshape(n, -1) @ g
        self.edges[rows, dst.cols] += block.to(self.edges) * weight

    def add_neurons(self, rows: slice, delta: Delta, grad: torch.Tensor, weight: float) -> None:
        """neurons[rows] += Σ_{batch,pos} Δ[rows] ⊙ grad; ``grad`` ``[batch pos (rows) d_model]`` (one gradient
        for all of ``rows`` when it has no rows dimension)."""
        g = source_major(grad).to(delta.values)
        self.neurons[rows] += (delta.take(rows) * g).sum((1, 2), dtype=self.neurons.dtype) * weight


def on_grad(t: torch.Tensor, fn: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """A copy of ``t`` whose gradient is handed to ``fn``. The copy matters at ``hook_mlp_in``, where
    the bridge hands over the residual stream itself, which also flows past the MLP."""
    if not t.requires_grad:
        return t
    t = t.clone()
    t.register_hook(fn)
    return t


def gradient_pass(
    model: Any,
    graph: Graph,
    batch: Batch,
    metric: Metric,
    clean_readout: torch.Tensor | None,
    interpolate: tuple[str, Callable],
    on_destination: Callable[[Destination, torch.Tensor], None] | None,
    on_source: Callable[[Source, torch.Tensor], None] | None,
    window: slice,
    where: str,
) -> None:
    """One forward/backward of the clean prompt with ``interpolate`` = (hook, fn) applied; gradients at
    destination inputs go to ``on_destination``, at source outputs to ``on_source``."""
    hooks = [interpolate]
    if on_destination is not None:  # only destinations that read a source of the window
        for d in destinations(graph):
            if d.n_sources > window.start:
                hooks.append((d.hook, lambda t, hook, d=d: on_grad(t, lambda g: on_destination(d, g))))
    if on_source is not None:  # where the outputs join the stream (for post-normed heads, their normalized sum)
        for s in sources(graph):
            if window.start <= s.rows.start < window.stop:
                hooks.append((stream_hook(model, s), lambda t, hook, s=s: on_grad(t, lambda g: on_source(s, g))))
    hooked_backward(model, batch, metric, clean_readout, hooks, where)


def hooked_backward(
    model: Any, batch: Batch, metric: Metric, clean_readout: torch.Tensor | None,
    hooks: list[tuple[str, Callable]], where: str, is_clean_run: bool = False,
) -> torch.Tensor:
    """Forward the clean prompt with ``hooks``, then backpropagate the loss (refusing a non-finite one).
    Returns the read-out ``[batch d_vocab]`` (detached); ``is_clean_run``: this pass is the clean run, so
    its own read-out is the clean one."""
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(batch.clean)
        this = readout(logits, batch.lengths)
        loss = metric.loss(this, batch, this.detach() if is_clean_run else clean_readout)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"metric {metric.name!r} returned {loss.item()} in {where}; check the metric for divisions by "
                "zero or logs of zero, and the model dtype (try float32)"
            )
        if loss.requires_grad:
            loss.backward()
    return this.detach()


def input_interpolation(
    model: Any, batch: Batch, metric: Metric, delta: Delta, clean_readout: torch.Tensor | None,
    alphas: list[float], acc: Accumulator, tick: Callable[[], None], where: str,
) -> None:
    """Gradients at token embeddings e_corr + α (e_clean − e_corr), averaged over ``alphas``."""
    corrupted_embed = token_embeddings(model, acc.graph, batch, batch.corrupted)
    embed_diff = token_embeddings(model, acc.graph, batch, batch.clean) - corrupted_embed
    weight = 1.0 / len(alphas)
    window = slice(delta.start, delta.stop)
    for step, alpha in enumerate(alphas):
        def interpolate(t: torch.Tensor, hook: Any, alpha: float = alpha) -> torch.Tensor:
            return (corrupted_embed + alpha * embed_diff).requires_grad_(True)

        gradient_pass(
            model, acc.graph, batch, metric, clean_readout, ("hook_embed", interpolate),
            (lambda d, g: acc.add_edges(d, window, delta, g, weight)) if acc.level == "edge" else None,
            (lambda s, g: acc.add_neurons(s.rows, delta, g, weight)) if acc.level != "edge" else None,
            window,
            f"{where}, gradient step {step + 1} of {len(alphas)}",
        )
        tick()


def activation_interpolation(
    model: Any, batch: Batch, metric: Metric, delta: Delta, clean_readout: torch.Tensor | None,
    steps: int, acc: Accumulator, tick: Callable[[], None], where: str,
) -> None:
    """For each source group (input, each attention layer, each MLP) in turn, its output set to
    α·clean + (1 − α)·ablated for α = k/steps, k = 1..steps, where it joins the residual stream
    (:func:`eapcore.sites.stream_hook`); the group's own edges (or neurons) take the mean gradient along
    its path."""
    weight = 1.0 / steps
    for group in sources(acc.graph):
        rows = group.rows
        if not delta.start <= rows.start < delta.stop:
            continue  # another window's group
        shift = delta.take(rows)  # [rows batch pos d_model]: ablated − clean
        for k in range(1, steps + 1):
            alpha = k / steps

            def interpolate(t: torch.Tensor, hook: Any, alpha: float = alpha) -> torch.Tensor:
                moved = (shift.permute(1, 2, 0, 3) if t.dim() == 4 else shift.sum(0)).to(t.device)  # per row, or summed
                out = (t + (1 - alpha) * moved).detach().requires_grad_(True)
                if acc.level != "edge":
                    out.register_hook(lambda g: acc.add_neurons(rows, delta, g, weight))
                return out

            gradient_pass(
                model, acc.graph, batch, metric, clean_readout, (stream_hook(model, group), interpolate),
                (lambda d, g: acc.add_edges(d, rows, delta, g, weight)) if acc.level == "edge" else None,
                None,
                rows,
                f"{where}, group {group.hook}, step {k} of {steps}",
            )
            tick()
