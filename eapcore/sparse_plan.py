"""What one sparse evaluation of a circuit computes, decided once per evaluation from the CPU masks.

Every batch of an evaluator is evaluated with the same :class:`Plan`: which nodes the sparse engine
(:mod:`eapcore.sparse`) computes, at which positions, and from which in-circuit parents, as index
tensors and mask blocks made on the CPU and copied to the model's device in one go when the plan is made
(:mod:`eapcore.upload`), so the per-batch loop asks the device nothing.

A node is *needed* when it has an in-circuit outgoing edge, and needed at every position when some
in-circuit path leads from it into a key or value input (otherwise only at the last real tokens).

A plan may start from the circuit whose node outputs the batches' runners hold (:class:`Held`): then a
needed node is recomputed only if its in-circuit inputs changed (an edge into it was added or removed,
or an in-circuit parent is recomputed) or its held output does not cover the positions needed now;
everything else, and the logits if nothing they read changed, is reused. Nodes no longer needed are
dropped from what is held. The result equals a fresh evaluation of the circuit, whatever circuit the
runners held before.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from eapcore.graph import QKV, Graph
from eapcore.upload import to_device

NONE, LAST, FULL = 0, 1, 2  # what is held of a node's output: nothing, the last real tokens, every position


@dataclass(frozen=True)
class Held:
    """The circuit whose node outputs the runners hold: ``keep`` ``[n_forward n_backward]`` (CPU bool) and,
    per source row, :data:`NONE`, :data:`LAST` or :data:`FULL`."""

    keep: torch.Tensor
    have: tuple[int, ...]


@dataclass(frozen=True)
class Read:
    """How ``n_cols`` destination columns read their in-circuit parents among the first ``n`` sources:
    base + ``mask`` ``[n_cols parents]`` @ the parents' ``restore``; ``rows``: the parents (a device index,
    or ``slice(0, n)`` when most rows are parents); None when no column has one."""

    n_cols: int
    rows: torch.Tensor | slice | None
    mask: torch.Tensor | None


@dataclass(frozen=True)
class HeadGroup:
    """Heads of a layer computed at every position (``full``) or at the last tokens only: their places
    ``sub`` among the layer's computed heads, their numbers ``heads``, their q inputs, their source ``rows``."""

    full: bool
    sub: torch.Tensor
    heads: torch.Tensor
    q: Read
    rows: torch.Tensor


@dataclass(frozen=True)
class LayerStep:
    """One layer: the heads computed (k and v for all of them) and their groups; the MLP if computed
    (``mlp_full``: at every position)."""

    heads: torch.Tensor | None
    kv: Read | None
    groups: tuple[HeadGroup, ...]
    mlp: Read | None
    mlp_full: bool


@dataclass(frozen=True)
class Plan:
    """``fresh``: start from nothing held; ``dropped``: rows whose held outputs are cleared; ``logits``: how
    the logits read their parents (None: the held logits stand); ``held``: what is held afterwards."""

    fresh: bool
    layers: tuple[LayerStep, ...]
    logits: Read | None
    dropped: torch.Tensor | None
    held: Held
    recomputed: tuple[int, ...]  # the source rows computed


@lru_cache(maxsize=16)
def _columns(graph: Graph) -> tuple[torch.Tensor, torch.Tensor, tuple[list[int], ...]]:
    """Per destination column: does it read all positions (k, v), and the row of the node that reads
    through it (``n_forward`` for the logits); per source row, the columns it reads through."""
    reads_all = torch.zeros(graph.n_backward, dtype=torch.bool)
    reader = torch.full((graph.n_backward,), graph.n_forward)
    columns: list[list[int]] = [[] for _ in range(graph.n_forward)]
    for layer in range(graph.cfg.n_layers):
        for h in range(graph.cfg.n_heads):
            row = graph.head_index(layer, h)
            for which in QKV:
                col = graph.qkv_column(layer, which, h)
                reads_all[col], reader[col] = which != "q", row
                columns[row].append(col)
        reader[graph.mlp_column(layer)] = graph.mlp_index(layer)
        columns[graph.mlp_index(layer)].append(graph.mlp_column(layer))
    return reads_all, reader, tuple(columns)


