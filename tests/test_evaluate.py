"""One-pass circuit evaluation against a hand-patched, hook-free forward."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from eapcore.circuit import Circuit
from eapcore.data import tokenize
from eapcore.evaluate import CircuitEvaluator, normalized
from eapcore.metrics import get_metric, readout
from eapcore.models import model_graph

from reference_gpt2 import forward


@pytest.fixture(scope="module", params=["sparse", "hooked"])
def evaluator(request, tiny64, pairs):
    """Both evaluation engines: node by node (eapcore.sparse, GPT-2) and one hooked forward pass."""
    ev = CircuitEvaluator(tiny64, tokenize(pairs, tiny64.tokenizer), batch_size=3, engine=request.param)
    assert ev.engine == request.param
    return ev


def hand_patched(hf, graph, data, keep, metric="logit_diff"):
    """Per-example metric with every edge outside ``keep`` carrying the corrupted source output."""
    values = []
    with torch.no_grad():
        for batch in data.batches(1):
            _, corrupted, _ = forward(hf, graph, batch.corrupted)
            logits, _, _ = forward(hf, graph, batch.clean, keep=keep, corrupted=corrupted)
            values.append(get_metric(metric)(readout(logits, batch.lengths), batch))
    return torch.cat(values)


def test_full_circuit_is_clean_and_empty_is_corrupted(evaluator, tiny_dir, pairs):
    hf = GPT2LMHeadModel.from_pretrained(tiny_dir, dtype=torch.float64).eval()
    base = evaluator.baseline()
    full = evaluator.evaluate(Circuit.full(evaluator.graph))  # looked up: the cached clean run
    empty = evaluator.evaluate(Circuit.empty(evaluator.graph)).mean().item()
    assert abs(base.clean - base.corrupted) > 0.1
    expected = hand_patched(hf, evaluator.graph, evaluator.data, evaluator.graph.real_edge_mask)
    torch.testing.assert_close(full, expected)
    assert empty == pytest.approx(base.corrupted, abs=1e-5)
    # the full graph through the engine itself, as any other circuit
    torch.testing.assert_close(evaluator.evaluate(Circuit.full(evaluator.graph), reuse_clean=False), expected,
                               rtol=1e-10, atol=1e-10)


@pytest.mark.devices
def test_removing_each_edge_equals_hand_patching(evaluator, tiny_dir, tiny64, pairs):
    hf = GPT2LMHeadModel.from_pretrained(tiny_dir, dtype=torch.float64).eval()
    graph = model_graph(tiny64)
    data = tokenize(pairs, tiny64.tokenizer)
    rows, cols = graph.real_edge_mask.nonzero(as_tuple=True)
    changed = 0
    for r, c in zip(rows.tolist(), cols.tolist()):
        keep = graph.real_edge_mask.clone()
        keep[r, c] = False
        ours = evaluator.evaluate(Circuit(graph, keep, torch.ones(graph.n_forward, dtype=torch.bool)))
        expected = hand_patched(hf, graph, data, keep)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
        changed += int((expected - evaluator.evaluate(Circuit.full(graph))).abs().max() > 1e-4)
    assert changed > graph.n_edges // 2  # most single edges matter on this random model


@pytest.mark.devices
def test_random_circuits_equal_hand_patching(evaluator, tiny_dir, tiny64, pairs):
    hf = GPT2LMHeadModel.from_pretrained(tiny_dir, dtype=torch.float64).eval()
    graph = model_graph(tiny64)
    data = tokenize(pairs, tiny64.tokenizer)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        keep = graph.real_edge_mask & (torch.rand(graph.real_edge_mask.shape, generator=gen) < 0.5)
        ours = evaluator.evaluate(Circuit(graph, keep, torch.ones(graph.n_forward, dtype=torch.bool)))
        torch.testing.assert_close(ours, hand_patched(hf, graph, data, keep), rtol=1e-5, atol=1e-6)


def test_faithfulness_is_normalized(evaluator):
    assert evaluator.faithfulness(Circuit.full(evaluator.graph)) == pytest.approx(1.0, abs=1e-6)
    assert evaluator.faithfulness(Circuit.empty(evaluator.graph)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="undefined"):
        normalized(1.0, 2.0, 2.0)


@pytest.mark.devices
@pytest.mark.parametrize("engine", ["sparse", "hooked"])
def test_kl_metric_is_zero_for_full_circuit(engine, tiny64, pairs):
    ev = CircuitEvaluator(tiny64, tokenize(pairs, tiny64.tokenizer), metric="kl_div", engine=engine)
    assert ev.baseline().clean == pytest.approx(0.0, abs=1e-9)
    assert ev.evaluate(Circuit.full(ev.graph)).abs().max() < 1e-9
    assert ev.evaluate(Circuit.full(ev.graph), reuse_clean=False).abs().max() < 1e-9  # through the engine
    assert ev.baseline().corrupted > 0


def _rows(pairs, rows):
    return type(pairs)(*(tuple(getattr(pairs, f)[i] for i in rows) for f in ("clean", "corrupted", "correct", "incorrect")))


def _both_paths(model, data, intervention, batch_size=3):
    sparse_ev = CircuitEvaluator(model, data, batch_size=batch_size, intervention=intervention)  # auto: sparse
    hooked = CircuitEvaluator(model, data, batch_size=batch_size, intervention=intervention, engine="hooked")
    assert (sparse_ev.engine, hooked.engine) == ("sparse", "hooked")
    return sparse_ev, hooked


@pytest.mark.devices
@pytest.mark.parametrize("intervention", ["patching", "zero", "mean", "mean-positional"])
def test_sparse_evaluation_equals_the_hooked_pass(intervention, tiny64, pairs):
    """Random circuits from very sparse (a node needed only at the last token) to dense (the full graph run
    through both engines, not looked up), every intervention."""
    if intervention == "mean-positional":  # needs prompts of one length
        pairs = _rows(pairs, [i for i, c in enumerate(pairs.clean) if len(c.split()) == 4])
    data = tokenize(pairs, tiny64.tokenizer)
    fast, hooked = _both_paths(tiny64, data, intervention)
    graph = fast.graph
    gen = torch.Generator().manual_seed(1)
    for density in (0.0, 0.03, 0.1, 0.3, 0.7, 1.0):
        for _ in range(3):
            keep = graph.real_edge_mask & (torch.rand(graph.real_edge_mask.shape, generator=gen) < density)
            circuit = Circuit(graph, keep, torch.ones(graph.n_forward, dtype=torch.bool))
            torch.testing.assert_close(fast.evaluate(circuit, reuse_clean=False), hooked.evaluate(circuit, reuse_clean=False),
                                       rtol=1e-10, atol=1e-10)


@pytest.mark.devices
def test_sparse_evaluation_on_the_demo_model_top_circuits(device):
    from eapcore.attribute import AttributionSpec, attribute
    from eapcore.data import PromptPairs
    from eapcore.models import load_model
    from eapcore.select import top_n
    from eapcore.tasks import get_task

    model = load_model("demo", device=device, dtype="float32")
    data = tokenize(_rows(PromptPairs.from_csv(get_task("ioi").csv.read_bytes()), range(48)), model.tokenizer)
    scores = attribute(model, data, AttributionSpec(method="EAP", batch_size=48))
    fast, hooked = _both_paths(model, data, "patching", batch_size=16)
    for n in (1, 5, 24, 96, 240, 479):  # 479: the full graph, run through both engines
        circuit = top_n(scores, n)
        torch.testing.assert_close(fast.evaluate(circuit, reuse_clean=False), hooked.evaluate(circuit, reuse_clean=False),
                                   rtol=1e-4, atol=1e-4)


def test_unknown_engine_is_refused(tiny64, pairs):
    with pytest.raises(ValueError, match="unknown engine 'fast'; choose auto, sparse or hooked"):
        CircuitEvaluator(tiny64, tokenize(pairs, tiny64.tokenizer), engine="fast")
