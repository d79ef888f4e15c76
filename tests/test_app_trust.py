"""The trust checks in the app (AppTest): Explore's Verify, Per prompt, Robustness and "CPR and CMD both
ways" panels, the Compare page, runs removed and imported, the Export page's MIB submission and check,
and MIB task files on the Data page. Every number the app shows is checked against eapcore computing the
same thing directly on the same model and data (the ``engine`` fixture), not against the app's own code.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch

from eapcore.attribute import AttributionSpec, attribute
from eapcore.compare import compare
from eapcore.curve import edges_for_percent, mib_curves
from eapcore.evaluate import CircuitEvaluator
from eapcore.export import save_pt
from eapcore.mib import check_submission
from eapcore.per_example import per_example
from eapcore.robustness import robustness
from eapcore.select import top_n
from eapcore.tokens import token_diff
from eapcore.verify import verify

from conftest import errors, metric_value, new_app, run_attribution


def reference(engine, intervention: str = "patching") -> CircuitEvaluator:
    model, data = engine
    return CircuitEvaluator(model, data, "logit_diff", batch_size=128, intervention=intervention)


def explore_at(size: int):
    """A new session on Explore with the default run's top-``size`` circuit."""
    at = run_attribution(new_app())
    at.number_input(key="w_n_box").set_value(size).run()
    assert errors(at) == []
    return at


def open_panel(at, key: str):
    at.session_state[key] = True  # the expander's state: it computes only while open
    at.run()
    assert errors(at) == [] and not at.exception, (errors(at), at.exception)
    return at


def frame(at, column: str) -> pd.DataFrame:
    found = [d.value for d in at.dataframe if column in d.value.columns]
    assert found, f"no table with a column {column!r}; have {[list(d.value.columns) for d in at.dataframe]}"
    return found[0]


def figure(at, trace_type: str, name: str | None = None) -> dict:
    """The first plotly figure with a trace of ``trace_type`` (named ``name``, if given)."""
    found = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    found = [f for f in found if any(t.get("type") == trace_type and name in (None, t.get("name")) for t in f["data"])]
    assert found, f"no {trace_type} figure"
    return found[0]


def num(text: str) -> float:
    return float("nan") if text == "undefined" else float(text.rstrip("%"))


def close(a, b, tol: float) -> None:
    a, b = pd.Series(list(a), dtype=float), pd.Series(list(b), dtype=float)
    assert len(a) == len(b), (list(a), list(b))
    assert (a.isna() == b.isna()).all() and ((a - b).abs()[~a.isna()] <= tol).all(), (list(a), list(b))


# ----- Explore's panels -----


def test_verify_panel_equals_eapcore_verify_and_is_kept_per_circuit(engine) -> None:
    at = open_panel(explore_at(12), "w_verify_open")
    at.number_input(key="w_verify_k").set_value(15).run()
    at.button(key="run_verify").click().run()
    assert errors(at) == []
    scores = at.session_state["scores"]
    want = verify(reference(engine), scores, 15, top_n(scores, 12))
    assert num(metric_value(at, "Pearson r")) == pytest.approx(want.pearson, abs=1e-3)
    assert num(metric_value(at, "Spearman ρ")) == pytest.approx(want.spearman, abs=1e-3)
    assert num(metric_value(at, "Sign agreement")) == pytest.approx(100 * want.sign_agreement, abs=0.5)
    assert num(metric_value(at, "Complement faithfulness")) == pytest.approx(want.complement_faithfulness, abs=1e-3)
    worst = frame(at, "|estimate − exact|")
    assert list(worst["edge"]) == [e.edge for e in want.worst(10)]
    close(worst["exact"], [e.exact for e in want.worst(10)], 1e-5)
    scatter = figure(at, "scatter", "estimate = exact")["data"]
    close(scatter[1]["x"], [e.estimate for e in want.edges], 1e-6)
    close(scatter[1]["y"], [e.exact for e in want.edges], 1e-5)
    close(scatter[0]["x"], scatter[0]["y"], 0)  # the identity line

    at.number_input(key="w_n_box").set_value(30).run()  # another circuit: not verified yet
    assert not [m for m in at.metric if m.label == "Pearson r"] and at.button(key="run_verify")
    at.number_input(key="w_n_box").set_value(12).run()  # back: shown at once, no click
    assert num(metric_value(at, "Complement faithfulness")) == pytest.approx(want.complement_faithfulness, abs=1e-3)

    at.number_input(key="w_verify_k").set_value(10**6).run()  # beyond the graph: clamped, with the engine's note
    at.button(key="run_verify").click().run()
    graph = scores.graph
    assert errors(at) == [] and any(f"more than the graph's {graph.n_edges} edges" in i.value for i in at.info)
    assert len(figure(at, "scatter", "estimate = exact")["data"][1]["x"]) == graph.n_edges


