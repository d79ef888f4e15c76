"""Explore's node drill-down, hand edits, saved sessions, the view in the URL and the cost line on the
Attribute page, through AppTest, each number checked against eapcore (or Hugging Face) computing the same
thing directly:

* the drill-down's attention against Hugging Face's ``output_attentions`` for that layer and head, and its
  other numbers against :func:`eapcore.inspection.inspect_node` (itself tested against Hugging Face);
* an edit's faithfulness against evaluating the circuit edited by hand (mask cells set and cleared here,
  then pruned);
* a session saved, then loaded in a fresh AppTest: the same faithfulness at the same size, against the
  hand-edited circuit evaluated directly; truncated, other-model and pickled files refused, nothing lost;
* the URL's run and size reopen the same view in a fresh AppTest;
* the cost line: the memory estimate of ``eapcore.cost`` for these batches, the time from the speed the
  app's own run measured.

In AppTest a page reached with ``switch_page("pages/...")`` runs without ``app.py`` (Streamlit's pages-folder
mode; the real server always runs ``app.py``), so the tests run ``app.py`` itself (:func:`shell`) where the
app's shell (the sidebar, the URL) must run.
"""

from __future__ import annotations

import io
import pickle
import re
import time

import pytest
import torch
from streamlit.testing.v1 import AppTest

from conftest import APP, Evil, assert_kept, errors, metric_value, new_app, run_attribution
from eapcore.circuit import Circuit
from eapcore.data import PromptPairs
from eapcore.edits import Edits
from eapcore.evaluate import CircuitEvaluator
from eapcore.graph import Graph, GraphConfig
from eapcore.inspection import inspect_node
from eapcore.memory import human
from eapcore.models import ModelSpec, resolve_source
from eapcore.select import prune, top, top_n
from eapcore.session import Session, save_session


def faithfulness(at) -> float:
    return float(metric_value(at, "Faithfulness"))


def charts(at) -> list[dict]:
    import json

    return [json.loads(e.proto.spec) for e in at.main if getattr(e, "type", "") == "plotly_chart"]


def graph_page(at) -> str:
    return list(at.get("iframe"))[0].proto.srcdoc


def in_circuit_head(scores, n: int) -> str:
    """The head with the largest outgoing |score| among the heads of the top-n circuit."""
    graph, circuit = scores.graph, top(scores, n)
    heads = [i for i in circuit.nodes.nonzero().flatten().tolist() if graph.src_nodes[i].startswith("a")]
    return graph.src_nodes[max(heads, key=lambda i: float(scores.edges[i].abs().sum()))]


# ----- node drill-down -----


def test_drill_down_shows_the_nodes_attention_tokens_effect_and_edges(setup, engine) -> None:
    from transformers import AutoModelForCausalLM

    model, data = engine
    at = run_attribution(new_app())
    scores, n = at.session_state["scores"], at.session_state["n_edges"]
    node = in_circuit_head(scores, n)
    layer, head = map(int, re.fullmatch(r"a(\d+)\.h(\d+)", node).groups())
    at.selectbox(key="w_node").set_value(node).run()
    at.selectbox(key="w_inspect_pair").set_value(2).run()
    assert errors(at) == [] and any(h.value == f"Node `{node}`" for h in at.subheader)

    hf = AutoModelForCausalLM.from_pretrained(resolve_source(setup[0]), attn_implementation="eager").eval()
    length = int(data.data.lengths[2])
    shown = {c["layout"]["title"]["text"]: c for c in charts(at)}
    for side, tokens in (("clean", data.data.clean[2:3, :length]), ("corrupted", data.data.corrupted[2:3, :length])):
        with torch.no_grad():
            expected = hf(tokens, output_attentions=True).attentions[layer][0, head]
        got = torch.tensor(shown[side]["data"][0]["z"], dtype=torch.float64)
        torch.testing.assert_close(got, expected.double(), rtol=0, atol=1e-5)
        labels = shown[side]["layout"]["xaxis"]["ticktext"]
        assert [re.sub(r"^\d+: ", "", t) for t in labels] == [repr(model.tokenizer.decode([t]))[:24 - len(f"{i}: ")]
                                                              for i, t in enumerate(tokens[0].tolist())]
    bars = shown["Attention of the last position (the read-out) to each key"]["data"]
    report = inspect_node(model, data, 2, node, "logit_diff", scores, top(scores, n))
    for trace, row in zip(bars, report.last_row):
        assert trace["y"] == pytest.approx(row.tolist(), abs=1e-6)

    assert metric_value(at, "Direct effect, clean") == f"{report.direct_effect[0]:+.4f}"
    assert metric_value(at, "Direct effect, corrupted") == f"{report.direct_effect[1]:+.4f}"
    assert metric_value(at, "Node score") == f"{report.edges.score:.4g}"
    tables = [d.value for d in at.dataframe]
    promotes, suppresses, incoming, outgoing = tables[:4]
    assert list(promotes["token"]) == [t for t, _ in report.promotes]
    assert list(suppresses["direct logit"]) == pytest.approx([v for _, v in report.suppresses], abs=1e-6)
    assert list(incoming["edge"]) == [e for e, _ in report.edges.incoming] and len(incoming) > 0
    assert list(outgoing["score"]) == pytest.approx([v for _, v in report.edges.outgoing], abs=1e-6)

    page = graph_page(at)  # the picked node is ringed and selected in the graph
    assert f'network.selectNodes(["{node}"])' in page and '"border": "#e11d48"' in page

    start = time.perf_counter()
    at.selectbox(key="w_node").set_value("m0").run()  # an MLP: no attention, still tokens and edges
    print(f"\npick m0 on a seen pair: {time.perf_counter() - start:.3f} s for the whole Explore rerun (AppTest)")
    assert errors(at) == [] and not any(c["layout"]["title"]["text"] == "clean" for c in charts(at))
    assert metric_value(at, "Direct effect, clean") == f"{inspect_node(model, data, 2, 'm0').direct_effect[0]:+.4f}"


