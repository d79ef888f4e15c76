"""Attribution: one public entry point, :func:`attribute`, and one runner per kind of method.

The method table (:mod:`eapcore.methods`) says how each method runs (its ``runner``); the backend that
runs it is chosen once per call (:func:`eapcore.backends.attribution_backend`) and recorded in the
provenance. Score of edge (u, v) = Σ_{batch, pos, d_model} Δ_u · g_v, averaged over examples, where
Δ_u = ``delta`` = ablated_u − clean_u (ablated = corrupted for patching; zero or a mean otherwise) and
g_v is the gradient of the loss (the metric signed so that lower is better) at the input of v. Positive
means ablating the edge hurts the task. Node/neuron level takes g at u's own output instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from eapcore import fastgrad
from eapcore.backends import attribution_backend, check_backend
from eapcore.circuit import Scores
from eapcore.data import Batch, TokenizedPairs
from eapcore.families import architecture
from eapcore.gradients import Accumulator, Delta, activation_interpolation, input_interpolation
from eapcore.graph import Graph
from eapcore.interventions import INTERVENTIONS, Intervention, make_intervention
from eapcore.memory import reporting_out_of_memory
from eapcore.methods import LEVELS, METHODS, get_method
from eapcore.metrics import Metric, MetricFn, get_metric, readout
from eapcore.models import frozen, model_device, model_dtype, model_graph, model_lock, source_name
from eapcore.recording import record_sources, row_windows, source_outputs
from eapcore.sites import destinations, per_column
from eapcore.vocabulary import check_vocabulary

Progress = Callable[[int, int], None]


class Cancelled(Exception):
    """Raise from a progress callback to stop attribution; hooks are removed on the way out."""


@dataclass(frozen=True)
class AttributionSpec:
    """How to attribute; also the cache key and the provenance written into exports. ``backend``: ``auto``,
    ``unsplit`` or ``split`` (:mod:`eapcore.backends`); every backend gives the same scores."""

    method: str = "EAP-IG-inputs"
    ig_steps: int = 5
    metric: str = "logit_diff"
    intervention: str = "patching"
    batch_size: int = 32
    level: str = "edge"
    chunks: int = 1  # split the Δ buffer into this many windows of source rows (same scores, less memory)
    backend: str = "auto"

    def __post_init__(self) -> None:
        method = get_method(self.method)
        if self.intervention not in INTERVENTIONS:
            raise ValueError(f"unknown intervention {self.intervention!r}; choose one of {', '.join(INTERVENTIONS)}")
        if self.intervention not in method.interventions:
            others = [m.name for m in METHODS.values() if self.intervention in m.interventions and m.uses_intervention]
            raise ValueError(
                f"{self.method} interpolates between the clean and the corrupted prompt, so it needs the 'patching' "
                f"intervention, not {self.intervention!r}; use {', '.join(others[:-1])} or {others[-1]} for {self.intervention}"
            )
        if self.level not in LEVELS:
            raise ValueError(f"unknown level {self.level!r}; choose one of {', '.join(LEVELS)}")
        if self.level not in method.levels:
            raise ValueError(f"{self.method} scores {' and '.join(l + 's' for l in method.levels)} only, not "
                             f"{self.level}s; use level={' or '.join(map(repr, method.levels))}")
        if isinstance(self.ig_steps, bool) or not isinstance(self.ig_steps, int) or self.ig_steps < 1:
            raise ValueError(f"ig_steps (--ig-steps) must be a positive integer, got {self.ig_steps!r}; 5 is the usual choice")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size (--batch-size) must be a positive integer, got {self.batch_size!r}; try 32")
        if isinstance(self.chunks, bool) or not isinstance(self.chunks, int) or self.chunks < 1:
            raise ValueError(f"chunks (--chunks) must be a positive integer, got {self.chunks!r}; 1 keeps the whole Δ buffer")
        check_backend(method, self.backend)

    def alphas(self) -> list[float]:
        """Where input-interpolation methods take gradients, as the weight of the clean embeddings."""
        return get_method(self.method).alphas(self.ig_steps)

    def passes_per_batch(self, graph: Graph) -> int:
        """Forward (or forward/backward) passes per batch, for progress and time estimates."""
        return get_method(self.method).passes_per_batch(graph, len(row_windows(graph, self.chunks)), self.ig_steps,
                                                        self.level)

    def total_passes(self, graph: Graph, n_examples: int) -> int:
        """What ``progress`` counts to over a whole run (``exact``: evaluations over all the data)."""
        if get_method(self.method).runner == "removal":
            return self.passes_per_batch(graph)
        return -(-n_examples // self.batch_size) * self.passes_per_batch(graph)


def attribute(
    model: Any,
    data: TokenizedPairs,
    spec: AttributionSpec = AttributionSpec(),
    metric: Metric | MetricFn | None = None,
    progress: Progress | None = None,
    reference: TokenizedPairs | None = None,
) -> Scores:
    """Score ``model``'s graph on ``data``. ``metric`` overrides ``spec.metric``; ``reference`` is the
    dataset the mean interventions average over (default: ``data``). The model's weights are frozen for
    the duration (their ``requires_grad`` is restored after)."""
    metric = get_metric(metric if metric is not None else spec.metric)
    graph = model_graph(model)
    backend = attribution_backend(spec.method, architecture(model), spec.backend, model,
                                  int(data.data.lengths.max()))
    for pairs in (data, reference):
        if pairs is not None:
            check_vocabulary(pairs, model)

    def run() -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        with model_lock(model), frozen(model):
            if get_method(spec.method).runner == "removal":
                return _exact(model, graph, data, spec, metric, progress, reference)
            return _by_batches(model, graph, data, spec, metric, progress, reference, backend)

    result = reporting_out_of_memory(run, lambda error: (
        f"out of memory on {model_device(model)} while attributing with batch size {spec.batch_size} ({error}); try a "
        f"smaller batch (--batch-size {max(1, spec.batch_size // 2)}) or half precision (--dtype bfloat16)"))
    if model_dtype(model) != torch.float64:
        result = tuple(None if t is None else t.float() for t in result)
    provenance = {
        **asdict(spec),
        "backend": backend,
        "metric": metric.name,
        "model": source_name(str(getattr(model.cfg, "model_name", ""))),
        "data": data.fingerprint,
        "n_examples": len(data),
    }
    return Scores(graph, *result, provenance=provenance)


def _counter(total: int, progress: Progress | None) -> Callable[..., None]:
    done = 0

    def tick(*_: Any) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    return tick


def _by_batches(
    model: Any, graph: Graph, data: TokenizedPairs, spec: AttributionSpec, metric: Metric,
    progress: Progress | None, reference: TokenizedPairs | None, backend: str,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    device, dtype = model_device(model), model_dtype(model)
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    acc = Accumulator(
        graph, spec.level,
        torch.zeros(graph.n_forward, graph.n_backward, dtype=acc_dtype, device=device),
        torch.zeros(graph.n_forward, model.cfg.d_model, dtype=acc_dtype, device=device),
    )
    intervention = make_intervention(spec.intervention, model, graph, reference or data, spec.batch_size)
    batches = list(data.batches(spec.batch_size, device))
    tick = _counter(len(batches) * spec.passes_per_batch(graph), progress)
    for index, batch in enumerate(batches):
        where = f"batch {index + 1} of {len(batches)}"
        if get_method(spec.method).runner == "information-flow":
            _information_flow(model, graph, batch, acc)
            tick()
        else:
            _gradient_batch(model, graph, batch, spec, metric, intervention, acc, tick, where, backend)
    n = len(data)
    if spec.level == "edge":
        edges = torch.where(graph.real_edge_mask.to(device), acc.edges / n, torch.zeros((), dtype=acc_dtype, device=device))
        return edges.cpu(), None, None
    neurons = (acc.neurons / n).cpu()
    zeros = torch.zeros(graph.n_forward, graph.n_backward, dtype=acc_dtype)
    return zeros, neurons.sum(-1), neurons if spec.level == "neuron" else None


def _gradient_batch(
    model: Any, graph: Graph, batch: Batch, spec: AttributionSpec, metric: Metric, intervention: Intervention,
    acc: Accumulator, tick: Callable[..., None], where: str, backend: str,
) -> None:
    """Per window of source rows (one window, all rows, unless ``spec.chunks`` > 1): the unsplit backend
    (:mod:`eapcore.fastgrad`) records Δ in its own passes; the split one takes Δ = ablated − clean from
    two forward passes, then runs the method's gradient passes (:mod:`eapcore.gradients`)."""
    activations = get_method(spec.method).runner == "activation-interpolation"
    for window in row_windows(graph, spec.chunks):
        if backend == "unsplit" and activations:
            fastgrad.activation_interpolation(model, batch, metric, intervention, window, spec.ig_steps, acc, tick, where)
            continue
        if backend == "unsplit":
            fastgrad.input_interpolation(model, batch, metric, intervention, window, spec.alphas(), acc, tick, where)
            continue
        values = intervention.ablated(model, graph, batch, window)
        tick()
        with torch.no_grad():
            clean_logits = model.run_with_hooks(batch.clean, fwd_hooks=record_sources(model, graph, values, window, sign=-1))
        clean_readout = readout(clean_logits, batch.lengths) if metric.needs_clean_logits else None
        del clean_logits
        tick()
        delta = Delta(window.start, values)
        if activations:
            activation_interpolation(model, batch, metric, delta, clean_readout, spec.ig_steps, acc, tick, where)
        else:
            input_interpolation(model, batch, metric, delta, clean_readout, spec.alphas(), acc, tick, where)


