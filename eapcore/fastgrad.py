"""The unsplit attribution backend: edge scores from input interpolation without per-head copies of the
residual stream.

With split q/k/v inputs on, the bridge hands every head its own copy of the residual and of the
attention's input norm, so each gradient pass does that work H times and keeps it for backward. Here
the gradient passes run with split inputs and per-head results off, and the gradient at head h's q
(k, v) input is rebuilt from the gradient G_h at the projection's output ``[batch pos head d_head]``
through the norm's backward, x̂ = (x − μ)·r (no μ for RMSNorm), q = (γ ⊙ x̂) W + c::

    g_h = r · (γ ⊙ G_h Wᵀ − mean_d(γ ⊙ G_h Wᵀ)) − x̂ · s_h
    s_h = r · mean_d((γ ⊙ G_h Wᵀ) ⊙ x̂) = r · G_h · (q_h − c_h) / d_model

Both terms are linear in G, so over the interpolation steps a it is enough to keep Σ_a r_a G_a (head
space), and per step x̂_a ``[batch pos d_model]`` and s_a ``[batch pos head]``, and to contract with Δ
once per destination at the end. Δ (``delta`` = ablated − clean outputs) is recorded by the same
passes where one of them is that run (per-head results from ``hook_z`` and W_O). Same scores as
:func:`eapcore.gradients.input_interpolation` at edge level; runs the families whose
:class:`~eapcore.families.Family` has ``unsplit`` (:mod:`eapcore.backends` decides).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from eapcore import families
from eapcore.data import Batch
from eapcore.gradients import Accumulator, Delta, hooked_backward, on_grad
from eapcore.graph import QKV, Graph
from eapcore.heads import HeadWeights, head_weights
from eapcore.interventions import Intervention
from eapcore.metrics import Metric, readout
from eapcore.recording import Hook, new_buffer, record, token_embeddings
from eapcore.sites import Destination, destinations, sources


@dataclass(frozen=True)
class _Attention:
    """One layer's input norm and q/k/v projections: x̂ = (x − μ)·r, q = (γ ⊙ x̂) W + c."""

    centered: bool  # LayerNorm (subtracts the mean) or RMSNorm
    eps: float
    gamma: torch.Tensor | None  # [d_model]
    heads: HeadWeights  # W [head d_model d_head] per q/k/v, and W_O
    offsets: dict[str, torch.Tensor]  # which -> c [head d_head] (bias + β W)


def _norm(kind: str, module: Any) -> tuple[bool, float, torch.Tensor | None, torch.Tensor | None]:
    """(centered, eps, γ, β) of a norm of ``kind`` (:data:`eapcore.families.NORMS`)."""
    if kind == "layernorm":
        return True, module.eps, module.weight, module.bias
    if kind == "layernorm-free":  # OLMo: F.layer_norm(x, shape, None, None, eps=1e-5)
        return True, 1e-5, None, None
    if kind == "rmsnorm":
        return False, float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))), module.weight, None
    raise ValueError(f"the unsplit backend does not rebuild a {families.NORMS[kind]}")


def _attention(model: Any, layer: int, heads: HeadWeights) -> _Attention:
    """The layer's norm and projections, for a model whose family has the unsplit backend."""
    centered, eps, gamma, beta = _norm(families.of(model).norm, model.blocks[layer].ln1.original_component)
    offsets = {w: heads.b[w] + (0 if beta is None else torch.einsum("d,hde->he", beta.detach(), heads.w[w])) for w in QKV}
    return _Attention(centered, eps, None if gamma is None else gamma.detach(), heads, offsets)


@contextmanager
def unsplit(model: Any) -> Iterator[None]:
    """Split q/k/v inputs and per-head results off for the duration."""
    model.set_use_split_qkv_input(False)
    model.set_use_attn_result(False)
    try:
        yield
    finally:
        model.set_use_split_qkv_input(True)
        model.set_use_attn_result(True)


@dataclass
class _LayerSums:
    """Per layer, summed over steps: ``scaled_grads`` Σ r·G per q/k/v ``[batch pos head d_head]``; per
    step, ``xhat_terms`` (s, x̂) per q/k/v; ``current``: this step's r, x̂ and q/k/v."""

    attn: _Attention
    scaled_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    xhat_terms: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=lambda: {w: [] for w in QKV})
    current: dict[str, torch.Tensor] = field(default_factory=dict)

    def on_norm_input(self, x: torch.Tensor) -> None:
        x = x.detach()
        if self.attn.centered:
            x = x - x.mean(-1, keepdim=True)
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.attn.eps)
        self.current["r"], self.current["xhat"] = r, x * r

    def on_projection(self, which: str, out: torch.Tensor) -> torch.Tensor:
        """Returned, so that the bridge carries on with the very tensor whose gradient is watched."""
        self.current[which] = out.detach()
        if out.requires_grad:
            out.register_hook(lambda g: self.on_gradient(which, g))
        return out

    def on_gradient(self, which: str, g: torch.Tensor) -> None:
        r = self.current["r"]  # [batch pos 1]
        heads = self.attn.offsets[which].shape  # [head d_head]; some bridges hand over [batch pos head*d_head]
        rg = g.reshape(*g.shape[:2], *heads) * r[..., None]
        self.scaled_grads[which] = rg if which not in self.scaled_grads else self.scaled_grads[which].add_(rg)
        base = self.current[which].reshape(rg.shape) - self.attn.offsets[which]
        xhat = self.current["xhat"]
        self.xhat_terms[which].append(((rg * base).sum(-1) / xhat.shape[-1], xhat))

    def input_gradient(self, which: str) -> torch.Tensor:
        """Σ_a of the gradient at every head's ``which`` input ``[batch pos head d_model]``."""
        W = self.attn.heads.w[which]
        g = torch.einsum("bphe,hde->bphd", self.scaled_grads[which], W)
        if self.attn.gamma is not None:
            g = g * self.attn.gamma
        if self.attn.centered:
            g = g - g.mean(-1, keepdim=True)
        s, xhat = (torch.stack(t) for t in zip(*self.xhat_terms[which]))
        return g - torch.einsum("abph,abpd->bphd", s, xhat)