def test_per_prompt_panel_equals_eapcore_per_example(engine) -> None:
    model, _ = engine
    at = open_panel(explore_at(12), "w_per_prompt_open")
    scores, pairs = at.session_state["scores"], at.session_state["pairs"]
    want = per_example(reference(engine), top_n(scores, 12))
    shown = num(metric_value(at, "Faithfulness (all pairs)"))
    assert shown == pytest.approx(want.faithfulness, abs=1e-4) == num(metric_value(at, "Faithfulness"))
    lo, hi = metric_value(at, "95% interval").split(" – ")
    assert (float(lo), float(hi)) == pytest.approx(want.interval, abs=1e-3)
    table = frame(at, "faithfulness")
    assert list(table["pair"]) == list(range(1, len(pairs) + 1))
    close(table["faithfulness"], want.pair_faithfulness.tolist(), 1e-5)
    close(table["circuit logit_diff"], want.metric.tolist(), 1e-4)
    close(table["clean logit_diff"], want.clean.tolist(), 1e-4)
    close(table["corrupted logit_diff"], want.corrupted.tolist(), 1e-4)
    bars = figure(at, "histogram")["data"][0]
    lo, hi = bars["xbins"]["start"], bars["xbins"]["end"]  # values beyond the axis are drawn at its ends
    close(sorted(bars["x"]), sorted(min(max(v, lo), hi) for v in want.pair_faithfulness.tolist() if v == v), 1e-6)

    at.number_input(key="w_prompt_pair").set_value(3).run()
    chips = [h.proto.body for h in at.get("html") if "<b>pair 3</b>" in h.proto.body]
    diff = token_diff(model.tokenizer, pairs.clean[2], pairs.corrupted[2])
    assert chips and all(a.replace(" ", "·") in chips[0] for a, _, _ in diff)
    assert num(metric_value(at, "pair 3: clean")) == pytest.approx(float(want.clean[2]), abs=1e-4)
    assert num(metric_value(at, "pair 3: corrupted")) == pytest.approx(float(want.corrupted[2]), abs=1e-4)
    assert num(metric_value(at, "pair 3: circuit")) == pytest.approx(float(want.metric[2]), abs=1e-4)

    at.number_input(key="w_n_box").set_value(0).run()  # the empty circuit: its interval is reported, no crash
    assert errors(at) == [] and not at.exception
    assert metric_value(at, "95% interval") == "0.000 – 0.000" and metric_value(at, "Faithfulness (all pairs)") == "0.0000"


def test_robustness_panel_equals_eapcore_robustness(engine) -> None:
    model, data = engine
    at = open_panel(explore_at(20), "w_robustness_open")
    at.button(key="run_robustness").click().run()
    assert errors(at) == []
    want = robustness(model, data, top_n(at.session_state["scores"], 20), "logit_diff", batch_size=128)
    table = frame(at, "circuit faithfulness")
    assert [i.split(" ")[0] for i in table["intervention"]] == [r.intervention for r in want]
    nan = float("nan")
    close(table["circuit faithfulness"], [nan if r.faithfulness is None else r.faithfulness for r in want], 1e-4)
    close(table["complement faithfulness"],
          [nan if r.complement_faithfulness is None else r.complement_faithfulness for r in want], 1e-4)
    captions = [c.value for c in at.caption]
    assert all(f"{r.intervention}: {r.note}" in captions for r in want if r.note)
    bars = figure(at, "bar")["data"]
    assert bars[0]["x"] == [r.intervention for r in want if r.faithfulness is not None]


