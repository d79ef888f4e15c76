"""Explore's Robustness panel: the current circuit's and its complement's faithfulness under every
intervention (:func:`eapcore.robustness.robustness`), each normalised by that intervention's own empty
circuit."""

from __future__ import annotations

from dataclasses import astuple

import streamlit as st

from eapcore.evaluate import CircuitEvaluator
from eapcore.interventions import INTERVENTIONS
from eapcore.robustness import InterventionResult, robustness
from ui import cache, current, figures, progress

HELP = ("What an edge outside the circuit carries: the corrupted run's output (patching), zero, the mean over the "
        "data (mean) or the mean at each position (mean-positional). A circuit whose faithfulness holds under each "
        "depends less on what removed edges carry.")


def panel(evaluator: CircuitEvaluator) -> None:
    s = st.session_state
    circuit = current.evaluation(evaluator).evaluation.circuit
    metric = evaluator.metric.name
    st.caption(f"The current circuit ({circuit.n_edges:,} edges) and its complement (every other real edge) under "
               f"each intervention, evaluated with `{metric}`; this run's intervention is "
               f"`{evaluator.intervention_kind}`.", help=HELP)
    key = ("robustness", astuple(s.model_spec), s.scores_key, cache.circuit_key(circuit), evaluator.data.fingerprint,
           metric, evaluator.batch_size)

    def compute(tick: progress.Progress) -> tuple[InterventionResult, ...]:
        evaluators = {kind: cache.remembering(s.model_spec, s.pairs, metric, kind) for kind in INTERVENTIONS}
        return robustness(cache.get_model(s.model_spec), evaluator.data, circuit, metric, evaluator.batch_size,
                          evaluators=evaluators, progress=tick)

    found = progress.button("Run every intervention", "run_robustness", ":material/science:", key, "Robustness",
                            compute, "interventions")
    if found is not None:
        show(found, evaluator.intervention_kind)


def show(results: tuple[InterventionResult, ...], used: str) -> None:
    st.plotly_chart(figures.robustness_figure(results), width="stretch")
    st.dataframe([{"intervention": r.intervention + (" (this run's)" if r.intervention == used else ""),
                   "circuit faithfulness": r.faithfulness, "complement faithfulness": r.complement_faithfulness}
                  for r in results], hide_index=True, width="stretch")
    for r in results:
        if r.note:
            st.caption(f"{r.intervention}: {r.note}")
