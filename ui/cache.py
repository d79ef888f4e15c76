"""Process-wide caches shared by every browser session.

The model is loaded once per :class:`ModelSpec`; tokenized data and evaluators once per (model, data
fingerprint, metric, batch size); attribution results and faithfulness curves are kept in stores keyed
by their specs, so the same run again (or after a browser reload) is instant. Attribution and
evaluation take the model's lock inside ``eapcore`` (hooks are global state on the shared model).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import astuple, dataclass
from typing import Any, Callable

import streamlit as st

from eapcore.attribute import AttributionSpec, attribute
from eapcore.circuit import Circuit, Scores
from eapcore.data import PromptPairs, TokenizedPairs
from eapcore.curve import MIB_PERCENTS, Curve, fine_percents, size_for_percent
from eapcore.evaluate import CircuitEvaluator, normalized
from eapcore.models import ModelSpec, load_model, model_graph
from eapcore.vocabulary import tokenize_for

EVAL_BATCH = 128
ENV_THREADS = "EAPCORE_TORCH_THREADS"


def configure_threads() -> int:
    """Set torch's intra-op threads for the app: ``$EAPCORE_TORCH_THREADS`` if set, else 1 on machines
    with two or fewer cores (the model's tensors are small, and two spinning threads on a busy 2-core
    machine made the demo's attribution ~20x slower than one thread), else torch's default."""
    import os

    import torch

    wanted = os.environ.get(ENV_THREADS)
    if wanted:
        torch.set_num_threads(max(1, int(wanted)))
    elif (os.cpu_count() or 1) <= 2:
        torch.set_num_threads(1)
    return torch.get_num_threads()


@st.cache_resource(show_spinner=False, max_entries=3)
def get_model(spec: ModelSpec) -> Any:
    """The shared, frozen TransformerBridge for ``spec`` (loaded once per process). Everything alive after
    the load (libraries, the model) is moved out of the garbage collector's way: a full collection of
    that heap otherwise pauses a slider move now and then by ~0.6 s (bench_explorer.py)."""
    import gc

    model = load_model(spec)
    gc.collect()
    gc.freeze()
    return model


@st.cache_resource(show_spinner=False, max_entries=16)
def _tokenized(spec: ModelSpec, fingerprint: str, _pairs: PromptPairs) -> TokenizedPairs:
    model = get_model(spec)
    return tokenize_for(_pairs, model)


def get_data(spec: ModelSpec, pairs: PromptPairs) -> TokenizedPairs:
    """``pairs`` tokenized for the model of ``spec``; raises ``DataError`` naming the bad row."""
    return _tokenized(spec, pairs.fingerprint(), pairs)


@st.cache_resource(show_spinner=False, max_entries=16)
def _evaluator(
    spec: ModelSpec, fingerprint: str, metric: str, intervention: str, batch_size: int, _pairs: PromptPairs
) -> CircuitEvaluator:
    return CircuitEvaluator(get_model(spec), get_data(spec, _pairs), metric, batch_size, intervention=intervention)


def get_evaluator(
    spec: ModelSpec, pairs: PromptPairs, metric: str, intervention: str = "patching", batch_size: int = EVAL_BATCH
) -> CircuitEvaluator:
    """The shared evaluator for (model, data, metric, intervention); what ablated sources carry is
    computed on first use and kept."""
    return _evaluator(spec, pairs.fingerprint(), metric, intervention, batch_size, pairs)


def intervention_of(scores: Scores) -> str:
    return str(scores.provenance.get("intervention", "patching"))


def unit_of(scores: Scores) -> str:
    """``edges`` for edge-level scores, ``nodes`` for node- or neuron-level ones (circuits chosen by node)."""
    level = scores.provenance.get("level", "edge")
    return "nodes" if level in ("node", "neuron") and scores.nodes is not None else "edges"


def unit_count(scores: Scores) -> int:
    if unit_of(scores) == "nodes":
        return int((~scores.nodes.isnan()).sum())
    return scores.graph.n_edges


def default_size(scores: Scores) -> int:
    """The circuit size Explore opens with: 5% of the graph, at least 20 (edges or nodes)."""
    total = unit_count(scores)
    return min(total, max(round(total * 0.05), 20))


def select(scores: Scores, n: int, absolute: bool = True) -> Circuit:
    """The top-``n`` circuit (pruned): by edge score, or by node score for node-level scores."""
    from eapcore.select import by_nodes, top_n

    if unit_of(scores) == "nodes":
        return by_nodes(scores, n, absolute=absolute)
    return top_n(scores, n, absolute=absolute)


class Store:
    """A small thread-safe LRU dict shared by all sessions."""

    def __init__(self, size: int) -> None:
        self.size, self._items, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __contains__(self, key: Any) -> bool:
        with self._lock:
            return key in self._items


@st.cache_resource(show_spinner=False)
def results() -> Store:
    """Attribution results by (ModelSpec, data fingerprint, AttributionSpec)."""
    return Store(32)


@st.cache_resource(show_spinner=False)
def curves() -> Store:
    """Faithfulness curves by (scores key, data fingerprint, metric, absolute)."""
    return Store(32)


def attribution_key(spec: ModelSpec, pairs: PromptPairs, attr: AttributionSpec) -> str:
    """A stable text key for a run (also the session's ``scores_key``)."""
    blob = repr((astuple(spec), pairs.fingerprint(), astuple(attr)))
    return "run:" + hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Timing:
    seconds: float
    cached: bool


def run_attribution(
    spec: ModelSpec, pairs: PromptPairs, attr: AttributionSpec, progress: Callable[[int, int], None] | None = None
) -> tuple[Scores, str, Timing]:
    """Scores for (model, data, spec): from the store when this run was done before, else computed."""
    key = attribution_key(spec, pairs, attr)
    hit = results().get(key)
    if hit is not None:
        return hit, key, Timing(0.0, True)
    start = time.perf_counter()
    model = get_model(spec)
    scores = attribute(model, get_data(spec, pairs), attr, progress=progress).cpu()
    scores = Scores(scores.graph, scores.edges, scores.nodes, scores.neurons, {**scores.provenance, "model": spec.name})
    results().put(key, scores)
    return scores, key, Timing(time.perf_counter() - start, False)


def cached_attribution(spec: ModelSpec, pairs: PromptPairs, attr: AttributionSpec) -> Scores | None:
    return results().get(attribution_key(spec, pairs, attr))


@dataclass(frozen=True)
class Evaluation:
    """One circuit's numbers, as the Explore page shows them."""

    requested: int
    circuit: Circuit
    metric: float
    faithfulness: float


def evaluate_top_n(evaluator: CircuitEvaluator, scores: Scores, n: int, absolute: bool = True) -> Evaluation:
    """The top-``n`` circuit (pruned), its mean metric and faithfulness: one real evaluation pass."""
    return evaluate_circuit(evaluator, select(scores, n, absolute), n)


def _evaluator_key(evaluator: CircuitEvaluator) -> tuple:
    return (evaluator.data.fingerprint, evaluator.metric.name, evaluator.intervention_kind, evaluator.batch_size)


def evaluate_circuit(evaluator: CircuitEvaluator, circuit: Circuit, requested: int | None = None) -> Evaluation:
    value = evaluator.evaluate(circuit).mean().item()
    faith = normalized(value, evaluator.baseline().clean, evaluator.empty_metric())
    return Evaluation(circuit.n_edges if requested is None else requested, circuit, value, faith)


def curve_sizes(scores: Scores, percents: tuple[float, ...]) -> list[int]:
    """Circuit sizes (edges, or nodes for node-level scores) for percentages of the graph, as MIB counts them."""
    return [size_for_percent(unit_count(scores), p) for p in percents]


def get_curves(
    evaluator: CircuitEvaluator, scores: Scores, scores_key: str, absolute: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Curve, Curve]:
    """(MIB curve, finer-grid curve) for these scores on the evaluator's data. Each circuit size is
    evaluated once and kept (shared by all sessions); ``progress(done, total)`` runs between sizes, so
    a Streamlit rerun can interrupt the computation without losing the sizes already done."""
    key = (scores_key, *_evaluator_key(evaluator), absolute)
    done: dict[int, float] | None = curves().get(key)
    if done is None:
        done = {}
        curves().put(key, done)
    grids = (MIB_PERCENTS, fine_percents())
    sizes = [curve_sizes(scores, p) for p in grids]
    todo = sorted({n for row in sizes for n in row} - set(done))
    for i, n in enumerate(todo):
        if progress is not None:
            progress(i, len(todo))
        done[n] = evaluate_top_n(evaluator, scores, n, absolute).faithfulness
    return tuple(Curve(tuple(p), tuple(row), tuple(done[n] for n in row)) for p, row in zip(grids, sizes))


def model_facts(spec: ModelSpec) -> dict[str, Any]:
    model = get_model(spec)
    graph = model_graph(model)
    return {
        "layers": model.cfg.n_layers,
        "heads": model.cfg.n_heads,
        "d_model": model.cfg.d_model,
        "context": model.cfg.n_ctx,
        "vocabulary": model.cfg.d_vocab,
        "parameters": sum(p.numel() for p in model.parameters()),
        "graph nodes": graph.n_nodes,
        "graph edges": graph.n_edges,
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
