"""Per-head weights of a bridge's attention layer, read from the Hugging Face modules it wraps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from eapcore import families
from eapcore.graph import QKV


@dataclass(frozen=True)
class HeadWeights:
    """q/k/v = x W + b per head, and each head's result z W_O, as the bridge's hooks report them."""

    w: dict[str, torch.Tensor]  # q, k, v: [head d_model d_head]
    b: dict[str, torch.Tensor]  # q, k, v: [head d_head] (zeros where there is no bias)
    w_o: torch.Tensor  # [head d_head d_model]; includes the family's output scale, which the bridge folds into hook_result

    def results(self, z: torch.Tensor) -> torch.Tensor:
        """Per-head results ``[head batch pos d_model]`` from z ``[batch pos head d_head]`` (or flattened heads)."""
        H, dh = self.w_o.shape[:2]
        return torch.einsum("bphe,hed->hbpd", z.reshape(*z.shape[:2], H, dh), self.w_o)


def head_weights(model: Any, layer: int) -> HeadWeights | None:
    """The layer's per-head weights; None unless q, k, v and o are plain projections of the right size."""
    attn = model.blocks[layer].attn
    H, dh = model.cfg.n_heads, model.cfg.d_head
    w, b = {}, {}
    for which in QKV:
        linear = getattr(getattr(attn, which, None), "original_component", None)
        if not isinstance(linear, torch.nn.Linear) or linear.out_features != H * dh:
            return None
        w[which] = linear.weight.detach().view(H, dh, -1).transpose(1, 2)
        b[which] = (linear.bias.detach().view(H, dh) if linear.bias is not None
                    else torch.zeros(H, dh, dtype=linear.weight.dtype, device=linear.weight.device))
    o = getattr(getattr(attn, "o", None), "original_component", None)
    if o is None or o.weight.numel() != H * dh * model.cfg.d_model:
        return None
    # GPT-2's Conv1D holds [in out], a Linear [out in]; the bridge scales results by the family's output scale
    family = families.of(model)
    scale = float(getattr(model.original_model.config, family.output_scale)) if family and family.output_scale else 1.0
    w_o = (o.weight.detach().T if isinstance(o, torch.nn.Linear) else o.weight.detach()).reshape(H, dh, -1)
    return HeadWeights(w, b, w_o * scale if scale != 1.0 else w_o)