# ----- hand edits -----


def edges_into(graph, node: str) -> list[int]:
    return [c for c, name in enumerate(graph.dst_node_of_column) if name == node]


def test_an_edit_shows_the_faithfulness_of_the_hand_edited_circuit(engine) -> None:
    model, data = engine
    at = run_attribution(new_app())
    scores, n = at.session_state["scores"], at.session_state["n_edges"]
    graph = scores.graph
    selected, circuit = top_n(scores, n, prune=False), top_n(scores, n)
    evaluator = CircuitEvaluator(model, data, "logit_diff", batch_size=128)
    unedited = evaluator.faithfulness(circuit)

    rows, cols = circuit.edges.nonzero(as_tuple=True)
    first = graph.edge_name(int(rows[0]), int(cols[0]))  # an edge of the circuit, excluded
    members = [graph.src_nodes[i] for i in circuit.nodes.nonzero().flatten().tolist() if graph.src_nodes[i] != "input"]
    gone = members[-1]  # a node of the circuit, excluded
    source = next(u for u in members if u != gone and not selected.edges[graph.src_index[u], graph.logits_column])
    added = f"{source}->logits"  # an edge the selection lacks, included

    hand = selected.edges.clone()
    hand[graph.parse_edge_name(first)] = False
    hand[graph.parse_edge_name(added)] = True
    hand[graph.src_index[gone]] = False
    hand[:, edges_into(graph, gone)] = False
    expected = prune(Circuit(graph, hand, hand.any(1)))
    assert not torch.equal(expected.edges, circuit.edges)

    start = time.perf_counter()
    at.multiselect(key="w_edit_exclude").set_value([first, gone]).run()
    at.multiselect(key="w_edit_include").set_value([added]).run()
    edit_seconds = time.perf_counter() - start
    assert errors(at) == []
    assert at.session_state["edits"] == Edits((added,), (first, gone))
    assert torch.equal(at.session_state["explore_result"]["evaluation"].circuit.edges, expected.edges)
    value = evaluator.faithfulness(expected)
    assert faithfulness(at) == pytest.approx(value, abs=2e-4)
    delta = next(m.delta for m in at.metric if m.label == "Faithfulness")
    assert delta == f"{value - unedited:+.4f} vs unedited"
    assert any(c.value.startswith("Edited: ") and f"{unedited:.4f} → {value:.4f}" in c.value for c in at.caption)
    start = time.perf_counter()
    at.number_input(key="w_n_box").set_value(n + 1).run()  # a size change re-applies the edits to the new top-n
    move_seconds = time.perf_counter() - start
    print(f"\ntwo edits: {edit_seconds:.3f} s (two reruns); a size change with edits: {move_seconds:.3f} s (AppTest)")
    assert at.session_state["edits"] == Edits((added,), (first, gone))

    before = {k: at.session_state[k] for k in ("edits", "scores", "n_edges")}
    at.multiselect(key="w_edit_include").set_value([added, first]).run()  # both ways: refused, edits kept
    assert any("Edit not applied" in e and repr(first) in e and "both to include and to exclude" in e for e in errors(at))
    assert_kept(at, before)
    assert at.multiselect(key="w_edit_include").value == [added]
    at.multiselect(key="w_edit_include").set_value([added, "a0.h99"]).run()  # a typed name that is not in the graph
    assert any("unknown node or edge name(s)" in e and "'a0.h99' (nearest: " in e for e in errors(at))
    assert_kept(at, before)


