"""Exact removal effects (eapcore.exact) and verify (eapcore.verify) against hand patching with plain forward
hooks (tests/hand_patching.py), on the tiny GPT-2 and the demo model, in float64."""

from __future__ import annotations

import json

import pytest
import torch

from eapcore import exact
from eapcore.attribute import AttributionSpec, attribute
from eapcore.circuit import Circuit
from eapcore.cli import main
from eapcore.data import PromptPairs, tokenize
from eapcore.evaluate import CircuitEvaluator
from eapcore.models import load_model, model_graph
from eapcore.select import top_n
from eapcore.tasks import get_task
from eapcore.verify import verify

from conftest import plain_pearson, plain_ranks
from hand_patching import hand_metrics


@pytest.fixture(scope="module")
def tiny_data(tiny64, pairs):
    return tokenize(pairs, tiny64.tokenizer)


@pytest.fixture(scope="module")
def demo64():
    return load_model("demo", device="cpu", dtype="float64")


@pytest.fixture(scope="module")
def demo_data(demo64):
    p = PromptPairs.from_csv(get_task("ioi").csv)
    return tokenize(PromptPairs(p.clean[:6], p.corrupted[:6], p.correct[:6], p.incorrect[:6]), demo64.tokenizer)


def _removed(graph, *edges) -> torch.Tensor:
    keep = graph.real_edge_mask.clone()
    for r, c in edges:
        keep[r, c] = False
    return keep


@pytest.mark.parametrize("which", ["tiny", "demo"])
def test_verify_equals_hand_patching(which, tiny64, tiny_data, demo64, demo_data):
    model, data, k = (tiny64, tiny_data, 8) if which == "tiny" else (demo64, demo_data, 5)
    graph = model_graph(model)
    scores = attribute(model, data, AttributionSpec("EAP", batch_size=4))
    evaluator = CircuitEvaluator(model, data, batch_size=4)
    result = verify(evaluator, scores, k)

    flat = [(abs(scores.edges[r, c].item()), r, c) for r, c in graph.real_edge_mask.nonzero().tolist()]
    top = [(r, c) for _, r, c in sorted(flat, key=lambda t: -t[0])[:k]]  # stable: row-major among ties
    assert [e.edge for e in result.edges] == [graph.edge_name(r, c) for r, c in top]
    full = hand_metrics(model, graph, data, graph.real_edge_mask).mean().item()
    for check, (r, c) in zip(result.edges, top):
        expected = -(hand_metrics(model, graph, data, _removed(graph, (r, c))).mean().item() - full)
        assert check.exact == pytest.approx(expected, rel=1e-6, abs=1e-9), check.edge
        assert check.estimate == scores.edges[r, c].item()
    assert sum(abs(e.exact) > 1e-3 for e in result.edges) > k // 2  # not vacuous

    est, ex = [e.estimate for e in result.edges], [e.exact for e in result.edges]
    assert result.pearson == pytest.approx(plain_pearson(est, ex), rel=1e-9)
    assert result.spearman == pytest.approx(plain_pearson(plain_ranks(est), plain_ranks(ex)), rel=1e-9)
    sign = lambda x: (x > 0) - (x < 0)  # noqa: E731
    assert result.sign_agreement == sum(sign(x) == sign(y) for x, y in zip(est, ex)) / k
    worst = sorted(result.edges, key=lambda e: abs(e.estimate - e.exact), reverse=True)
    assert result.worst(3) == tuple(worst[:3])

    rest = graph.real_edge_mask & ~top_n(scores, k).edges
    empty = hand_metrics(model, graph, data, torch.zeros_like(rest)).mean().item()
    m_rest = hand_metrics(model, graph, data, rest).mean().item()
    assert result.complement_faithfulness == pytest.approx((m_rest - empty) / (full - empty), rel=1e-6)


def test_exact_sign_follows_the_metric(tiny64, tiny_data):
    """kl_div is lower-is-better: removing an edge that hurts raises it, and the effect is +(m_removed − m_full)."""
    graph = model_graph(tiny64)
    evaluator = CircuitEvaluator(tiny64, tiny_data, metric="kl_div", batch_size=3)
    edges = [tuple(e) for e in graph.real_edge_mask.nonzero().tolist()[::17]]
    effects = exact.edge_effects(evaluator, edges)
    for (r, c), effect in zip(edges, effects.tolist()):
        expected = hand_metrics(tiny64, graph, tiny_data, _removed(graph, (r, c)), metric="kl_div").mean().item()
        assert effect == pytest.approx(expected, rel=1e-6, abs=1e-12)  # the full graph's KL is 0
        assert effect >= -1e-12


