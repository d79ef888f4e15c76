"""The sparse evaluation engine: circuit evaluation that computes only the nodes a circuit reads from.

Destination v's input under a circuit C is X_v + Σ_{(u,v) ∈ C} (a_u − ā_u): its input with every edge
ablated, X_v = c_v + Σ_u ā_u (c_v: position embeddings and output biases, which no edge carries),
plus, for each in-circuit edge, its parent's ``restore`` = actual − ablated output. So a node whose
outgoing edges are all outside C is never computed, heads are computed one by one from their own q/k/v
inputs, and the logits only at each example's last real token. A small circuit costs a fraction of a
forward pass; the full graph about one. Same values as the hooked engine (tests/test_evaluate.py). Runs the
families whose :class:`~eapcore.families.Family` has ``sparse`` (:mod:`eapcore.backends` decides).

It calls only hook-free views of the Hugging Face modules (:func:`eapcore.shared.hook_free`: no bridge
component, no hook point; the same weights) and reads weight tensors, so it computes the same whatever
another thread has hooked or switched on the bridge, and needs no turn at the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from eapcore import families
from eapcore.graph import Graph
from eapcore.heads import HeadWeights, head_weights
from eapcore.recording import Hook, record
from eapcore.shared import hook_free
from eapcore.sites import Destination, destinations
from eapcore.sparse_plan import Plan, Read


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

    def project(self, which: str, x: torch.Tensor, heads: torch.Tensor, shared: bool = False) -> torch.Tensor:
        """Inputs -> q, k or v ``[n ... d_head]`` of the ``n`` heads ``heads`` (q and k after any per-head
        norm, before any rotation); ``x``: one input per head ``[n ... d_model]``, or one for all (``shared``)."""
        w, b = self.heads.w[which][heads], self.heads.b[which][heads]
        y = torch.einsum("...d,nde->n...e" if shared else "n...d,nde->n...e", self.ln1(x), w)
        y = y + b.view(len(heads), *[1] * (y.dim() - 2), -1)
        return self.head_norms[which](y) if which in self.head_norms else y

    def output(self, z: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """z ``[n ... d_head]`` -> each head's result ``[n ... d_model]``."""
        return torch.einsum("n...e,ned->n...d", z, self.heads.w_o[heads])


