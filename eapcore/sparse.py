"""The sparse evaluation engine: circuit evaluation that computes only the nodes a circuit reads from.

Destination v's input under a circuit C is X_v + Σ_{(u,v) ∈ C} (a_u − ā_u): its input with every edge
ablated, X_v = c_v + Σ_u ā_u (c_v: position embeddings and output biases, which no edge carries),
plus, for each in-circuit edge, its parent's ``restore`` = actual − ablated output. So a node whose
outgoing edges are all outside C is never computed, heads are computed one by one from their own q/k/v
inputs, and the logits only at each example's last real token. A small circuit costs a fraction of a
forward pass; the full graph about one. Same values as the hooked engine (tests/test_evaluate.py). Runs the
families whose :class:`~eapcore.families.Family` has ``sparse`` (:mod:`eapcore.backends` decides).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from eapcore import families
from eapcore.graph import QKV, Graph
from eapcore.heads import HeadWeights, head_weights
from eapcore.recording import Hook, record
from eapcore.sites import Destination, destinations


def unfit(model: Any, n_pos: int = 0) -> str | None:
    """Why this loaded model (of a family that has sparse evaluation) cannot be evaluated node by node on
    prompts of ``n_pos`` tokens, as text; None if it can. GPT-2 (plain scaled attention), Llama-style models
    (rotary attention, optional q/k norms, a sliding window no shorter than ``n_pos``) and GPT-NeoX/Pythia
    (partial rotary, parallel or sequential residual) are handled, with per-head q/k/v projections as the
    bridge splits them, on one device."""
    if len({p.device for p in model.parameters()}) > 1:
        return "the model is split over several devices"
    if head_weights(model, 0) is None:
        return "its attention has no per-head q/k/v/o projections of the expected size"
    hf = model.original_model.config
    window = getattr(hf, "sliding_window", None) if getattr(hf, "use_sliding_window", True) else None
    if window is not None and window < n_pos:
        return f"its sliding window ({window} tokens) is shorter than the prompts ({n_pos} tokens)"
    if families.of(model).attention != "plain" and _rotary_embedding(model) is None:
        return "its rotary embedding module was not found"
    return None


def _rotary_embedding(model: Any) -> torch.nn.Module | None:
    """The Hugging Face model's rotary embedding module (``model.model`` or, in GPT-NeoX, ``gpt_neox``)."""
    inner = getattr(model.original_model, "model", None) or getattr(model.original_model, "gpt_neox", None)
    return getattr(inner, "rotary_emb", None)


@dataclass(frozen=True)
class _Layer:
    ln1: torch.nn.Module
    ln2: torch.nn.Module
    mlp: Callable[[torch.Tensor], torch.Tensor]
    heads: HeadWeights
    scaling: float
    head_norms: dict[str, torch.nn.Module]  # q, k: norms over d_head before the rotation (Qwen3)

    def project(self, which: str, x: torch.Tensor, heads: list[int]) -> torch.Tensor:
        """Per-head inputs ``[n ... d_model]`` -> q, k or v ``[n ... d_head]`` of ``heads`` (q and k
        after any per-head norm, before any rotation)."""
        w, b = self.heads.w[which][heads], self.heads.b[which][heads]
        y = torch.einsum("n...d,nde->n...e", self.ln1(x), w)
        y = y + b.view(len(heads), *[1] * (y.dim() - 2), -1)
        return self.head_norms[which](y) if which in self.head_norms else y

    def output(self, z: torch.Tensor, heads: list[int]) -> torch.Tensor:
        """z ``[n ... d_head]`` -> each head's result ``[n ... d_model]``."""
        return torch.einsum("n...e,ned->n...d", z, self.heads.w_o[heads])


def _layer(model: Any, layer: int) -> _Layer:
    block = model.blocks[layer]
    hf_attn = block.attn.original_component
    scaling = float(getattr(hf_attn, "scaling", model.cfg.d_head**-0.5))
    norms = {w: getattr(hf_attn, f"{w}_norm") for w in "qk"} if families.of(model).qk_norm else {}
    mlp = block.mlp.original_component
    return _Layer(block.ln1.original_component, block.ln2.original_component, _mlp(mlp), head_weights(model, layer),
                  scaling, norms)


