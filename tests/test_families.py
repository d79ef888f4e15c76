"""Model families: each verified family, as a tiny random Hugging Face model, against ground truth
computed with plain forward hooks only (here and in tests/hand_patching.py; no eapcore.sites, no score or
patch machinery):

* EAP score of edge (u, v) = d/dε[u, v] at ε = 0 of the loss of the clean run in which each destination
  input v gets Σ_u ε[u, v]·(a_u(corrupted) − a_u(clean)) added; at ε = 0 each partial derivative is that
  of patching the edge (u, v) alone (exact, by autograd on ε; every edge of the graph is compared);
* a circuit's metric = the clean run in which every destination input gets Σ over its removed parents of
  (a_u(corrupted) − a_u(actual, this run)), patched by hand from node names.

Grouped-query (GQA) and multi-query models are ungrouped on loading (one k/v input per query head, as in
EAP-IG), which the tests check too. What the registry (eapcore.families) says of each family is checked
against its model, and each fast path it claims against the general one (refusals: tests/test_refusals.py). Adding a family: its entry in eapcore/families.py and its tiny config in FAMILIES (tests/conftest.py).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

from eapcore import families
from eapcore.attribute import AttributionSpec, attribute
from eapcore.circuit import Circuit
from eapcore.data import tokenize
from eapcore.evaluate import CircuitEvaluator
from eapcore.metrics import get_metric, readout
from eapcore.models import architecture, model_device, model_graph

from conftest import FAMILIES, hf_model, loaded, save_with_tiny_tokenizer
from hand_patching import add_at, destination_site, head_outputs, patched_metric, source_outputs

SEEDS = {"gpt-bigcode": 1}  # where seed 0 gives a model on which the corruption hardly matters
# The bridge's own GPT-NeoX attention differs from Hugging Face's by ~2e-7 in float64. eapcore.sparse calls
# Hugging Face's modules (and matches its logits to ~1e-15), so it differs from hooked runs by as much.
BRIDGE_NOISE = {"pythia": 1e-6, "neox-sequential": 1e-6}

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run several times faster on one thread, above all on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_SAVED: dict[str, object] = {}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, device, tmp_path_factory):
    """(name, folder, float64 model on ``device``); each family is saved once and loaded once per device."""
    name = request.param
    if name not in _SAVED:
        config_cls, model_cls, kwargs, parallel, n_kv = FAMILIES[name]
        hf = hf_model(config_cls, model_cls, kwargs, seed=SEEDS.get(name, 0))
        _SAVED[name] = save_with_tiny_tokenizer(tmp_path_factory.mktemp(name), hf)
    path = _SAVED[name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = loaded(path, "float64", device)
    assert not [w for w in caught if "verified" in str(w.message)]  # a verified family loads without a warning
    return name, path, model


@pytest.fixture(scope="module")
def data(family, pairs):
    return tokenize(pairs, family[2].tokenizer)


def _edge_gradients(model, graph, batch, delta, moved: tuple[list[int], float] | None = None) -> torch.Tensor:
    """d loss / dε[u, v] at ε = 0 for every edge, where v's input gets Σ_u ε[u, v]·Δ_u added (loss summed
    over the batch). At ε = 0 each partial derivative is that of patching the one edge (u, v) alone.
    ``moved`` = (rows, α): every input that reads those sources also gets (1 − α)·Σ_rows Δ, i.e. their
    outputs are moved to α·clean + (1 − α)·ablated and everything downstream recomputed."""
    metric = get_metric("logit_diff")
    eps = torch.zeros(graph.n_forward, graph.n_backward, dtype=torch.float64, device=batch.clean.device, requires_grad=True)
    stacked = torch.stack([delta[u] for u in graph.src_nodes])  # [n_forward batch pos d_model]
    hooks = []
    for col, v in enumerate(graph.dst_nodes):
        site, head = destination_site(v, graph.cfg.n_layers)
        parents = [r for r in range(graph.n_forward) if graph.real_edge_mask[r, col]]
        shift = 0
        if moved is not None and graph.real_edge_mask[moved[0][0], col]:
            shift = (1 - moved[1]) * stacked[moved[0]].sum(0)

        def perturb(t, hook, col=col, head=head, parents=parents, shift=shift):
            return add_at(head, torch.einsum("u,ubpd->bpd", eps[parents, col], stacked[parents]) + shift)(t, hook)
        hooks.append((site, perturb))
    with torch.enable_grad():
        logits = model.run_with_hooks(batch.clean, fwd_hooks=hooks)
        (grad,) = torch.autograd.grad(metric.loss(readout(logits, batch.lengths), batch), eps)
    grad = grad.cpu()
    assert not grad[~graph.real_edge_mask].any()
    return grad


def _sample_edges(graph, n: int, seed: int) -> list[tuple[int, int]]:
    rows, cols = graph.real_edge_mask.nonzero(as_tuple=True)
    pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n]
    return [(int(rows[i]), int(cols[i])) for i in pick]


# ----- tests -----
def test_docs_list_every_family():
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "families.md").read_text(encoding="utf-8")
    assert [name for name in families.FAMILIES if f"`{name}`" not in text] == []


def _normalized(x: torch.Tensor, kind: str, module) -> torch.Tensor:
    """What a norm of ``kind`` (eapcore.families.NORMS) computes, written out."""
    eps = float(getattr(module, "eps", getattr(module, "variance_epsilon", 1e-5)))
    if kind.startswith("layernorm"):
        x = x - x.mean(-1, keepdim=True)
    x = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    if kind == "layernorm":
        return x * module.weight + module.bias
    if kind == "rmsnorm":
        return x * module.weight
    return x * (1 + module.weight) if kind == "rmsnorm-1p" else x


def test_the_registry_describes_the_model(family):
    """Norm kinds before and after the sub-layers, attention kind, q/k norms, output scale and parallel
    attention/MLP, as the entry says."""
    name, _, model = family
    entry, hf = families.of(model), model.original_model
    assert entry is not None and entry.verified
    x = torch.randn(2, 3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for block in model.blocks:
        for kind, names in ((entry.norm, ("ln1", "ln2")), (entry.post_norm, ("ln1_post", "ln2_post"))):
            norms = [getattr(block, n, None) for n in names]
            if kind in (None, "none"):
                assert norms == [None, None]
                continue
            for norm in (n.original_component for n in norms):
                torch.testing.assert_close(norm(x), _normalized(x, kind, norm), rtol=1e-6, atol=1e-6)
    inner = getattr(hf, "model", None) or getattr(hf, "gpt_neox", None) or hf.transformer
    inner = getattr(inner, "language_model", inner)  # a multimodal model's
    config = hf.config.get_text_config()
    assert (getattr(inner, "rotary_emb", None) is not None) == (entry.attention != "plain")
    if entry.attention != "plain":
        partial = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
        assert (entry.attention == "partial-rotary") == (partial < 1)
    q_norm = getattr(model.blocks[0].attn.original_component, "q_norm", None)
    assert (q_norm is not None) == (entry.qk_norm is not None)
    if q_norm is not None:  # over one head's query, or over all heads' queries together
        assert q_norm.weight.numel() == {"per-head": 1, "across-heads": 4}[entry.qk_norm] * model.cfg.d_head
    assert entry.output_scale is None or getattr(hf.config, entry.output_scale) != 1.0
    assert entry.parallel_attn_mlp(hf.config) == FAMILIES[name][3] == model_graph(model).cfg.parallel_attn_mlp


def test_graph_matches_the_config_and_the_count_formula(family):
    name, _, model = family
    _, _, kwargs, parallel, _ = FAMILIES[name]
    graph = model_graph(model)
    L, H = 2, 4
    assert (graph.cfg.n_layers, graph.cfg.n_heads, graph.cfg.parallel_attn_mlp, graph.cfg.d_model) == (L, H, parallel, 16)
    n_forward = 1 + L * (H + 1)
    n_edges = n_forward + sum(
        3 * H * (1 + l * (H + 1)) + (1 + l * (H + 1) + (0 if parallel else H)) for l in range(L)
    )
    assert (graph.n_forward, graph.n_backward, graph.n_edges) == (n_forward, L * (3 * H + 1) + 1, n_edges)


def test_logits_equal_hugging_face(family):
    """Hooks on, GQA ungrouped: still the model's own function (eager HF attention as the reference)."""
    name, path, model = family
    hf = getattr(transformers, FAMILIES[name][1]).from_pretrained(path, dtype=torch.float64, attn_implementation="eager").eval()
    tokens = torch.tensor([[0, 3, 4, 5, 6, 7, 8], [0, 9, 10, 11, 12, 13, 14]])
    with torch.no_grad():
        ours, expected = model(tokens), hf(tokens).logits
    # the bridge computes some softmaxes in float32 where eager HF does not
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


