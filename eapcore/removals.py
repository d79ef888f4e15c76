"""Removals from the full graph, several in one stacked pass: the sparse engine's exact-patching primitive.

A removal is one edge ``(row, col)`` or all of a node's outgoing edges ``(row, None)``. Removing edge
u→v from the full graph changes only v's input, by ā_u − a_u (ablated − clean output of u); removing all
of u's outgoing edges changes the input of every node after u by that much. The nodes before the first
changed input keep their clean outputs, so only what lies after it is computed: the changed node (one
head, for an edge into a head), then every later node from the clean run's input plus the running
change Σ (new − clean output) of the nodes computed before it; an edge into the logits changes only the
read-out. Removals that start at the same place are stacked along the batch (``[K batch pos d_model]``);
the last layer is computed at the last real tokens only. Same values as evaluating each removal's
circuit (tests/test_verify.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from eapcore.graph import Graph
from eapcore.sparse import SparseCircuitRunner, attend, input_groups
from eapcore.upload import to_device

Removal = tuple[int, "int | None"]
STACK_TOKENS = 4096  # batch × positions × removals stacked in one pass


def start(graph: Graph, removal: Removal) -> int:
    """The first input group (attention and MLP of each layer, then the logits) whose input it changes."""
    row, col = removal
    if col is None:
        return next(i for i, d in enumerate(input_groups(graph)) if d.n_sources > row)
    if col == graph.logits_column:
        return 2 * graph.cfg.n_layers
    layer = col // (3 * graph.cfg.n_heads + 1)
    return 2 * layer + (col == graph.mlp_column(layer))


@dataclass(frozen=True)
class Stack:
    """Removals evaluated together: their places in the caller's list, where they start, whether they
    remove nodes, and as device tensors their rows and (for edges into heads) each one's head and q/k/v."""

    places: tuple[int, ...]
    start: int
    nodes: bool
    rows: torch.Tensor  # [K] the removed edges' (or nodes') source rows
    heads: torch.Tensor | None  # [K] the head each edge enters
    which: dict[str, torch.Tensor] | None  # q, k, v -> [K] 1 where the edge enters that input


