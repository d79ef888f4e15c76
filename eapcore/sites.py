"""Where each graph node lives in the model: the hook of every source output and destination input.

Activations are kept source-major, ``[n_forward batch pos d_model]``, so that one matrix product turns
a destination's gradient (or mask column) into a whole block of scores (or a patch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eapcore.graph import QKV, Graph


@dataclass(frozen=True)
class Source:
    """A hook whose output is the output of source rows ``rows`` (one row, or one per head)."""

    hook: str
    rows: slice


@dataclass(frozen=True)
class Destination:
    """A hook whose tensor is the input of destination columns ``cols``; reads the first ``n_sources`` sources."""

    hook: str
    cols: slice
    n_sources: int


def sources(graph: Graph) -> list[Source]:
    H = graph.cfg.n_heads
    out = [Source("hook_embed", slice(0, 1))]
    for layer in range(graph.cfg.n_layers):
        first = graph.head_index(layer, 0)
        out.append(Source(f"blocks.{layer}.attn.hook_result", slice(first, first + H)))
        out.append(Source(f"blocks.{layer}.hook_mlp_out", slice(graph.mlp_index(layer), graph.mlp_index(layer) + 1)))
    return out


def destinations(graph: Graph) -> list[Destination]:
    H = graph.cfg.n_heads
    out = []
    for layer in range(graph.cfg.n_layers):
        for which in QKV:
            col = graph.qkv_column(layer, which)
            out.append(Destination(f"blocks.{layer}.hook_{which}_input", slice(col, col + H), graph.n_attn_sources(layer)))
        col = graph.mlp_column(layer)
        out.append(Destination(f"blocks.{layer}.hook_mlp_in", slice(col, col + 1), graph.n_mlp_sources(layer)))
    last = graph.cfg.n_layers - 1
    out.append(Destination(f"blocks.{last}.hook_resid_post", slice(graph.logits_column, graph.n_backward), graph.n_forward))
    return out


def source_major(t: torch.Tensor) -> torch.Tensor:
    """``[batch pos d_model]`` or ``[batch pos head d_model]`` -> ``[rows batch pos d_model]``."""
    return t.unsqueeze(0) if t.dim() == 3 else t.permute(2, 0, 1, 3)


def per_column(t: torch.Tensor) -> torch.Tensor:
    """A destination tensor as ``[batch pos cols d_model]`` (a view)."""
    return t.unsqueeze(2) if t.dim() == 3 else t


def from_per_column(patch: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`per_column` for a patch shaped ``[batch pos cols d_model]``."""
    return patch.squeeze(2) if like.dim() == 3 else patch