def test_cpr_and_cmd_both_ways_equal_mib_curves(engine) -> None:
    at = open_panel(run_attribution(new_app()), "w_areas_open")
    mib = mib_curves(reference(engine), at.session_state["scores"])
    for axis in ("log", "linear"):
        board, mark = mib.leaderboard(axis), " (board)" if axis == "log" else ""
        assert num(metric_value(at, f"CPR · signed, {axis}{mark}")) == pytest.approx(board["CPR"], abs=1e-4)
        assert num(metric_value(at, f"CMD · absolute, {axis}{mark}")) == pytest.approx(board["CMD"], abs=1e-4)
    table = frame(at, "area_under · log")
    for row, curve in zip(table.to_dict("records"), (mib.signed, mib.absolute)):
        assert row["ranking"] == curve.ranking
        for kind in ("area_under", "area_from_1"):
            for axis in ("linear", "log"):
                assert row[f"{kind} · {axis}"] == pytest.approx(getattr(curve, kind)(axis), abs=1e-5)
    helps = {m.label: m.help for m in at.metric}
    assert "area_under = Σ (x₂ − x₁)·(f₁ + f₂)/2" in helps["CPR · signed, log (board)"]
    assert "What MIB's leaderboard reports" in helps["CMD · absolute, log (board)"]
    assert any("MIB's leaderboard reports" in m.value and "run_evaluation.py" in m.value for m in at.markdown)
    # the numbers that were there stay: the linear-axis areas of the toggle's (absolute) ranking
    assert num(metric_value(at, "CPR (area under f)")) == pytest.approx(mib.absolute.cpr, abs=2e-4)


def test_panels_of_node_level_scores(engine) -> None:
    """Node-level scores choose circuits by node: Per prompt and Robustness take that circuit; Verify and the
    both-ways areas, which rank edges, say why they do not apply."""
    from eapcore.select import by_nodes

    at = new_app()
    at.switch_page("pages/attribute.py").run()
    at.selectbox(key="w_method").set_value("EAP")
    at.selectbox(key="w_level").set_value("node")
    run_attribution(at, switch=False)
    for key in ("w_areas_open", "w_verify_open", "w_per_prompt_open", "w_robustness_open"):
        open_panel(at, key)
    infos = " ".join(i.value for i in at.info)
    assert "Verify checks edge scores" in infos and "MIB's areas rank edges" in infos
    circuit = by_nodes(at.session_state["scores"], at.session_state["n_edges"])
    want = per_example(reference(engine), circuit)
    assert num(metric_value(at, "Faithfulness (all pairs)")) == pytest.approx(want.faithfulness, abs=1e-4)
    at.button(key="run_robustness").click().run()
    assert errors(at) == [] and frame(at, "circuit faithfulness")["circuit faithfulness"][0] == pytest.approx(
        want.faithfulness, abs=1e-4)


# ----- Compare -----


def attribute_method(at, method: str, batch: int | None = None):
    at.switch_page("pages/attribute.py").run()
    at.selectbox(key="w_method").set_value(method)
    if batch is not None:
        at.number_input(key="w_batch").set_value(batch)
    return run_attribution(at, switch=False, open_explore=False)


def test_compare_page_equals_eapcore_compare(engine, tmp_path: Path) -> None:
    model, data = engine
    at = new_app()
    attribute_method(at, "EAP")
    attribute_method(at, "EAP-IG-inputs")
    third = attribute(model, data, AttributionSpec("clean-corrupted", batch_size=32))
    save_pt(tmp_path / "cc.pt", third, None)
    at.switch_page("pages/compare.py").run()
    at.file_uploader(key="w_compare_files").set_value([("cc.pt", (tmp_path / "cc.pt").read_bytes(), "application/octet-stream")]).run()
    assert errors(at) == []
    runs = at.session_state["runs"]
    labels = [r["label"] for r in runs.values()]
    assert len(runs) == 3 and labels[2] == "imported cc.pt" and at.multiselect(key="w_compare_runs").value == list(runs)
    at.button(key="run_compare").click().run()
    assert errors(at) == [] and not at.exception

    by_label = {r["label"]: r["scores"] for r in runs.values()}
    want = compare(reference(engine), by_label, absolute=True)
    curves = {t["name"]: t["y"] for t in figure(at, "scatter", labels[0])["data"]}
    for label in labels:
        close(curves[label], want.curves[label].faithfulness, 2e-4)
    areas = frame(at, "CPR · absolute, linear").set_index("run")
    for label in labels:
        assert areas.loc[label, "CPR · absolute, linear"] == pytest.approx(want.curves[label].cpr, abs=2e-4)
        assert areas.loc[label, "CMD · absolute, linear"] == pytest.approx(want.curves[label].cmd, abs=2e-4)
        mib = mib_curves(reference(engine), by_label[label])
        assert areas.loc[label, "CPR · signed, log (board)"] == pytest.approx(mib.leaderboard("log")["CPR"], abs=1e-3)
        assert areas.loc[label, "CMD · absolute, log (board)"] == pytest.approx(mib.leaderboard("log")["CMD"], abs=1e-3)
        assert areas.loc[label, "CPR · signed, linear"] == pytest.approx(mib.signed.area_under("linear"), abs=1e-3)
    index = want.percents.index(5.0)  # the overlap slider's default size
    z = figure(at, "heatmap")["data"][0]["z"]
    for (a, b), values in want.overlap.items():
        assert z[labels.index(a)][labels.index(b)] == pytest.approx(values[index])
    a, b = labels[0], labels[1]
    assert num(metric_value(at, "Spearman ρ (all edges)")) == pytest.approx(want.spearman[(a, b)], abs=1e-3)
    k = edges_for_percent(by_label[a].graph, 5.0)
    ca, cb = top_n(by_label[a], k).edges, top_n(by_label[b], k).edges
    graph = by_label[a].graph
    only_a = {graph.edge_name(i, j) for i, j in (ca & ~cb).nonzero().tolist()}
    assert metric_value(at, "Only in A") == str(len(only_a))
    if only_a:
        assert set(frame(at, "score in the other run")["edge"]) == only_a
    disagree = frame(at, "rank in A")
    assert list(disagree["edge"]) == [d.edge for d in want.disagreements[(a, b)]]
    close(disagree["rank in B"], [d.rank_b for d in want.disagreements[(a, b)]], 0)

    at.switch_page("pages/explore.py").run()
    at.switch_page("pages/compare.py").run()  # kept: shown again without a click
    assert errors(at) == [] and not [x for x in at.button if x.key == "run_compare"]
    assert frame(at, "CPR · absolute, linear")["run"].tolist() == labels


