"""Ground truth for circuit metrics, patched by hand with plain forward hooks from node names (no eapcore
evaluator, sites or interventions): every edge outside ``keep`` carries ``ablated[u]`` instead of u's actual
output in the same run. ``ablated`` is built here for each intervention: the corrupted run's outputs, zeros,
or means over the clean prompts' real positions (per position for mean-positional). Also the hook names of
nodes, read from their names, for other hand-made checks (tests/test_families.py).

A head's output is its slice of ``hook_result``; where the block normalizes its attention output before
adding it (the bridge's ``ln1_post``: Gemma-2/3, OLMo-2/3), it is that slice times the norm's scale
1/rms(Σ heads' results) and weight of the same run (:func:`head_outputs`), written out here from the
norm's definition."""

from __future__ import annotations

import re
from typing import Callable

import torch

from eapcore.data import Batch
from eapcore.metrics import get_metric, readout
from eapcore.models import model_dtype


def source_site(name: str) -> tuple[str, int | None]:
    """(hook, head or None) of a source node's output, from its name."""
    if name == "input":
        return "hook_embed", None
    if m := re.fullmatch(r"a(\d+)\.h(\d+)", name):
        return f"blocks.{m[1]}.attn.hook_result", int(m[2])
    return f"blocks.{name[1:]}.hook_mlp_out", None


def destination_site(name: str, n_layers: int) -> tuple[str, int | None]:
    """(hook, head or None) of a destination node's input, from its name."""
    if name == "logits":
        return f"blocks.{n_layers - 1}.hook_resid_post", None
    if m := re.fullmatch(r"a(\d+)\.h(\d+)<([qkv])>", name):
        return f"blocks.{m[1]}.hook_{m[3]}_input", int(m[2])
    return f"blocks.{name[1:]}.hook_mlp_in", None


def head_outputs(model, layer: int, results: torch.Tensor) -> torch.Tensor:
    """Heads' outputs ``[batch pos head d_model]`` from their results: the results, or where the block
    RMS-normalizes its attention output (``ln1_post``), each result · γ / sqrt(mean(x²) + eps), with x the sum
    of the results of the same run and γ the norm's weight w, or 1 + w where it says so (Gemma's)."""
    norm = getattr(model.blocks[layer], "ln1_post", None)
    if norm is None:
        return results
    module = norm.original_component
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    gamma = 1 + module.weight if norm.uses_weight_offset else module.weight
    x = results.sum(2)
    return results * (gamma / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()).unsqueeze(2)


def _output(model, u: str, t: torch.Tensor) -> torch.Tensor:
    """Source ``u``'s output ``[batch pos d_model]`` from the tensor at its hook."""
    if (m := re.fullmatch(r"a(\d+)\.h(\d+)", u)) is None:
        return t
    return head_outputs(model, int(m[1]), t)[:, :, int(m[2])]


def source_outputs(model, graph, tokens) -> dict[str, torch.Tensor]:
    """Every source node's output ``[batch pos d_model]`` on ``tokens``, by node name."""
    store = {}

    def keep(name):
        def hook(t, hook):
            store[name] = _output(model, name, t.detach()).clone()
        return hook

    hooks = [(source_site(n)[0], keep(n)) for n in graph.src_nodes]
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=hooks)
    return store


def add_at(head: int | None, extra: torch.Tensor):
    """A hook that adds ``extra`` ``[batch pos d_model]`` to the tensor (to head ``head``'s slice, if given)."""
    def hook(t, hook):
        if head is None:
            return t + extra
        pad = torch.zeros_like(t)
        pad[:, :, head] = 1
        return t + pad * extra.unsqueeze(2)
    return hook


def ablation(model, graph, data, intervention: str) -> Callable[[Batch], dict[str, torch.Tensor]]:
    """batch -> what each source carries when ablated on it (``[batch pos d_model]`` by node name); the
    means are taken over all of ``data``."""
    if intervention == "patching":
        return lambda batch: source_outputs(model, graph, batch.corrupted)
    d, dtype = graph.cfg.d_model, model_dtype(model)
    if intervention == "zero":
        return lambda batch: {u: torch.zeros(*batch.clean.shape, d, dtype=dtype) for u in graph.src_nodes}
    (everything,) = data.batches(len(data))
    outs = source_outputs(model, graph, everything.clean)
    real = (torch.arange(everything.n_pos)[None, :] < everything.lengths[:, None]).to(dtype)  # [n pos]
    if intervention == "mean":
        means = {u: torch.einsum("npd,np->d", t, real) / real.sum() for u, t in outs.items()}
        return lambda batch: {u: m.expand(*batch.clean.shape, d) for u, m in means.items()}
    assert intervention == "mean-positional" and bool((everything.lengths == everything.lengths[0]).all())
    means = {u: t.mean(0) for u, t in outs.items()}  # [pos d_model]
    return lambda batch: {u: m[: batch.n_pos].expand(*batch.clean.shape, d) for u, m in means.items()}


def patched_metric(model, graph, batch, keep: torch.Tensor, ablated: dict[str, torch.Tensor],
                   metric: str = "logit_diff") -> torch.Tensor:
    """Per-example metric ``[batch]`` (on the CPU) of the clean run with every edge outside ``keep`` carrying
    ``ablated`` (``batch`` and ``ablated`` on the model's device)."""
    actual: dict[str, torch.Tensor] = {}
    hooks = []
    for u in graph.src_nodes:
        def record(t, hook, u=u):
            actual[u] = _output(model, u, t)
        hooks.append((source_site(u)[0], record))
    for col, v in enumerate(graph.dst_nodes):
        removed = [graph.src_nodes[r] for r in range(graph.n_forward) if graph.real_edge_mask[r, col] and not keep[r, col]]
        if removed:
            site, head = destination_site(v, graph.cfg.n_layers)

            def patch(t, hook, removed=removed, head=head):
                return add_at(head, sum(ablated[u] - actual[u] for u in removed))(t, hook)
            hooks.append((site, patch))
    with torch.no_grad():
        clean = readout(model(batch.clean), batch.lengths)
        logits = readout(model.run_with_hooks(batch.clean, fwd_hooks=hooks), batch.lengths)
    return get_metric(metric)(logits, batch, clean).double().cpu()


def hand_metrics(model, graph, data, keep: torch.Tensor, intervention: str = "patching",
                 metric: str = "logit_diff") -> torch.Tensor:
    """``[n_examples]``: :func:`patched_metric` over all of ``data``, one pair at a time."""
    ablated = ablation(model, graph, data, intervention)
    return torch.cat([patched_metric(model, graph, b, keep, ablated(b), metric) for b in data.batches(1)])