def _recorders(heads: list[HeadWeights], graph: Graph, values: torch.Tensor, window: slice, sign: int) -> list[Hook]:
    """Unsplit forward hooks that add ``sign`` × each non-input source's output of ``window`` into
    ``values`` ``[rows batch pos d_model]``: heads' results from ``hook_z`` and each layer's ``heads``
    W_O, MLPs' from ``hook_mlp_out``."""
    hooks = []
    for s in sources(graph)[1:]:
        if window.start <= s.rows.start < window.stop:
            local = slice(s.rows.start - window.start, s.rows.stop - window.start)
            if s.hook.endswith("hook_result"):
                layer = int(s.hook.split(".")[1])
                hooks.append(record(f"blocks.{layer}.attn.hook_z", values, local, heads[layer].results, sign))
            else:
                hooks.append(record(s.hook, values, local, sign=sign))
    return hooks


def input_interpolation(
    model: Any, batch: Batch, metric: Metric, intervention: Intervention, window: slice, alphas: list[float],
    acc: Accumulator, tick: Callable[[], None], where: str,
) -> None:
    """Edge scores of the source rows in ``window``, as :func:`eapcore.gradients.input_interpolation`
    computes them, from unsplit passes. Δ = ablated − clean is recorded in the gradient passes where
    one is that run: the α = 1 pass is the clean run and, under patching, the α = 0 pass the corrupted
    one; so EAP and clean-corrupted need no other forward pass and EAP-IG-inputs only the clean run."""
    graph = acc.graph
    corrupted_embed = token_embeddings(model, graph, batch, batch.corrupted)
    clean_embed = token_embeddings(model, graph, batch, batch.clean)
    corrupted_run = intervention.corrupted_run  # under patching the α = 0 pass is the corrupted run
    if corrupted_run:
        values = new_buffer(model, graph, batch, window).zero_()
        if window.start == 0:
            values[0] = corrupted_embed
    else:
        values = intervention.ablated(model, graph, batch, window)  # e.g. zero or means: no forward pass
        tick()
    if window.start == 0:
        values[0] -= clean_embed
    delta = Delta(window.start, values)

    by_hook = {d.hook: d for d in destinations(graph)}
    heads = [head_weights(model, l) for l in range(graph.cfg.n_layers)]
    layers = {l: _LayerSums(_attention(model, l, heads[l])) for l in range(graph.cfg.n_layers)
              if graph.n_attn_sources(l) > window.start}
    plain = [d for d in by_hook.values() if not d.hook.endswith(("q_input", "k_input", "v_input"))
             and d.n_sources > window.start]
    sums: dict[str, torch.Tensor] = {}

    def add(dst: Destination, g: torch.Tensor) -> None:
        sums[dst.hook] = g.detach().clone() if dst.hook not in sums else sums[dst.hook].add_(g)

    hooks: list[Hook] = []
    for l, s in layers.items():
        hooks.append((f"blocks.{l}.ln1.hook_in", lambda t, hook, s=s: s.on_norm_input(t)))
        for which in QKV:
            hooks.append((f"blocks.{l}.attn.hook_{which}", lambda t, hook, s=s, w=which: s.on_projection(w, t)))
    for d in plain:
        hooks.append((d.hook, lambda t, hook, d=d: on_grad(t, lambda g: add(d, g))))
    endpoints = {1.0: clean_embed, 0.0: corrupted_embed}
    clean_readout = None
    with unsplit(model):
        if 1.0 not in alphas:  # EAP-IG-inputs: the clean run on its own
            with torch.no_grad():
                logits = model.run_with_hooks(batch.clean, fwd_hooks=_recorders(heads, graph, values, window, -1))
            clean_readout = readout(logits, batch.lengths)
            del logits
            tick()
        if corrupted_run and 0.0 not in alphas:  # EAP: the corrupted run on its own
            with torch.no_grad():
                model.run_with_hooks(batch.corrupted, fwd_hooks=_recorders(heads, graph, values, window, 1))
            tick()
        for step, alpha in enumerate(sorted(alphas, key=lambda a: (a != 1.0, a != 0.0))):  # the clean run first
            start = endpoints[alpha] if alpha in endpoints else corrupted_embed + alpha * (clean_embed - corrupted_embed)

            def interpolate(t: torch.Tensor, hook: Any, start: torch.Tensor = start) -> torch.Tensor:
                return start.clone().requires_grad_(True)

            records = alpha == 1.0 or (alpha == 0.0 and corrupted_run)
            extra = _recorders(heads, graph, values, window, 1 if alpha == 0.0 else -1) if records else []
            this = hooked_backward(model, batch, metric, clean_readout, [("hook_embed", interpolate), *hooks, *extra],
                                   f"{where}, gradient step {step + 1} of {len(alphas)}", is_clean_run=alpha == 1.0)
            if alpha == 1.0:
                clean_readout = this
            for s in layers.values():
                s.current.clear()
            tick()
            if records:
                tick()  # this pass was also a forward pass of its own
    weight = 1.0 / len(alphas)
    for l, s in layers.items():
        for which in QKV:
            if which in s.scaled_grads:
                acc.add_edges(by_hook[f"blocks.{l}.hook_{which}_input"], window, delta, s.input_gradient(which), weight)
    for d in plain:
        if d.hook in sums:
            acc.add_edges(d, window, delta, sums[d.hook], weight)