def _blocks(graph: Graph) -> list[list[int]]:
    """Source rows in blocks, in forward order: each layer's heads, then its MLP."""
    out = []
    for layer in range(graph.cfg.n_layers):
        out.append([graph.head_index(layer, h) for h in range(graph.cfg.n_heads)])
        out.append([graph.mlp_index(layer)])
    return out


def _everywhere(graph: Graph, keep: torch.Tensor, needed: torch.Tensor) -> torch.Tensor:
    """``[n_forward]``: needed at every position; readers come after their parents, so blocks go backwards."""
    reads_all, reader, _ = _columns(graph)
    everywhere = torch.zeros(graph.n_forward + 1, dtype=torch.bool)  # the logits: never computed fully
    for rows in reversed([[0]] + _blocks(graph)):
        wanted = reads_all | everywhere[reader]
        everywhere[rows] = (keep[rows] & wanted).any(1) & needed[rows]
    return everywhere[:-1]


def make_plan(graph: Graph, keep: torch.Tensor, held: Held | None, device: torch.device, dtype: torch.dtype) -> Plan:
    """The plan for the circuit ``keep`` ``[n_forward n_backward]`` (CPU bool, real edges), starting from
    ``held`` (None: nothing held), with index tensors on ``device`` and masks in ``dtype``."""
    _, _, columns = _columns(graph)
    needed = keep.any(1)
    everywhere = _everywhere(graph, keep, needed)
    changed = None if held is None else (keep != held.keep).any(0)
    recompute = torch.zeros(graph.n_forward, dtype=torch.bool)
    have, dropped = [FULL] + [NONE] * (graph.n_forward - 1), []  # the input node's output is always held
    for rows in _blocks(graph):
        for u in rows:
            before = NONE if held is None else held.have[u]
            if not needed[u]:
                if before != NONE:
                    dropped.append(u)
                continue
            want = FULL if everywhere[u] else LAST
            cols = columns[u]
            redo = (before == NONE or (want == FULL and before != FULL) or bool(changed[cols].any())
                    or bool((keep[:u, cols].any(1) & recompute[:u]).any()))
            recompute[u], have[u] = redo, want if redo else before
    logits_col = graph.logits_column
    redo_logits = (held is None or bool(changed[logits_col]) or bool((keep[:, logits_col] & recompute).any()))

    def index(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)

    def read(n: int, cols: list[int]) -> Read:
        mask = keep[:n, cols]
        parents = mask.any(1).nonzero().flatten()
        if len(parents) == 0:
            return Read(len(cols), None, None)
        if 2 * len(parents) > n:  # most rows: multiply through all of them rather than copy them out
            return Read(len(cols), slice(0, n), mask.T.to(dtype))
        return Read(len(cols), parents, mask[parents].T.to(dtype))

    layers = []
    H = graph.cfg.n_heads
    for layer in range(graph.cfg.n_layers):
        n = graph.n_attn_sources(layer)
        heads = [h for h in range(H) if recompute[graph.head_index(layer, h)]]
        groups = []
        for full in (True, False):
            sub = [i for i, h in enumerate(heads) if bool(everywhere[graph.head_index(layer, h)]) == full]
            if sub:
                chosen = [heads[i] for i in sub]
                groups.append(HeadGroup(full, index(sub), index(chosen),
                                        read(n, [graph.qkv_column(layer, "q", h) for h in chosen]),
                                        index([graph.head_index(layer, h) for h in chosen])))
        kv = read(n, [graph.qkv_column(layer, w, h) for w in "kv" for h in heads]) if heads else None
        row = graph.mlp_index(layer)
        mlp = read(graph.n_mlp_sources(layer), [graph.mlp_column(layer)]) if recompute[row] else None
        layers.append(LayerStep(index(heads) if heads else None, kv, tuple(groups), mlp, bool(everywhere[row])))
    on_device = to_device((tuple(layers), read(graph.n_forward, [logits_col]) if redo_logits else None,
                           index(dropped) if dropped else None), device)  # one copy per dtype
    return Plan(held is None, *on_device, Held(keep, tuple(have)), tuple(recompute.nonzero().flatten().tolist()))