def test_edits_are_exported_with_the_circuit_and_restored_on_import(engine) -> None:
    from ui import exports

    model, data = engine
    at = run_attribution(new_app())
    scores, n = at.session_state["scores"], at.session_state["n_edges"]
    circuit = top_n(scores, n)
    members = [scores.graph.src_nodes[i] for i in circuit.nodes.nonzero().flatten().tolist()]
    changes = Edits((), (members[-1],))
    at.multiselect(key="w_edit_exclude").set_value(list(changes.exclude)).run()
    edited = at.session_state["explore_result"]["evaluation"]
    at.switch_page("pages/export.py").run()
    assert any(f"top {n:,} edges with your edits → {edited.circuit.n_edges:,} edges" in c.value for c in at.caption)

    # The file the Export page writes (its download buttons call exports.json_bytes with the page's values).
    blob = exports.json_bytes(scores, edited.circuit, {**scores.provenance, "selection": {"method": "top_n", "n": n,
                                                                                          "absolute": True}}, changes)
    fresh = new_app()
    fresh.switch_page("pages/export.py").run()
    fresh.file_uploader(key="w_circuit_file").set_value(("edited.json", blob, "application/json")).run()
    assert any(f"Made with hand edits: include nothing; exclude {members[-1]}." in c.value for c in fresh.caption)
    fresh.button(key="explore_imported").click().run()
    fresh.switch_page("pages/explore.py").run()
    assert errors(fresh) == [] and fresh.session_state["edits"] == changes and "pinned" not in fresh.session_state
    assert fresh.session_state["n_edges"] == n
    assert fresh.multiselect(key="w_edit_exclude").value == [members[-1]]
    expected = CircuitEvaluator(model, data, "logit_diff", batch_size=128).faithfulness(edited.circuit)
    assert faithfulness(fresh) == pytest.approx(expected, abs=2e-4)


# ----- sessions -----


def saved_session(at) -> bytes:
    """What the sidebar's "Save session" button downloads for this AppTest's session."""
    from ui import sessions

    session, left_out = sessions.snapshot(at.session_state)
    assert left_out == []
    return sessions.to_bytes(session)


def shell(at):
    """Run ``app.py`` itself from now on (the sidebar, the URL). AppTest lists it as a page only after a page
    ran alone, so one such run comes first when the last run was the shell's own navigation."""
    try:
        at.switch_page("app.py")
    except ValueError:
        at.switch_page("pages/model.py").run().switch_page("app.py")
    return at.run()


def load_session_file(at, name: str, blob: bytes):
    shell(at).file_uploader(key="w_session_file").set_value((name, blob, "application/zip"))
    return at.run()


def test_a_saved_session_opens_the_same_view_in_a_fresh_app(engine) -> None:
    model, data = engine
    at = run_attribution(new_app())
    scores = at.session_state["scores"]
    at.number_input(key="w_n_box").set_value(40).run()
    node = in_circuit_head(scores, 40)
    at.multiselect(key="w_edit_exclude").set_value([node]).run()
    at.selectbox(key="w_node").set_value(node).run()
    shown = faithfulness(at)
    at.session_state["page"] = "explore"  # app.py records the page; here the page ran without it
    blob = saved_session(at)

    fresh = load_session_file(new_app(), "mine.zip", blob)
    assert errors(fresh) == [] and not fresh.exception
    assert [h.value for h in fresh.title] == ["Explore"]  # the session's page
    assert fresh.session_state["n_edges"] == 40 and fresh.session_state["node"] == node
    assert fresh.session_state["edits"] == Edits((), (node,))
    assert torch.equal(fresh.session_state["scores"].edges, scores.edges)
    assert faithfulness(fresh) == pytest.approx(shown, abs=1e-6)
    selected = top_n(scores, 40, prune=False).edges.clone()
    selected[scores.graph.src_index[node]] = False
    selected[:, edges_into(scores.graph, node)] = False
    by_hand = prune(Circuit(scores.graph, selected, selected.any(1)))
    evaluator = CircuitEvaluator(model, data, "logit_diff", batch_size=128)
    assert shown == pytest.approx(evaluator.faithfulness(by_hand), abs=2e-4)
    assert any(h.value == f"Node `{node}`" for h in fresh.subheader)