def stacks(graph: Graph, removals: Sequence[Removal], tokens: int, device: torch.device, dtype: torch.dtype) -> list[Stack]:
    """``removals`` grouped by where they start and by kind, in stacks of about :data:`STACK_TOKENS`
    (``tokens``: batch × positions of the largest batch)."""
    size = max(1, STACK_TOKENS // max(1, tokens))
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, removal in enumerate(removals):
        groups.setdefault((start(graph, removal), removal[1] is None), []).append(i)
    out = []
    H = graph.cfg.n_heads
    for (first, nodes), places in sorted(groups.items()):
        for at in range(0, len(places), size):
            chunk = places[at:at + size]
            rows = torch.tensor([removals[i][0] for i in chunk])
            heads = which = None
            if not nodes and first % 2 == 0 and first < 2 * graph.cfg.n_layers:  # edges into heads
                offsets = [removals[i][1] % (3 * H + 1) for i in chunk]  # q, k, v columns of the layer, by head
                heads = torch.tensor([o % H for o in offsets])
                which = {w: torch.tensor([float(o // H == j) for o in offsets], dtype=dtype) for j, w in enumerate("qkv")}
            out.append(Stack(tuple(chunk), first, nodes, rows, heads, which))
    return to_device(out, device)


def removal_logits(runner: SparseCircuitRunner, stack: Stack, clean: torch.Tensor,
                   clean_inputs: torch.Tensor) -> torch.Tensor:
    """Read-out logits ``[K batch d_vocab]`` of the full graph without each of ``stack``'s removals, on
    ``runner``'s batch; ``clean``: every source's clean output ``[n_forward batch pos d_model]``,
    ``clean_inputs``: every input group's clean input ``[2 n_layers + 1, batch pos d_model]``."""
    r, graph = runner, runner.graph
    L, H = graph.cfg.n_layers, graph.cfg.n_heads
    K, (B, P, d) = len(stack.places), clean.shape[1:]
    last = r.last.repeat(K)  # [K·batch]
    real = (r.real[None] + B * P * torch.arange(K, device=clean.device)[:, None]).flatten()
    softmax = None if r.rotary is None else torch.float32
    removed = clean.index_select(0, stack.rows) - r.ablated.index_select(0, stack.rows)  # a_u − ā_u [K batch pos d]

    def mlp(layer: int, x: torch.Tensor, full: bool) -> torch.Tensor:
        """The MLP's new output minus its clean one: ``x`` ``[K batch pos d]`` -> at real tokens (0 at
        padding), or ``[K batch d]`` at the last tokens."""
        row, weights = graph.mlp_index(layer), r.layers[layer]
        if not full:
            return weights.mlp(weights.ln2(x)) - r.at_last(clean[row])
        out = torch.zeros(K * B * P, d, dtype=x.dtype, device=x.device)
        new = r.mlp(weights, x.reshape(-1, d), real)
        out.index_copy_(0, real, new - clean[row].reshape(-1, d).index_select(0, r.real).repeat(K, 1))
        return out.view(K, B, P, d)

    def heads(layer: int, x: torch.Tensor, full: bool) -> torch.Tensor:
        """All heads' new minus clean outputs, summed, from the shared input ``x`` ``[K batch pos d]``."""
        weights, everyone = r.layers[layer], torch.arange(H, device=x.device)
        k, v = (weights.project(w, x, everyone, shared=True).flatten(1, 2) for w in "kv")  # [H K·batch pos d_head]
        q_in = x if full else r.at_last(x)
        q = weights.project("q", q_in, everyone, shared=True).flatten(1, 2)
        at = None if full else last
        z = attend(r.position(q, at), r.position(k, None), v, at, weights.scaling, softmax)
        out = torch.einsum("hn...e,hed->n...d", z, weights.heads.w_o).view(K, B, *([P] if full else []), d)
        first = graph.head_index(layer, 0)
        base = clean[first:first + H].sum(0)
        return out - (base if full else r.at_last(base))

    def fit(t: torch.Tensor, full: bool) -> torch.Tensor:
        """A change at the positions a layer computes: every position, or the last tokens."""
        return t if full or t.dim() == 3 else r.at_last(t)

    change: torch.Tensor | None = -removed if stack.nodes else None  # [K batch pos d], or at the last tokens
    slot = stack.start
    if not stack.nodes and slot == 2 * L:  # an edge into the logits
        change = -r.at_last(removed)
    elif not stack.nodes and slot % 2 == 1:  # an edge into an MLP
        layer, x = slot // 2, clean_inputs[slot] - removed
        change = mlp(layer, x, True) if layer < L - 1 else mlp(layer, r.at_last(x), False)
        slot += 1
    elif not stack.nodes:  # an edge into one head's q, k or v input
        layer, weights = slot // 2, r.layers[slot // 2]
        full = layer < L - 1
        x = {w: clean_inputs[slot] - removed * stack.which[w].view(K, 1, 1, 1) for w in "qkv"}
        q, k, v = (weights.project(w, x[w] if w != "q" or full else r.at_last(x[w]), stack.heads) for w in "qkv")
        at = None if full else r.last
        z = attend(r.position(q, at), r.position(k, None), v, at, weights.scaling, softmax)
        own = clean.index_select(0, stack.heads + graph.head_index(layer, 0))
        change = weights.output(z, stack.heads) - (own if full else r.at_last(own))
        slot += 1
    before = None  # the change as it was before a layer's heads, which a parallel MLP reads
    while slot < 2 * L:
        layer, full = slot // 2, slot // 2 < L - 1
        if slot % 2 == 0:  # every head of the layer, from a changed input at every position
            before = change
            change = heads(layer, clean_inputs[slot] + change, full) + fit(change, full)
        else:
            reads = before if graph.cfg.parallel_attn_mlp else change
            if reads is not None:  # (a parallel MLP whose input did not change is its clean self)
                reads = fit(reads, full)
                x = (clean_inputs[slot] if reads.dim() == 4 else r.at_last(clean_inputs[slot])) + reads
                change = fit(change, full) + mlp(layer, x, full)
        slot += 1
    return r.unembed(r.at_last(clean_inputs[2 * L]) + fit(change, False))