def test_node_effects_remove_every_outgoing_edge(tiny64, tiny_data):
    graph = model_graph(tiny64)
    evaluator = CircuitEvaluator(tiny64, tiny_data, batch_size=8)
    full = hand_metrics(tiny64, graph, tiny_data, graph.real_edge_mask).mean().item()
    rows = [0, graph.head_index(0, 1), graph.mlp_index(1)]
    for row, effect in zip(rows, exact.node_effects(evaluator, rows).tolist()):
        keep = graph.real_edge_mask.clone()
        keep[row] = False
        assert effect == pytest.approx(-(hand_metrics(tiny64, graph, tiny_data, keep).mean().item() - full), rel=1e-6)


def test_progress_counts_removals_and_can_stop(tiny64, tiny_data):
    evaluator = CircuitEvaluator(tiny64, tiny_data, batch_size=8)
    scores = attribute(tiny64, tiny_data, AttributionSpec("EAP", batch_size=8))
    seen = []
    verify(evaluator, scores, 4, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 5) for i in range(1, 6)]

    class Stop(Exception):
        pass

    def stop(done, total):
        raise Stop

    with pytest.raises(Stop):
        verify(evaluator, scores, 4, progress=stop)


def test_k_beyond_the_graph_is_clamped_with_a_note(tiny64, tiny_data):
    graph = model_graph(tiny64)
    evaluator = CircuitEvaluator(tiny64, tiny_data, batch_size=8)
    scores = attribute(tiny64, tiny_data, AttributionSpec("EAP", batch_size=8))
    result = verify(evaluator, scores, graph.n_edges + 100)
    assert result.k == len(result.edges) == graph.n_edges
    assert f"{graph.n_edges + 100}" in result.note and f"all {graph.n_edges}" in result.note
    assert result.complement_faithfulness == pytest.approx(0.0, abs=1e-9)  # the complement of everything is empty
    assert verify(evaluator, scores, 3).note is None
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="top-k must be a positive integer"):
            verify(evaluator, scores, bad)


def test_complement_of_a_given_circuit(tiny64, tiny_data):
    graph = model_graph(tiny64)
    evaluator = CircuitEvaluator(tiny64, tiny_data, batch_size=8)
    scores = attribute(tiny64, tiny_data, AttributionSpec("EAP", batch_size=8))
    assert verify(evaluator, scores, 2, circuit=Circuit.full(graph)).complement_faithfulness == pytest.approx(0.0, abs=1e-9)
    assert verify(evaluator, scores, 2, circuit=Circuit.empty(graph)).complement_faithfulness == pytest.approx(1.0)


def test_verify_cli(tiny_dir, tiny64, tiny_data, tmp_path, capsys, monkeypatch):
    from conftest import CSV

    csv = tmp_path / "pairs.csv"
    csv.write_text(CSV)
    run = tmp_path / "run.pt"
    assert main(["attribute", "--model", str(tiny_dir), "--data", str(csv), "--method", "EAP", "--out", str(run),
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["verify", "--model", str(tiny_dir), "--data", str(csv), "--circuit", str(run), "--top-k", "4",
                 "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"k", "pearson", "spearman", "sign_agreement", "complement_faithfulness", "edges"} <= out.keys()
    assert out["k"] == 4 and len(out["edges"]) == 4 and out["note"] is None
    graph = model_graph(tiny64)
    for e in out["edges"]:
        assert graph.edge_name(*graph.parse_edge_name(e["edge"])) == e["edge"]
        assert {"estimate", "exact"} <= e.keys()
    assert main(["verify", "--model", str(tiny_dir), "--data", str(csv), "--circuit", str(run), "--top-k", "9999",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert out["k"] == graph.n_edges and "9999" in out["note"] and "note: top-k 9999" in captured.err
    assert main(["verify", "--model", str(tiny_dir), "--data", str(csv), "--circuit", str(run), "--top-k", "0"]) == 2
    assert "top-k must be a positive integer" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun: refused before anything starts
    assert main(["verify", "--model", str(tiny_dir), "--data", str(csv), "--circuit", str(run), "--top-k", "4"]) == 2
    assert "verify runs in one process" in capsys.readouterr().err
