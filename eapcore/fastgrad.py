"""The unsplit attribution backend: scores from gradient passes without per-head copies of the residual
stream, at every level, for input and activation interpolation.

With split q/k/v inputs on, the bridge hands every head its own copy of the residual and of the
attention's input norm, so each gradient pass does that work H times and keeps it for backward. Here
the gradient passes run with split inputs and per-head results off, and the gradient at head h's q
(k, v) input is rebuilt from the gradient G_h at the projection's output ``[batch pos head d_head]``
through the norm's backward, x̂ = (x − μ)·r (no μ for RMSNorm), q = (γ ⊙ x̂) W + c::

    g_h = r · (γ ⊙ G_h Wᵀ − mean_d(γ ⊙ G_h Wᵀ)) − x̂ · s_h
    s_h = r · mean_d((γ ⊙ G_h Wᵀ) ⊙ x̂) = r · G_h · (q_h − c_h) / d_model

Both terms are linear in G, so over the passes of one scoring unit it is enough to keep Σ r·G (head
space), and per pass x̂ ``[batch pos d_model]`` and s ``[batch pos head]``, and to contract with Δ once
per destination at the end. The norm is rebuilt and the sums kept in float32 (float64 for a float64
model) whatever the model's dtype: a half-precision x² overflows for the large residual values that
real models have. Node and neuron scores take the gradient at each source's output: every head of a
layer shares it (the attention output is the sum of the heads' results), so it is read at
``hook_attn_out``.

Δ (``delta`` = ablated − clean outputs) is recorded by the same passes where one of them is that run
(per-head results from ``hook_z`` and W_O). Same scores as :mod:`eapcore.gradients`; runs the families
whose :class:`~eapcore.families.Family` has ``unsplit`` (:mod:`eapcore.backends` decides).
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
from eapcore.sites import Source, destinations, sources


@dataclass(frozen=True)
class _Attention:
    """One layer's input norm and q/k/v projections: x̂ = (x − μ)·r, q = (γ ⊙ x̂) W + c; in ``dtype``."""

    centered: bool  # LayerNorm (subtracts the mean) or RMSNorm
    eps: float
    gamma: torch.Tensor | None  # [d_model]
    w: dict[str, torch.Tensor]  # q, k, v: W [head d_model d_head]
    offsets: dict[str, torch.Tensor]  # which -> c [head d_head] (bias + β W)
    dtype: torch.dtype


def _norm(kind: str, module: Any) -> tuple[bool, float, torch.Tensor | None, torch.Tensor | None]:
    """(centered, eps, γ, β) of a norm of ``kind`` (:data:`eapcore.families.NORMS`)."""
    if kind == "layernorm":
        return True, module.eps, module.weight, module.bias
    if kind == "layernorm-free":  # OLMo: F.layer_norm(x, shape, None, None, eps=1e-5)
        return True, 1e-5, None, None
    if kind == "rmsnorm":
        return False, float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))), module.weight, None
    raise ValueError(f"the unsplit backend does not rebuild a {families.NORMS[kind]}")


def _attention(model: Any, layer: int, heads: HeadWeights, dtype: torch.dtype) -> _Attention:
    """The layer's norm and projections in ``dtype``, for a model whose family has the unsplit backend."""
    centered, eps, gamma, beta = _norm(families.of(model).norm, model.blocks[layer].ln1.original_component)
    w = {which: heads.w[which].to(dtype) for which in QKV}
    offsets = {which: heads.b[which].to(dtype) + (0 if beta is None else torch.einsum("d,hde->he", beta.detach().to(dtype), w[which]))
               for which in QKV}
    return _Attention(centered, eps, None if gamma is None else gamma.detach().to(dtype), w, offsets, dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where gradients are rebuilt and summed: float32, or float64 for a float64 model."""
    return torch.promote_types(dtype, torch.float32)


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
    """Per layer, summed over passes: ``scaled_grads`` Σ r·G per q/k/v ``[batch pos head d_head]``; per
    pass, ``xhat_terms`` (s, x̂) per q/k/v; ``current``: this pass's r, x̂ and q/k/v."""

    attn: _Attention
    scaled_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    xhat_terms: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=lambda: {w: [] for w in QKV})
    current: dict[str, torch.Tensor] = field(default_factory=dict)

    def on_norm_input(self, x: torch.Tensor) -> None:
        x = x.detach().to(self.attn.dtype)
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
        rg = g.reshape(*g.shape[:2], *heads).to(self.attn.dtype) * r[..., None]
        self.scaled_grads[which] = rg if which not in self.scaled_grads else self.scaled_grads[which].add_(rg)
        base = self.current[which].reshape(rg.shape).to(self.attn.dtype) - self.attn.offsets[which]
        xhat = self.current["xhat"]
        self.xhat_terms[which].append(((rg * base).sum(-1) / xhat.shape[-1], xhat))

    def input_gradient(self, which: str) -> torch.Tensor:
        """Σ over the passes of the gradient at every head's ``which`` input ``[batch pos head d_model]``."""
        g = torch.einsum("bphe,hde->bphd", self.scaled_grads[which], self.attn.w[which])
        if self.attn.gamma is not None:
            g = g * self.attn.gamma
        if self.attn.centered:
            g = g - g.mean(-1, keepdim=True)
        s, xhat = (torch.stack(t) for t in zip(*self.xhat_terms[which]))
        return g - torch.einsum("abph,abpd->bphd", s, xhat)