def test_compare_refuses_runs_on_different_data_naming_both(setup) -> None:
    _, csv = setup
    at = new_app()
    attribute_method(at, "EAP")
    first = at.session_state["scores_label"]
    at.switch_page("pages/data.py").run()
    at.radio(key="w_data_source").set_value("Upload CSV").run()
    fewer = pd.read_csv(csv, dtype=str, keep_default_na=False).head(6).to_csv(index=False).encode()
    at.file_uploader(key="w_csv").set_value(("fewer.csv", fewer, "text/csv")).run()
    attribute_method(at, "EAP")
    second = at.session_state["scores_label"]
    at.switch_page("pages/compare.py").run()
    found = errors(at)
    assert len(found) == 1 and first in found[0] and second in found[0] and "different data" in found[0], found
    assert not [x for x in at.button if x.key == "run_compare"]


def test_runs_have_distinct_labels_can_be_removed_and_bad_imports_are_refused(engine, tmp_path: Path) -> None:
    at = new_app()
    attribute_method(at, "EAP", batch=8)
    attribute_method(at, "EAP", batch=4)  # the same label otherwise: another run
    runs = at.session_state["runs"]
    first, second = (r["label"] for r in runs.values())
    assert len(runs) == 2 and second == f"{first} (2)"
    at.switch_page("pages/compare.py").run()
    at.file_uploader(key="w_compare_files").set_value([("junk.pt", b"not a torch file", "application/octet-stream")]).run()
    assert any(e.startswith("junk.pt was not imported") for e in errors(at)) and len(at.session_state["runs"]) == 2
    shown = at.session_state["scores_key"]
    at.selectbox(key="w_remove_run").set_value(shown)
    at.button(key="remove_run").click().run()
    assert list(at.session_state["runs"]) != [] and shown not in at.session_state["runs"]
    assert at.session_state["scores_label"] == first  # the other run is shown instead
    assert frame(at, "run")["run"].tolist() == [first]


# ----- Export: MIB -----


def unzip(blob: bytes, folder: Path) -> Path:
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        zf.extractall(folder)
    return folder / "mib_submission"


def choose_task(at, task: str) -> None:
    [box for box in at.selectbox if box.label == "MIB task"][0].set_value(task)


