"""Explore's Verify panel: the selected run's top-k edge scores against the exact effect of removing each
edge alone, and the faithfulness of the current circuit's complement (:func:`eapcore.verify.verify`)."""

from __future__ import annotations

from dataclasses import astuple

import streamlit as st

from eapcore.evaluate import CircuitEvaluator
from eapcore.select import EDGES, unit_of
from eapcore.verify import Verification, verify
from ui import cache, current, figures, progress, widgets

TOP_K = 50
HELP = {
    "Pearson r": "Linear correlation of the estimates (scores) with the exact effects over the top-k edges.",
    "Spearman ρ": "Rank correlation of the estimates with the exact effects over the top-k edges (ties share ranks).",
    "Sign agreement": "Share of the top-k edges whose estimate and exact effect have the same sign (0 matches 0 only).",
    "Complement faithfulness": "Faithfulness of every real edge not in the current circuit: near 0 when the circuit "
                               "holds everything the task needs.",
}


def fmt(value: float) -> str:
    return "undefined" if value != value else f"{value:.3f}"


def panel(evaluator: CircuitEvaluator) -> None:
    s = st.session_state
    if unit_of(s.scores) != EDGES:
        st.info("Verify checks edge scores; these scores choose circuits by node.")
        return
    if cache.undefined(evaluator):
        st.info("Faithfulness is undefined on this data, so the complement's would be too; nothing to verify.")
        return
    circuit = current.evaluation(evaluator).evaluation.circuit
    st.caption("Removes each of the run's top-k edges (by |score|) alone from the full model and measures the "
               "loss change, in the units and sign of the scores: one evaluation per edge.")
    c1, c2, c3 = st.columns([1, 1, 3], vertical_alignment="bottom")
    k = int(c1.number_input("Top-k edges", min_value=1, value=TOP_K, step=10, key="w_verify_k",
                            help="How many of the highest-|score| edges to check; more than the graph has verifies all"))
    key = ("verify", astuple(s.model_spec), s.scores_key, cache.circuit_key(circuit), *cache.evaluator_key(evaluator), k)
    found = progress.button("Verify", "run_verify", ":material/fact_check:", key, "Verify", lambda tick: verify(
        cache.Remembering(s.model_spec, evaluator), s.scores, k, circuit, tick), "evaluations", (c2, c3))
    if found is not None:
        show(found)


def show(v: Verification) -> None:
    if v.note:
        st.info(v.note, icon=":material/info:")
    widgets.metric_row({"Pearson r": fmt(v.pearson), "Spearman ρ": fmt(v.spearman),
                        "Sign agreement": f"{v.sign_agreement:.0%}",
                        "Complement faithfulness": fmt(v.complement_faithfulness)}, HELP)
    st.plotly_chart(figures.verify_figure(v.edges), width="stretch")
    st.markdown(f"**The worst-estimated edges** (largest |estimate − exact| of the top {v.k})")
    st.dataframe([{"edge": e.edge, "estimate": e.estimate, "exact": e.exact, "|estimate − exact|": abs(e.estimate - e.exact)}
                  for e in v.worst(10)], hide_index=True, width="stretch")
