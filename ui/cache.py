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
from dataclasses import asdict, astuple, dataclass
from typing import Any, Callable

import streamlit as st

from eapcore.attribute import AttributionSpec
from eapcore.cost import timed_attribute
from eapcore.circuit import Circuit, Scores
from eapcore.data import PromptPairs, TokenizedPairs
from eapcore.curve import MIB_PERCENTS, Curve
from eapcore.evaluate import CircuitEvaluator, normalized
from eapcore.gap import faithfulness, no_gap
from eapcore.memory import parameter_count
from eapcore.methods import get_method
from eapcore.models import ModelSpec, load_model, model_graph
from eapcore.select import top
from eapcore.sizes import fine_grid, sizes_for_percents
from eapcore.tokens import UnknownWord, unknown_words
from eapcore.vocabulary import tokenize_for

EVAL_BATCH = 128


@st.cache_resource(show_spinner=False, max_entries=3)
def get_model(spec: ModelSpec) -> Any:
    """The shared, frozen TransformerBridge for ``spec`` (loaded once per process). Everything alive after
    the load (libraries, the model) is moved out of the garbage collector's way: a full collection of
    that heap would otherwise pause a slider move now and then (benchmarks/README.md, Explorer)."""
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
def _unknown(spec: ModelSpec, fingerprint: str, _pairs: PromptPairs) -> list[UnknownWord]:
    return unknown_words(get_model(spec).tokenizer, _pairs)


def get_unknown_words(spec: ModelSpec, pairs: PromptPairs) -> list[UnknownWord]:
    """Words of the prompts that the model's tokenizer turns into its unknown token (at most 20)."""
    return _unknown(spec, pairs.fingerprint(), pairs)


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

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


@st.cache_resource(show_spinner=False)
def results() -> Store:
    """Attribution results by (ModelSpec, data fingerprint, AttributionSpec)."""
    return Store(32)


@dataclass(frozen=True)
class RunView:
    """The model, data and label a run was made with, to reopen it from a link."""

    model_spec: ModelSpec
    pairs: PromptPairs
    data_label: str
    metric: str
    label: str


@st.cache_resource(show_spinner=False)
def views() -> Store:
    """What a link needs besides a run's scores (:mod:`ui.url`): by attribution key, the :class:`RunView`
    of runs made on this server (never of uploaded files)."""
    return Store(32)


@st.cache_resource(show_spinner=False)
def curves() -> Store:
    """Faithfulness curves by (scores key, data fingerprint, metric, absolute)."""
    return Store(32)


def attribution_key(spec: ModelSpec, pairs: PromptPairs, attr: AttributionSpec) -> str:
    """A stable text key for a run (also the session's ``scores_key``). A method that ignores the metric
    (or the intervention) has the same key for every metric (intervention): changing it runs nothing."""
    method = get_method(attr.method)
    fields = asdict(attr)
    if not method.uses_metric:
        fields["metric"] = None
    if not method.uses_intervention:
        fields["intervention"] = None
    blob = repr((astuple(spec), pairs.fingerprint(), tuple(fields.values())))
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
    scores = timed_attribute(model, get_data(spec, pairs), attr, progress=progress).cpu()  # its speed refines estimates
    results().put(key, scores)
    return scores, key, Timing(time.perf_counter() - start, False)


def cached_attribution(spec: ModelSpec, pairs: PromptPairs, attr: AttributionSpec) -> Scores | None:
    return results().get(attribution_key(spec, pairs, attr))


@dataclass(frozen=True)
class Evaluation:
    """One circuit's numbers, as Explore and Export show them; ``faithfulness`` is ``None`` when it is
    undefined (the clean run and the empty circuit give the same metric: :mod:`eapcore.gap`)."""

    requested: int
    circuit: Circuit
    metric: float
    faithfulness: float | None


def undefined(evaluator: CircuitEvaluator) -> bool:
    """Whether faithfulness is undefined on the evaluator's data (no gap between clean and empty)."""
    return no_gap(evaluator.baseline().clean, evaluator.empty_metric())


def evaluate_circuit(evaluator: CircuitEvaluator, circuit: Circuit, requested: int | None = None) -> Evaluation:
    """``circuit``'s mean metric and faithfulness: one real evaluation pass."""
    value = evaluator.evaluate(circuit).mean().item()
    faith = faithfulness(value, evaluator.baseline().clean, evaluator.empty_metric())
    return Evaluation(circuit.n_edges if requested is None else requested, circuit, value, faith)


