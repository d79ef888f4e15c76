"""Explore page: a circuit-size slider that evaluates the top-n circuit on every move, hand edits of the
circuit, the circuit as an interactive graph, what a picked node does, and the faithfulness curve with
CPR/CMD."""

from __future__ import annotations

from dataclasses import replace

import streamlit as st

from eapcore.models import model_graph
from eapcore.select import NODES, unit_of
from eapcore.sizes import log_grid, unit_count
from ui import areas, cache, current, drilldown, edits, figures, graph_view, per_prompt, robustness, state, verification, widgets
from ui.provenance import UNDEFINED, fmt_faithfulness

state.require_entry()
s = st.session_state
st.title("Explore")
if not widgets.need("pairs", "scores"):
    st.stop()
widgets.run_picker()

scores, graph = s.scores, s.scores.graph
unit, total = unit_of(scores), unit_count(scores)
ready = False
with state.guard("Cannot explore these scores"):
    model_cfg = model_graph(cache.get_model(s.model_spec)).cfg
    if model_cfg != graph.cfg:
        raise ValueError(f"the scores are for a graph {graph.cfg} but the loaded model's is {model_cfg}; "
                         "load the matching model or run the attribution again")
    evaluator = current.evaluator()
    baseline = evaluator.baseline()
    undefined = cache.undefined(evaluator)
    ready = True
if not ready:
    st.stop()

metric = evaluator.metric.name
if metric != s.metric:
    spec = current.spec_of(scores)
    st.warning(f"These scores were made with `{metric}`, so Explore evaluates their circuits with `{metric}`; "
               f"the session's metric is now `{s.metric}`.", icon=":material/warning:")
    if spec is not None and st.button(f"Run this attribution again with {s.metric}", icon=":material/replay:",
                                      key="rerun_with_metric"):
        s.attr_spec = replace(spec, metric=s.metric)
        for widget in ("w_method", "w_steps", "w_batch", "w_intervention", "w_attr_metric", "w_level"):
            s.pop(widget, None)  # re-seeded from attr_spec
        s.run_requested = True
        st.switch_page("pages/attribute.py")

grid = log_grid(total)
pin = current.pinned()
n_now = current.pinned_size(scores, pin) if pin is not None else current.size()


def snap(n: int) -> int:
    return min(grid, key=lambda g: (abs(g - n), g))


def from_slider() -> None:
    current.unpin()
    s.n_edges = int(s.w_n_slider)
    s.w_n_box = s.n_edges


def from_box() -> None:
    current.unpin()
    n = int(s.w_n_box)
    if n > total:  # no max_value on the box: say why the number changed instead of silently clamping it
        s.explore_note = f"{n:,} is more than the {total:,} {unit} in the graph; showing the whole graph ({total:,})."
        n = s.w_n_box = total
    s.n_edges = n
    s.w_n_slider = snap(s.n_edges)


if s.get("w_n_slider") not in grid or (pin is not None and s.w_n_slider != snap(n_now)):
    s.w_n_slider = snap(n_now)
if s.get("w_n_box") is None or s.w_n_box > total or pin is not None:
    s.w_n_box = n_now
state.widget_value("w_absolute", "absolute")
st.caption(f"Scores: {s.scores_label} · data: {s.data_label} ({len(s.pairs)} pairs) · metric `{metric}` "
           f"(clean {baseline.clean:.3f}, corrupted {baseline.corrupted:.3f}) · intervention `{evaluator.intervention_kind}`")


