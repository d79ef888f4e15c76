"""Explore's Per prompt panel: the current circuit pair by pair (:func:`eapcore.per_example.per_example`):
the data set's faithfulness with its bootstrap interval, a histogram and a sortable table of the pairs'
values, and one pair's tokens and metrics."""

from __future__ import annotations

import html
from dataclasses import astuple

import streamlit as st

from eapcore.evaluate import CircuitEvaluator
from eapcore.per_example import PerExample, per_example
from eapcore.tokens import token_diff
from ui import cache, current, figures, widgets
from ui.provenance import UNDEFINED

HELP = {
    "Faithfulness (all pairs)": "The data set's faithfulness: the ratio of the means over all pairs (MIB's definition), "
                    "(mean m(C) − mean m(∅)) / (mean m(full) − mean m(∅)); not the mean of the pairs' values.",
    "95% interval": "Bootstrap percentile interval of the faithfulness: 1000 resamples of the pairs with "
                    "replacement (seed 0), the ratio of means recomputed on each.",
    "Pairs undefined": "Pairs whose clean and empty-circuit metrics coincide: their own faithfulness is undefined.",
}
PAIR_HELP = "(m_i(C) − m_i(∅)) / (m_i(full) − m_i(∅)) for this pair alone."


def fmt(value: float) -> str:
    return UNDEFINED if value != value else f"{value:.4f}"


def result(evaluator: CircuitEvaluator) -> PerExample:
    """The current circuit evaluated pair by pair, kept per (model, run, circuit, data, metric, intervention)."""
    s = st.session_state
    circuit = current.evaluation(evaluator).evaluation.circuit
    key = ("per_prompt", astuple(s.model_spec), s.scores_key, cache.circuit_key(circuit), *cache.evaluator_key(evaluator))
    found = cache.checks().get(key)
    if found is None:
        with st.spinner("Evaluating the circuit on each pair ..."):
            found = per_example(cache.Remembering(s.model_spec, evaluator), circuit)
        cache.checks().put(key, found)
    return found


def panel(evaluator: CircuitEvaluator) -> None:
    s = st.session_state
    if cache.undefined(evaluator):
        st.info("Faithfulness is undefined on this data (no gap between the clean run and the empty circuit).")
        return
    found = result(evaluator)
    metric = evaluator.metric.name
    n = len(found.metric)
    lo, hi = found.interval
    undefined = int(found.pair_faithfulness.isnan().sum())
    widgets.metric_row({"Faithfulness (all pairs)": fmt(found.faithfulness),
                        "95% interval": UNDEFINED if lo != lo else f"{lo:.3f} – {hi:.3f}",
                        "Pairs": str(n), "Pairs undefined": str(undefined)}, HELP)
    st.plotly_chart(figures.histogram_figure(found.pair_faithfulness.tolist()), width="stretch")
    rows = [{"pair": i + 1, f"circuit {metric}": m, f"clean {metric}": c, f"corrupted {metric}": k, "faithfulness": f}
            for i, (m, c, k, f) in enumerate(zip(*(t.tolist() for t in (found.metric, found.clean, found.corrupted,
                                                                        found.pair_faithfulness))))]
    st.dataframe(rows, hide_index=True, width="stretch", height=280, column_config={
        "faithfulness": st.column_config.NumberColumn("faithfulness", help=PAIR_HELP, format="%.4f")})
    st.caption("Click a column's name to sort by it (e.g. faithfulness, to find the pairs the circuit fails on).")
    i = int(st.columns([1, 3])[0].number_input("Pair to show", min_value=1, max_value=n, value=1, step=1,
                                                 key="w_prompt_pair")) - 1
    pairs = s.pairs
    tokenizer = cache.get_model(s.model_spec).tokenizer
    answers = html.escape(f"correct {', '.join(pairs.correct[i])} · incorrect {', '.join(pairs.incorrect[i])}")
    st.html(f"<div><b>pair {i + 1}</b> <span style='color:#6b7280;font-size:0.85em'>{answers}</span>"
            f"{figures.token_diff_html(token_diff(tokenizer, pairs.clean[i], pairs.corrupted[i]))}</div>")
    widgets.metric_row({f"pair {i + 1}: clean": f"{found.clean[i]:.4f}", f"pair {i + 1}: corrupted": f"{found.corrupted[i]:.4f}",
                        f"pair {i + 1}: circuit": f"{found.metric[i]:.4f}",
                        f"pair {i + 1}: faithfulness": fmt(float(found.pair_faithfulness[i]))},
                       {f"pair {i + 1}: faithfulness": PAIR_HELP})