def test_hooks_add_up(family):
    """Per-head outputs (+ b_O) sum to the attention output (after its norm, where the family has one:
    tests/hand_patching.py's head_outputs); the logits' input is the sum of the source outputs plus constants
    (positional embeddings, output biases); q/k/v inputs are per-query-head copies of the residual stream."""
    name, _, model = family
    L, H = 2, 4
    tol = 1e-6 if families.of(model).post_norm else 1e-10  # post-norms compute in float32 even in float64 models
    tokens = torch.tensor([[0, 3, 4, 5, 6], [0, 7, 8, 9, 10]])
    names = ["hook_embed", f"blocks.{L - 1}.hook_resid_post"] + (["hook_pos_embed"] if "hook_pos_embed" in model.hook_dict else [])
    for l in range(L):
        names += [f"blocks.{l}.{h}" for h in ("attn.hook_result", "hook_attn_out", "hook_mlp_out", "hook_resid_pre")]
        names += [f"blocks.{l}.hook_{w}_input" for w in "qkv"]
    store = {}

    def keep(n):
        def hook(t, hook):
            store[n] = t.detach().clone()
        return hook

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(n, keep(n)) for n in names])
    total = store["hook_embed"] + store.get("hook_pos_embed", 0)
    for l in range(L):
        b_O = model.blocks[l].attn.b_O
        heads = head_outputs(model, l, store[f"blocks.{l}.attn.hook_result"]).sum(2) + (0 if b_O is None else b_O)
        torch.testing.assert_close(heads, store[f"blocks.{l}.hook_attn_out"], rtol=tol, atol=tol)
        total = total + heads + store[f"blocks.{l}.hook_mlp_out"]
        for w in "qkv":
            x = store[f"blocks.{l}.hook_{w}_input"]
            assert x.shape == (2, 5, H, 16)
            torch.testing.assert_close(x, store[f"blocks.{l}.hook_resid_pre"].unsqueeze(2).expand_as(x), rtol=0, atol=0)
    torch.testing.assert_close(total, store[f"blocks.{L - 1}.hook_resid_post"], rtol=tol, atol=tol)


