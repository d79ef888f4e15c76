"""Where a circuit's nodes go and how its edges look, shared by the interactive graph and the PNG.

Layout: ``input`` at the bottom, ``logits`` at the top; each layer's heads on one row with its MLP on
the row above (on the same row, to the right, for parallel attention/MLP models). Every node of the graph
has its place, computed from the graph alone, so a node stays where it is whatever the circuit; nodes
outside the circuit are drawn faded or not at all (:class:`GraphStyle`), but keep their place. A node's
size grows with its score (:func:`node_sizes`). Edges are coloured by the input they feed (q, k, v or
other: MLP/logits) and by the sign of their score (strong colour and solid: positive; faint and dashed:
negative); their width grows with ``|score|``. Colours come in a light and a dark theme.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch

from eapcore.circuit import Circuit, Scores
from eapcore.graph import Graph

NODE_COLOURS = {"input": "#9ca3af", "head": "#f59e0b", "mlp": "#14b8a6", "logits": "#ef4444"}
NODE_TEXT = "#111827"  # labels on a node's own fill (input, logits): one colour reads on both themes
PAGE_TEXT = {"light": "#111827", "dark": "#e5e7eb"}  # labels beside a node, on the page's background
PAGE_BACKGROUND = {"light": "#ffffff", "dark": "#0e1117"}
PICKED = "#e11d48"  # the ring around the picked node
FADED_ALPHA = 0.25
EDGE_KINDS = ("q", "k", "v", "other")


# Edge colours by theme, (kind, sign) -> colour, sign 1 positive (strong), -1 negative (faint).
EDGE_COLOURS: dict[str, dict[tuple[str, int], str]] = {
    "light": {
        ("q", 1): "#1d4ed8", ("q", -1): "#93c5fd",
        ("k", 1): "#15803d", ("k", -1): "#86efac",
        ("v", 1): "#7e22ce", ("v", -1): "#d8b4fe",
        ("other", 1): "#374151", ("other", -1): "#d1d5db",
    },
    "dark": {
        ("q", 1): "#60a5fa", ("q", -1): "#1e40af",
        ("k", 1): "#4ade80", ("k", -1): "#166534",
        ("v", 1): "#c084fc", ("v", -1): "#6b21a8",
        ("other", 1): "#e5e7eb", ("other", -1): "#4b5563",
    },
}
THEMES = tuple(EDGE_COLOURS)
# Curvature per kind so the three edges into one head do not overlap.
_CURVE = {"q": 0.18, "k": 0.0, "v": -0.18, "other": 0.06}


def node_kind(name: str) -> str:
    if name == "input" or name == "logits":
        return name
    return "head" if name.startswith("a") else "mlp"


def edge_kind(dst_name: str) -> str:
    """``q``, ``k`` or ``v`` for an edge into a head input, else ``other``."""
    m = re.search(r"<([qkv])>$", dst_name)
    return m.group(1) if m else "other"


@lru_cache(maxsize=16)
def node_positions(graph: Graph) -> dict[str, tuple[float, float]]:
    """``{node: (x, level)}``: level 0 is ``input``, the top level is ``logits`` (bigger is higher).
    Heads of a layer sit on one row around x = 0; MLPs on the row above, in a column to the right (on
    the heads' row for parallel attention/MLP), so the residual path input -> logits stays clear."""
    L, H = graph.cfg.n_layers, graph.cfg.n_heads
    parallel = graph.cfg.parallel_attn_mlp
    pos: dict[str, tuple[float, float]] = {"input": (0.0, 0.0)}
    per_layer = 1 if parallel else 2
    right = (H - 1) / 2 + 1.0
    for layer in range(L):
        base = 1 + per_layer * layer
        for h in range(H):
            pos[f"a{layer}.h{h}"] = (h - (H - 1) / 2, float(base))
        pos[f"m{layer}"] = (right, float(base if parallel else base + 1))
    pos["logits"] = (0.0, float(1 + per_layer * L))
    return pos


@dataclass(frozen=True)
class DrawnEdge:
    src: str
    dst: str  # destination node (a0.h1, m0, logits)
    kind: str  # q, k, v, other
    score: float
    name: str  # parent->child<q>


def circuit_edges(scores: Scores, circuit: Circuit, max_edges: int | None = None) -> list[DrawnEdge]:
    """The circuit's edges, largest ``|score|`` first (at most ``max_edges``)."""
    graph = scores.graph
    mask = circuit.edges.cpu() & graph.real_edge_mask
    rows, cols = mask.nonzero(as_tuple=True)
    values = scores.edges.detach().float().cpu()[rows, cols]
    order = torch.argsort(values.abs().nan_to_num(0.0), descending=True, stable=True)
    if max_edges is not None:
        order = order[:max_edges]
    out = []
    for i in order.tolist():
        r, c = int(rows[i]), int(cols[i])
        dst_name = graph.dst_nodes[c]
        out.append(DrawnEdge(graph.src_nodes[r], graph.dst_node_of_column[c], edge_kind(dst_name), float(values[i]), graph.edge_name(r, c)))
    return out


def curvature(edge: DrawnEdge, pos: dict[str, tuple[float, float]]) -> float:
    """Signed bend of an edge: q/k/v edges into one head bend apart; long 'other' edges bend more so
    that they do not run through the nodes in between."""
    if edge.kind != "other":
        return _CURVE[edge.kind]
    span = pos[edge.dst][1] - pos[edge.src][1]
    return round(min(0.3, _CURVE["other"] + 0.04 * max(0.0, span - 1)), 2)


def edge_colour(edge: DrawnEdge, theme: str = "light") -> str:
    return EDGE_COLOURS[theme][(edge.kind, 1 if edge.score >= 0 else -1)]


def width(score: float, top: float, lo: float = 1.0, hi: float = 8.0) -> float:
    """Line width growing with ``sqrt(|score| / top)`` (a linear scale leaves all but a few edges hairlines)."""
    if not math.isfinite(score) or top <= 0:
        return lo
    return lo + (hi - lo) * math.sqrt(min(abs(score) / top, 1.0))


def top_score(edges: Sequence[DrawnEdge]) -> float:
    return max((abs(e.score) for e in edges if math.isfinite(e.score)), default=0.0)


def nodes_of(edges: Sequence[DrawnEdge]) -> list[str]:
    """The nodes the edges touch (``input`` and ``logits`` for an empty circuit), in order of appearance."""
    seen: dict[str, None] = {}
    for e in edges:
        seen.setdefault(e.src)
        seen.setdefault(e.dst)
    return list(seen) or ["input", "logits"]


@dataclass(frozen=True)
class GraphStyle:
    """How a circuit is drawn: nodes outside it ``faded`` (else left out, keeping their place), each edge
    labelled with its score (``edge_labels``), and the ``picked`` node ringed."""

    faded: bool = False
    edge_labels: bool = False
    picked: str | None = None


@dataclass(frozen=True)
class NodeSizes:
    """``strength``: each source node's size measure (>= 0; ``logits`` has none), ``what``: which measure."""

    strength: dict[str, float]
    what: str

    def fraction(self, name: str) -> float | None:
        """``sqrt(strength / largest)`` in [0, 1] (area grows with the measure); ``None`` for ``logits``."""
        if name not in self.strength:
            return None
        top = max(self.strength.values(), default=0.0)
        return math.sqrt(self.strength[name] / top) if top > 0 else 0.0

    def caption(self) -> str:
        return f"node size: {self.what}"


def node_sizes(scores: Scores) -> NodeSizes:
    """Each node's size measure, from the whole graph (so it does not change with the circuit): ``|node
    score|`` when the scores have node scores, else the sum of ``|score|`` of its outgoing edges in the graph.
    Unscored nodes (NaN) get 0."""
    graph = scores.graph
    if scores.nodes is not None and not bool(scores.nodes.isnan().all()):
        values, what = scores.nodes.detach().double().cpu().abs(), "|node score|"
    else:
        edges = scores.edges.detach().double().cpu().abs() * graph.real_edge_mask
        values, what = edges.nan_to_num(0.0).sum(1), "sum of |outgoing edge scores|"
    values = values.nan_to_num(0.0).tolist()
    return NodeSizes(dict(zip(graph.src_nodes, values)), what)


def in_circuit(edges: Sequence[DrawnEdge]) -> set[str]:
    """The nodes drawn as part of the circuit: those its drawn edges touch, and always ``input`` and ``logits``."""
    return set(nodes_of(edges)) | {"input", "logits"}


def edge_label(edge: DrawnEdge) -> str:
    return f"{edge.score:+.3g}"


def legend_items(sizes: NodeSizes, style: GraphStyle, theme: str = "light") -> list[tuple[str, str, str]]:
    """``(kind, colour, text)`` entries of the picture's legend: ``node`` (a filled dot), ``edge`` and
    ``edge-`` (a solid and a dashed line in the theme's colour), ``ring`` (the picked node) and ``note``."""
    rows = [("node", NODE_COLOURS[k], label) for k, label in
            (("input", "input"), ("head", "attention head"), ("mlp", "MLP"), ("logits", "logits"))]
    rows += [("edge", EDGE_COLOURS[theme][(k, 1)], f"{k} +") for k in EDGE_KINDS]
    rows += [("edge-", EDGE_COLOURS[theme][(k, -1)], f"{k} −") for k in EDGE_KINDS]
    rows.append(("note", "", f"{sizes.caption()}; edge width: |score|"))
    rows.append(("note", "", "faded: outside the circuit" if style.faded else "nodes outside the circuit hidden"))
    if style.picked:
        rows.append(("ring", PICKED, f"picked: {style.picked}"))
    return rows