def test_mib_submission_is_written_and_checked(engine, tmp_path: Path) -> None:
    at = run_attribution(new_app())
    at.switch_page("pages/export.py").run()
    choose_task(at, "ioi")
    at.button(key="write_mib").click().run()
    assert errors(at) == []
    blob = at.session_state["mib_zip"]["bytes"]
    assert [b.label for b in at.get("download_button")][-1] == "MIB submission (.zip)"
    model = at.session_state["scores"].provenance["model"]
    root = unzip(blob, tmp_path / "scores")
    report = check_submission(root)
    assert report.ok and sorted(report.folders) == [f"ioi_{model}"]
    assert any("Passes MIB's format check" in x.value for x in at.success)
    assert all(w in " ".join(m.value for m in at.markdown) for w in report.warnings)

    at.toggle(key="w_mib_circuits").set_value(True).run()
    at.button(key="write_mib").click().run()
    root = unzip(at.session_state["mib_zip"]["bytes"], tmp_path / "circuits")
    assert len(list((root / f"ioi_{model}").iterdir())) == 9 and check_submission(root).ok

    at.file_uploader(key="w_mib_check").set_value(("mine.zip", blob, "application/zip")).run()
    assert errors(at) == [] and any("1 folder(s)" in x.value for x in at.success)
    broken = tmp_path / "broken" / "mib_submission"
    unzip(blob, tmp_path / "broken")
    payload = torch.load(broken / f"ioi_{model}" / "importances.pt", weights_only=True)
    del payload["edges_in_graph"]
    torch.save(payload, broken / f"ioi_{model}" / "importances.pt")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in broken.rglob("*"):
            zf.write(path, path.relative_to(broken.parent).as_posix())
    at.file_uploader(key="w_mib_check").set_value(("broken.zip", buf.getvalue(), "application/zip")).run()
    want = check_submission(broken)
    assert not want.ok and any("edges_in_graph" in p for p in want.problems)
    assert any("MIB would reject this submission" in e for e in errors(at))
    problems = [m.value for m in at.markdown if "problem" in m.value]
    assert problems and all(f"ioi_{model}/importances.pt" in p and "edges_in_graph" in p for p in problems)
    at.file_uploader(key="w_mib_check").set_value(("x.zip", b"no zip", "application/zip")).run()
    assert any("x.zip is not a zip file" in e for e in errors(at))


def test_two_runs_for_one_mib_folder_are_refused(engine) -> None:
    at = new_app()
    attribute_method(at, "EAP")
    attribute_method(at, "EAP-IG-inputs")
    at.switch_page("pages/export.py").run()
    at.multiselect(key="w_mib_runs").set_value(list(at.session_state["runs"])).run()
    for box in [b for b in at.selectbox if b.label == "MIB task"]:
        box.set_value("ioi")
    at.button(key="write_mib").click().run()
    found = errors(at)
    assert len(found) == 1 and "both go to ioi_" in found[0] and "one run per task and model" in found[0]


# ----- Data: MIB task files -----


def test_mib_jsonl_task_file_is_read_with_row_numbered_errors(setup) -> None:
    _, csv = setup
    frame_ = pd.read_csv(csv, dtype=str, keep_default_na=False)
    rows = [{"prompt": r.clean, "s2_io_flip_counterfactual": {"prompt": r.corrupted},
             "metadata": {"indirect_object": r.correct, "subject": r.incorrect}} for r in frame_.itertuples()]
    at = new_app()
    at.switch_page("pages/data.py").run()
    at.radio(key="w_data_source").set_value("Upload CSV").run()
    before = at.session_state["pairs"]
    bad = [dict(r) for r in rows]
    bad[1] = {**bad[1], "metadata": {"indirect_object": rows[1]["metadata"]["indirect_object"]}}  # no subject
    text = "\n".join(json.dumps(r) for r in bad).encode()
    at.file_uploader(key="w_csv").set_value(("bad.jsonl", text, "application/json")).run()
    found = errors(at)
    assert len(found) == 1 and "bad.jsonl was not loaded" in found[0] and "row 2" in found[0], found
    assert at.session_state["pairs"] is before
    text = "\n".join(json.dumps(r) for r in rows).encode()
    at.file_uploader(key="w_csv").set_value(("ioi_mib.jsonl", text, "application/json")).run()
    assert errors(at) == [] and at.session_state["data_label"] == "file: ioi_mib.jsonl"
    pairs = at.session_state["pairs"]
    assert pairs.clean == before.clean and pairs.corrupted == before.corrupted
    assert [a[0] for a in pairs.correct] == [" " + a[0] for a in before.correct]  # MIB prepends a space
    assert [a[0] for a in pairs.incorrect] == [" " + a[0] for a in before.incorrect]
    at.file_uploader(key="w_csv").set_value(("ioi_mib.json", json.dumps(rows).encode(), "application/json")).run()
    assert errors(at) == [] and at.session_state["pairs"].fingerprint() == pairs.fingerprint()