def test_key_value_inputs_are_per_query_head(family):
    """After ungrouping, a k (or v) input edit for query head 0 changes head 0's result only, although
    head 1 shared its key/value head before ungrouping; but a key norm over all heads together (OLMo-2's)
    carries a k edit to every head's key."""
    name, _, model = family
    grouped = FAMILIES[name][4] < 4
    assert model.cfg.n_key_value_heads in (None, 4) and getattr(model.cfg, "ungroup_grouped_query_attention", False) == grouped
    tokens = torch.tensor([[0, 3, 4, 5, 6, 7]])
    edit = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    results = {}

    def keep(key):
        def hook(t, hook):
            results[key] = t.detach().clone()
        return hook

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_result", keep("clean"))])
        for which in "kv":
            model.run_with_hooks(
                tokens, fwd_hooks=[(f"blocks.1.hook_{which}_input", add_at(0, edit)), ("blocks.1.attn.hook_result", keep(which))]
            )
    across = families.of(model).qk_norm == "across-heads"
    for which in "kv":
        change = (results[which] - results["clean"]).abs().amax(dim=(0, 1, 3))
        assert change[0] > 1e-3 and (float(change[1:].min()) > 0 if across and which == "k" else float(change[1:].max()) == 0.0), (which, change)


@pytest.mark.devices
def test_eap_scores_equal_exact_edge_derivatives(family, data):
    name, _, model = family
    graph = model_graph(model)
    ours = attribute(model, data, AttributionSpec(method="EAP", batch_size=3)).edges
    (batch,) = data.batches(len(data), model_device(model))
    clean, corrupted = source_outputs(model, graph, batch.clean), source_outputs(model, graph, batch.corrupted)
    expected = _edge_gradients(model, graph, batch, {u: corrupted[u] - clean[u] for u in graph.src_nodes}) / len(data)
    scale = float(expected.abs().max())
    assert scale > 1e-3 and int((expected.abs() > 1e-3 * scale).sum()) > graph.n_edges // 2  # not vacuous
    # float32 noise allowed: RMSNorms compute in float32 even in a float64 model, and eapcore.fastgrad
    # rebuilds their backward in float64
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7 * scale)
    # the k (and v) edges of two query heads that shared a key/value head are scored separately
    for which in "kv":
        h0, h1 = (expected[:, graph.dst_index[f"a1.h{h}<{which}>"]] for h in (0, 1))
        assert float((h0 - h1).abs().max()) > 1e-3 * scale


