"""Removals from the full graph evaluated several at once (CircuitEvaluator.without, eapcore.removals) against
evaluating each removal's circuit one by one, node by node from the cached ablated inputs (the sparse
engine's general path) and with hooks (the hooked engine), in float64: every edge of the tiny GPT-2 and the
demo model under every intervention, and edges of every kind on each family with sparse evaluation.
(Hand patching checks exact effects in tests/test_verify.py and tests/test_methods.py.)"""

from __future__ import annotations

import pytest
import torch

from eapcore import families
from eapcore.circuit import Circuit
from eapcore.data import PromptPairs, tokenize
from eapcore.evaluate import CircuitEvaluator
from eapcore.models import load_model, model_graph
from eapcore.tasks import get_task

from conftest import FAMILIES, hf_model, save_with_tiny_tokenizer


def one_by_one(evaluator, removals) -> torch.Tensor:
    graph = evaluator.graph
    out = []
    for row, col in removals:
        keep = graph.real_edge_mask.clone()
        keep[row, slice(None) if col is None else col] = False
        out.append(evaluator.evaluate(Circuit(graph, keep, torch.ones(graph.n_forward, dtype=torch.bool)), reuse_clean=False))
    return torch.stack(out)


def every_removal(graph) -> list:
    return [tuple(e) for e in graph.real_edge_mask.nonzero().tolist()] + [(row, None) for row in range(graph.n_forward)]


@pytest.mark.devices
@pytest.mark.parametrize("intervention", ["patching", "zero", "mean", "mean-positional"])
def test_every_removal_equals_its_circuit(intervention, tiny64, pairs):
    if intervention == "mean-positional":  # needs prompts of one length
        keep = [i for i, c in enumerate(pairs.clean) if len(c.split()) == 4]
        pairs = PromptPairs(*(tuple(getattr(pairs, f)[i] for i in keep) for f in ("clean", "corrupted", "correct", "incorrect")))
    data = tokenize(pairs, tiny64.tokenizer)
    stacked = CircuitEvaluator(tiny64, data, batch_size=3, intervention=intervention)
    hooked = CircuitEvaluator(tiny64, data, batch_size=3, intervention=intervention, engine="hooked")
    removals = every_removal(stacked.graph)
    ours = stacked.without(removals)
    expected = one_by_one(hooked, removals)
    assert ours.shape == (len(removals), len(data)) and float((expected - expected[:1]).abs().max()) > 1e-3
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(hooked.without(removals[::7]), expected[::7], rtol=0, atol=0)  # hooked: one by one


def test_every_removal_on_the_demo_model():
    """Four layers, so removals start before, in and after the middle; batches of different lengths."""
    model = load_model("demo", device="cpu", dtype="float64")
    p = PromptPairs.from_csv(get_task("ioi").csv)
    data = tokenize(PromptPairs(p.clean[:10], p.corrupted[:10], p.correct[:10], p.incorrect[:10]), model.tokenizer)
    evaluator = CircuitEvaluator(model, data, batch_size=4)
    removals = every_removal(evaluator.graph)
    seen = []
    ours = evaluator.without(removals, progress=lambda done, total: seen.append((done, total)))
    torch.testing.assert_close(ours, one_by_one(evaluator, removals), rtol=1e-10, atol=1e-10)
    assert seen[-1] == (3 * len(removals),) * 2 and all(a[0] < b[0] for a, b in zip(seen, seen[1:]))


SPARSE = [name for name, spec in FAMILIES.items() if families.get(spec[1]).sparse]


@pytest.mark.parametrize("name", SPARSE)
def test_removals_on_each_family(name, tmp_path, pairs):
    """Rotary and partial-rotary attention, q/k norms, parallel attention and MLP."""
    config_cls, model_cls, kwargs, _, _ = FAMILIES[name]
    model = load_model(str(save_with_tiny_tokenizer(tmp_path, hf_model(config_cls, model_cls, kwargs))), device="cpu",
                       dtype="float64")
    graph = model_graph(model)
    evaluator = CircuitEvaluator(model, tokenize(pairs, model.tokenizer), batch_size=4)
    removals = every_removal(graph)[::3]

    def kind(col):
        name = "node" if col is None else graph.dst_nodes[col]
        return name[-2] if name.endswith(">") else name if name in ("node", "logits") else "mlp"

    assert {kind(c) for _, c in removals} == {"q", "k", "v", "mlp", "logits", "node"}
    # the bridge's own GPT-NeoX attention differs from Hugging Face's by ~2e-7 in float64: removals mix the bridge's
    # clean outputs with recomputed ones, node-by-node evaluation recomputes every node with Hugging Face's modules
    tol = 1e-6 if FAMILIES[name][1] == "GPTNeoXForCausalLM" else 1e-9
    torch.testing.assert_close(evaluator.without(removals), one_by_one(evaluator, removals), rtol=tol, atol=tol)