def _information_flow(model: Any, graph: Graph, batch: Batch, acc: Accumulator) -> None:
    """Ferrando & Voita (2024): proximity max(0, ‖h_v‖₁ − ‖h_v − x_u‖₁) of each source output x_u to each
    destination input h_v on the clean run, normalised over u, averaged over real positions."""
    outs, _ = source_outputs(model, graph, batch, batch.clean)  # sources only; destinations read below
    real = (torch.arange(batch.n_pos, device=outs.device)[None, :] < batch.lengths[:, None]).to(acc.edges.dtype)
    routes = Routes(outs, real / real.sum(1, keepdim=True), acc)  # weights: mean over each example's real positions
    with torch.no_grad():
        model.run_with_hooks(batch.clean, fwd_hooks=[(d.hook, lambda t, hook, d=d: routes(t, d)) for d in destinations(graph)])


class Routes:
    """The information-flow hook: adds destination ``d``'s proximities to ``acc.edges[:n_sources, d.cols]``.

    ``outs``: the source outputs ``[n_forward batch pos d_model]``; ``weights``: ``[batch pos]``. On a model
    split over devices each destination's hook runs on its layer's device: ``outs`` and ``weights`` are
    copied there once per device, and only the ``[n_sources]`` score blocks go to the accumulator's."""

    def __init__(self, outs: torch.Tensor, weights: torch.Tensor, acc: Accumulator) -> None:
        self.acc = acc
        self.on_device = {outs.device: (outs, weights)}

    def __call__(self, t: torch.Tensor, d: Any) -> None:
        h = per_column(t)
        if h.device not in self.on_device:
            outs, weights = next(iter(self.on_device.values()))
            self.on_device[h.device] = (outs.to(h.device), weights.to(h.device))
        outs, weights = self.on_device[h.device]
        sources = outs.narrow(0, 0, d.n_sources)  # narrow/select/unbind, not indexing: fake CUDA tensors allow them
        for c, column in enumerate(h.unbind(2)):
            block = (proximity(column, sources) * weights).sum((1, 2))  # [n_sources]
            self.acc.edges.narrow(0, 0, d.n_sources).select(1, d.cols.start + c).add_(block.to(self.acc.edges.device))