def test_activation_interpolation_and_node_scores_equal_exact_derivatives(family, data):
    """EAP-IG-activations (2 steps): the edges of each source group (input, a layer's heads, an MLP) get the mean
    over α ∈ {1/2, 1} of the exact edge derivatives of the run with that group's outputs moved to
    α·clean + (1 − α)·ablated. Node scores are the row sums of edge scores (∂L/∂a_u = Σ over u's children of
    ∂L/∂h_v), and neuron scores sum to them, for EAP and EAP-IG-activations."""
    name, _, model = family
    graph = model_graph(model)
    spec = dict(method="EAP-IG-activations", ig_steps=2, batch_size=3)
    ours = attribute(model, data, AttributionSpec(**spec)).edges
    (batch,) = data.batches(len(data))
    clean, corrupted = source_outputs(model, graph, batch.clean), source_outputs(model, graph, batch.corrupted)
    delta = {u: corrupted[u] - clean[u] for u in graph.src_nodes}
    at_clean = _edge_gradients(model, graph, batch, delta)
    groups = [[0]] + [rows for l in range(graph.cfg.n_layers)
                      for rows in ([graph.head_index(l, h) for h in range(graph.cfg.n_heads)], [graph.mlp_index(l)])]
    expected = torch.zeros_like(at_clean)
    for rows in groups:
        expected[rows] = (at_clean[rows] + _edge_gradients(model, graph, batch, delta, (rows, 0.5))[rows]) / 2
    expected /= len(data)
    scale = float(expected.abs().max())
    assert float((expected - at_clean / len(data)).abs().max()) > 1e-2 * scale  # moving the groups matters
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7 * scale)
    for method in ("EAP", "EAP-IG-activations"):
        edges = ours if method != "EAP" else attribute(model, data, AttributionSpec(method="EAP", batch_size=3)).edges
        node = attribute(model, data, AttributionSpec(**dict(spec, method=method), level="node")).nodes
        neuron = attribute(model, data, AttributionSpec(**dict(spec, method=method), level="neuron")).neurons
        scale = float(node.abs().max())
        torch.testing.assert_close(node, edges.sum(1), rtol=1e-5, atol=1e-7 * scale)
        torch.testing.assert_close(neuron.sum(-1), node, rtol=1e-9, atol=1e-12 * scale)


def test_post_normed_heads_direct_logits_add_up_to_the_logits(family, data):
    """The drill-down reads each head after its layer's post-norm: with no biases or positional embeddings in
    these families, the direct logits of all nodes add up to the clean logits, and on the corrupted run
    (read through the final norm at the clean run's scale) to the corrupted logits times the ratio of the
    two runs' final-norm scales. Gemma-2's final soft-capping is not affine, so the drill-down refuses it."""
    name, _, model = family
    if not families.of(model).post_norm:
        pytest.skip("a family without post-norms (its direct logits: tests/test_inspection.py)")
    from eapcore import inspection

    if name == "gemma2":
        with pytest.raises(ValueError, match="do not reproduce its logits"):
            inspection.pair_runs(model, data, 0)
        return
    runs = inspection.pair_runs(model, data, 0)
    total = sum(inspection.direct_logits(model, runs, row) for row in range(model_graph(model).n_forward))
    scale = runs.scale.double()
    expected = runs.logits.double() * torch.cat([scale[:1] / scale[:1], scale[1:] / scale[:1]])
    assert abs(float(scale[1] / scale[0]) - 1) > 1e-3  # the two scales differ: the rescaling is not vacuous
    torch.testing.assert_close(total, expected, rtol=0, atol=1e-6 * float(runs.logits.abs().max()))


def test_full_circuit_is_clean_and_empty_is_corrupted(family, data):
    name, path, model = family
    evaluator = CircuitEvaluator(model, data, batch_size=3)
    base = evaluator.baseline()
    assert abs(base.clean - base.corrupted) > 0.1
    full = evaluator.evaluate(Circuit.full(evaluator.graph))  # looked up: the cached clean run
    assert full.mean().item() == pytest.approx(base.clean, abs=1e-5)
    assert evaluator.evaluate(Circuit.empty(evaluator.graph)).mean().item() == pytest.approx(base.corrupted, abs=1e-5)
    for engine in ["hooked"] + (["sparse"] if families.of(model).sparse else []):  # run through each engine
        ev = CircuitEvaluator(model, data, batch_size=3, engine=engine)
        _assert_metrics_equal(ev.evaluate(Circuit.full(ev.graph), reuse_clean=False), full, name)


