"""Export page: download the current circuit (.pt, .json, PNG) and the curve (PNG); import a circuit."""

from __future__ import annotations

import streamlit as st

from eapcore import render
from eapcore.models import model_graph
from ui import cache, exports, state, widgets

state.require_entry()
s = st.session_state
st.title("Export")

st.subheader("Download")
if s.get("scores") is None:
    widgets.need("scores")
else:
    with state.guard("Export failed"):
        scores = s.scores
        n = s.get("n_edges")
        unit = cache.unit_of(scores)
        n = cache.default_size(scores) if n is None or n > cache.unit_count(scores) else int(n)
        absolute = s.get("absolute", True)
        circuit = cache.select(scores, n, absolute)
        how = "top_n" if unit == "edges" else "by_nodes"
        provenance = {**scores.provenance, "selection": {"method": how, "n": n, "absolute": absolute, "pruned": True},
                      "data_label": s.get("data_label", "")}
        st.caption(f"{s.scores_label} · top {n:,} {unit} → {circuit.n_edges:,} edges and {circuit.n_nodes} nodes "
                   "after pruning (set the size on the Explore page).")
        stem = f"circuit_{n}"
        c1, c2, c3, c4 = st.columns(4)
        c1.download_button(".pt (EAP-IG)", lambda: exports.pt_bytes(scores, circuit, provenance), f"{stem}.pt",
                           "application/octet-stream", on_click="ignore", icon=":material/download:")
        c2.download_button(".json (EAP-IG)", lambda: exports.json_bytes(scores, circuit, provenance), f"{stem}.json",
                           "application/json", on_click="ignore", icon=":material/download:")
        c3.download_button("Circuit PNG", lambda: render.circuit_png(scores, circuit), f"{stem}.png", "image/png",
                           on_click="ignore", icon=":material/image:")

        def curve_png() -> bytes:
            evaluator = cache.get_evaluator(s.model_spec, s.pairs, s.metric, cache.intervention_of(scores))
            mib, fine = cache.get_curves(evaluator, scores, s.scores_key, absolute)
            marker = None
            if n:
                marker = (100 * n / cache.unit_count(scores), cache.evaluate_top_n(evaluator, scores, n, absolute).faithfulness)
            return render.curve_png(mib, fine, marker, unit)

        c4.download_button("Curve PNG", curve_png, "faithfulness_curve.png", "image/png", on_click="ignore",
                           icon=":material/show_chart:")

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
        evaluator = cache.get_evaluator(s.model_spec, s.pairs, s.metric, cache.intervention_of(imported["scores"]))
        result = cache.evaluate_circuit(evaluator, imported["circuit"])
        graph = imported["scores"].graph
        widgets.metric_row({"Faithfulness": f"{result.faithfulness:.4f}", f"Circuit {s.metric}": f"{result.metric:.4f}",
                            "Edges": f"{result.circuit.n_edges:,} / {graph.n_edges:,}", "Nodes": f"{result.circuit.n_nodes}"})
        widgets.show_graph(imported["scores"], imported["circuit"])
        if st.button("Explore these scores", icon=":material/hub:", key="explore_imported"):
            size = imported["circuit"].n_nodes if cache.unit_of(imported["scores"]) == "nodes" else imported["circuit"].n_edges
            state.set_scores(imported["scores"], imported["key"], f"imported {imported['name']}", size)
            st.switch_page("pages/explore.py")
