"""What the explorer says and shows, through AppTest, each number checked against eapcore computing the
same thing directly: the metric the scores were made with, an imported circuit as saved, node and
neuron views, undefined faithfulness, information-flow routes, the parameter count, node counts,
settings that stay as set, what each number means, and Export using the circuit Explore evaluated."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from conftest import demo_available, errors, metric_value, new_app, run_attribution
from eapcore.attribute import AttributionSpec, attribute
from eapcore.evaluate import CircuitEvaluator
from eapcore.models import model_graph, resolve_source
from eapcore.select import by_nodes, threshold, top_n
from eapcore.sizes import default_size


def warnings(at) -> list[str]:
    return [w.value for w in at.warning]


def metric_help(at, label: str) -> str:
    found = [m.proto.help for m in at.metric if m.label == label]
    assert found, f"no metric {label!r}"
    return found[0]


def faithfulness(at) -> float:
    return float(metric_value(at, "Faithfulness"))


def set_metric_on_attribute_page(at, metric: str):
    at.switch_page("pages/attribute.py").run()
    at.selectbox(key="w_attr_metric").set_value(metric).run()
    return at


# ----- the metric the scores were made with -----


def test_explore_evaluates_with_the_scores_metric_and_offers_a_rerun(engine) -> None:
    model, data = engine
    at = run_attribution(new_app())
    scores = at.session_state["scores"]
    n = at.session_state["n_edges"]
    made_with = CircuitEvaluator(model, data, "logit_diff", batch_size=128).faithfulness(top_n(scores, n))
    assert faithfulness(at) == pytest.approx(made_with, abs=2e-4)

    set_metric_on_attribute_page(at, "prob_diff")  # changed, not run (as after a cancelled run)
    at.switch_page("pages/explore.py").run()
    assert faithfulness(at) == pytest.approx(made_with, abs=2e-4)  # still logit_diff, and it says so
    assert any("made with `logit_diff`" in w and "now `prob_diff`" in w for w in warnings(at))
    assert [m.label for m in at.metric if m.label.startswith("Circuit ")] == ["Circuit logit_diff"]

    at.button(key="rerun_with_metric").click().run()  # one click: runs the same attribution with prob_diff
    assert errors(at) == []
    at.switch_page("pages/explore.py").run()
    rerun = at.session_state["scores"]
    assert rerun.provenance["metric"] == "prob_diff" and rerun.provenance["method"] == scores.provenance["method"]
    reference = attribute(model, data, AttributionSpec(metric="prob_diff"))
    assert torch.allclose(rerun.edges, reference.edges, atol=1e-6, rtol=1e-4)
    expected = CircuitEvaluator(model, data, "prob_diff", batch_size=128).faithfulness(top_n(reference, n))
    assert faithfulness(at) == pytest.approx(expected, abs=2e-4) and not warnings(at)


# ----- an imported circuit, as saved -----


def test_explore_shows_an_imported_circuit_as_saved_then_the_slider_takes_over(engine) -> None:
    from ui import exports

    model, data = engine
    graph = model_graph(model)
    scores = attribute(model, data, AttributionSpec("EAP", batch_size=8))
    circuit = threshold(scores, float(scores.edges.abs()[graph.real_edge_mask].quantile(0.9)))  # not a top-n
    assert not torch.equal(top_n(scores, circuit.n_edges).edges, circuit.edges)
    evaluator = CircuitEvaluator(model, data, "logit_diff", batch_size=128)
    at = new_app()
    at.switch_page("pages/export.py").run()
    at.file_uploader(key="w_circuit_file").set_value(("mine.pt", exports.pt_bytes(scores, circuit, scores.provenance),
                                                      "application/octet-stream")).run()
    details = " ".join(m.value for m in at.markdown)
    assert "method **EAP**" in details and f"pairs **{len(data)}**" in details
    assert f"circuit **{circuit.n_edges:,} edges, {circuit.n_nodes} nodes**" in details
    at.button(key="explore_imported").click().run()
    at.switch_page("pages/explore.py").run()
    assert errors(at) == []
    assert faithfulness(at) == pytest.approx(evaluator.faithfulness(circuit), abs=2e-4)
    assert metric_value(at, "Edges (after pruning)").startswith(f"{circuit.n_edges:,} /")
    assert any("imported circuit from mine.pt as it was saved" in i.value for i in at.info)
    at.switch_page("pages/export.py").run()
    assert any("the imported circuit (mine.pt)" in c.value for c in at.caption)

    at.switch_page("pages/explore.py").run()
    at.number_input(key="w_n_box").set_value(5).run()  # a size: the top circuit by score from now on
    assert faithfulness(at) == pytest.approx(evaluator.faithfulness(top_n(scores, 5)), abs=2e-4)
    assert not any("as it was saved" in i.value for i in at.info)


# ----- node and neuron level -----


@pytest.mark.parametrize("level", ["node", "neuron"])
def test_node_and_neuron_scores_have_their_own_views(engine, level: str) -> None:
    model, data = engine
    at = new_app()
    at.switch_page("pages/attribute.py").run()
    at.selectbox(key="w_method").set_value("EAP")
    at.selectbox(key="w_level").set_value(level)
    run_attribution(at, open_explore=False, switch=False)
    scores = at.session_state["scores"]
    reference = attribute(model, data, AttributionSpec("EAP", level=level))
    charts = [e for e in at.main if getattr(e, "type", "") == "plotly_chart"]
    import json

    bars = json.loads(charts[0].proto.spec)["data"][0]
    assert bars["type"] == "bar" and not any("Scores (sources × destinations)" in h.value for h in at.subheader)
    assert bars["x"] == model_graph(model).src_nodes
    assert bars["y"] == pytest.approx(reference.nodes.tolist(), abs=1e-5)
    if level == "neuron":
        table = at.dataframe[0].value
        strongest = reference.neurons[1].abs().argmax().item()
        assert table.iloc[1]["top 5 dimensions (by |score|)"].startswith(f"d{strongest} ")
    at.switch_page("pages/explore.py").run()
    assert at.session_state["n_edges"] == default_size(scores) < model_graph(model).n_forward // 2
    assert metric_value(at, "Nodes (excl. logits)").endswith(f"/ {model_graph(model).n_forward}")
    assert any("Node circuits hold whole nodes" in c.value for c in at.caption)
    evaluator = CircuitEvaluator(model, data, "logit_diff", batch_size=128)
    assert faithfulness(at) == pytest.approx(evaluator.faithfulness(by_nodes(reference, default_size(scores))), abs=2e-4)


# ----- clean = corrupted -----


def test_clean_equal_to_corrupted_is_flagged_and_faithfulness_is_undefined(setup) -> None:
    _, csv = setup
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    frame["corrupted"] = frame["clean"]
    at = new_app()
    at.switch_page("pages/data.py").run()
    at.radio(key="w_data_source").set_value("Upload CSV").run()
    at.file_uploader(key="w_csv").set_value(("same.csv", frame.to_csv(index=False).encode(), "text/csv")).run()
    assert errors(at) == [] and any("almost the same logit_diff" in w and "differ by 0" in w for w in warnings(at))
    at = run_attribution(at)
    for label in ("Faithfulness", "CPR (area under f)", "CMD (area under |1 - f|)"):
        assert metric_value(at, label) == "undefined"
    assert any("Faithfulness is undefined on this data" in w for w in warnings(at))
    at.switch_page("pages/export.py").run()
    assert [b.disabled for b in at.get("download_button")] == [False, False, False, True]  # no curve to draw


# ----- information-flow routes -----


def test_information_flow_routes_ignore_metric_and_intervention(engine) -> None:
    model, data = engine
    at = new_app()
    at.switch_page("pages/attribute.py").run()
    at.selectbox(key="w_method").set_value("information-flow-routes").run()
    assert at.selectbox(key="w_attr_metric").disabled and at.selectbox(key="w_intervention").disabled
    assert not at.selectbox(key="w_level").disabled
    run_attribution(at, open_explore=False, switch=False)
    label = at.session_state["scores_label"]
    assert label.startswith("information-flow-routes,") and "logit_diff" not in label
    first = at.session_state["scores"]
    assert torch.allclose(first.edges, attribute(model, data, AttributionSpec("information-flow-routes")).edges)
    at.switch_page("pages/data.py").run()
    at.selectbox(key="w_data_metric").set_value("prob_diff").run()  # the metric changes elsewhere ...
    at.switch_page("pages/attribute.py").run()
    assert at.session_state["metric"] == "prob_diff"
    assert any("cached: this run is instant" in c.value for c in at.caption)  # ... and nothing needs running
    at.button(key="run_attribution").click().run()
    assert at.session_state["scores"] is first and at.session_state["last_attribution_seconds"] == 0.0
    at.switch_page("pages/explore.py").run()
    assert not warnings(at) and [m.label for m in at.metric if m.label.startswith("Circuit ")] == ["Circuit prob_diff"]


# ----- the Model page's counts -----


def test_parameters_are_counted_like_hugging_face(setup) -> None:
    from transformers import AutoModelForCausalLM

    model_name, _ = setup
    hf = AutoModelForCausalLM.from_pretrained(resolve_source(model_name))
    at = new_app()
    assert metric_value(at, "parameters") == f"{hf.num_parameters():,}"
    if demo_available():
        assert metric_value(at, "parameters") == "856,832"


def test_node_counts_say_whether_they_include_logits(engine) -> None:
    model, _ = engine
    graph = model_graph(model)
    at = new_app()
    assert metric_value(at, "graph nodes (incl. logits)") == str(graph.n_nodes)
    assert f"{graph.n_forward} source nodes" in metric_help(at, "graph nodes (incl. logits)")
    at = run_attribution(at)
    assert metric_value(at, "Nodes (excl. logits)").endswith(f"/ {graph.n_forward}") and graph.n_forward == graph.n_nodes - 1


# ----- settings that stay as set -----


def test_open_explore_stays_off(engine) -> None:
    at = new_app()
    at.switch_page("pages/attribute.py").run()
    at.checkbox(key="w_open_explore").uncheck().run()
    at.switch_page("pages/data.py").run()  # leave the page
    at.switch_page("pages/attribute.py").run()
    assert at.checkbox(key="w_open_explore").value is False
    at.selectbox(key="w_intervention").set_value("zero").run()  # EAP-IG-inputs refuses zero: an invalid setting
    assert any("Invalid settings" in e for e in errors(at))
    at.selectbox(key="w_intervention").set_value("patching").run()
    assert at.checkbox(key="w_open_explore").value is False


def test_exact_method_counts_the_passes_its_progress_counts(engine) -> None:
    model, data = engine
    at = new_app()
    at.switch_page("pages/attribute.py").run()
    at.selectbox(key="w_method").set_value("exact").run()
    spec = at.session_state["attr_spec"]
    assert spec.total_passes(model_graph(model), len(data)) == model_graph(model).n_edges  # one evaluation per edge
    assert any(f"· {model_graph(model).n_edges} passes over batches of" in c.value for c in at.caption)


# ----- what the numbers mean -----


def test_numbers_carry_their_definitions(engine) -> None:
    at = run_attribution(new_app())
    assert "(m(C) − m(∅)) / (m(full) − m(∅))" in metric_help(at, "Faithfulness")
    assert "∫₀¹ f(k) dk" in metric_help(at, "CPR (area under f)")
    assert "∫₀¹ |1 − f(k)| dk" in metric_help(at, "CMD (area under |1 - f|)")


def test_unknown_words_are_flagged_before_a_run(setup) -> None:
    from ui import cache

    at = new_app()
    tokenizer = cache.get_model(at.session_state["model_spec"]).tokenizer
    if getattr(tokenizer, "unk_token_id", None) is None:
        pytest.skip("this tokenizer has no unknown token")
    pairs = at.session_state["pairs"]
    word = "Zqxjv"
    assert tokenizer.convert_tokens_to_ids(word) == tokenizer.unk_token_id
    frame = pd.DataFrame({"clean": [pairs.clean[0]], "corrupted": [pairs.corrupted[0].replace(pairs.corrupted[0].split()[1], word, 1)],
                          "correct": [pairs.correct[0][0]], "incorrect": [pairs.incorrect[0][0]]})
    at.switch_page("pages/data.py").run()
    at.radio(key="w_data_source").set_value("Upload CSV").run()
    at.file_uploader(key="w_csv").set_value(("unk.csv", frame.to_csv(index=False).encode(), "text/csv")).run()
    assert any(f"row 1 corrupted: '{word}'" in w for w in warnings(at))
    at.switch_page("pages/attribute.py").run()
    assert any("unknown to the tokenizer" in w for w in warnings(at))


# ----- Export uses what Explore evaluated -----


def test_export_uses_the_circuit_explore_evaluated(engine) -> None:
    at = run_attribution(new_app())
    at.number_input(key="w_n_box").set_value(7).run()
    shown = at.session_state["explore_result"]
    at.switch_page("pages/export.py").run()
    assert errors(at) == []
    assert at.session_state["explore_result"]["evaluation"] is shown["evaluation"]  # not evaluated again
    assert any(f"faithfulness {shown['faithfulness']:.4f}" in c.value and "top 7 edges" in c.value for c in at.caption)


# ----- every run of the session -----


def test_the_session_keeps_every_run_and_explore_shows_the_selected_one(engine) -> None:
    """A second method adds a run instead of replacing the first; picking the first again makes Explore
    evaluate its circuits (eapcore's faithfulness for that run's top-n)."""
    model, data = engine
    at = new_app()
    at.switch_page("pages/attribute.py").run()
    at.selectbox(key="w_method").set_value("EAP")
    run_attribution(at, switch=False)
    first = at.session_state["scores_key"]
    at.switch_page("pages/attribute.py").run()
    at.selectbox(key="w_method").set_value("EAP-IG-inputs")
    run_attribution(at, switch=False)
    runs = at.session_state["runs"]
    assert len(runs) == 2 and at.session_state["scores_key"] != first
    assert [r["scores"].provenance["method"] for r in runs.values()] == ["EAP", "EAP-IG-inputs"]
    at.selectbox(key="w_run").set_value(first).run()
    assert errors(at) == [] and at.session_state["scores_key"] == first
    at.number_input(key="w_n_box").set_value(12).run()
    evaluator = CircuitEvaluator(model, data, "logit_diff", batch_size=128)
    eap = attribute(model, data, AttributionSpec("EAP", batch_size=32))
    assert faithfulness(at) == pytest.approx(evaluator.faithfulness(top_n(eap, 12)), abs=2e-4)
