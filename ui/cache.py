"""Process-wide caches shared by every browser session, bounded in bytes (:mod:`ui.budget`).

The model is loaded once per device (its spec normalised: :func:`canonical`); tokenized data and
evaluators once per (model, data fingerprint, metric, batch size); attribution results and faithfulness
curves are kept in stores keyed by their specs, so the same run again (or after a browser reload) is
instant. All of them are entries of one :class:`~ui.budget.Budget`, dropped least recently used when a
device passes its budget; a model's data and evaluators go with it. Passes through the model's bridge
take its turn inside ``eapcore`` (:func:`eapcore.models.model_lock`, first come first served); the sparse
evaluation engine needs none, so slider moves never wait for another session's attribution.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import threading
import time
from dataclasses import asdict, astuple, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import streamlit as st
import torch

from eapcore.attribute import AttributionSpec
from eapcore.cost import timed_attribute
from eapcore.circuit import Circuit, Scores
from eapcore.data import PromptPairs, TokenizedPairs
from eapcore.curve import MIB_PERCENTS, Curve
from eapcore.evaluate import CircuitEvaluator, normalized
from eapcore.gap import faithfulness, no_gap
from eapcore.memory import parameter_count
from eapcore.methods import get_method
from eapcore.models import ModelSpec, default_device, load_model, model_graph, model_lock, source_name
from eapcore.roots import allowed_roots, check_model_source, is_local
from eapcore.select import top
from eapcore.shared import reporting
from eapcore.sizes import fine_grid, sizes_for_percents
from eapcore.tokens import UnknownWord, unknown_words
from eapcore.vocabulary import tokenize_for
from ui import background
from ui.budget import Store, budget
from ui.state import ENV_MODEL

EVAL_BATCH = 128
def canonical(spec: ModelSpec) -> ModelSpec:
    """``spec`` with the device it resolves to (``auto`` is ``cuda:0`` on a GPU machine, ``cuda`` the current
    GPU) and a local folder's real path (``demo`` for the shipped model's): one key, one copy per device."""
    name = source_name(str(Path(spec.name).expanduser().resolve())) if is_local(spec.name) else spec.name
    device = spec.device
    if spec.device_map is None and (spec.n_devices or 1) <= 1:
        dev = torch.device(device or default_device())
        if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
            dev = torch.device("cuda", torch.cuda.current_device())
        device = str(dev)
    return replace(spec, name=name, device=device)


def readable_roots() -> list[Path]:
    """Where the app may load model folders from: :func:`eapcore.roots.allowed_roots`, plus the folder of
    the default model that the administrator set (``EAPCORE_APP_MODEL``)."""
    default = os.environ.get(ENV_MODEL, "")
    return allowed_roots([default] if default and is_local(default) else [])


_FROZEN = threading.Lock()
_frozen = False


def _freeze_startup_heap() -> None:
    """Move everything alive before the first model load (the libraries: about half a million objects) out
    of the garbage collector's way, once: a full collection of that heap would pause a slider move now and
    then (benchmarks/README.md, Explorer). Models, evaluators and results, made later, stay collectible."""
    global _frozen
    with _FROZEN:
        if not _frozen:
            import transformer_lens.model_bridge  # noqa: F401 - its imports (transformers) belong to the libraries

            gc.collect()
            gc.freeze()
            _frozen = True


def get_model(spec: ModelSpec) -> Any:
    """The shared TransformerBridge for ``spec`` (loaded once per device and kept within the budget).
    A local folder outside :func:`readable_roots` raises :class:`~eapcore.roots.ForbiddenPathError`."""
    check_model_source(spec.name, readable_roots())
    spec = canonical(spec)
    key = ("model", spec)

    def make() -> Any:
        _freeze_startup_heap()
        return load_model(spec)

    return budget().get_or_make(key, make, "model", f"{spec.name} ({spec.device or spec.device_map}, {spec.dtype})")


def _keys(spec: ModelSpec, pairs: PromptPairs) -> tuple[tuple, tuple]:
    """The budget's keys of the model of ``spec`` and of ``pairs`` tokenized for it."""
    spec = canonical(spec)
    return ("model", spec), ("data", spec, pairs.fingerprint())


def get_data(spec: ModelSpec, pairs: PromptPairs) -> TokenizedPairs:
    """``pairs`` tokenized for the model of ``spec``; raises ``DataError`` naming the bad row."""
    model = get_model(spec)
    model_key, data_key = _keys(spec, pairs)
    return budget().get_or_make(data_key, lambda: tokenize_for(pairs, model), "data", f"{len(pairs)} pairs tokenized",
                               [model_key])


