"""Explore page: a circuit-size slider that evaluates the top-n circuit on every move, the faithfulness
curve with CPR/CMD, and the circuit as an interactive graph."""

from __future__ import annotations

import streamlit as st

from eapcore import render
from eapcore.models import model_graph
from ui import cache, state, widgets

state.require_entry()
s = st.session_state
st.title("Explore")
if not widgets.need("pairs", "scores"):
    st.stop()

scores, graph = s.scores, s.scores.graph
unit, total = cache.unit_of(scores), cache.unit_count(scores)
ready = False
with state.guard("Cannot explore these scores"):
    model_cfg = model_graph(cache.get_model(s.model_spec)).cfg
    if model_cfg != graph.cfg:
        raise ValueError(f"the scores are for a graph {graph.cfg} but the loaded model's is {model_cfg}; "
                         "load the matching model or run the attribution again")
    evaluator = cache.get_evaluator(s.model_spec, s.pairs, s.metric, cache.intervention_of(scores))
    baseline = evaluator.baseline()
    ready = True
if not ready:
    st.stop()

grid = render.log_grid(total)
if s.get("n_edges") is None or not 0 <= s.n_edges <= total:
    s.n_edges = cache.default_size(scores)


def snap(n: int) -> int:
    return min(grid, key=lambda g: (abs(g - n), g))


def from_slider() -> None:
    s.n_edges = int(s.w_n_slider)
    s.w_n_box = s.n_edges


def from_box() -> None:
    n = int(s.w_n_box)
    if n > total:  # no max_value on the box: say why the number changed instead of silently clamping it
        s.explore_note = f"{n:,} is more than the {total:,} {unit} in the graph; showing the whole graph ({total:,})."
        n = s.w_n_box = total
    s.n_edges = n
    s.w_n_slider = snap(s.n_edges)


if s.get("w_n_slider") not in grid:
    s.w_n_slider = snap(s.n_edges)
if s.get("w_n_box") is None or s.w_n_box > total:
    s.w_n_box = s.n_edges
state.widget_value("w_absolute", "absolute")
st.caption(f"Scores: {s.scores_label} · data: {s.data_label} ({len(s.pairs)} pairs) · metric `{s.metric}` "
           f"(clean {baseline.clean:.3f}, corrupted {baseline.corrupted:.3f}) · intervention `{evaluator.intervention_kind}`")


def panel() -> None:
    # Not a fragment on purpose: a slider move is then a full rerun, which Streamlit lets interrupt a
    # running curve computation (fragment reruns wait for the current run to finish).
    c1, c2, c3 = st.columns([5, 1.2, 1.3])
    scale = "log scale" if len(grid) < total + 1 else "every size"
    c1.select_slider(f"{unit.capitalize()} in the circuit (top by score, {scale})", options=grid, key="w_n_slider",
                     on_change=from_slider)
    c2.number_input("Exact count", min_value=0, step=1, key="w_n_box", on_change=from_box, help=f"0 to {total:,}")
    s.absolute = c3.toggle("Rank by |score|", key="w_absolute", help="Off: rank by signed score")
    with state.guard("Evaluation failed"):
        result = cache.evaluate_top_n(evaluator, scores, int(s.n_edges), s.absolute)
        s.explore_result = {"n": result.requested, "faithfulness": result.faithfulness, "metric": result.metric,
                            "edges": result.circuit.n_edges, "nodes": result.circuit.n_nodes}
        widgets.metric_row({
            "Faithfulness": f"{result.faithfulness:.4f}",
            f"Circuit {s.metric}": f"{result.metric:.4f}",
            "Edges (after pruning)": f"{result.circuit.n_edges:,} / {graph.n_edges:,}",
            "Nodes": f"{result.circuit.n_nodes} / {graph.n_forward}",
        })
        note = st.empty()  # always present, so that the elements below keep their places between reruns
        if s.get("explore_note"):
            note.info(s.pop("explore_note"), icon=":material/info:")
        elif result.circuit.n_edges == 0:
            note.info("After pruning, none of these lies on a path from input to logits: add more.")
        widgets.show_graph(scores, result.circuit)
        bar = st.empty()

        def progress(done: int, todo: int) -> None:
            bar.progress(done / todo, text=f"Faithfulness curve: circuit {done + 1} of {todo} (once per scores and data)")

        mib, fine = cache.get_curves(evaluator, scores, s.scores_key, s.absolute, progress)
        bar.empty()
        marker = (100 * result.requested / total, result.faithfulness) if result.requested else None
        st.plotly_chart(render.curve_figure(mib, fine, marker, unit), width="stretch")
        widgets.metric_row({"CPR (area under f)": f"{mib.cpr:.4f}", "CMD (area under |1 - f|)": f"{mib.cmd:.4f}"})


panel()
st.page_link("pages/export.py", label="Export this circuit", icon=":material/download:")
