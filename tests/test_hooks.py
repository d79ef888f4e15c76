"""The TransformerLens 4 bridge hooks that EAP relies on behave as the graph assumes (docs/architecture.md).
On every device (the ``devices`` marker: the CPU, and CUDA where there is one)."""

from __future__ import annotations

import pytest
import torch

from eapcore.graph import Graph, GraphConfig
from eapcore.models import model_device, model_graph

pytestmark = pytest.mark.devices


def _tokens(model) -> torch.Tensor:
    return torch.tensor([[0, 3, 4, 5, 6]], device=model_device(model))


def _run(model, tokens, names):
    store = {}

    def keep(name):
        def hook(t, hook):
            store[name] = t.detach().clone()
        return hook

    model.run_with_hooks(tokens, fwd_hooks=[(n, keep(n)) for n in names])
    return store


def test_graph_counts_match_the_formula():
    assert (Graph(GraphConfig(12, 12)).n_nodes, Graph(GraphConfig(12, 12)).n_edges) == (158, 32491)
    assert (Graph(GraphConfig(24, 16)).n_nodes, Graph(GraphConfig(24, 16)).n_edges) == (410, 231877)


def test_head_results_plus_bias_sum_to_attention_output(tiny64):
    tokens = _tokens(tiny64)
    names = [f"blocks.{l}.{h}" for l in range(2) for h in ("attn.hook_result", "hook_attn_out")]
    acts = _run(tiny64, tokens, names)
    for layer in range(2):
        b_O = tiny64.blocks[layer].attn.b_O
        total = acts[f"blocks.{layer}.attn.hook_result"].sum(2) + b_O
        torch.testing.assert_close(total, acts[f"blocks.{layer}.hook_attn_out"], rtol=1e-10, atol=1e-10)


def test_residual_stream_is_the_sum_of_source_outputs(tiny64):
    """The logits' input equals embeddings + positional embeddings + Σ sources + attention biases."""
    tokens = _tokens(tiny64)
    graph = model_graph(tiny64)
    names = ["hook_embed", "hook_pos_embed", "blocks.1.hook_resid_post"] + [
        f"blocks.{l}.{h}" for l in range(2) for h in ("attn.hook_result", "hook_mlp_out")
    ]
    acts = _run(tiny64, tokens, names)
    total = acts["hook_embed"] + acts["hook_pos_embed"]
    for layer in range(graph.cfg.n_layers):
        total = total + acts[f"blocks.{layer}.attn.hook_result"].sum(2) + tiny64.blocks[layer].attn.b_O
        total = total + acts[f"blocks.{layer}.hook_mlp_out"]
    torch.testing.assert_close(total, acts["blocks.1.hook_resid_post"], rtol=1e-10, atol=1e-10)


def test_qkv_inputs_are_per_head_copies_of_the_residual(tiny64):
    tokens = _tokens(tiny64)
    acts = _run(tiny64, tokens, ["blocks.1.hook_resid_pre", "blocks.1.hook_q_input", "blocks.1.hook_v_input"])
    for name in ("blocks.1.hook_q_input", "blocks.1.hook_v_input"):
        assert acts[name].shape == (1, 5, tiny64.cfg.n_heads, tiny64.cfg.d_model)
        torch.testing.assert_close(acts[name], acts["blocks.1.hook_resid_pre"].unsqueeze(2).expand_as(acts[name]))


def test_first_order_edits_at_destination_hooks_match_their_gradients(tiny64):
    """For each destination hook: loss(x + εr) − loss(x) ≈ ε r·g, with g from a tensor hook on a copy."""
    tokens = _tokens(tiny64)
    hooks = ["blocks.0.hook_k_input", "blocks.1.hook_q_input", "blocks.0.hook_mlp_in", "blocks.1.hook_resid_post"]
    gen = torch.Generator().manual_seed(0)
    for name in hooks:
        grads, watched = {}, {}

        def watch(t, hook):
            t = watched["t"] = t.clone().requires_grad_(True)
            t.register_hook(lambda g: grads.setdefault("g", g))
            return t

        with torch.enable_grad(), tiny64.hooks(fwd_hooks=[(name, watch)]):
            torch.autograd.grad(tiny64(tokens)[0, -1, 3], watched["t"])  # no gradients left on the weights
        assert "g" in grads, f"gradient hook on {name} did not fire"
        r = torch.randn(grads["g"].shape, generator=gen, dtype=torch.float64).to(grads["g"].device)
        eps = 1e-6

        def edit(t, hook):
            return t + eps * r

        with torch.no_grad():
            base = tiny64(tokens)[0, -1, 3]
            moved = tiny64.run_with_hooks(tokens, fwd_hooks=[(name, edit)])[0, -1, 3]
        assert abs((moved - base).item() / eps - (r * grads["g"]).sum().item()) < 1e-5
