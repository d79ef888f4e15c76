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


# ----- slider moves: each evaluation reuses what the previous circuit computed (eapcore.sparse_plan) -----


def _walk(graph, seed: int, steps: int = 12):
    """Top-n circuits (pruned) of random scores, n moving up and down by 1-5 edges, as a slider does."""
    from eapcore.circuit import Scores
    from eapcore.select import top_n

    gen = torch.Generator().manual_seed(seed)
    scores = Scores(graph, torch.randn(graph.n_forward, graph.n_backward, generator=gen, dtype=torch.float64) * graph.real_edge_mask)
    n = int(torch.randint(1, graph.n_edges // 2, (1,), generator=gen))
    for _ in range(steps):
        n = min(graph.n_edges, max(0, n + int(torch.randint(-5, 6, (1,), generator=gen))))
        yield top_n(scores, n)


@pytest.mark.devices
@pytest.mark.parametrize("intervention", ["patching", "zero", "mean", "mean-positional"])
def test_slider_moves_equal_fresh_evaluation(intervention, tiny64, pairs):
    """Random moves up and down: each move's metric equals the hooked pass and a fresh node-by-node evaluation."""
    if intervention == "mean-positional":
        pairs = _rows(pairs, [i for i, c in enumerate(pairs.clean) if len(c.split()) == 4])
    data = tokenize(pairs, tiny64.tokenizer)
    moving, hooked = _both_paths(tiny64, data, intervention)
    fresh, _ = _both_paths(tiny64, data, intervention)
    for seed in range(3):
        for circuit in _walk(moving.graph, seed):
            ours = moving.evaluate(circuit, reuse_clean=False)
            fresh.forget()  # nothing held: every node the circuit needs is computed
            torch.testing.assert_close(ours, fresh.evaluate(circuit, reuse_clean=False), rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(ours, hooked.evaluate(circuit, reuse_clean=False), rtol=1e-10, atol=1e-10)


def test_slider_moves_on_the_demo_model_and_sessions_that_alternate():
    """Two sessions moving their own sliders on one shared evaluator, in turn and from two threads at once."""
    import threading

    from eapcore.data import PromptPairs
    from eapcore.models import load_model
    from eapcore.tasks import get_task

    model = load_model("demo", device="cpu", dtype="float64")
    data = tokenize(_rows(PromptPairs.from_csv(get_task("ioi").csv.read_bytes()), range(12)), model.tokenizer)
    shared, hooked = _both_paths(model, data, "patching", batch_size=5)
    sessions = [list(_walk(shared.graph, seed, steps=10)) for seed in (10, 11)]
    expected = [[hooked.evaluate(c, reuse_clean=False) for c in walk] for walk in sessions]
    for a, b, ea, eb in zip(*sessions, *expected):  # in turn
        torch.testing.assert_close(shared.evaluate(a, reuse_clean=False), ea, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(shared.evaluate(b, reuse_clean=False), eb, rtol=1e-10, atol=1e-10)
    results: dict[int, list] = {0: [], 1: []}

    def session(i):
        results[i] = [shared.evaluate(c, reuse_clean=False) for c in sessions[i]]

    threads = [threading.Thread(target=session, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (0, 1):
        for ours, exp in zip(results[i], expected[i], strict=True):
            torch.testing.assert_close(ours, exp, rtol=1e-10, atol=1e-10)


def test_a_move_recomputes_only_what_the_changed_edges_reach(tiny64):
    """From a held circuit, a plan recomputes a node only if a changed edge or a recomputed in-circuit parent
    reaches it (or it was not held at the positions needed now); a move of an edge into the logits
    recomputes no node at all."""
    from eapcore.sparse_plan import make_plan

    graph = model_graph(tiny64)
    real = graph.real_edge_mask
    reader = {c: r for r in range(graph.n_forward) for c in range(graph.n_backward) if graph.forward_to_backward[r, c]}
    gen = torch.Generator().manual_seed(3)
    for _ in range(40):
        before = real & (torch.rand(real.shape, generator=gen) < 0.4)
        after = before.clone()
        r, c = real.nonzero()[int(torch.randint(0, graph.n_edges, (1,), generator=gen))].tolist()
        after[r, c] = ~after[r, c]
        held = make_plan(graph, before, None, torch.device("cpu"), torch.float64)
        plan = make_plan(graph, after, held.held, torch.device("cpu"), torch.float64)
        reach = {reader[c]} if c in reader else set()
        for u in range(graph.n_forward):  # forward order: parents before children
            if any(after[p, col] for p in reach for col in range(graph.n_backward) if reader.get(col) == u):
                reach.add(u)
        needed = after.any(1)
        not_held_enough = {u for u in range(graph.n_forward) if needed[u] and held.held.have[u] < plan.held.have[u]}
        assert set(plan.recomputed) <= (reach | not_held_enough) & set(needed.nonzero().flatten().tolist())
        if c == graph.logits_column and needed[r] == before.any(1)[r]:
            assert plan.recomputed == () and plan.logits is not None


def test_two_sessions_asking_at_once_prepare_the_cache_once(tiny64, pairs):
    import threading

    ev = CircuitEvaluator(tiny64, tokenize(pairs, tiny64.tokenizer), batch_size=3)
    prepare, calls = ev._prepare, []
    ev._prepare = lambda *a: calls.append(1) or prepare(*a)
    circuit = Circuit(ev.graph, ev.graph.real_edge_mask, torch.ones(ev.graph.n_forward, dtype=torch.bool))
    threads = [threading.Thread(target=ev.evaluate, args=(circuit, False)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 3  # 8 pairs in batches of 3, once
