"""Export page: download the current circuit (.pt, .json, PNG) and the curve (PNG); import a circuit;
write the session's runs as an MIB submission (.zip) and check one."""

from __future__ import annotations

import streamlit as st

from eapcore.edits import from_provenance
from eapcore.mib import MODELS as MIB_MODELS
from eapcore.models import model_graph
from eapcore.select import unit_of
from eapcore.sizes import unit_count
from ui import cache, current, edits, exports, figures, graph_view, runs, state, submission, widgets
from ui.provenance import fmt_faithfulness, picture_title, run_details

state.require_entry()
s = st.session_state
st.title("Export")

st.subheader("Download")
if s.get("scores") is None:
    widgets.need("scores")
else:
    with state.guard("Export failed"):
        scores = s.scores
        unit, total = unit_of(scores), unit_count(scores)
        evaluator = current.evaluator()
        now = current.evaluation(evaluator)  # what Explore shows (evaluated there already)
        result, circuit = now.evaluation, now.evaluation.circuit
        n = result.requested
        data_label = s.get("data_label", "")
        provenance = {**scores.provenance, "selection": now.selection, "data_label": data_label,
                      "evaluation": {"metric": evaluator.metric.name, "intervention": evaluator.intervention_kind,
                                     "value": result.metric, "faithfulness": result.faithfulness}}
        chosen = (f"the imported circuit ({s.pinned.get('name')})" if now.pinned
                  else f"top {n:,} {unit}") + (" with your edits" if now.edits else "")
        st.caption(f"{s.scores_label} · {chosen} → {circuit.n_edges:,} edges and {circuit.n_nodes} nodes after pruning, "
                   f"faithfulness {fmt_faithfulness(result.faithfulness)} (set the size on the Explore page).")
        size = (f"{circuit.n_edges} edges, {circuit.n_nodes} nodes" + (f" (top {n} {unit})" if not now.pinned else "")
                + (" edited" if now.edits else ""))
        title = picture_title(scores.provenance, data_label, size, result.faithfulness)
        curve = None
        if result.faithfulness is not None:  # the curve is computed (and cached) on the Explore page
            curve = cache.get_curves(evaluator, scores, s.scores_key, bool(s.get("absolute", True)))
        marker = (100 * n / total, result.faithfulness) if n and total and result.faithfulness is not None else None
        stem = f"circuit_{n}"
        # Download data is made when the button is clicked, outside this script run: the callables
        # below close over plain values only, never over st.session_state.
        c1, c2, c3, c4 = st.columns(4)
        changes, style = now.edits, graph_view.style()
        c1.download_button(".pt (EAP-IG)", lambda: exports.pt_bytes(scores, circuit, provenance, changes), f"{stem}.pt",
                           "application/octet-stream", on_click="ignore", icon=":material/download:")
        c2.download_button(".json (EAP-IG)", lambda: exports.json_bytes(scores, circuit, provenance, changes),
                           f"{stem}.json", "application/json", on_click="ignore", icon=":material/download:")
        c3.download_button("Circuit PNG", lambda: figures.circuit_png(scores, circuit, title=title, style=style),
                           f"{stem}.png", "image/png", on_click="ignore", icon=":material/image:")
        c4.download_button("Curve PNG", lambda: figures.curve_png(*curve, marker, unit, title, total),
                           "faithfulness_curve.png", "image/png", on_click="ignore", icon=":material/show_chart:",
                           disabled=curve is None, help=None if curve else "Faithfulness is undefined on this data")

st.divider()
st.subheader("Import a circuit")
st.caption("A `.pt` or `.json` file written by this tool, EAP-IG or MIB, for the loaded model's graph. "
           "`.pt` files are read with `weights_only=True` (never unpickled).")
upload = st.file_uploader("Circuit file", type=["pt", "json"], key="w_circuit_file")
if upload is not None and s.get("imported_id") != upload.file_id:
    s.imported_id, s.imported, s.import_error = upload.file_id, None, None
    try:
        expected = model_graph(cache.get_model(s.model_spec))
        imp_scores, imp_circuit, key = exports.read_circuit(upload.name, upload.getvalue(), expected)
        s.imported = {"name": upload.name, "scores": imp_scores, "circuit": imp_circuit, "key": key}
    except Exception as e:  # noqa: BLE001 - shown while this file stays selected
        s.import_error = f"{upload.name} was not imported: {e}"
if upload is not None and s.get("import_error"):
    st.error(s.import_error, icon=":material/error:")