def get_unknown_words(spec: ModelSpec, pairs: PromptPairs) -> list[UnknownWord]:
    """Words of the prompts that the model's tokenizer turns into its unknown token (at most 20)."""
    model = get_model(spec)
    model_key, data_key = _keys(spec, pairs)
    return budget().get_or_make(("unknown", data_key), lambda: unknown_words(model.tokenizer, pairs), "unknown words",
                               f"unknown words of {len(pairs)} pairs", [model_key])


def get_evaluator(
    spec: ModelSpec, pairs: PromptPairs, metric: str, intervention: str = "patching", batch_size: int = EVAL_BATCH
) -> CircuitEvaluator:
    """The shared evaluator for (model, data, metric, intervention); what ablated sources carry is
    computed on first use and kept (the budget measures it again when it is next used: :mod:`ui.budget`).
    An intervention that cannot run on this data (mean-positional on prompts of several lengths) raises
    when first used, as the engine's callers expect."""
    model, data = get_model(spec), get_data(spec, pairs)
    model_key, data_key = _keys(spec, pairs)
    key = ("evaluator", data_key, metric, intervention, batch_size)

    def make() -> CircuitEvaluator:
        return CircuitEvaluator(model, data, metric, batch_size, intervention=intervention)

    return budget().get_or_make(key, make, "evaluator", f"evaluator: {len(pairs)} pairs, {metric}, {intervention}",
                               [model_key, data_key])


def intervention_of(scores: Scores) -> str:
    return str(scores.provenance.get("intervention", "patching"))


@st.cache_resource(show_spinner=False)
def results() -> Store:
    """Attribution results by (ModelSpec, data fingerprint, AttributionSpec)."""
    return Store(32, "result")


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
    return Store(32, "view")


@st.cache_resource(show_spinner=False)
def curves() -> Store:
    """Faithfulness curves by (scores key, data fingerprint, metric, absolute)."""
    return Store(32, "curve")


def attribution_key(spec: ModelSpec, pairs: PromptPairs, attr: AttributionSpec) -> str:
    """A stable text key for a run (also the session's ``scores_key``). A method that ignores the metric
    (or the intervention) has the same key for every metric (intervention): changing it runs nothing."""
    method = get_method(attr.method)
    fields = asdict(attr)
    if not method.uses_metric:
        fields["metric"] = None
    if not method.uses_intervention:
        fields["intervention"] = None
    blob = repr((astuple(canonical(spec)), pairs.fingerprint(), tuple(fields.values())))
    return "run:" + hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Timing:
    seconds: float
    cached: bool


def run_attribution(
    spec: ModelSpec, pairs: PromptPairs, attr: AttributionSpec, progress: Callable[[int, int], None] | None = None,
    waiting: Callable[[int], None] | None = None,
) -> tuple[Scores, str, Timing]:
    """Scores for (model, data, spec): from the store when this run was done before, else computed when
    the model's turn comes (``waiting(position)`` is called while other sessions' runs go first), in a
    worker thread at a lower CPU priority than the sessions' slider moves (:mod:`ui.background`); raise
    from ``progress`` or ``waiting`` to stop. ``Timing.seconds`` counts from the turn."""
    key = attribution_key(spec, pairs, attr)
    hit = results().get(key)
    if hit is not None:
        return hit, key, Timing(0.0, True)
    model, data = get_model(spec), get_data(spec, pairs)

    def work(progress: Callable[[int, int], None], waiting: Callable[[int], None]) -> tuple[Scores, float]:
        with reporting(waiting), model_lock(model):
            start = time.perf_counter()
            scores = timed_attribute(model, data, attr, progress=progress).cpu()  # its speed refines estimates
            return scores, time.perf_counter() - start

    scores, seconds = background.run(work, progress, waiting)
    results().put(key, scores)
    return scores, key, Timing(seconds, False)


def model_queue(spec: ModelSpec) -> tuple[bool, int]:
    """(whether the model of ``spec`` is busy with a pass through its bridge, how many sessions wait for it)."""
    return model_lock(get_model(spec)).state()


@contextlib.contextmanager
def queue_notice(slot: Any) -> Iterator[None]:
    """While inside, a wait for a model's turn shows "waiting for the model: position N" in ``slot`` (an
    ``st.empty``), which each report redraws (that is where Streamlit can stop the run); cleared after."""
    waited = []

    def report(position: int) -> None:
        waited.append(position)
        slot.info(f"Waiting for the model: position {position} in the queue (another session's run is using it).",
                  icon=":material/hourglass_top:")

    with reporting(report):
        yield
    if waited:
        slot.empty()


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
    return Store(64, "check")


@st.cache_resource(show_spinner=False)
def circuit_metrics() -> Store:
    """Per-example metrics ``[n_examples]`` of evaluated circuits by (model, evaluator key, circuit)."""
    return Store(512, "circuit metric")


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
