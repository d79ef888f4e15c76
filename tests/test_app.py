"""The Streamlit explorer through `streamlit.testing.v1.AppTest`: every page, the whole flow, the slider
against eapcore's own evaluation, errors, downloads, import, and concurrent sessions on the shared model.

Runs on the shipped demo model and the first pairs of the IOI task when they exist, else on a tiny
random GPT-2 and eight toy pairs (the assertions are the same; the ``setup`` and ``engine`` fixtures
in conftest.py).
"""

from __future__ import annotations

import io
import os
import json
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

from eapcore.attribute import METHODS, AttributionSpec, attribute
from eapcore.data import PromptPairs
from eapcore.curve import faithfulness_curve
from eapcore.evaluate import CircuitEvaluator
from eapcore.models import ModelSpec, model_graph, model_lock
from eapcore.select import top_n
from eapcore.tasks import TASKS

from conftest import demo_available, errors, metric_value, new_app, run_attribution

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `ui` lives next to app.py
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module", autouse=True)
def one_thread_on_small_machines():
    """The app uses one torch thread on <= 2 cores (eapcore.threads); so do the references here."""
    before = torch.get_num_threads()
    if (os.cpu_count() or 1) <= 2:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def iframes(at: AppTest) -> list:
    return list(at.get("iframe"))


# ----- Model -----


def test_app_opens_on_the_default_model_and_data(setup, engine) -> None:
    at = new_app()
    assert errors(at) == [] and not at.exception
    model, data = engine
    graph = model_graph(model)
    assert metric_value(at, "layers") == str(model.cfg.n_layers)
    assert metric_value(at, "heads") == str(model.cfg.n_heads)
    assert metric_value(at, "graph nodes (incl. logits)") == str(graph.n_nodes)
    assert metric_value(at, "graph edges") == f"{graph.n_edges:,}"
    assert len(at.session_state["pairs"]) == len(data)
    assert any("Data ready" in s.value for s in at.success)


def test_loading_a_missing_model_shows_an_error_and_keeps_the_old_one(setup) -> None:
    at = new_app()
    before = at.session_state["model_spec"]
    at.text_input[0].set_value("/no/such/model/folder")
    at.button[0].click().run()  # the form's submit button
    assert any("Could not load the model" in e and "no/such/model" in e for e in errors(at))
    assert at.session_state["model_spec"] == before
    assert metric_value(at, "layers")  # the loaded model's facts still show