def output_site(source: Source) -> str:
    """Where a source group's output is one tensor in unsplit passes: a layer's heads share
    ``hook_attn_out``, the sum of their results."""
    return source.hook if source.layer is None else f"blocks.{source.layer}.hook_attn_out"


class _Gradients:
    """The gradients that score the source rows ``rows``, summed over the passes of one scoring unit.

    Edge level: at every destination input that reads one of the rows (q/k/v rebuilt through the norm,
    :class:`_LayerSums`); node and neuron level: at the outputs of the rows' source groups."""

    def __init__(self, model: Any, graph: Graph, heads: list[HeadWeights], level: str, rows: slice) -> None:
        self.graph, self.level, self.rows = graph, level, rows
        self.dtype = compute_dtype(heads[0].w_o.dtype)
        self.sums: dict[str, torch.Tensor] = {}
        self.layers: dict[int, _LayerSums] = {}
        if level == "edge":
            self.layers = {l: _LayerSums(_attention(model, l, heads[l], self.dtype)) for l in range(graph.cfg.n_layers)
                           if graph.n_attn_sources(l) > rows.start}
            self.plain = [d for d in destinations(graph) if not d.hook.endswith(("q_input", "k_input", "v_input"))
                          and d.n_sources > rows.start]
        else:
            self.outputs = {output_site(s): s.rows for s in sources(graph) if rows.start <= s.rows.start < rows.stop}

    def _add(self, site: str, g: torch.Tensor) -> None:
        g = g.detach().to(self.dtype)
        self.sums[site] = g.clone() if site not in self.sums else self.sums[site].add_(g)

    def hooks(self) -> list[Hook]:
        """Forward hooks that watch this unit's gradients in a pass."""
        if self.level != "edge":
            return [(site, lambda t, hook, site=site: on_grad(t, lambda g: self._add(site, g))) for site in self.outputs]
        hooks: list[Hook] = []
        for l, s in self.layers.items():
            hooks.append((f"blocks.{l}.ln1.hook_in", lambda t, hook, s=s: s.on_norm_input(t)))
            for which in QKV:
                hooks.append((f"blocks.{l}.attn.hook_{which}", lambda t, hook, s=s, w=which: s.on_projection(w, t)))
        return hooks + [(d.hook, lambda t, hook, d=d: on_grad(t, lambda g: self._add(d.hook, g))) for d in self.plain]

    def end_pass(self) -> None:
        for s in self.layers.values():
            s.current.clear()

    def contract(self, acc: Accumulator, delta: Delta, weight: float) -> None:
        """Add ``weight`` × Σ Δ · (the summed gradients) to ``acc`` for this unit's rows."""
        if self.level != "edge":
            for site, rows in self.outputs.items():
                if site in self.sums:
                    acc.add_neurons(rows, delta, self.sums[site], weight)
            return
        by_hook = {d.hook: d for d in destinations(self.graph)}
        for l, s in self.layers.items():
            for which in QKV:
                if which in s.scaled_grads:
                    acc.add_edges(by_hook[f"blocks.{l}.hook_{which}_input"], self.rows, delta, s.input_gradient(which), weight)
        for d in self.plain:
            if d.hook in self.sums:
                acc.add_edges(d, self.rows, delta, self.sums[d.hook], weight)


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