def panel() -> None:
    # Not a fragment on purpose: a slider move is then a full rerun, which Streamlit lets interrupt a
    # running curve computation (fragment reruns wait for the current run to finish).
    c1, c2, c3 = st.columns([5, 1.2, 1.3])
    scale = "log scale" if len(grid) < total + 1 else "every size"
    c1.select_slider(f"{unit.capitalize()} in the circuit (top by score, {scale})", options=grid, key="w_n_slider",
                     on_change=from_slider)
    c2.number_input("Exact count", min_value=0, step=1, key="w_n_box", on_change=from_box, help=f"0 to {total:,}")
    s.absolute = c3.toggle("Rank by |score|", key="w_absolute", on_change=current.unpin, help="Off: rank by signed score")
    with state.guard("Evaluation failed"):
        now = current.evaluation(evaluator)
        result = now.evaluation
        widgets.metric_row({
            "Faithfulness": fmt_faithfulness(result.faithfulness),
            f"Circuit {metric}": f"{result.metric:.4f}",
            "Edges (after pruning)": f"{result.circuit.n_edges:,} / {graph.n_edges:,}",
            "Nodes (excl. logits)": f"{result.circuit.n_nodes} / {graph.n_forward}",
        }, {"Faithfulness": widgets.FAITHFULNESS_HELP,
            "Nodes (excl. logits)": "Source nodes in the circuit (input, heads, MLPs); logits is always in."},
            edits.delta(result, now.unedited) if now.edits else None)
        note = st.empty()  # always present, so that the elements below keep their places between reruns
        if s.get("explore_note"):
            note.info(s.pop("explore_note"), icon=":material/info:")
        elif pin is not None:
            note.info(f"Showing the imported circuit from {s.pinned.get('name')} as it was saved "
                      f"({result.circuit.n_edges:,} edges, {result.circuit.n_nodes} nodes). Move the slider or type a "
                      "size to take the top circuit by score instead.", icon=":material/info:")
        elif undefined:
            note.warning(f"Faithfulness is undefined on this data: the clean run and the empty circuit give the same "
                         f"{metric} ({baseline.clean:.4g}), so there is nothing to recover.", icon=":material/warning:")
        elif result.circuit.n_edges == 0:
            note.info("After pruning, none of these lies on a path from input to logits: add more.")
        with st.expander("Edit the circuit" + (" (edited)" if now.edits else ""), expanded=bool(now.edits)):
            edits.editor(graph, result.circuit, s.get("node"))
            if now.edits:
                st.caption(edits.summary(result, now.unedited, now.dropped))
        style = graph_view.controls(graph, result.circuit)
        graph_slot = st.container()  # filled after the drill-down below it, which then shows first after a pick
        drilldown.panel(s.model_spec, s.pairs, scores, result.circuit, metric, style.picked)
        with graph_slot:
            widgets.show_graph(scores, result.circuit, style=style)
        if undefined:
            widgets.metric_row({"CPR (area under f)": UNDEFINED, "CMD (area under |1 - f|)": UNDEFINED},
                               {"CPR (area under f)": widgets.CPR_HELP, "CMD (area under |1 - f|)": widgets.CMD_HELP})
            return
        bar = st.empty()

        def progress(done: int, todo: int) -> None:
            bar.progress(done / todo, text=f"Faithfulness curve: circuit {done + 1} of {todo} (once per scores and data)")

        mib, fine = cache.get_curves(evaluator, scores, s.scores_key, s.absolute, progress)
        bar.empty()
        marker = (100 * result.requested / total, result.faithfulness) if result.requested and total else None
        st.plotly_chart(figures.curve_figure(mib, fine, marker, unit, total), width="stretch")
        if unit == NODES:
            st.caption("Node circuits hold whole nodes: MIB's percentages round to "
                       + ", ".join(f"{p:g}% → {n}" for p, n in zip(mib.percents, mib.n_edges)) + f" of {total} nodes.")
        widgets.metric_row({"CPR (area under f)": f"{mib.cpr:.4f}", "CMD (area under |1 - f|)": f"{mib.cmd:.4f}"},
                           {"CPR (area under f)": widgets.CPR_HELP, "CMD (area under |1 - f|)": widgets.CMD_HELP})
        areas.expander(evaluator)


panel()
for title, key, show in (("Verify: estimates against exact patching", "w_verify_open", verification.panel),
                         ("Per prompt: each pair's faithfulness", "w_per_prompt_open", per_prompt.panel),
                         ("Robustness: every intervention", "w_robustness_open", robustness.panel)):
    box = st.expander(title, key=key, on_change="rerun")  # computed only while open
    if box.open:
        with box, state.guard(f"{title.split(':')[0]} failed"):
            show(evaluator)
st.page_link("pages/export.py", label="Export this circuit", icon=":material/download:")