def test_a_missing_default_model_is_an_error_not_a_crash(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EAPCORE_APP_MODEL", "/no/such/default/model")
    at = new_app()
    assert not at.exception
    assert any("Could not load the model" in e and "/no/such/default/model" in e for e in errors(at))
    at.switch_page("pages/attribute.py").run()  # other pages still open and show the error too
    assert not at.exception and errors(at)


# ----- Data -----


def test_data_page_shows_baselines_and_token_preview(engine) -> None:
    at = new_app()
    at.switch_page("pages/data.py").run()
    assert errors(at) == []
    model, data = engine
    base = CircuitEvaluator(model, data, "logit_diff").baseline()
    assert float(metric_value(at, "clean logit_diff")) == pytest.approx(base.clean, abs=1e-4)
    assert float(metric_value(at, "corrupted logit_diff")) == pytest.approx(base.corrupted, abs=1e-4)
    previews = [h.proto.body for h in at.get("html")]
    assert len(previews) == min(5, len(data))
    assert "pair 1" in previews[0] and "#fde68a" in previews[0]  # a differing token is highlighted


@pytest.mark.skipif(not demo_available(), reason="the shipped tasks are written for the demo model's vocabulary")
def test_every_shipped_task_loads_with_its_metric() -> None:
    at = new_app()
    at.switch_page("pages/data.py").run()
    for name, task in TASKS.items():
        at.selectbox(key="w_task").set_value(name)
        at.button(key="use_task").click().run()
        assert errors(at) == [], (name, errors(at))
        assert at.session_state["data_label"] == f"task: {name}" and at.session_state["metric"] == task.metric
        assert metric_value(at, f"clean {task.metric}") and metric_value(at, f"corrupted {task.metric}")


def bad_csv(csv: Path) -> bytes:
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    first_word = frame.loc[1, "corrupted"].split()[0]
    frame.loc[1, "corrupted"] = f"{first_word} {frame.loc[1, 'corrupted']}"  # row 2 is now one token longer
    return frame.to_csv(index=False).encode()


def test_bad_csv_shows_a_row_numbered_error_and_keeps_the_data(setup) -> None:
    _, csv = setup
    at = new_app()
    at.switch_page("pages/data.py").run()
    before = at.session_state["pairs"]
    at.radio(key="w_data_source").set_value("Upload CSV").run()
    at.file_uploader(key="w_csv").set_value(("bad.csv", bad_csv(csv), "text/csv")).run()
    msgs = errors(at)
    assert len(msgs) == 1 and "bad.csv was not loaded" in msgs[0] and "row 2" in msgs[0] and "same number of tokens" in msgs[0]
    assert at.session_state["pairs"] is before
    at.run()  # the error stays while the file is selected
    assert errors(at) == msgs
    at.file_uploader(key="w_csv").set_value(("cols.csv", b"prompt,answer\nx,y\n", "text/csv")).run()
    assert any("missing column(s) clean, corrupted, correct, incorrect" in e for e in errors(at))
    good = csv.read_bytes()
    at.file_uploader(key="w_csv").set_value(("good.csv", good, "text/csv")).run()
    assert errors(at) == [] and at.session_state["data_label"] == "file: good.csv"


def test_typed_pairs_are_validated_and_used(setup) -> None:
    at = new_app()
    at.switch_page("pages/data.py").run()
    at.radio(key="w_data_source").set_value("Type pairs").run()
    at.session_state["w_typed_pairs"] = {"edited_rows": {"0": {"correct": None}}, "added_rows": [], "deleted_rows": []}
    at.button(key="use_typed").click().run()
    assert any("row 1" in e and "'correct' is empty" in e for e in errors(at))
    at.session_state["w_typed_pairs"] = {"edited_rows": {}, "added_rows": [], "deleted_rows": [2, 3, 4]}
    at.button(key="use_typed").click().run()
    assert errors(at) == []
    assert at.session_state["data_label"] == "typed pairs" and len(at.session_state["pairs"]) == 2


# ----- Attribute, Explore -----


def test_whole_flow_slider_matches_eapcore(engine) -> None:
    model, data = engine
    at = run_attribution(new_app())
    # The run opened Explore: metrics, the pyvis graph and the curve are there.
    assert at.session_state["scores_label"].startswith("EAP-IG-inputs (5 steps)")
    assert iframes(at) and "new vis.Network" in iframes(at)[0].proto.srcdoc
    metric_value(at, "CPR (area under f)")

    spec = AttributionSpec("EAP-IG-inputs", 5, "logit_diff", "patching", 32)
    reference = attribute(model, data, spec)
    app_scores = at.session_state["scores"]
    assert torch.allclose(app_scores.edges, reference.edges, atol=1e-5, rtol=1e-4)

    evaluator = CircuitEvaluator(model, data, "logit_diff", batch_size=128)
    mib = faithfulness_curve(evaluator, reference)
    assert float(metric_value(at, "CPR (area under f)")) == pytest.approx(mib.cpr, abs=2e-4)
    assert float(metric_value(at, "CMD (area under |1 - f|)")) == pytest.approx(mib.cmd, abs=2e-4)
    graph = reference.graph
    shown = []
    for n in (graph.n_edges // 4, graph.n_edges // 2, graph.n_edges):
        n = min(at.select_slider(key="w_n_slider").options, key=lambda o: abs(int(o) - n))
        at.select_slider(key="w_n_slider").set_value(int(n)).run()
        assert errors(at) == []
        expected = evaluator.faithfulness(top_n(reference, int(n)))
        value = float(metric_value(at, "Faithfulness"))
        assert value == pytest.approx(expected, abs=2e-4)
        assert at.session_state["explore_result"]["faithfulness"] == pytest.approx(expected, abs=1e-5)
        assert at.number_input(key="w_n_box").value == int(n)
        shown.append(value)
    assert len(set(shown)) > 1, f"faithfulness did not change with the slider: {shown}"
    assert shown[-1] == pytest.approx(1.0, abs=1e-4)  # the full graph

    # The number box moves the slider too.
    at.number_input(key="w_n_box").set_value(3).run()
    assert at.session_state["n_edges"] == 3
    assert float(metric_value(at, "Faithfulness")) == pytest.approx(evaluator.faithfulness(top_n(reference, 3)), abs=2e-4)


def test_node_level_scores_with_a_mean_intervention(engine) -> None:
    """Other methods, levels and interventions flow through: the slider then counts nodes, and the shown
    faithfulness is eapcore's for the node-selected circuit under the same intervention."""
    from eapcore.attribute import LEVELS
    from eapcore.interventions import INTERVENTIONS
    from eapcore.select import by_nodes

    assert "node" in LEVELS and "mean" in INTERVENTIONS
    model, data = engine
    at = new_app()
    at.switch_page("pages/attribute.py").run()
    assert at.selectbox(key="w_method").options == list(METHODS)
    assert at.selectbox(key="w_intervention").options == list(INTERVENTIONS)
    at.selectbox(key="w_method").set_value("EAP")
    at.selectbox(key="w_intervention").set_value("mean")
    at.selectbox(key="w_level").set_value("node")
    run_attribution(at, switch=False)
    scores = at.session_state["scores"]
    assert scores.provenance["level"] == "node" and scores.provenance["intervention"] == "mean"
    assert at.select_slider(key="w_n_slider").label.startswith("Nodes in the circuit")
    at.select_slider(key="w_n_slider").set_value(4).run()
    evaluator = CircuitEvaluator(model, data, "logit_diff", batch_size=128, intervention="mean")
    expected = evaluator.faithfulness(by_nodes(scores, 4))
    assert float(metric_value(at, "Faithfulness")) == pytest.approx(expected, abs=2e-4)


def test_same_attribution_again_is_served_from_the_cache(engine) -> None:
    at = run_attribution(new_app(), open_explore=False)
    first = at.session_state["scores"]
    at2 = run_attribution(new_app(), open_explore=False)  # a new session: like a browser reload
    assert at2.session_state["last_attribution_seconds"] == 0.0
    assert at2.session_state["scores"] is first
    assert any("cached" in c.value for c in at2.caption)
    heatmaps = [e for e in at2.main if getattr(e, "type", "") == "plotly_chart"]
    assert heatmaps, "no heatmap on the Attribute page"
    fig = json.loads(heatmaps[0].proto.spec)
    assert fig["data"][0]["type"] == "heatmap"


def test_explore_and_export_without_scores_point_to_attribute() -> None:
    at = new_app()
    at.switch_page("pages/explore.py").run()
    assert errors(at) == [] and any("No scores yet" in i.value for i in at.info)
    at.switch_page("pages/export.py").run()
    assert errors(at) == [] and any("No scores yet" in i.value for i in at.info)


def test_attribute_without_pairs_points_to_data() -> None:
    at = new_app()
    at.switch_page("pages/attribute.py").run()
    at.session_state["pairs"] = None
    at.run()
    assert any("No prompt pairs" in i.value for i in at.info)


# ----- Export -----


def test_export_downloads_and_import_round_trip(engine) -> None:
    from ui import exports

    model, data = engine
    at = run_attribution(new_app())
    at.switch_page("pages/export.py").run()
    assert errors(at) == []
    labels = [b.label for b in at.get("download_button")]
    assert labels == [".pt (EAP-IG)", ".json (EAP-IG)", "Circuit PNG", "Curve PNG"]

    scores = at.session_state["scores"]
    circuit = top_n(scores, at.session_state["n_edges"])
    evaluator = CircuitEvaluator(model, data, "logit_diff", batch_size=128)
    for name, blob in (("c.pt", exports.pt_bytes(scores, circuit, {"a": 1})), ("c.json", exports.json_bytes(scores, circuit, {}))):
        at.file_uploader(key="w_circuit_file").set_value((name, blob, "application/octet-stream")).run()
        assert errors(at) == []
        assert float(metric_value(at, "Faithfulness")) == pytest.approx(evaluator.faithfulness(circuit), abs=2e-4)
        assert metric_value(at, "Edges").startswith(f"{circuit.n_edges:,} /")
        assert iframes(at)
    at.button(key="explore_imported").click().run()
    assert errors(at) == [] and at.session_state["scores_label"] == "imported c.json"
    assert at.session_state["n_edges"] == circuit.n_edges


class Payload:  # not a tensor: a weights-only load must refuse it
    def __reduce__(self):
        return (print, ("this must never run",))


def test_import_rejects_bad_and_malicious_files(engine) -> None:
    model, _ = engine
    at = new_app()
    at.switch_page("pages/export.py").run()
    buf = io.BytesIO()
    torch.save({"cfg": {"n_layers": 1, "n_heads": 1}, "evil": Payload()}, buf)
    at.file_uploader(key="w_circuit_file").set_value(("evil.pt", buf.getvalue(), "application/octet-stream")).run()
    assert any("evil.pt was not imported" in e and "refused" in e for e in errors(at))
    cfg = model_graph(model).cfg
    other = json.dumps({"cfg": {"n_layers": cfg.n_layers + 1, "n_heads": cfg.n_heads}, "nodes": {}, "edges": {}}).encode()
    at.file_uploader(key="w_circuit_file").set_value(("other.json", other, "application/json")).run()
    assert any("other.json was not imported" in e and "loaded model has" in e for e in errors(at))
    at.file_uploader(key="w_circuit_file").set_value(("junk.json", b"{not json", "application/json")).run()
    assert any("junk.json was not imported" in e for e in errors(at))


def test_export_bytes_round_trip(engine) -> None:
    from ui import exports

    model, data = engine
    graph = model_graph(model)
    scores = attribute(model, data, AttributionSpec("EAP", batch_size=8))
    circuit = top_n(scores, max(1, graph.n_edges // 10))
    for name, blob in (("x.pt", exports.pt_bytes(scores, circuit, {"k": "v"})), ("x.json", exports.json_bytes(scores, circuit, {"k": "v"}))):
        s2, c2, key = exports.read_circuit(name, blob, graph)
        assert torch.equal(c2.edges, circuit.edges) and torch.equal(c2.nodes, circuit.nodes)
        assert torch.allclose(s2.edges, scores.edges.float(), atol=1e-6) and key.startswith("import:")
        assert s2.provenance["k"] == "v"
    with pytest.raises(ValueError, match="upload a .pt or .json"):
        exports.read_circuit("x.pkl", b"", graph)


# ----- shared model, concurrent sessions -----


def test_sessions_share_one_model(setup) -> None:
    a, b = new_app(), new_app()
    assert a.session_state["model_spec"] == b.session_state["model_spec"]
    from ui import cache

    assert cache.get_model(a.session_state["model_spec"]) is cache.get_model(b.session_state["model_spec"])


def test_concurrent_sessions_get_the_same_scores_as_alone(setup, engine) -> None:
    """Two sessions attribute at once on the app's shared model while a third evaluates a circuit again and
    again: each gets exactly what it gets alone. The attributions take turns at the model; the evaluations
    (the sparse engine) need none and really run while an attribution holds the model."""
    from ui import cache

    _, data = engine
    spec = ModelSpec(setup[0], "cpu", "float32")
    pairs = PromptPairs.from_csv(setup[1])
    half = PromptPairs.from_lists(pairs.clean[::-1], pairs.corrupted[::-1], pairs.correct[::-1], pairs.incorrect[::-1])
    jobs = [(pairs, AttributionSpec("EAP-IG-inputs", 3, batch_size=4)), (half, AttributionSpec("EAP", batch_size=3))]
    model = cache.get_model(spec)
    alone = [attribute(model, cache.get_data(spec, p), a).edges for p, a in jobs]
    evaluator = CircuitEvaluator(model, data, "logit_diff", batch_size=5)
    circuit = top_n(attribute(model, data, AttributionSpec("EAP")), 5)
    alone_eval = evaluator.evaluate(circuit)

    barrier = threading.Barrier(3)
    out: dict[int, torch.Tensor] = {}
    evaluations: list[tuple[torch.Tensor, bool]] = []
    failures: list[BaseException] = []
    done = threading.Event()

    def session(i: int) -> None:
        try:
            barrier.wait()
            if i < 2:
                for _ in range(2):
                    p, a = jobs[i]
                    cache.results().put(cache.attribution_key(spec, p, a), None)  # force a real run
                    scores, _, timing = cache.run_attribution(spec, p, a)
                    assert not timing.cached
                    out[i] = scores.edges
                return
            while not done.is_set():
                before = model_lock(model).state()[0]
                value = evaluator.evaluate(circuit)
                evaluations.append((value, before and model_lock(model).state()[0]))
        except BaseException as e:  # noqa: BLE001
            failures.append(e)

    threads = [threading.Thread(target=session, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads[:2]:
        t.join(timeout=300)
    done.set()
    threads[2].join(timeout=60)
    assert not failures, failures
    assert torch.equal(out[0], alone[0]) and torch.equal(out[1], alone[1])
    assert all(torch.equal(value, alone_eval) for value, _ in evaluations)
    assert any(during for _, during in evaluations), "no evaluation ran while an attribution held the model"
