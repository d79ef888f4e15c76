"""Where each graph node lives in the model: the hook of every source output and destination input, and
how a source's output is read off its hook (:func:`output_reader`, :class:`PostNorm`).

Activations are kept source-major, ``[n_forward batch pos d_model]``, so that one matrix product turns
a destination's gradient (or mask column) into a whole block of scores (or a patch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from eapcore import families
from eapcore.graph import QKV, Graph


@dataclass(frozen=True)
class Source:
    """A hook whose output is the output of source rows ``rows`` (one row, or one per head of ``layer``)."""

    hook: str
    rows: slice
    layer: int | None = None  # the attention layer whose heads these rows are; None for the input and MLPs


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
        out.append(Source(f"blocks.{layer}.attn.hook_result", slice(first, first + H), layer))
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


@dataclass(frozen=True)
class PostNorm:
    """The norm a family applies to a layer's attention output x = Σ_h result_h before adding it to the
    residual stream (Gemma-2/3, OLMo-2/3): y = x · r · γ, r = 1/sqrt(mean over d_model of x² + ``eps``), γ
    its weight w (RMSNorm) or 1 + w (Gemma's). Head h's output is result_h · r · γ, with r of the run the
    head ran in: the heads' outputs add up to y, an edge from h carries h's output with h's own run's
    scale, and patching every head of a layer gives that run's y (docs/families.md, "Post-sublayer norms")."""

    gamma: torch.Tensor  # γ [d_model]
    eps: float

    def heads(self, results: torch.Tensor) -> torch.Tensor:
        """Heads' outputs ``[batch pos head d_model]`` from their results (``hook_result``), computed at least
        in float32 as the norm computes."""
        dtype = torch.promote_types(results.dtype, torch.float32)
        x = results.to(dtype)
        r = torch.rsqrt(x.sum(-2).pow(2).mean(-1, keepdim=True) + self.eps)  # [batch pos 1]
        return (x * (r * self.gamma.to(x.device, dtype)).unsqueeze(-2)).to(results.dtype)


def _post_norm_kind(model: Any) -> str | None:
    family = families.of(model)
    return None if family is None else family.post_norm


def post_norm(model: Any, layer: int) -> PostNorm | None:
    """The post-attention norm of ``layer`` (the bridge's ``ln1_post``), if the model's family has one."""
    kind = _post_norm_kind(model)
    if kind is None:
        return None
    if kind not in ("rmsnorm", "rmsnorm-1p"):
        raise ValueError(f"a post-sublayer {families.NORMS[kind]} is not one that eapcore.sites.PostNorm computes")
    norm = model.blocks[layer].ln1_post.original_component
    eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
    w = norm.weight.detach()
    return PostNorm(1 + w if kind == "rmsnorm-1p" else w, float(eps))


def output_reader(model: Any, source: Source) -> Callable[[torch.Tensor], torch.Tensor]:
    """How ``source``'s outputs ``[rows batch pos d_model]`` are read off its hook's tensor: as they are
    (:func:`source_major`), or, for heads of a layer with a post-attention norm, times its scale
    (:class:`PostNorm`)."""
    norm = None if source.layer is None else post_norm(model, source.layer)
    return source_major if norm is None else lambda t: source_major(norm.heads(t))


def stream_hook(model: Any, source: Source) -> str:
    """The hook where ``source``'s outputs join the residual stream: its own, or, for heads of a layer with a
    post-attention norm, the normalized attention output (``hook_attn_out``, ``[batch pos d_model]``, the
    sum of the heads' outputs). Gradients of the sources' outputs are read there and interpolations added."""
    if source.layer is None or _post_norm_kind(model) is None:
        return source.hook
    return f"blocks.{source.layer}.hook_attn_out"