def _mlp(mlp: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The block's MLP; GPT-2's tanh-approximated GELU (five elementwise passes in Hugging Face's
    ``NewGELUActivation``) as PyTorch's one fused kernel of the same formula."""
    if type(getattr(mlp, "act", None)).__name__ == "NewGELUActivation":
        return lambda x: mlp.c_proj(F.gelu(mlp.c_fc(x), approximate="tanh"))
    return mlp


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x`` ``[... d_head]``; ``cos``/``sin`` ``[... rotary_dim]`` rotate its
    first ``rotary_dim`` dimensions (all of them, or a part as in Pythia) and leave the rest."""
    n = cos.shape[-1]
    rot, rest = x[..., :n], x[..., n:]
    rot = rot * cos + torch.cat((-rot[..., n // 2:], rot[..., : n // 2]), -1) * sin
    return torch.cat((rot, rest), -1) if rest.shape[-1] else rot


class SparseCircuitRunner:
    """Evaluates circuits on one prepared batch from cached ablated inputs.

    ``ablated``: ``[n_forward batch pos d_model]`` what sources carry when ablated; ``clean``: their
    clean-run outputs; ``clean_inputs``: the clean run's input at every destination group (attention of
    each layer, MLP of each layer, logits), each ``[batch pos d_model]``.

    A node is computed at every position only if some in-circuit path leads from it into a key or
    value input; otherwise (it feeds the logits, queries or MLPs that feed the logits) only at the last
    real tokens, ``[batch d_model]``."""

    def __init__(self, model: Any, graph: Graph, ablated: torch.Tensor, clean: torch.Tensor,
                 clean_inputs: list[torch.Tensor], lengths: torch.Tensor) -> None:
        self.model, self.graph, self.ablated = model, graph, ablated
        self.layers = [_layer(model, layer) for layer in range(graph.cfg.n_layers)]
        self.rows, self.last = torch.arange(ablated.shape[1], device=ablated.device), lengths.to(ablated.device) - 1
        self.real = torch.arange(ablated.shape[2], device=ablated.device)[None, :] <= self.last[:, None]  # [batch pos]
        self.rotary = None  # cos, sin [pos d_head]
        if families.of(model).attention != "plain":
            positions = torch.arange(ablated.shape[2], device=ablated.device)[None]
            self.rotary = tuple(t[0] for t in _rotary_embedding(model)(ablated[0, :1], positions))
        self.input_restore = clean[0] - ablated[0]  # the input node's actual output is its clean one
        # X_v = c_v + Σ_{u < n} ā_u over the n sources v reads, with c_v = clean input − Σ_{u < n} clean_u (a
        # running sum: no temporary the size of the cache)
        shift, done, self.all_ablated = torch.zeros_like(clean[0]), 0, []
        for x, n in zip(clean_inputs, [d.n_sources for d in _input_groups(graph)]):
            shift += (ablated[done:n] - clean[done:n]).sum(0)
            done = n
            self.all_ablated.append(x + shift)
        self.ablated_last = self._at_last(ablated)
        # per destination column: does it read all positions (k, v), and which node reads through it
        self.reads_all = torch.zeros(graph.n_backward, dtype=torch.bool)
        self.reader = torch.full((graph.n_backward,), graph.n_forward)  # the logits: a node never computed fully
        for layer in range(graph.cfg.n_layers):
            for which in QKV:
                for h in range(graph.cfg.n_heads):
                    col = graph.qkv_column(layer, which, h)
                    self.reads_all[col], self.reader[col] = which != "q", graph.head_index(layer, h)
            self.reader[graph.mlp_column(layer)] = graph.mlp_index(layer)

    def _at_last(self, t: torch.Tensor) -> torch.Tensor:
        """``[... batch pos d]`` -> ``[... batch d]`` at each example's last real token."""
        return t[..., self.rows, self.last, :]

    def _plan(self, keep: torch.Tensor) -> tuple[list[bool], list[bool]]:
        """(needed, everywhere) per source row: read by some in-circuit edge; needed at every position."""
        needed = keep.any(1)
        everywhere = torch.zeros(self.graph.n_forward + 1, dtype=torch.bool)
        for u in reversed(needed.nonzero().flatten().tolist()):  # readers come after their parents
            everywhere[u] = bool((keep[u] & (self.reads_all | everywhere[self.reader])).any())
        return needed.tolist(), everywhere.tolist()

    def readout(self, keep: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch d_vocab]`` at the last real tokens when only the edges in ``keep``
        ``[n_forward n_backward]`` (bool, real edges) carry actual outputs."""
        g, H = self.graph, self.graph.cfg.n_heads
        needed, everywhere = self._plan(keep)
        restore = torch.zeros_like(self.ablated)  # actual − ablated, a_u − ā_u, of sources computed at every position
        restore_last = torch.zeros_like(self.ablated_last)  # ... and of every computed source, at the last tokens
        restore[0], restore_last[0] = self.input_restore, self._at_last(self.input_restore)

        def store(rows: list[int], out: torch.Tensor, full: bool) -> None:
            if full:
                restore[rows] = out - self.ablated[rows]
                restore_last[rows] = self._at_last(restore[rows])
            else:
                restore_last[rows] = out - self.ablated_last[rows]

        for layer, weights in enumerate(self.layers):
            base, base_mlp = self.all_ablated[2 * layer], self.all_ablated[2 * layer + 1]
            heads = [h for h in range(H) if needed[g.head_index(layer, h)]]
            if heads:
                n = g.n_attn_sources(layer)
                kv = self._inputs(base, keep, restore, n, [g.qkv_column(layer, w, h) for w in "kv" for h in heads])
                k, v = (weights.project(w, kv[i * len(heads):(i + 1) * len(heads)], heads) for i, w in enumerate("kv"))
                k = self._position(k, None)
                for full in (True, False):
                    sub = [i for i, h in enumerate(heads) if everywhere[g.head_index(layer, h)] == full]
                    if not sub:
                        continue
                    chosen = [heads[i] for i in sub]
                    q_cols = [g.qkv_column(layer, "q", h) for h in chosen]
                    q_in = (self._inputs(base, keep, restore, n, q_cols) if full
                            else self._inputs(self._at_last(base), keep, restore_last, n, q_cols))
                    at = None if full else self.last
                    z = _attend(self._position(weights.project("q", q_in, chosen), at), k[sub], v[sub], at, weights.scaling,
                                None if self.rotary is None else torch.float32)
                    store([g.head_index(layer, h) for h in chosen], weights.output(z, chosen), full)
            row = g.mlp_index(layer)
            if needed[row]:
                full, cols = everywhere[row], [g.mlp_column(layer)]
                if full:  # real tokens only: padding is 10-20% of a typical batch
                    x = self._inputs(base_mlp, keep, restore, g.n_mlp_sources(layer), cols)[0]
                    out = self.ablated[row].clone()
                    out[self.real] = weights.mlp(weights.ln2(x[self.real]))
                else:
                    out = weights.mlp(weights.ln2(self._inputs(self._at_last(base_mlp), keep, restore_last, g.n_mlp_sources(layer), cols)))
                store([row], out, full)
        final = self._inputs(self._at_last(self.all_ablated[-1]), keep, restore_last, g.n_forward, [g.logits_column])[0]
        return self.model.unembed.original_component(self.model.ln_final.original_component(final))

    def _position(self, x: torch.Tensor, at: torch.Tensor | None) -> torch.Tensor:
        """Rotate q or k ``[n batch pos d_head]`` (or ``[n batch d_head]`` at positions ``at``), if rotary."""
        if self.rotary is None:
            return x
        cos, sin = (t if at is None else t[at] for t in self.rotary)
        return _rotate(x, cos, sin)

    @staticmethod
    def _inputs(base: torch.Tensor, keep: torch.Tensor, restore: torch.Tensor, n: int, cols: list[int]) -> torch.Tensor:
        """``[len(cols) *base.shape]``: base + Σ over each column's in-circuit parents (among the first ``n``
        sources) of their ``restore``."""
        mask = keep[:n, cols]
        parents = mask.any(1).nonzero().flatten()
        if len(parents) == 0:
            return base.expand(len(cols), *base.shape)
        if 2 * len(parents) > n:  # most rows: multiply through all of them rather than copy them out
            add = mask.T.to(restore) @ restore[:n].reshape(n, -1)
        else:
            add = mask[parents].T.to(restore) @ restore[parents].reshape(len(parents), -1)
        return base + add.view(len(cols), *base.shape)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, last: torch.Tensor | None, scaling: float,
            softmax_dtype: torch.dtype | None) -> torch.Tensor:
    """Causal attention per head: q ``[n batch pos d_head]`` (or ``[n batch d_head]`` at positions ``last``
    ``[batch]``), k, v ``[n batch pos d_head]`` -> z shaped like q; the softmax in ``softmax_dtype`` (as
    the Hugging Face model computes it; None: the model's dtype)."""
    P = k.shape[-2]
    if last is None:
        scores = q @ k.transpose(-1, -2)  # [n batch pos pos]
        allowed = torch.ones(P, P, dtype=torch.bool, device=q.device).tril()
    else:
        scores = (q[..., None, :] @ k.transpose(-1, -2))[..., 0, :]  # [n batch pos]
        allowed = torch.arange(P, device=q.device)[None, :] <= last[:, None]
    scores = (scores * scaling).masked_fill(~allowed, torch.finfo(scores.dtype).min)
    pattern = scores.softmax(-1, dtype=softmax_dtype).to(v.dtype)
    return pattern @ v if last is None else (pattern[..., None, :] @ v)[..., 0, :]


def _input_groups(graph: Graph) -> list[Destination]:
    """One destination per group that shares an input: each layer's attention (its q hook stands for
    q, k and v), each layer's MLP, the logits; in forward order."""
    return [d for d in destinations(graph) if d.hook.endswith(("q_input", "mlp_in", "resid_post"))]


def input_recorders(graph: Graph, store: torch.Tensor) -> list[Hook]:
    """Forward hooks that write the input of every destination group (attention and MLP of each layer,
    logits) into ``store`` ``[2 n_layers + 1, batch pos d_model]``, in that order."""
    return [record(d.hook, store, slot, _first_column) for slot, d in enumerate(_input_groups(graph))]


def _first_column(t: torch.Tensor) -> torch.Tensor:
    """A destination group's input ``[batch pos d_model]``; per-head copies (q of every head) are equal."""
    return t[:, :, 0] if t.dim() == 4 else t