def _layer(model: Any, layer: int) -> _Layer:
    """The layer's modules as hook-free views (:func:`eapcore.shared.hook_free`) and its head weights."""
    block = model.blocks[layer]
    hf_attn = block.attn.original_component
    scaling = float(getattr(hf_attn, "scaling", model.cfg.d_head**-0.5))
    norms = {w: hook_free(getattr(hf_attn, f"{w}_norm")) for w in "qk"} if families.of(model).qk_norm else {}
    return _Layer(hook_free(block.ln1.original_component), hook_free(block.ln2.original_component),
                  _mlp(hook_free(block.mlp.original_component)), head_weights(model, layer), scaling, norms)


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

    It keeps what the last evaluation computed (``restore`` of every computed node, the logits), which a
    :class:`~eapcore.sparse_plan.Plan` that starts from it reuses."""

    def __init__(self, model: Any, graph: Graph, ablated: torch.Tensor, clean: torch.Tensor,
                 clean_inputs: list[torch.Tensor], lengths: torch.Tensor) -> None:
        self.model, self.graph, self.ablated = model, graph, ablated
        self.layers = [_layer(model, layer) for layer in range(graph.cfg.n_layers)]
        self.ln_final = hook_free(model.ln_final.original_component)
        self.unembedding = hook_free(model.unembed.original_component)
        device = ablated.device
        self.rows, self.last = torch.arange(ablated.shape[1], device=device), lengths.to(device) - 1
        real = torch.arange(ablated.shape[2], device=device)[None, :] <= self.last[:, None]  # [batch pos]
        self.real = real.flatten().nonzero().flatten()  # flat indices of real tokens (one sync, here)
        self.rotary = None  # cos, sin [pos d_head]
        if families.of(model).attention != "plain":
            positions = torch.arange(ablated.shape[2], device=device)[None]
            self.rotary = tuple(t[0] for t in hook_free(_rotary_embedding(model))(ablated[0, :1], positions))
        self.input_restore = clean[0] - ablated[0]  # the input node's actual output is its clean one
        # X_v = c_v + Σ_{u < n} ā_u over the n sources v reads, with c_v = clean input − Σ_{u < n} clean_u: a
        # running sum in float32 or wider (no temporary the size of the cache), rounded once per input
        wide = torch.promote_types(ablated.dtype, torch.float32)
        shift, done, self.all_ablated = torch.zeros(clean[0].shape, dtype=wide, device=device), 0, []
        for x, n in zip(clean_inputs, [d.n_sources for d in input_groups(graph)]):
            shift += (ablated[done:n].to(wide) - clean[done:n].to(wide)).sum(0)
            done = n
            self.all_ablated.append((x.to(wide) + shift).to(ablated.dtype))
        self.ablated_last = self.at_last(ablated)
        self.mlp_rows = [torch.full((1,), graph.mlp_index(layer), device=device) for layer in range(graph.cfg.n_layers)]
        self.restore: torch.Tensor | None = None  # actual − ablated, a_u − ā_u, of nodes computed at every position
        self.restore_last: torch.Tensor | None = None  # ... and of every computed node, at the last tokens
        self.logits: torch.Tensor | None = None

    def forget(self) -> None:
        """Drop what the last evaluation computed."""
        self.restore = self.restore_last = self.logits = None

    def at_last(self, t: torch.Tensor) -> torch.Tensor:
        """``[... batch pos d]`` -> ``[... batch d]`` at each example's last real token."""
        return t[..., self.rows, self.last, :]

    def readout(self, plan: Plan) -> torch.Tensor:
        """Logits ``[batch d_vocab]`` at the last real tokens of the circuit that ``plan`` was made for."""
        if plan.fresh:
            self.restore, self.restore_last = torch.zeros_like(self.ablated), torch.zeros_like(self.ablated_last)
            self.restore[0], self.restore_last[0] = self.input_restore, self.at_last(self.input_restore)
        elif plan.dropped is not None:
            self.restore.index_fill_(0, plan.dropped, 0)
            self.restore_last.index_fill_(0, plan.dropped, 0)
        restore, restore_last = self.restore, self.restore_last
        for layer, (weights, step) in enumerate(zip(self.layers, plan.layers)):
            base, base_mlp = self.all_ablated[2 * layer], self.all_ablated[2 * layer + 1]
            if step.heads is not None:
                m = len(step.heads)
                kv = self._inputs(base, step.kv, restore)
                k, v = (weights.project(w, kv[i * m:(i + 1) * m], step.heads) for i, w in enumerate("kv"))
                k = self.position(k, None)
                for group in step.groups:
                    at = None if group.full else self.last
                    q_in = (self._inputs(base, group.q, restore) if group.full
                            else self._inputs(self.at_last(base), group.q, restore_last))
                    z = attend(self.position(weights.project("q", q_in, group.heads), at), k[group.sub], v[group.sub],
                               at, weights.scaling, None if self.rotary is None else torch.float32)
                    self._store(group.rows, weights.output(z, group.heads), group.full)
            if step.mlp is not None:
                row = self.mlp_rows[layer]
                if step.mlp_full:  # real tokens only: padding is 10-20% of a typical batch
                    x = self._inputs(base_mlp, step.mlp, restore)[0]
                    out = self.ablated[row].clone()
                    out.view(-1, x.shape[-1]).index_copy_(0, self.real, self.mlp(weights, x.view(-1, x.shape[-1]), self.real))
                else:
                    out = weights.mlp(weights.ln2(self._inputs(self.at_last(base_mlp), step.mlp, restore_last)))
                self._store(row, out, step.mlp_full)
        if plan.logits is not None:
            final = self._inputs(self.at_last(self.all_ablated[-1]), plan.logits, restore_last)[0]
            self.logits = self.unembed(final)
        return self.logits

    @staticmethod
    def mlp(weights: "_Layer", x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """The MLP on the rows ``real`` of ``x`` ``[tokens d_model]``."""
        return weights.mlp(weights.ln2(x.index_select(0, real)))

    def unembed(self, final: torch.Tensor) -> torch.Tensor:
        """The final norm and the unembedding (hook-free views) of ``final`` ``[... d_model]``."""
        return self.unembedding(self.ln_final(final))

    def _store(self, rows: torch.Tensor, out: torch.Tensor, full: bool) -> None:
        """Keep the outputs ``out`` of source ``rows`` as actual − ablated."""
        if full:
            self.restore.index_copy_(0, rows, out - self.ablated.index_select(0, rows))
            self.restore_last.index_copy_(0, rows, self.at_last(self.restore.index_select(0, rows)))
        else:
            self.restore_last.index_copy_(0, rows, out - self.ablated_last.index_select(0, rows))

    def position(self, x: torch.Tensor, at: torch.Tensor | None) -> torch.Tensor:
        """Rotate q or k ``[n batch pos d_head]`` (or ``[n batch d_head]`` at positions ``at``), if rotary."""
        if self.rotary is None:
            return x
        cos, sin = (t if at is None else t[at] for t in self.rotary)
        return _rotate(x, cos, sin)

    @staticmethod
    def _inputs(base: torch.Tensor, read: Read, restore: torch.Tensor) -> torch.Tensor:
        """``[read.n_cols *base.shape]``: base + Σ over each column's in-circuit parents of their ``restore``."""
        if read.rows is None:
            return base.expand(read.n_cols, *base.shape)
        parents = restore[read.rows] if isinstance(read.rows, slice) else restore.index_select(0, read.rows)
        add = read.mask @ parents.reshape(parents.shape[0], -1)
        return base + add.view(read.n_cols, *base.shape)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, last: torch.Tensor | None, scaling: float,
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


def input_groups(graph: Graph) -> list[Destination]:
    """One destination per group that shares an input: each layer's attention (its q hook stands for
    q, k and v), each layer's MLP, the logits; in forward order."""
    return [d for d in destinations(graph) if d.hook.endswith(("q_input", "mlp_in", "resid_post"))]


def input_recorders(graph: Graph, store: torch.Tensor) -> list[Hook]:
    """Forward hooks that write the input of every destination group (attention and MLP of each layer,
    logits) into ``store`` ``[2 n_layers + 1, batch pos d_model]``, in that order."""
    return [record(d.hook, store, slot, _first_column) for slot, d in enumerate(input_groups(graph))]


def _first_column(t: torch.Tensor) -> torch.Tensor:
    """A destination group's input ``[batch pos d_model]``; per-head copies (q of every head) are equal."""
    return t[:, :, 0] if t.dim() == 4 else t
