"""Half precision (float16, bfloat16) on the CPU: what eapcore sums or normalises itself is computed in
float32 (metrics, means, proximities, the unsplit backend's norm rebuild and step sums, the sparse engine's
running sums), against float64 computed from the same half-precision values, or against the float32 model.

The model with large residual values is a copy of the demo model whose BOS embedding has a "massive
activation" of 3000 in one dimension (as GPT-2 and Llama have at the first token; its unembedding is
kept as it was, untied). Each test fails when the quantity is computed in the model's dtype.
"""

from __future__ import annotations

import pytest
import torch

from eapcore import fastgrad
from eapcore.attribute import AttributionSpec, attribute, proximity
from eapcore.data import Batch, PromptPairs, tokenize
from eapcore.evaluate import CircuitEvaluator
from eapcore.gradients import hooked_backward, on_grad
from eapcore.heads import head_weights
from eapcore.interventions import mean_outputs
from eapcore.metrics import METRICS, get_metric
from eapcore.models import load_model, model_graph
from eapcore.sparse import input_groups
from eapcore.tasks import get_task

HALF = [torch.bfloat16, torch.float16]
MASSIVE = 3000.0


@pytest.fixture(scope="module")
def massive_dir(tmp_path_factory):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from eapcore.models import DEMO_MODEL_DIR

    demo = GPT2LMHeadModel.from_pretrained(DEMO_MODEL_DIR)
    demo.config.tie_word_embeddings = False
    model = GPT2LMHeadModel(demo.config)
    model.load_state_dict(demo.state_dict(), strict=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(demo.transformer.wte.weight)
        model.transformer.wte.weight[demo.config.bos_token_id, 7] = MASSIVE
    path = tmp_path_factory.mktemp("massive")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(DEMO_MODEL_DIR).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ioi():
    return PromptPairs.from_csv(get_task("ioi").csv.read_bytes())


def _first(pairs: PromptPairs, n: int) -> PromptPairs:
    return PromptPairs(*(getattr(pairs, f)[:n] for f in ("clean", "corrupted", "correct", "incorrect")))


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = torch.stack([a.argsort().argsort(), b.argsort().argsort()]).double()
    return float(torch.corrcoef(ranks)[0, 1])


# ----- metrics -----


@pytest.mark.parametrize("name", list(METRICS))
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_metrics_of_half_precision_logits_are_computed_in_float32(name, dtype):
    """Read-out logits like a small model's (up to ~25, 432 tokens, answer sets of one or two tokens), in half
    precision; "near": a run close to the clean one, where KL is small and a bfloat16 KL is mostly rounding."""
    gen = torch.Generator().manual_seed(0)
    B, V = 16, 432
    clean = (torch.randn(B, V, generator=gen) * 6).to(dtype)
    near = (clean.float() + 0.05 * torch.randn(B, V, generator=gen) * 6).to(dtype)
    ids = lambda: torch.randint(0, V, (B, 2), generator=gen)  # noqa: E731
    mask = torch.ones(B, 2, dtype=torch.bool)
    mask[::2, 1] = False
    batch = Batch(torch.zeros(B, 1, dtype=torch.long), torch.zeros(B, 1, dtype=torch.long), torch.ones(B, dtype=torch.long),
                  ids(), mask, ids(), mask.clone())
    metric = METRICS[name]
    for logits in (near, clean.flip(0)):
        expected = metric.fn(logits.double(), batch, clean.double())  # float64 from the same half-precision values
        ours = metric(logits, batch, clean)
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)


# ----- mean ablation -----


@pytest.mark.parametrize("dtype, batch_size", [("float16", 32), ("bfloat16", 2)])
def test_means_are_summed_in_float32(dtype, batch_size, massive_dir, ioi):
    """float16: 32 BOS positions of 3000 pass 65504 (the means were inf); bfloat16, 2 prompts per batch: a
    running total of 128 batches rounds each batch's part (the means were 2-3% off)."""
    means = {}
    for d in ("float32", dtype):
        model = load_model(str(massive_dir), device="cpu", dtype=d)
        means[d] = mean_outputs(model, model_graph(model), tokenize(ioi, model.tokenizer), False, batch_size).double()
    assert means[dtype].isfinite().all()
    scale = means["float32"].abs().amax(1, keepdim=True)  # per source
    assert float(((means[dtype] - means["float32"]).abs() / scale).max()) < 0.012


def test_eap_with_mean_ablation_in_float16_has_no_nan(massive_dir, ioi):
    """The scores of EAP with mean ablation on the model with a massive activation: NaN for ~10% of the edges
    when the means overflowed; now ranked as float32 ranks them."""
    scores = {}
    for dtype in ("float32", "float16"):
        model = load_model(str(massive_dir), device="cpu", dtype=dtype)
        data = tokenize(_first(ioi, 64), model.tokenizer)
        spec = AttributionSpec(method="EAP", intervention="mean", batch_size=32)
        scores[dtype] = attribute(model, data, spec).edges[model_graph(model).real_edge_mask]
    assert scores["float16"].isfinite().all()
    assert _spearman(scores["float16"], scores["float32"]) > 0.999