def proximity(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """max(0, ‖h‖₁ − ‖h − x_u‖₁) normalised over u: ``h`` ``[batch pos d_model]``, ``x`` ``[n batch pos d_model]``
    -> ``[n batch pos]`` in float32 (float64 for float64 inputs). The L1 norms are summed in that precision:
    in half precision they pass float16's 65504 (inf − inf) or keep 8 bits (bfloat16), and their difference
    is rounding noise."""
    wide = torch.float64 if h.dtype == torch.float64 else torch.float32
    prox = (h.abs().sum(-1, dtype=wide) - (h.unsqueeze(0) - x).abs().sum(-1, dtype=wide)).clamp_min(0)
    return prox / prox.sum(0, keepdim=True).clamp_min(torch.finfo(wide).tiny)


def _exact(
    model: Any, graph: Graph, data: TokenizedPairs, spec: AttributionSpec, metric: Metric,
    progress: Progress | None, reference: TokenizedPairs | None,
) -> tuple[torch.Tensor, torch.Tensor | None, None]:
    """Ground truth: remove each edge (or each node's outgoing edges) alone; score = loss change (:mod:`eapcore.exact`)."""
    from eapcore import exact
    from eapcore.evaluate import CircuitEvaluator

    evaluator = CircuitEvaluator(model, data, metric, spec.batch_size, spec.intervention, reference)
    if spec.level == "node":
        edges = torch.zeros(graph.n_forward, graph.n_backward, dtype=torch.float64)
        return edges, exact.node_effects(evaluator, progress=progress), None
    return exact.edge_scores(evaluator, progress), None, None