@dataclass
class _Run:
    """One batch and window: the model, the embeddings, Δ as the passes fill it in, progress."""

    model: Any
    batch: Batch
    metric: Metric
    intervention: Intervention
    window: slice
    acc: Accumulator
    tick: Callable[[], None]
    where: str

    def __post_init__(self) -> None:
        graph, batch = self.acc.graph, self.batch
        self.heads = [head_weights(self.model, l) for l in range(graph.cfg.n_layers)]
        self.corrupted_embed = token_embeddings(self.model, graph, batch, batch.corrupted)
        self.clean_embed = token_embeddings(self.model, graph, batch, batch.clean)
        self.corrupted_run = self.intervention.corrupted_run  # under patching the α = 0 pass is the corrupted run
        if self.corrupted_run:
            values = new_buffer(self.model, graph, batch, self.window).zero_()
            if self.window.start == 0:
                values[0] = self.corrupted_embed
        else:
            values = self.intervention.ablated(self.model, graph, batch, self.window)  # zero or means: no forward pass
            self.tick()
        if self.window.start == 0:
            values[0] -= self.clean_embed
        self.delta = Delta(self.window.start, values)
        self.clean_readout: torch.Tensor | None = None

    def gradients(self, rows: slice) -> _Gradients:
        return _Gradients(self.model, self.acc.graph, self.heads, self.acc.level, rows)

    def record(self, sign: int) -> list[Hook]:
        """Hooks that add this pass's source outputs ``sign`` times into Δ."""
        return _recorders(self.heads, self.acc.graph, self.delta.values, self.window, sign)

    def forward(self, tokens: torch.Tensor, sign: int) -> None:
        """A forward pass without gradients whose outputs go into Δ ``sign`` times."""
        with torch.no_grad():
            logits = self.model.run_with_hooks(tokens, fwd_hooks=self.record(sign))
        if sign < 0:
            self.clean_readout = readout(logits, self.batch.lengths)
        self.tick()

    def backward(self, hooks: list[Hook], grads: _Gradients, what: str, clean_run: bool = False) -> None:
        """A gradient pass of the clean prompt with ``hooks`` (``clean_run``: it is the clean run itself)."""
        this = hooked_backward(self.model, self.batch, self.metric, self.clean_readout, hooks + grads.hooks(),
                               f"{self.where}, {what}", is_clean_run=clean_run)
        if clean_run:
            self.clean_readout = this
        grads.end_pass()
        self.tick()

    def input_passes(self, alphas: list[float], grads: _Gradients) -> None:
        """Gradient passes at the embeddings e_corr + α (e_clean − e_corr), the clean run (α = 1) first;
        Δ is recorded in the passes that are the clean or (under patching) the corrupted run."""
        if 1.0 not in alphas:  # EAP-IG-inputs: the clean run on its own
            self.forward(self.batch.clean, -1)
        if self.corrupted_run and 0.0 not in alphas:  # EAP: the corrupted run on its own
            self.forward(self.batch.corrupted, 1)
        endpoints = {1.0: self.clean_embed, 0.0: self.corrupted_embed}
        for step, alpha in enumerate(sorted(alphas, key=lambda a: (a != 1.0, a != 0.0))):
            start = endpoints.get(alpha)
            if start is None:
                start = self.corrupted_embed + alpha * (self.clean_embed - self.corrupted_embed)

            def interpolate(t: torch.Tensor, hook: Any, start: torch.Tensor = start) -> torch.Tensor:
                return start.clone().requires_grad_(True)

            records = alpha == 1.0 or (alpha == 0.0 and self.corrupted_run)
            extra = self.record(1 if alpha == 0.0 else -1) if records else []
            self.backward([("hook_embed", interpolate), *extra], grads, f"gradient step {step + 1} of {len(alphas)}",
                          clean_run=alpha == 1.0)
            if records:
                self.tick()  # this pass was also a forward pass of its own


def input_interpolation(
    model: Any, batch: Batch, metric: Metric, intervention: Intervention, window: slice, alphas: list[float],
    acc: Accumulator, tick: Callable[[], None], where: str,
) -> None:
    """Scores of the source rows in ``window`` at ``acc.level``, as :func:`eapcore.gradients.input_interpolation`
    computes them, from unsplit passes. Δ = ablated − clean is recorded in the gradient passes where one
    is that run: the α = 1 pass is the clean run and, under patching, the α = 0 pass the corrupted one;
    so EAP and clean-corrupted need no other forward pass and EAP-IG-inputs only the clean run."""
    run = _Run(model, batch, metric, intervention, window, acc, tick, where)
    grads = run.gradients(window)
    with unsplit(model):
        run.input_passes(alphas, grads)
    grads.contract(acc, run.delta, 1.0 / len(alphas))


def activation_interpolation(
    model: Any, batch: Batch, metric: Metric, intervention: Intervention, window: slice, steps: int,
    acc: Accumulator, tick: Callable[[], None], where: str,
) -> None:
    """Scores of the source rows in ``window`` at ``acc.level``, as :func:`eapcore.gradients.activation_interpolation`
    computes them: for each source group, its output set to clean + (1 − α)·Δ for α = k/steps, k = 1..steps.

    The α = 1 pass is the clean run for every group, so it runs once (an EAP pass, which also records
    Δ); each group then runs its other ``steps − 1`` passes with the shift added where the group's output
    joins the residual stream (a layer's heads together at ``hook_attn_out``), and only the destinations
    after it (or, at node level, its own output) are watched."""
    run = _Run(model, batch, metric, intervention, window, acc, tick, where)
    groups = [s for s in sources(acc.graph) if window.start <= s.rows.start < window.stop]
    with unsplit(model):
        clean = run.gradients(window)
        run.input_passes([1.0], clean)  # under patching, after the corrupted run on its own
        for _ in groups[1:]:
            tick()  # the α = 1 pass of every group
        clean.contract(acc, run.delta, 1.0 / steps)
        del clean
        for group in groups:
            shift = run.delta.take(group.rows).sum(0)  # [batch pos d_model]: Σ over the group's rows of ablated − clean
            grads = run.gradients(group.rows)
            for k in range(1, steps):
                def interpolate(t: torch.Tensor, hook: Any, moved: torch.Tensor = (1 - k / steps) * shift) -> torch.Tensor:
                    return (t + moved.to(t.device)).detach().requires_grad_(True)

                run.backward([(output_site(group), interpolate)], grads, f"group {group.hook}, step {k} of {steps}")
            grads.contract(acc, run.delta, 1.0 / steps)
