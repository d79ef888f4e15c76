"""An independent, hook-free GPT-2 forward that builds every destination input explicitly.

Each head's q/k/v input, each MLP input and the final residual are formed as the sum of the source
outputs they read (plus positional embeddings and attention output biases), so that an edge can be
patched by hand and gradients can be taken with ``torch.autograd.grad`` at every destination input.
Uses only the Hugging Face modules' weights, never TransformerLens.
"""

from __future__ import annotations

import torch

from eapcore.graph import QKV, Graph


def forward(
    hf, graph: Graph, tokens: torch.Tensor, keep: torch.Tensor | None = None, corrupted: list | None = None,
    neurons: torch.Tensor | None = None,
):
    """Run ``hf`` (a ``GPT2LMHeadModel``) on ``tokens`` ``[batch pos]``.

    ``keep`` ``[n_forward n_backward]`` bool: edges that carry the actual source output; the others carry
    ``corrupted[u]``; with ``neurons`` ``[n_forward d_model]`` bool, kept edges carry only the kept
    dimensions of the actual output and the corrupted values elsewhere. Returns ``(logits, outputs, inputs)``: the source outputs in row order and a dict
    column -> destination input tensor.
    """
    tr = hf.transformer
    H, D = graph.cfg.n_heads, graph.cfg.d_model
    dh = D // H
    B, P = tokens.shape
    outputs: list[torch.Tensor] = [tr.wte(tokens)]
    inputs: dict[int, torch.Tensor] = {}
    const = tr.wpe(torch.arange(P)).expand(B, P, D)

    def build(col: int, prev: int, base: torch.Tensor) -> torch.Tensor:
        x = base
        for u in range(prev):
            if keep is None or not bool(keep[u, col]):
                x = x + (outputs[u] if keep is None else corrupted[u])
            elif neurons is None:
                x = x + outputs[u]
            else:
                x = x + torch.where(neurons[u], outputs[u], corrupted[u])
        inputs[col] = x
        return x

    causal = torch.tril(torch.ones(P, P, dtype=torch.bool))
    for layer, block in enumerate(tr.h):
        W, b = block.attn.c_attn.weight, block.attn.c_attn.bias
        Wo = block.attn.c_proj.weight
        heads = []
        for h in range(H):
            proj = {}
            for i, which in enumerate(QKV):
                x = build(graph.qkv_column(layer, which, h), graph.n_attn_sources(layer), const)
                cols = slice(i * D + h * dh, i * D + (h + 1) * dh)
                proj[which] = block.ln_1(x) @ W[:, cols] + b[cols]
            att = (proj["q"] @ proj["k"].transpose(-1, -2)) / dh**0.5
            att = att.masked_fill(~causal, float("-inf")).softmax(-1)
            heads.append((att @ proj["v"]) @ Wo[h * dh : (h + 1) * dh])
        outputs.extend(heads)
        const = const + block.attn.c_proj.bias
        mlp_in = build(graph.mlp_column(layer), graph.n_mlp_sources(layer), const)
        outputs.append(block.mlp(block.ln_2(mlp_in)))
    final = build(graph.logits_column, graph.n_forward, const)
    logits = hf.lm_head(tr.ln_f(final))
    return logits, outputs, inputs