def evaluate_top(evaluator: CircuitEvaluator, scores: Scores, n: int, absolute: bool = True) -> Evaluation:
    """The top-``n`` circuit at the scores' level (pruned), evaluated."""
    return evaluate_circuit(evaluator, top(scores, n, absolute), n)


def evaluator_key(evaluator: CircuitEvaluator) -> tuple:
    return (evaluator.data.fingerprint, evaluator.metric.name, evaluator.intervention_kind, evaluator.batch_size)


def get_curves(
    evaluator: CircuitEvaluator, scores: Scores, scores_key: str, absolute: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Curve, Curve]:
    """(MIB curve, finer-grid curve) for these scores on the evaluator's data (faithfulness must be
    defined: see :func:`undefined`). Each circuit size is evaluated once and kept (shared by all
    sessions); ``progress(done, total)`` runs between sizes, so a Streamlit rerun can interrupt the
    computation without losing the sizes already done."""
    key = (scores_key, *evaluator_key(evaluator), absolute)
    done: dict[int, float] | None = curves().get(key)
    if done is None:
        done = {}
        curves().put(key, done)
    grids = [(MIB_PERCENTS, sizes_for_percents(scores, MIB_PERCENTS)), fine_grid(scores)]
    todo = sorted({n for _, sizes in grids for n in sizes} - set(done))
    for i, n in enumerate(todo):
        if progress is not None:
            progress(i, len(todo))
        done[n] = evaluate_top(evaluator, scores, n, absolute).faithfulness
    return tuple(Curve(tuple(p), tuple(sizes), tuple(done[n] for n in sizes)) for p, sizes in grids)


@st.cache_resource(show_spinner=False)
def checks() -> Store:
    """Trust-check results (verify, per prompt, robustness, compare) by run, circuit, data, metric and settings."""
    return Store(64)


@st.cache_resource(show_spinner=False)
def circuit_metrics() -> Store:
    """Per-example metrics ``[n_examples]`` of evaluated circuits by (model, evaluator key, circuit)."""
    return Store(512)


def circuit_key(circuit: Circuit) -> str:
    """A content hash of a circuit's masks."""
    h = hashlib.sha256()
    for mask in (circuit.edges, circuit.nodes, circuit.neurons):
        h.update(b"-" if mask is None else mask.cpu().numpy().tobytes())
    return h.hexdigest()[:20]


class Remembering:
    """An evaluator whose circuits' per-example metrics are kept in :func:`circuit_metrics` (shared by all
    sessions), so a check that was interrupted goes on from the circuits it finished and one run again is
    instant; everything else is the wrapped evaluator's. Callers must not modify the tensors returned."""

    def __init__(self, spec: ModelSpec, evaluator: "CircuitEvaluator | Remembering") -> None:
        if isinstance(evaluator, Remembering):
            evaluator = evaluator.evaluator
        self.evaluator, self._key = evaluator, (astuple(spec), *evaluator_key(evaluator))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.evaluator, name)

    def evaluate(self, circuit: Circuit, reuse_clean: bool = True) -> Any:
        key = (*self._key, circuit_key(circuit), reuse_clean)
        value = circuit_metrics().get(key)
        if value is None:
            value = self.evaluator.evaluate(circuit, reuse_clean)
            circuit_metrics().put(key, value)
        return value

    def faithfulness(self, circuit: Circuit) -> float:
        return normalized(self.evaluate(circuit).mean().item(), self.evaluator.baseline().clean,
                          self.evaluator.empty_metric())


def remembering(spec: ModelSpec, pairs: PromptPairs, metric: str, intervention: str = "patching") -> Remembering:
    """:func:`get_evaluator`'s evaluator, remembering the circuits it evaluates."""
    return Remembering(spec, get_evaluator(spec, pairs, metric, intervention))


def model_facts(spec: ModelSpec) -> dict[str, Any]:
    model = get_model(spec)
    graph = model_graph(model)
    return {
        "layers": model.cfg.n_layers,
        "heads": model.cfg.n_heads,
        "d_model": model.cfg.d_model,
        "context": model.cfg.n_ctx,
        "vocabulary": model.cfg.d_vocab,
        "parameters": parameter_count(model),
        "graph nodes": graph.n_nodes,
        "graph edges": graph.n_edges,
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
