"""One circuit under every intervention: does its faithfulness depend on what removed edges carry?

For each intervention (patching, zero, mean, mean-positional) the faithfulness of the circuit and of its
complement (every real edge not in it), each normalised by that intervention's own empty circuit. An
intervention that cannot run on the data (mean-positional needs prompts of one length) or leaves the
metric unchanged gets a note that says why instead of values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from eapcore.circuit import Circuit
from eapcore.data import DataError, TokenizedPairs
from eapcore.evaluate import CircuitEvaluator
from eapcore.interventions import INTERVENTIONS
from eapcore.metrics import Metric, MetricFn
from eapcore.models import model_graph
from eapcore.schema import describe
from eapcore.verify import complement


@dataclass(frozen=True)
class InterventionResult:
    intervention: str
    faithfulness: float | None  # None when ``note`` says why it could not be computed
    complement_faithfulness: float | None
    note: str | None = None


def robustness(
    model: Any, data: TokenizedPairs, circuit: Circuit, metric: str | Metric | MetricFn = "logit_diff",
    batch_size: int = 64, reference: TokenizedPairs | None = None, interventions: Sequence[str] = INTERVENTIONS,
    evaluators: Mapping[str, CircuitEvaluator] | None = None, progress: Callable[[int, int], None] | None = None,
) -> tuple[InterventionResult, ...]:
    """``circuit`` under each of ``interventions``, on ``data`` (means over ``reference``, default ``data``).
    ``evaluators`` (by intervention) are used instead of new ones where given, e.g. the app's cached one.
    ``progress(done, total)`` is called after each intervention; raise from it to stop."""
    graph = model_graph(model)
    if circuit.graph.cfg != graph.cfg:
        raise ValueError(f"the circuit is for {describe(circuit.graph.cfg)} but the model has {describe(graph.cfg)}")
    unknown = [kind for kind in interventions if kind not in INTERVENTIONS]
    if unknown:
        raise ValueError(f"unknown intervention(s) {unknown}; choose from {', '.join(INTERVENTIONS)}")
    rest, results = complement(circuit), []
    for i, kind in enumerate(interventions):
        evaluator = (evaluators or {}).get(kind) or CircuitEvaluator(model, data, metric, batch_size, kind, reference)
        try:
            clean, empty = evaluator.baseline().clean, evaluator.empty_metric()
        except DataError as e:  # mean-positional on prompts of several lengths
            results.append(InterventionResult(kind, None, None, str(e)))
        else:
            if clean == empty:
                note = f"{kind} ablation of every edge leaves the metric at its clean value ({clean}): faithfulness is undefined"
                results.append(InterventionResult(kind, None, None, note))
            else:
                results.append(InterventionResult(kind, evaluator.faithfulness(circuit), evaluator.faithfulness(rest)))
        if progress is not None:
            progress(i + 1, len(interventions))
    return tuple(results)
