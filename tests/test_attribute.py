"""Attribution against independent ground truth: hook-free autograd, IG completeness, padding."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import GPT2LMHeadModel

from eapcore.attribute import AttributionSpec, attribute
from eapcore.backends import attribution_backend
from eapcore.data import PromptPairs, tokenize
from eapcore.metrics import logit_diff, readout
from eapcore.models import model_graph

from reference_gpt2 import forward


@pytest.fixture(scope="module")
def hf64(tiny_dir):
    model = GPT2LMHeadModel.from_pretrained(tiny_dir, dtype=torch.float64).eval()
    return model


def _single(data, i):
    """Example ``i`` alone, unpadded: (clean [1 pos], corrupted [1 pos], batch of one)."""
    batch = next(data.batches(1)) if i == 0 else list(data.batches(1))[i]
    return batch.clean, batch.corrupted, batch


def reference_scores(hf, graph, data, alphas):
    """Σ Δ_u · mean_α ∂L/∂input_v with explicit inputs and ``torch.autograd.grad`` (no hooks)."""
    for p in hf.parameters():
        p.requires_grad_(True)
    expected = torch.zeros(graph.n_forward, graph.n_backward, dtype=torch.float64)
    for i in range(len(data)):
        clean, corrupted, batch = _single(data, i)
        with torch.no_grad():
            _, corr_out, _ = forward(hf, graph, corrupted)
            _, clean_out, _ = forward(hf, graph, clean)
        emb_clean, emb_corr = clean_out[0], corr_out[0]
        for alpha in alphas:
            wte = hf.transformer.wte
            interpolated = emb_corr + alpha * (emb_clean - emb_corr)
            original = wte.forward
            wte.forward = lambda tokens, x=interpolated: x
            try:
                logits, _, inputs = forward(hf, graph, clean)
            finally:
                wte.forward = original
            loss = -logit_diff(readout(logits, batch.lengths), batch).sum()
            cols = sorted(inputs)
            grads = torch.autograd.grad(loss, [inputs[c] for c in cols])
            for col, g in zip(cols, grads):
                for u in range(int(graph.n_sources[col])):
                    expected[u, col] += ((corr_out[u] - clean_out[u]) * g).sum() / len(alphas)
    return expected / len(data)


def test_reference_forward_matches_hugging_face(hf64, tiny64, pairs):
    data = tokenize(pairs, tiny64.tokenizer)
    clean, _, _ = _single(data, 3)
    logits, _, _ = forward(hf64, model_graph(tiny64), clean)
    torch.testing.assert_close(logits, hf64(clean).logits, rtol=1e-10, atol=1e-10)


@pytest.mark.devices
@pytest.mark.parametrize("backend", ["unsplit", "split"])
@pytest.mark.parametrize("method", ["EAP", "clean-corrupted", "EAP-IG-inputs"])
def test_scores_equal_hook_free_autograd(method, backend, hf64, tiny64, pairs):
    """Both attribution backends: unsplit passes (eapcore.fastgrad) and per-head split inputs."""
    assert attribution_backend(method, "GPT2LMHeadModel") == "unsplit"  # what auto picks for GPT-2
    data = tokenize(pairs, tiny64.tokenizer)
    spec = AttributionSpec(method=method, ig_steps=3, batch_size=3, backend=backend)
    scores = attribute(tiny64, data, spec)
    assert scores.provenance["backend"] == backend
    ours = scores.edges
    expected = reference_scores(hf64, model_graph(tiny64), data, spec.alphas())
    assert expected.abs().max() > 1e-3  # the comparison is not vacuous
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-9 * float(expected.abs().max()))


def test_ig_completeness_improves_with_steps(tiny64, pairs):
    """Σ_v score(input, v) -> m(clean) − m(corrupted) as the Riemann sum refines."""
    from eapcore.evaluate import CircuitEvaluator

    data = tokenize(pairs, tiny64.tokenizer)
    base = CircuitEvaluator(tiny64, data).baseline()
    target = base.clean - base.corrupted

    def error(steps: int) -> float:
        scores = attribute(tiny64, data, AttributionSpec(ig_steps=steps, batch_size=8)).edges
        return abs(float(scores[0].sum()) - target)

    assert error(64) < error(2) / 5


@pytest.mark.devices
def test_example_scores_do_not_depend_on_padding(tiny64, pairs):
    data = tokenize(pairs, tiny64.tokenizer)
    together = attribute(tiny64, data, AttributionSpec(batch_size=8)).edges * len(data)
    alone = sum(
        attribute(tiny64, tokenize(PromptPairs.from_lists([c], [k], [a], [b]), tiny64.tokenizer), AttributionSpec()).edges
        for c, k, a, b in zip(pairs.clean, pairs.corrupted, pairs.correct, pairs.incorrect)
    )
    torch.testing.assert_close(together, alone, rtol=1e-9, atol=1e-12)


def test_weights_get_no_gradients(tiny64, pairs):
    """The weights are frozen only while eapcore attributes: they keep requires_grad (so other tools can
    differentiate them) and get no gradient."""
    assert all(p.requires_grad for p in tiny64.parameters())
    for method in ("EAP", "EAP-IG-activations"):
        for backend in ("auto", "split"):
            attribute(tiny64, tokenize(pairs, tiny64.tokenizer), AttributionSpec(method=method, backend=backend))
    assert all(p.grad is None and p.requires_grad for p in tiny64.parameters())


@pytest.mark.devices
def test_progress_reports_every_pass(tiny64, pairs):
    calls = []
    attribute(tiny64, tokenize(pairs, tiny64.tokenizer), AttributionSpec(ig_steps=2, batch_size=4), progress=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 8) for i in range(1, 9)]


@pytest.mark.parametrize("kwargs", [{"ig_steps": 0}, {"ig_steps": -3}, {"method": "EAP-IG"}, {"batch_size": 0}])
def test_bad_specs_are_refused(kwargs):
    with pytest.raises(ValueError):
        AttributionSpec(**kwargs)


@pytest.mark.devices
@pytest.mark.parametrize("method, intervention", [("EAP-IG-inputs", "patching"), ("EAP", "mean")])
@pytest.mark.parametrize("half_dtype", ["bfloat16", "float16"])
def test_half_precision_keeps_the_ranking(half_dtype, method, intervention, device):
    """Half precision (--dtype bfloat16 or float16; fast on GPUs and on CPUs with AVX512-BF16) ranks edges as
    float32 does: the unsplit gradient passes, and means summed over the data set."""
    from eapcore.models import load_model
    from eapcore.tasks import get_task

    pairs = PromptPairs.from_csv(get_task("ioi").csv.read_bytes())
    scores = {}
    for dtype in ("float32", half_dtype):
        model = load_model("demo", device=device, dtype=dtype)
        data = tokenize(PromptPairs(*(getattr(pairs, f)[:64] for f in ("clean", "corrupted", "correct", "incorrect"))),
                        model.tokenizer)
        spec = AttributionSpec(method=method, intervention=intervention, batch_size=64)
        scores[dtype] = attribute(model, data, spec).edges[model_graph(model).real_edge_mask]
    full, half = scores["float32"].abs(), scores[half_dtype].abs()
    assert half.dtype == torch.float32  # scores are accumulated and returned in float32
    ranks = torch.stack([full.argsort().argsort(), half.argsort().argsort()]).double()
    assert torch.corrcoef(ranks)[0, 1] > 0.99
    for n in (24, 48):  # the top 5% and 10% of the demo graph's 479 edges
        assert len(set(full.topk(n).indices.tolist()) & set(half.topk(n).indices.tolist())) >= 0.95 * n


@pytest.mark.devices
@pytest.mark.parametrize("level", ["edge", "node", "neuron"])
@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("method,intervention", [
    ("EAP", "patching"), ("EAP", "zero"), ("EAP", "mean"), ("EAP-IG-inputs", "patching"), ("clean-corrupted", "patching"),
    ("EAP-IG-activations", "patching"), ("EAP-IG-activations", "zero"), ("EAP-IG-activations", "mean"),
])
def test_fast_path_equals_the_plain_path(method, intervention, chunks, level, tiny64, pairs):
    """Δ recorded inside the unsplit gradient passes, every intervention the methods allow, windows of
    source rows, every level: the same scores and the same progress reports as the split backend."""
    data = tokenize(pairs, tiny64.tokenizer)
    spec = dict(method=method, ig_steps=3, batch_size=3, chunks=chunks, intervention=intervention, metric="prob_diff",
                level=level)
    fast_calls, plain_calls = [], []
    fast = attribute(tiny64, data, AttributionSpec(**spec, backend="unsplit"), progress=lambda *a: fast_calls.append(a))
    plain = attribute(tiny64, data, AttributionSpec(**spec, backend="split"), progress=lambda *a: plain_calls.append(a))
    for part in ("edges", "nodes", "neurons"):
        ours, expected = getattr(fast, part), getattr(plain, part)
        assert (ours is None) == (expected is None)
        if expected is not None and (level == "edge") == (part == "edges"):
            assert expected.abs().max() > 1e-3
            torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12 * float(expected.abs().max()))
    assert fast_calls == plain_calls


@pytest.mark.parametrize("kwargs, message", [
    ({"backend": "fast"}, "unknown backend 'fast'; choose auto, unsplit or split"),
    ({"backend": "unsplit", "method": "information-flow-routes"}, "information-flow-routes runs on the split backend only"),
    ({"backend": "split", "method": "exact"}, "exact runs circuit evaluations"),
])
def test_backends_that_cannot_run_are_refused_with_the_alternatives(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        AttributionSpec(**kwargs)


def test_the_backend_that_ran_is_recorded(tiny64, pairs):
    data = tokenize(pairs, tiny64.tokenizer)
    ran = {(method, level): attribute(tiny64, data, AttributionSpec(method=method, level=level, ig_steps=2)).provenance["backend"]
           for method, level in [("EAP", "edge"), ("EAP", "node"), ("EAP-IG-activations", "edge"),
                                 ("information-flow-routes", "edge"), ("exact", "node")]}
    assert ran == {("EAP", "edge"): "unsplit", ("EAP", "node"): "unsplit", ("EAP-IG-activations", "edge"): "unsplit",
                   ("information-flow-routes", "edge"): "split", ("exact", "node"): "sparse"}