imported = s.get("imported") if upload is not None else None
if imported:
    with state.guard("Evaluating the imported circuit failed"):
        imp_scores, imp_circuit = imported["scores"], imported["circuit"]
        details = run_details(imp_scores.provenance, imp_circuit.n_edges, imp_circuit.n_nodes)
        st.markdown(f"**{imported['name']}**: " + " · ".join(f"{k} **{v}**" for k, v in details.items()))
        metric = current.scores_metric(imp_scores, s.metric)
        evaluator = cache.get_evaluator(s.model_spec, s.pairs, metric, cache.intervention_of(imp_scores))
        result = cache.evaluate_circuit(evaluator, imp_circuit)
        graph = imp_scores.graph
        st.caption(f"Evaluated on the session's data ({s.data_label}, {len(s.pairs)} pairs) with `{metric}` and "
                   f"`{evaluator.intervention_kind}`.")
        widgets.metric_row({"Faithfulness": fmt_faithfulness(result.faithfulness), f"Circuit {metric}": f"{result.metric:.4f}",
                            "Edges": f"{imp_circuit.n_edges:,} / {graph.n_edges:,}", "Nodes": f"{imp_circuit.n_nodes}"},
                           {"Faithfulness": widgets.FAITHFULNESS_HELP})
        widgets.show_graph(imp_scores, imp_circuit)
        recorded = from_provenance(imp_scores.provenance, graph)
        if recorded:
            st.caption(f"Made with hand edits: include {', '.join(recorded.include) or 'nothing'}; exclude "
                       f"{', '.join(recorded.exclude) or 'nothing'}.")
        if st.button("Explore these scores", icon=":material/hub:", key="explore_imported"):
            edits.explore_imported(imp_scores, imp_circuit, imported["key"], imported["name"])
            st.switch_page("pages/explore.py")

st.divider()
st.subheader("Submit to MIB")
st.caption("MIB's circuit track takes one folder per `{task}_{model}` (e.g. `ioi_gpt2`) holding one file of importance "
           "scores for every edge, or 9 binary circuits at MIB's sizes; upload it to a public Hugging Face repository "
           "and submit its URL on the leaderboard. The leaderboard ranks the scores both ways: CPR from the signed "
           "ranking, CMD from the absolute one (Explore: “CPR and CMD both ways”).")
keys = list(runs.runs())
if not keys:
    st.info("No runs yet: run an attribution (or import a circuit above and explore it).")
else:
    s.w_mib_runs = [k for k in s.get("w_mib_runs", [s.get("scores_key")]) if k in keys]
    chosen = st.multiselect("Runs to submit", keys, key="w_mib_runs", format_func=runs.labels().get,
                            help="One run per task and model")
    entries = []
    for key in chosen:
        run_scores = runs.runs()[key]["scores"]
        same_data = s.get("pairs") is not None and run_scores.provenance.get("data") == s.pairs.fingerprint()
        task = submission.suggested_task(run_scores, s.get("data_label") if same_data else None)
        model = submission.suggested_model(run_scores)
        tasks, models = submission.task_options(task), [*MIB_MODELS, *([model] if model not in MIB_MODELS else [])]
        c1, c2, c3 = st.columns([2, 1, 1], vertical_alignment="bottom")
        c1.markdown(f"**{runs.label(key)}**")
        task = c2.selectbox("MIB task", tasks, index=tasks.index(task) if task in tasks else None, key=f"w_mib_task_{key}",
                            accept_new_options=True, placeholder="choose or type a task",
                            help="MIB's task names; another name is written as given (the leaderboard skips it)")
        model = c3.selectbox("MIB model", models, index=models.index(model), key=f"w_mib_model_{key}",
                             accept_new_options=True, help="MIB's model names; a run of another model is checked for "
                                                           "everything but MIB's edge count")
        entries.append((runs.label(key), run_scores, task, model))
    o1, o2, o3 = st.columns(3)
    circuits = o1.toggle("Binary circuits at MIB's sizes", key="w_mib_circuits",
                         help="9 files, the top edges at 0.1, 0.2, 0.5, 1, 2, 5, 10, 20 and 50% of the graph (pruned); "
                              "off: one file of importance scores, which MIB ranks both ways itself")
    absolute = o2.toggle("Rank by |score|", value=True, key="w_mib_absolute", disabled=not circuits,
                         help="How the binary circuits choose their edges; off: by signed score")
    fmt = o3.radio("Format", ["pt", "json"], horizontal=True, key="w_mib_format")
    settings = (tuple((k, t, m) for k, (_, _, t, m) in zip(chosen, entries)), circuits, absolute, fmt)
    if st.button("Write the submission", icon=":material/folder_zip:", key="write_mib", disabled=not chosen):
        with state.guard("The submission was not written"):
            missing = [label for label, _, task, _ in entries if not task]
            if missing:
                raise ValueError(f"choose or type an MIB task for {', '.join(missing)}")
            blob, report = submission.write_zip(entries, circuits, fmt, absolute)
            s.mib_zip = {"settings": settings, "bytes": blob, "report": report}
    made = s.get("mib_zip")
    if made is not None and made["settings"] == settings:
        submission.show_report(made["report"])
        st.download_button("MIB submission (.zip)", made["bytes"], f"{submission.FOLDER}.zip", "application/zip",
                           on_click="ignore", icon=":material/download:")

st.markdown("**Check a submission**")
check = st.file_uploader("A submission folder as a .zip (the folder that holds the `{task}_{model}` folders)",
                         type=["zip"], key="w_mib_check")
if check is not None:
    with state.guard(f"{check.name} was not checked"):
        if s.get("mib_checked", {}).get("id") != check.file_id:
            s.mib_checked = {"id": check.file_id, "report": submission.check_zip(check.name, check.getvalue())}
        submission.show_report(s.mib_checked["report"])
