"""Compare page: the session's runs (or imported circuit files) side by side: faithfulness curves, CPR and
CMD both ways, the overlap of their circuits, and where two of them differ."""

from __future__ import annotations

import streamlit as st

from eapcore.curve import MIB_PERCENTS, edges_for_percent
from ui import cache, comparison, figures, progress, runs, state, widgets
from ui.areas import NOTE

state.require_entry()
s = st.session_state
st.title("Compare")
st.caption("Do other methods, steps or interventions find the same circuit? Runs are compared on the session's data "
           "at MIB's ten sizes: their faithfulness curves, CPR and CMD, how much their circuits overlap, and the edges "
           "on which they differ.")
if not widgets.need("pairs"):
    st.stop()

with st.expander(f"Runs of this session ({len(runs.runs())}): remove one, or import circuit files",
                 expanded=len(runs.edge_runs()) < 2, icon=":material/list:"):
    runs.show_and_remove()
    uploads = st.file_uploader("Import runs: `.pt` or `.json` circuit files for the loaded model (read with "
                               "`weights_only=True`, never unpickled)", type=["pt", "json"], accept_multiple_files=True,
                               key="w_compare_files")
    imported = s.setdefault("compare_imports", {})  # file id -> {"key"} or {"error"}
    for upload in uploads or []:
        if upload.file_id not in imported:
            try:
                imported[upload.file_id] = {"key": runs.import_file(upload)}
                for name in ("compare_runs", "w_compare_runs"):  # compare it too
                    s[name] = [*s.get(name, []), imported[upload.file_id]["key"]]
            except ValueError as e:
                imported[upload.file_id] = {"error": str(e)}
        if "error" in imported[upload.file_id]:
            st.error(imported[upload.file_id]["error"], icon=":material/error:")

options = runs.edge_runs()
if not options:
    st.info("Compare needs runs with edge scores: run an attribution at edge level, or import circuit files above.")
    st.page_link("pages/attribute.py", label="Attribute", icon=":material/arrow_forward:")
    st.stop()
s.compare_runs = [k for k in s.get("compare_runs", options) if k in options] or options[:1]
s.w_compare_runs = [k for k in s.get("w_compare_runs", s.compare_runs) if k in options]
c1, c2 = st.columns([4, 1], vertical_alignment="bottom")
chosen = s.compare_runs = c1.multiselect("Runs to compare", options, key="w_compare_runs", format_func=runs.labels().get,
                                         help="Runs with edge scores (node-level runs choose circuits by node)")
state.widget_value("w_compare_absolute", "absolute")
absolute = c2.toggle("Rank by |score|", key="w_compare_absolute", help="Off: rank edges by signed score")

ready = False
with state.guard("Cannot compare these runs"):
    comparison.chosen_runs(chosen)
    evaluator = comparison.evaluator_for(chosen)
    if cache.undefined(evaluator):
        raise ValueError(f"faithfulness is undefined on {s.data_label}: the clean run and the empty circuit give the "
                         f"same {evaluator.metric.name}; choose data whose corruption changes the answer")
    ready = True
if not ready:
    st.stop()
st.caption(f"Evaluated on {s.data_label} ({len(s.pairs)} pairs) with `{evaluator.metric.name}` and "
           f"`{evaluator.intervention_kind}` (the first run's metric and intervention).")
key = comparison.key(evaluator, chosen, absolute)
found = None
with state.guard("Compare failed"):
    found = progress.button("Compare", "run_compare", ":material/compare_arrows:", key, "Compare",
                            lambda tick: comparison.compute(evaluator, chosen, absolute, tick))
if found is None:
    st.stop()

c = found.comparison
st.subheader("Faithfulness curves")
st.plotly_chart(figures.curves_figure(c.curves), width="stretch")
st.subheader("CPR and CMD")
helps = comparison.area_help(found)
st.dataframe(comparison.area_rows(found), hide_index=True, width="stretch", column_config={
    "run": st.column_config.TextColumn("run", width="medium"),
    **{name: st.column_config.NumberColumn(name, help=text, format="%.4f") for name, text in helps.items()}})
st.markdown(NOTE)

st.subheader("Overlap of the circuits")
graph = runs.runs()[chosen[0]]["scores"].graph
size = st.select_slider("Circuit size", list(MIB_PERCENTS), value=5.0, key="w_compare_size",
                        format_func=lambda p: f"{p:g}% ({edges_for_percent(graph, p):,} edges)")
index = list(MIB_PERCENTS).index(size)
st.plotly_chart(figures.overlap_figure(c.labels, comparison.overlap_matrix(c, index), f"{size:g}%"), width="stretch")
st.caption("Intersection over union of the edges of two runs' circuits (top-k by the ranking above, pruned; 1 when "
           "both are empty).")

if len(c.labels) > 1:
    st.subheader("Where two runs differ")
    for name, fallback in (("w_compare_a", 0), ("w_compare_b", 1)):
        if s.get(name) not in c.labels:
            s[name] = c.labels[fallback]
    d1, d2 = st.columns(2)
    a = d1.selectbox("Run A", c.labels, key="w_compare_a")
    b = d2.selectbox("Run B", c.labels, key="w_compare_b")
    if a == b:
        st.info("Pick two different runs.")
        st.stop()
    by_label = {runs.label(k): runs.runs()[k]["scores"] for k in chosen}
    only_a, only_b = comparison.only_in(by_label[a], by_label[b], size, absolute)
    overlap = comparison.overlap_matrix(c, index)[c.labels.index(a)][c.labels.index(b)]
    widgets.metric_row({"Spearman ρ (all edges)": f"{comparison.spearman_of(c, a, b):.3f}",
                        f"Overlap at {size:g}%": f"{overlap:.3f}", "Only in A": str(len(only_a)),
                        "Only in B": str(len(only_b))},
                       {"Spearman ρ (all edges)": "Rank correlation of the two runs' ranking values over every real edge."})
    for col, name, rows in zip(st.columns(2), "AB", (only_a, only_b)):
        col.markdown(f"**Edges only {name}'s circuit has** at {size:g}%")
        if rows:
            col.dataframe(rows, hide_index=True, width="stretch", height=min(38 + 35 * len(rows), 300))
        else:
            col.caption(f"None: every edge of {name}'s circuit is in the other's.")
    st.markdown("**Top disagreements**: the edges whose ranks differ most between A and B (1 = ranked first)")
    st.dataframe(comparison.disagreement_rows(c, a, b), hide_index=True, width="stretch")
