"""Export page: download the current circuit (.pt, .json, PNG) and the curve (PNG); import a circuit."""

from __future__ import annotations

import streamlit as st

from eapcore.models import model_graph
from eapcore.select import NODES, unit_of
from eapcore.sizes import unit_count
from ui import cache, current, exports, figures, state, widgets
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
                  else f"top {n:,} {unit}")
        st.caption(f"{s.scores_label} · {chosen} → {circuit.n_edges:,} edges and {circuit.n_nodes} nodes after pruning, "
                   f"faithfulness {fmt_faithfulness(result.faithfulness)} (set the size on the Explore page).")
        size = f"{circuit.n_edges} edges, {circuit.n_nodes} nodes" + (f" (top {n} {unit})" if not now.pinned else "")
        title = picture_title(scores.provenance, data_label, size, result.faithfulness)
        curve = None
        if result.faithfulness is not None:  # the curve is computed (and cached) on the Explore page
            curve = cache.get_curves(evaluator, scores, s.scores_key, bool(s.get("absolute", True)))
        marker = (100 * n / total, result.faithfulness) if n and total and result.faithfulness is not None else None
        stem = f"circuit_{n}"
        # Download data is made when the button is clicked, outside this script run: the callables
        # below close over plain values only, never over st.session_state.
        c1, c2, c3, c4 = st.columns(4)
        c1.download_button(".pt (EAP-IG)", lambda: exports.pt_bytes(scores, circuit, provenance), f"{stem}.pt",
                           "application/octet-stream", on_click="ignore", icon=":material/download:")
        c2.download_button(".json (EAP-IG)", lambda: exports.json_bytes(scores, circuit, provenance), f"{stem}.json",
                           "application/json", on_click="ignore", icon=":material/download:")
        c3.download_button("Circuit PNG", lambda: figures.circuit_png(scores, circuit, title=title), f"{stem}.png",
                           "image/png", on_click="ignore", icon=":material/image:")
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
        if st.button("Explore these scores", icon=":material/hub:", key="explore_imported"):
            size = imp_circuit.n_nodes if unit_of(imp_scores) == NODES else imp_circuit.n_edges
            state.set_scores(imp_scores, imported["key"], f"imported {imported['name']}", size,
                             pinned={"circuit": imp_circuit, "name": imported["name"]})
            st.switch_page("pages/explore.py")