@pytest.mark.devices
def test_edge_removals_equal_hand_patching(family, data):
    name, _, model = family
    graph = model_graph(model)
    evaluator = CircuitEvaluator(model, data, batch_size=len(data))
    (batch,) = data.batches(len(data), model_device(model))
    full = evaluator.evaluate(Circuit.full(graph))
    nodes = torch.ones(graph.n_forward, dtype=torch.bool)
    changed = 0
    edges = [  # k and v edges of a query head that shared its key/value head, an MLP input, a random edge
        (graph.src_index["a0.h2"], graph.dst_index["a1.h1<k>"]),
        (graph.src_index["input"], graph.dst_index["a1.h0<v>"]),
        (graph.src_index["a0.h3"], graph.dst_index["m1"]),
        _sample_edges(graph, 1, seed=2)[0],
    ]
    for r, c in edges:
        keep = graph.real_edge_mask.clone()
        keep[r, c] = False
        expected = patched_metric(model, graph, batch, keep, source_outputs(model, graph, batch.corrupted))
        _assert_metrics_equal(evaluator.evaluate(Circuit(graph, keep, nodes)), expected, name)
        changed += int((expected - full.double()).abs().max() > 1e-3)
    assert changed >= len(edges) // 2
    keep = graph.real_edge_mask & (torch.rand(graph.real_edge_mask.shape, generator=torch.Generator().manual_seed(3)) < 0.5)
    _assert_metrics_equal(evaluator.evaluate(Circuit(graph, keep, nodes)), patched_metric(model, graph, batch, keep, source_outputs(model, graph, batch.corrupted)), name)


def _assert_metrics_equal(ours: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """To float64 precision (or the bridge's own noise), or to float32's where the evaluator rounds its
    per-example metrics."""
    tol = max(1e-9, BRIDGE_NOISE.get(name, 0.0)) if ours.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ours.double(), expected, rtol=tol, atol=tol)


@pytest.mark.devices
def test_fast_path_gives_the_plain_path_scores(family, data):
    """The unsplit backend where the registry claims it gives the split backend's scores; elsewhere asking
    for it is a clear error and auto takes the split backend."""
    name, _, model = family
    spec = dict(method="EAP-IG-inputs", ig_steps=3, batch_size=3, metric="kl_div")
    plain = attribute(model, data, AttributionSpec(**spec, backend="split")).edges
    if not families.of(model).unsplit:
        with pytest.raises(ValueError, match=f"cannot run EAP-IG-inputs on {architecture(model)}.*'auto' or 'split'"):
            attribute(model, data, AttributionSpec(**spec, backend="unsplit"))
        assert attribute(model, data, AttributionSpec(**spec)).provenance["backend"] == "split"
        return
    fast = attribute(model, data, AttributionSpec(**spec))
    assert fast.provenance["backend"] == "unsplit"
    # 1e-5, not 1e-12: some norms compute in float32 even in a float64 model
    torch.testing.assert_close(fast.edges, plain, rtol=1e-5, atol=1e-7 * float(plain.abs().max()))


@pytest.mark.devices
def test_sparse_evaluation_equals_the_hooked_pass(family, data):
    name, path, model = family
    hooked = CircuitEvaluator(model, data, batch_size=3, engine="hooked")
    if not families.of(model).sparse:
        with pytest.raises(ValueError, match=f"sparse engine cannot evaluate circuits of {architecture(model)}"):
            CircuitEvaluator(model, data, engine="sparse")
        assert CircuitEvaluator(model, data).engine == "hooked"
        return
    fast = CircuitEvaluator(model, data, batch_size=3)
    assert fast.engine == "sparse"
    # the whole graph computed node by node is Hugging Face's own forward pass
    hf = getattr(transformers, FAMILIES[name][1]).from_pretrained(path, dtype=torch.float64, attn_implementation="eager")
    with torch.no_grad():
        expected = torch.cat([readout(hf.eval()(b.clean).logits, b.lengths) for b in data.batches(3)])
    torch.testing.assert_close(fast.logits(Circuit.full(fast.graph), reuse_clean=False).cpu(), expected, rtol=1e-9, atol=1e-9)
    graph, gen = fast.graph, torch.Generator().manual_seed(0)
    tol = max(1e-9, BRIDGE_NOISE.get(name, 0.0))
    for density in (0.0, 0.05, 0.2, 0.5, 0.9):
        for _ in range(2):
            keep = graph.real_edge_mask & (torch.rand(graph.real_edge_mask.shape, generator=gen) < density)
            circuit = Circuit(graph, keep, torch.ones(graph.n_forward, dtype=torch.bool))
            torch.testing.assert_close(fast.evaluate(circuit), hooked.evaluate(circuit), rtol=tol, atol=tol)
