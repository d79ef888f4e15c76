"""CPR and CMD both ways: MIB's areas under the faithfulness curve with the signed and the absolute
ranking, on the linear and the log axis (:mod:`eapcore.curve`), labelled as MIB's evaluator labels them
(``area_under``, ``area_from_1``), and which pair MIB's leaderboard reports (docs/mib.md)."""

from __future__ import annotations

from dataclasses import astuple
from typing import Any

import streamlit as st

from eapcore.circuit import Scores
from eapcore.curve import AXES, LEADERBOARD, LEADERBOARD_AXIS, PUBLIC_SCRIPT, MIBCurves, curve_metrics, mib_circuits, \
    mib_curves_of_metrics
from eapcore.evaluate import CircuitEvaluator
from eapcore.select import EDGES, unit_of
from ui import cache, progress

AXIS_HELP = {
    "linear": "x = p/100, from 0.001 to 1 (MIB's public run_evaluation.py integrates on this axis by default).",
    "log": "x = ln(p/100), from −6.91 to 0, not normalised: a curve at f = 1 everywhere has 6.91 here (the axis "
           "reported for MIB's leaderboard).",
}
KIND_HELP = {
    "area_under": "MIB's area_under = Σ (x₂ − x₁)·(f₁ + f₂)/2 over MIB's ten sizes (0.1% to 100% of the edges, "
                  "trapezoid rule): the area under the faithfulness curve. Reported as CPR; higher is better.",
    "area_from_1": "MIB's area_from_1 = Σ (x₂ − x₁)·(|1 − f₁| + |1 − f₂|)/2 over MIB's ten sizes: the area between "
                   "the faithfulness curve and 1. Reported as CMD; lower is better.",
}
RANKING_HELP = {"signed": "circuits are the top edges by signed score", "absolute": "circuits are the top edges by |score|"}
NOTE = (
    f"MIB's leaderboard reports **CPR** = `area_under` of the **{LEADERBOARD['CPR'][0]}** ranking and **CMD** = "
    f"`area_from_1` of the **{LEADERBOARD['CMD'][0]}** ranking, on the **{LEADERBOARD_AXIS}** axis (as reported for "
    f"the board); MIB's public `run_evaluation.py` computes one curve, by default with the **{PUBLIC_SCRIPT['ranking']}** "
    f"ranking on the **{PUBLIC_SCRIPT['axis']}** axis, so local numbers differ from the board's."
)


def column(kind: str, axis: str) -> str:
    return f"{kind} · {axis}"


def column_help(kind: str, axis: str) -> str:
    return f"{KIND_HELP[kind]} {AXIS_HELP[axis]}"


def name(number: str, ranking: str, axis: str) -> str:
    """``CPR · signed, log (board)``: a number (CPR or CMD) by its ranking and axis; ``(board)`` marks the
    pair the leaderboard reports."""
    board = LEADERBOARD[number][0] == ranking and axis == LEADERBOARD_AXIS
    return f"{number} · {ranking}, {axis}" + (" (board)" if board else "")


def definition(number: str, ranking: str, axis: str) -> str:
    kind = "area_under" if number == "CPR" else "area_from_1"
    board = LEADERBOARD[number][0] == ranking
    where = ("What MIB's leaderboard reports: " if board and axis == LEADERBOARD_AXIS
             else f"The leaderboard's {number} on the {axis} axis: " if board else "")
    return f"{where}{kind} of the {ranking} ranking ({RANKING_HELP[ranking]}). {column_help(kind, axis)}"


def board(mib: MIBCurves) -> list[tuple[str, float, str]]:
    """The leaderboard's CPR and CMD on its axis, then on the other one: (name, number, definition)."""
    out = []
    for axis in (LEADERBOARD_AXIS, *(a for a in AXES if a != LEADERBOARD_AXIS)):
        for number, value in mib.leaderboard(axis).items():
            ranking = LEADERBOARD[number][0]
            out.append((name(number, ranking, axis), value, definition(number, ranking, axis)))
    return out


def table(mib: MIBCurves) -> list[dict[str, Any]]:
    """Every area: one row per ranking, one column per (``area_under``/``area_from_1``, axis)."""
    return [{"ranking": curve.ranking, **{column(kind, axis): getattr(curve, kind)(axis)
                                          for kind in KIND_HELP for axis in AXES}}
            for curve in (mib.signed, mib.absolute)]


def curves_key(evaluator: CircuitEvaluator, run_key: str) -> tuple:
    """Where :func:`curves` of a run are kept: per (model, run, data, metric, intervention)."""
    return ("mib_curves", astuple(st.session_state.model_spec), run_key, *cache.evaluator_key(evaluator))


def curves(evaluator: CircuitEvaluator, scores: Scores, tick: progress.Progress | None = None) -> MIBCurves:
    """The MIB curve of ``scores`` under both rankings (:func:`eapcore.curve.mib_curves`, every circuit
    remembered); ``tick(done, total)`` after each circuit. Faithfulness must be defined."""
    ev = cache.Remembering(st.session_state.model_spec, evaluator)
    metrics = curve_metrics(ev, mib_circuits(scores), tick)
    return mib_curves_of_metrics(scores.graph, metrics, ev.baseline().clean, ev.empty_metric())


def expander(evaluator: CircuitEvaluator) -> None:
    """Explore's "both ways" expander for the selected run: computed when opened (and kept)."""
    s = st.session_state
    box = st.expander("CPR and CMD both ways: MIB's leaderboard, its public script", key="w_areas_open",
                      on_change="rerun", icon=":material/functions:")
    if not box.open:
        return
    with box:
        if unit_of(s.scores) != EDGES:
            st.info("MIB's areas rank edges; these scores choose circuits by node.")
            return
        if cache.undefined(evaluator):
            st.info("Faithfulness is undefined on this data, and so is every area.")
            return
        show(progress.kept(curves_key(evaluator, s.scores_key), "CPR and CMD both ways",
                           lambda tick: curves(evaluator, s.scores, tick)))


def show(mib: MIBCurves) -> None:
    numbers = board(mib)
    for col, (name, value, text) in zip(st.columns(len(numbers)), numbers):
        col.metric(name, f"{value:.4f}", help=text)
    st.markdown(NOTE)
    st.dataframe(table(mib), hide_index=True, width="stretch", column_config={
        "ranking": st.column_config.TextColumn("ranking", help="signed: top edges by score; absolute: by |score|"),
        **{column(k, a): st.column_config.NumberColumn(column(k, a), help=column_help(k, a), format="%.4f")
           for k in KIND_HELP for a in AXES},
    })
    st.caption("The CPR and CMD above this box are the linear-axis areas of one curve, ranked as the "
               "“Rank by |score|” toggle says (on: absolute ranking).")