# ----- information-flow routes -----


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_proximity_norms_are_summed_in_float32(dtype):
    """‖h‖₁ − ‖h − x_u‖₁ over 128 dimensions of ~700: each norm is ~70000, past float16's 65504 (inf − inf =
    NaN), and bfloat16 keeps 8 bits of it (a resolution of 256 to 512)."""
    gen = torch.Generator().manual_seed(0)
    h = (torch.randn(2, 3, 128, generator=gen) * 900).to(dtype)
    x = torch.stack([h.float() * s + torch.randn(2, 3, 128, generator=gen) * 40 for s in (1.0, 0.7, 0.0, -0.3)]).to(dtype)
    hd, xd = h.double(), x.double()
    assert float(hd.abs().sum(-1).min()) > 65504
    expected = (hd.abs().sum(-1) - (hd - xd).abs().sum(-1)).clamp_min(0)  # float64 from the same values
    expected = expected / expected.sum(0, keepdim=True)
    ours = proximity(h, x)
    assert ours.dtype == torch.float32 and ours.isfinite().all()
    # the rounding left is that of h − x_u, one half-precision step per element (in half precision the
    # normalised proximities were NaN in float16 and 3e-3 off in bfloat16)
    torch.testing.assert_close(ours.double(), expected, rtol=0, atol=1e-3 if dtype == torch.bfloat16 else 1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_information_flow_routes_in_half_precision_rank_as_float32(dtype, massive_dir, ioi):
    scores = {}
    for d in ("float32", dtype):
        model = load_model(str(massive_dir), device="cpu", dtype=d)
        data = tokenize(_first(ioi, 64), model.tokenizer)
        spec = AttributionSpec(method="information-flow-routes", batch_size=32)
        scores[d] = attribute(model, data, spec).edges[model_graph(model).real_edge_mask]
    assert scores[dtype].isfinite().all()
    assert _spearman(scores[dtype], scores["float32"]) > 0.999


# ----- the unsplit backend and the sparse engine -----


def _data(model, n):
    return tokenize(_first(PromptPairs.from_csv(get_task("ioi").csv.read_bytes()), n), model.tokenizer)


def _k_input_gradient(path, dtype: str, unsplit: bool, layer: int = 1) -> torch.Tensor:
    """The gradient of the logit difference at every head's k input of ``layer`` ``[batch pos head d_model]``
    (float32): rebuilt through the norm by the unsplit backend, or read by autograd at the split hook."""
    model = load_model(str(path), device="cpu", dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    (batch,) = _data(model, 8).batches(8)
    metric, graph = get_metric("logit_diff"), model_graph(model)
    embed = ("hook_embed", lambda t, hook: t.detach().clone().requires_grad_(True))
    if unsplit:
        grads = fastgrad._Gradients(model, graph, [head_weights(model, l) for l in range(graph.cfg.n_layers)], "edge",
                                    slice(0, graph.n_forward))
        with fastgrad.unsplit(model):
            hooked_backward(model, batch, metric, None, [embed, *grads.hooks()], "test")
        return grads.layers[layer].input_gradient("k").float()
    seen = {}
    hook = (f"blocks.{layer}.hook_k_input", lambda t, hook: on_grad(t, lambda g: seen.setdefault("g", g)))
    hooked_backward(model, batch, metric, None, [embed, hook], "test")
    return seen["g"].float()


def test_float16_norm_rebuild_does_not_overflow(massive_dir):
    """Fix: the unsplit backend rebuilds the norm in float32. In float16, (x − μ)² overflows for |x − μ| > 256,
    so r = rsqrt(mean) was 0 and every head's k input gradient at that position came out exactly 0."""
    reference = _k_input_gradient(massive_dir, "float32", unsplit=False)
    for unsplit in (True, False):
        half = _k_input_gradient(massive_dir, "float16", unsplit=unsplit)
        error = (half[:, 0] - reference[:, 0]).norm() / reference[:, 0].norm()  # at the massive position
        assert error < 2e-2, (unsplit, float(error))
    assert float(reference[:, 0].norm()) > 1e-3 * float(reference.norm())  # the position matters


@pytest.mark.slow
def test_bfloat16_sums_over_many_steps_in_float32():
    """Fix: Σ over the IG steps is kept in float32. Summed in bfloat16 (8 significant bits), 512 steps lost
    16% of the scores; in float32 the bfloat16 scores stay within 1% of float32's."""
    scores = {}
    for dtype in ("float32", "bfloat16"):
        model = load_model("demo", device="cpu", dtype=dtype)
        scores[dtype] = attribute(model, _data(model, 2), AttributionSpec("EAP-IG-inputs", ig_steps=512, batch_size=2)).edges
    error = (scores["bfloat16"] - scores["float32"]).norm() / scores["float32"].norm()
    assert error < 2e-2, float(error)


def test_sparse_engine_rounds_its_running_sums_once(massive_dir):
    """Fix: the sparse engine's all-ablated inputs X_v = clean input + Σ_{u < n} (ā_u − a_u) are summed in
    float32 and rounded once, so in bfloat16 each is the correctly rounded sum (summed in bfloat16, the
    running sum was rounded after every source)."""
    model = load_model(str(massive_dir), device="cpu", dtype="bfloat16")
    evaluator = CircuitEvaluator(model, _data(model, 16), batch_size=16, intervention="zero")
    (prepared,) = evaluator._prepared()
    runner = prepared.runner
    clean, inputs, _ = evaluator._clean_run(prepared.batch)
    graph, done, shift = evaluator.graph, 0, torch.zeros(inputs.shape[1:], dtype=torch.float64)
    for x, group, ours in zip(inputs, input_groups(graph), runner.all_ablated):
        shift += (prepared.ablated[done:group.n_sources].double() - clean[done:group.n_sources].double()).sum(0)
        done = group.n_sources
        exact = x.double() + shift
        half_ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 8)  # bfloat16: 8 significant bits
        slack = 2.0**-20 * float(shift.abs().max())  # the float32 sum's own rounding
        excess = (ours.double() - exact).abs() - half_ulp - slack
        assert float(excess.max()) <= 0, float(excess.max())
