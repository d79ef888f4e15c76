"""Edge attribution: EAP, EAP-IG-inputs and clean-corrupted (design §4).

Score of edge (u, v) = Σ_{batch, pos, d_model} Δ_u · g_v, averaged over examples, where
Δ_u = a_u(corrupted) − a_u(clean) and g_v is the gradient of the loss (the metric signed so that lower
is better) at the input of v. The three methods differ only in where the gradient is taken: at token
embeddings interpolated between the corrupted (α = 0) and the clean (α = 1) ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from eapcore.circuit import Scores
from eapcore.data import Batch, TokenizedPairs
from eapcore.metrics import Metric, MetricFn, get_metric, readout
from eapcore.models import model_device, model_dtype, model_graph, model_lock
from eapcore.sites import Destination, destinations, per_column, source_major, sources

Progress = Callable[[int, int], None]
METHODS = ("EAP", "EAP-IG-inputs", "clean-corrupted")
INTERVENTIONS = ("patching",)


@dataclass(frozen=True)
class AttributionSpec:
    """How to attribute; also the cache key and the provenance written into exports."""

    method: str = "EAP-IG-inputs"
    ig_steps: int = 5
    metric: str = "logit_diff"
    intervention: str = "patching"
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.intervention not in INTERVENTIONS:
            raise ValueError(f"intervention {self.intervention!r} is not supported; choose one of {', '.join(INTERVENTIONS)}")
        if not isinstance(self.ig_steps, int) or self.ig_steps < 1:
            raise ValueError(f"ig_steps must be a positive integer, got {self.ig_steps!r}; 5 is the usual choice")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")

    def alphas(self) -> list[float]:
        """Where gradients are taken, as interpolation weights of the clean embeddings."""
        if self.method == "EAP":
            return [1.0]
        if self.method == "clean-corrupted":
            return [1.0, 0.0]
        return [k / self.ig_steps for k in range(self.ig_steps)]


def attribute(
    model: Any,
    data: TokenizedPairs,
    spec: AttributionSpec = AttributionSpec(),
    metric: Metric | MetricFn | None = None,
    progress: Progress | None = None,
) -> Scores:
    """Score every edge of ``model``'s graph on ``data``; ``metric`` overrides ``spec.metric``."""
    metric = get_metric(metric if metric is not None else spec.metric)
    graph = model_graph(model)
    device, dtype = model_device(model), model_dtype(model)
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    scores = torch.zeros(graph.n_forward, graph.n_backward, dtype=acc_dtype, device=device)
    alphas = spec.alphas()
    batches = list(data.batches(spec.batch_size, device))
    total, done = len(batches) * (2 + len(alphas)), 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    with model_lock(model):
        for index, batch in enumerate(batches):
            _score_batch(model, graph, batch, metric, alphas, scores, tick, index)
    scores = scores / len(data)
    scores = torch.where(graph.real_edge_mask.to(device), scores, torch.zeros((), dtype=acc_dtype, device=device))
    provenance = {
        **asdict(spec),
        "metric": metric.name,
        "model": str(getattr(model.cfg, "model_name", "")),
        "data": data.fingerprint,
        "n_examples": len(data),
    }
    return Scores(graph, scores, provenance=provenance)


def _score_batch(
    model: Any, graph: Any, batch: Batch, metric: Metric, alphas: list[float], scores: torch.Tensor,
    tick: Callable[[], None], index: int,
) -> None:
    """Add this batch's summed scores into ``scores`` (``[n_forward n_backward]``)."""
    B, P = batch.clean.shape
    delta = torch.zeros(graph.n_forward, B, P, model.cfg.d_model, dtype=model_dtype(model), device=scores.device)
    embeds: dict[str, torch.Tensor] = {}

    def record(rows: slice, sign: float) -> Callable:
        def hook(t: torch.Tensor, hook: Any) -> None:
            delta[rows] += sign * source_major(t)
        return hook

    def keep_embed(t: torch.Tensor, hook: Any) -> None:
        embeds["corrupted"] = t.clone()

    with torch.no_grad():
        model.run_with_hooks(
            batch.corrupted, fwd_hooks=[(s.hook, record(s.rows, 1.0)) for s in sources(graph)] + [("hook_embed", keep_embed)]
        )
        tick()
        clean_logits = model.run_with_hooks(batch.clean, fwd_hooks=[(s.hook, record(s.rows, -1.0)) for s in sources(graph)])
        clean_readout = readout(clean_logits, batch.lengths) if metric.needs_clean_logits else None
        del clean_logits
        tick()
    corrupted_embed, embed_diff = embeds["corrupted"], -delta[0]
    weight = 1.0 / len(alphas)

    def accumulate(dst: Destination, grad: torch.Tensor) -> None:
        g = per_column(grad)
        g = g.permute(0, 1, 3, 2).reshape(-1, g.shape[2])
        block = delta[: dst.prev].reshape(dst.prev, -1) @ g
        scores[: dst.prev, dst.cols] += block.to(scores.dtype) * weight

    def watch(dst: Destination) -> Callable:
        def hook(t: torch.Tensor, hook: Any) -> torch.Tensor:
            # hook_mlp_in hands over the residual stream itself, which also flows past the MLP: a copy
            # makes the gradient that of the MLP branch alone.
            t = t.clone()
            t.register_hook(lambda g: accumulate(dst, g))
            return t
        return hook

    watchers = [(d.hook, watch(d)) for d in destinations(graph)]
    for step, alpha in enumerate(alphas):
        def interpolate(t: torch.Tensor, hook: Any, alpha: float = alpha) -> torch.Tensor:
            return (corrupted_embed + alpha * embed_diff).requires_grad_(True)

        with torch.enable_grad(), model.hooks(fwd_hooks=[("hook_embed", interpolate)] + watchers):
            logits = model(batch.clean)
            loss = metric.loss(readout(logits, batch.lengths), batch, clean_readout)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"metric {metric.name!r} returned {loss.item()} in batch {index + 1}, gradient step {step + 1}; "
                    "check the metric for divisions by zero or log of zero"
                )
            loss.backward()
        tick()