def test_bad_session_files_are_refused_and_the_session_is_kept(engine, tmp_path) -> None:
    from conftest import app_with_scores

    at, before = app_with_scores()
    good = saved_session(at)
    other = io.BytesIO()
    pairs = PromptPairs.from_lists(["a b"], ["b a"], ["a"], ["b"])
    small = Graph(GraphConfig(n_layers=1, n_heads=1, d_model=8))
    save_session(other, Session(small, ModelSpec("tiny"), pairs, "x", "logit_diff"))
    marker = tmp_path / "pwned"
    cases = [
        ("cut.zip", good[: len(good) // 2], r"cut\.zip was not loaded: .*not a valid eapcore session file: .*truncated"),
        ("other.zip", other.getvalue(), r"other\.zip was not loaded: .*a session for a model with 1 layer.*load the model "
                                        r"it was saved with \('tiny'\)"),
        ("evil.zip", pickle.dumps(Evil("system", marker)), r"evil\.zip was not loaded: .*Python pickle.*not unpickled"),
    ]
    for name, blob, message in cases:
        load_session_file(at, name, blob)
        found = errors(at)
        assert len(found) == 1 and re.search(message, found[0]), found
        assert_kept(at, before)
    assert not marker.exists()


# ----- the view in the URL -----


def test_the_url_holds_the_run_and_size_and_a_fresh_app_reopens_them(engine) -> None:
    model, data = engine
    at = run_attribution(new_app())
    key, scores = at.session_state["scores_key"], at.session_state["scores"]
    at.number_input(key="w_n_box").set_value(40).run()
    shell(at)
    assert at.query_params == {"run": key, "size": "40"}

    fresh = AppTest.from_file(APP, default_timeout=300)
    fresh.query_params = dict(at.query_params)  # a reload, or the link opened in another browser
    fresh.run()
    assert fresh.session_state["scores_key"] == key and fresh.session_state["scores"] is scores
    assert fresh.session_state["n_edges"] == 40 and fresh.query_params == {"run": key, "size": "40"}
    fresh.switch_page("pages/explore.py").run()
    expected = CircuitEvaluator(model, data, "logit_diff", batch_size=128).faithfulness(top_n(scores, 40))
    assert faithfulness(fresh) == pytest.approx(expected, abs=2e-4)

    gone = AppTest.from_file(APP, default_timeout=300)
    gone.query_params = {"run": "run:00000000000000000000", "size": "40"}
    gone.run()
    assert any("names the run `run:00000000000000000000`, which this server does not hold" in i.value for i in gone.info)
    assert "scores" not in gone.session_state and gone.query_params == {}
    big = AppTest.from_file(APP, default_timeout=300)
    big.query_params = {"run": key, "size": "99999999"}
    big.run()
    assert any("circuit size `99999999` does not fit this run" in i.value for i in big.info)
    assert big.session_state["scores_key"] == key


# ----- cost before a run -----


def test_attribute_shows_time_and_memory_before_a_run_and_warns_when_memory_is_short(engine, monkeypatch) -> None:
    from dataclasses import replace

    from eapcore import cost
    from eapcore.attribute import AttributionSpec

    model, data = engine
    at = new_app()
    at.switch_page("pages/attribute.py").run()
    at.number_input(key="w_steps").set_value(3).run()
    spec = at.session_state["attr_spec"]
    cost._RATES.pop(cost.rate_key(model, spec), None)  # no run of this kind measured yet in this process
    at.number_input(key="w_batch").set_value(61).run()
    spec = at.session_state["attr_spec"]
    line = next(c.value for c in at.caption if c.value.startswith("Estimated: "))
    direct = cost.estimate_cost(model, data, spec)
    assert "(first guess)" in line and f"peak memory {human(direct.memory.total)}" in line

    run_attribution(at, open_explore=False, switch=False)  # the app's run records its speed
    at.number_input(key="w_batch").set_value(62).run()  # another run of the same kind, not cached
    spec = at.session_state["attr_spec"]
    line = next(c.value for c in at.caption if c.value.startswith("Estimated: "))
    direct = cost.estimate_cost(model, data, spec)
    assert direct.measured and line.startswith(f"Estimated: {direct.summary().split(', peak memory')[0]}, peak memory")
    assert not any(w.value.startswith("Memory: ") for w in at.warning)

    needed = direct.needed  # free memory cannot be made short here: the reading is replaced
    monkeypatch.setattr(cost, "free_memory", lambda device: (needed // 2, "RAM available (/proc/meminfo)"))
    at.run()
    warning = next(w.value for w in at.warning if w.value.startswith("Memory: "))
    assert warning == f"Memory: {replace(direct, free=needed // 2, free_what='RAM available (/proc/meminfo)').warning}"
    assert spec == AttributionSpec("EAP-IG-inputs", 3, batch_size=62)
