"""Pictures of scores and circuits, without Streamlit: an offline pyvis page, static PNGs (matplotlib +
networkx, no browser or system package), plotly figures, and a token-level diff of a prompt pair.

Layout: ``input`` at the bottom, ``logits`` at the top; each layer's heads on one row with its MLP on
the row above (on the same row, to the right, for parallel attention/MLP models). Edges are coloured by
the input they feed (q, k, v or other: MLP/logits) and by the sign of their score (dark positive, light
negative and dashed); their width grows with ``|score|``.
"""

from __future__ import annotations

import functools
import html
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from eapcore.circuit import Circuit, Scores
from eapcore.graph import Graph

NODE_COLOURS = {"input": "#6b7280", "head": "#f59e0b", "mlp": "#14b8a6", "logits": "#ef4444"}
# (kind, sign) -> colour; positive dark, negative light.
EDGE_COLOURS = {
    ("q", 1): "#1d4ed8", ("q", -1): "#93c5fd",
    ("k", 1): "#15803d", ("k", -1): "#86efac",
    ("v", 1): "#7e22ce", ("v", -1): "#d8b4fe",
    ("other", 1): "#374151", ("other", -1): "#d1d5db",
}
EDGE_KINDS = ("q", "k", "v", "other")
# Curvature per kind so the three edges into one head do not overlap.
_CURVE = {"q": 0.18, "k": 0.0, "v": -0.18, "other": 0.06}
X_SPACING, Y_SPACING = 170, 95


# ----- layout and edge lists -----


def node_kind(name: str) -> str:
    if name == "input" or name == "logits":
        return name
    return "head" if name.startswith("a") else "mlp"


def edge_kind(dst_name: str) -> str:
    """``q``, ``k`` or ``v`` for an edge into a head input, else ``other``."""
    m = re.search(r"<([qkv])>$", dst_name)
    return m.group(1) if m else "other"


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


def _curvature(edge: DrawnEdge, pos: dict[str, tuple[float, float]]) -> float:
    """Signed bend of an edge: q/k/v edges into one head bend apart; long 'other' edges bend more so
    that they do not run through the nodes in between."""
    if edge.kind != "other":
        return _CURVE[edge.kind]
    span = pos[edge.dst][1] - pos[edge.src][1]
    return round(min(0.3, _CURVE["other"] + 0.04 * max(0.0, span - 1)), 2)


def _edge_colour(edge: DrawnEdge) -> str:
    return EDGE_COLOURS[(edge.kind, 1 if edge.score >= 0 else -1)]


def _width(score: float, top: float, lo: float = 1.0, hi: float = 8.0) -> float:
    """Line width growing with ``sqrt(|score| / top)`` (a linear scale leaves all but a few edges hairlines)."""
    if not math.isfinite(score) or top <= 0:
        return lo
    return lo + (hi - lo) * math.sqrt(min(abs(score) / top, 1.0))


def _nodes_of(edges: Sequence[DrawnEdge]) -> list[str]:
    seen: dict[str, None] = {}
    for e in edges:
        seen.setdefault(e.src)
        seen.setdefault(e.dst)
    return list(seen)


# ----- pyvis (interactive, offline) -----

_REMOTE_TAG = re.compile(
    r"<link\b[^>]*href=\"https?://[^\"]*\"[^>]*>|<script\b[^>]*src=\"https?://[^\"]*\"[^>]*>\s*</script>",
    re.IGNORECASE | re.DOTALL,
)
_EMPTY_HEADING = re.compile(r"<center>\s*<h1>\s*</h1>\s*</center>", re.IGNORECASE)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)


def strip_remote_resources(page: str) -> str:
    """Remove ``<link href=http...>`` and ``<script src=http...></script>`` tags (pyvis's Bootstrap CDN)."""
    return _COMMENT.sub("", _EMPTY_HEADING.sub("", _REMOTE_TAG.sub("", page)))


def pyvis_html(scores: Scores, circuit: Circuit, height_px: int = 620, max_edges: int = 600) -> str:
    """A self-contained HTML page (vis-network inlined, no CDN) drawing ``circuit`` with its scores."""
    from pyvis.network import Network

    graph = scores.graph
    edges = circuit_edges(scores, circuit, max_edges)
    pos = node_positions(graph)
    net = Network(height=f"{height_px - 20}px", width="100%", directed=True, cdn_resources="remote", bgcolor="#ffffff")
    names = _nodes_of(edges) or ["input", "logits"]
    strength: dict[str, float] = {}
    for e in edges:
        strength[e.src] = strength.get(e.src, 0.0) + abs(e.score)
    for name in sorted(names, key=lambda n: (pos[n][1], pos[n][0])):
        x, level = pos[name]
        kind = node_kind(name)
        title = f"{name} ({kind})" + (f"\nsum |score| of outgoing edges: {strength[name]:.4g}" if name in strength else "")
        net.add_node(
            name, label=name, title=title, color=NODE_COLOURS[kind], x=x * X_SPACING, y=-level * Y_SPACING,
            shape="box" if kind in ("input", "logits") else "ellipse", font={"color": "#111827", "size": 18},
            physics=False,
        )
    top = max((abs(e.score) for e in edges if math.isfinite(e.score)), default=0.0)
    for e in edges:
        curve = _curvature(e, pos)
        smooth = {"enabled": True, "type": "curvedCW" if curve >= 0 else "curvedCCW", "roundness": abs(curve)}
        net.add_edge(
            e.src, e.dst, title=f"{e.name}\nscore {e.score:+.4g}", color=_edge_colour(e), width=_width(e.score, top),
            dashes=e.score < 0, smooth=smooth if curve else {"enabled": False}, arrows="to",
        )
    net.toggle_physics(False)
    net.set_options(
        '{"physics": {"enabled": false}, "interaction": {"hover": true, "tooltipDelay": 80, "navigationButtons": false},'
        ' "edges": {"arrows": {"to": {"scaleFactor": 0.5}}}}'
    )
    # Rendered with the small "remote" template, then the CDN tags are swapped for the library inlined
    # (pyvis's "in_line" mode re-lexes the 500 kB library through jinja on every call: ~0.1 s).
    page = strip_remote_resources(net.generate_html(notebook=False))
    js, css = _vis_library()
    return page.replace("<head>", f"<head>\n<style>{css}</style>\n<script>{js}</script>", 1)


@functools.cache
def _vis_library() -> tuple[str, str]:
    """vis-network's JavaScript and CSS as shipped inside the pyvis package (read once)."""
    import pyvis

    lib = Path(pyvis.__file__).parent / "lib" / "vis-9.1.2"
    js = (lib / "vis-network.min.js").read_text(encoding="utf-8")
    if "</script" in js.lower():
        raise RuntimeError("the bundled vis-network script cannot be inlined")
    return js, (lib / "vis-network.css").read_text(encoding="utf-8")


# ----- static PNGs -----


def _figure_png(fig: Any, dpi: int = 130) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def circuit_png(scores: Scores, circuit: Circuit, max_edges: int = 600, title: str | None = None) -> bytes:
    """A PNG of the circuit with the same layout and colours as :func:`pyvis_html` (matplotlib + networkx)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import networkx as nx
    from matplotlib.lines import Line2D

    graph = scores.graph
    edges = circuit_edges(scores, circuit, max_edges)
    pos = node_positions(graph)
    names = _nodes_of(edges) or ["input", "logits"]
    xy = {n: (pos[n][0], pos[n][1]) for n in names}
    g = nx.MultiDiGraph()
    g.add_nodes_from(names)
    levels = max(p[1] for p in xy.values()) + 1
    spread = max(p[0] for p in pos.values()) - min(p[0] for p in pos.values()) + 1
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * spread + 2), max(5.0, 0.9 * levels + 1.5)))
    top = max((abs(e.score) for e in edges if math.isfinite(e.score)), default=0.0)
    groups: dict[tuple[str, int, float], list[DrawnEdge]] = {}
    for e in edges:
        groups.setdefault((e.kind, 1 if e.score >= 0 else -1, _curvature(e, pos)), []).append(e)
    for (kind, sign, rad), group in sorted(groups.items(), key=lambda kv: (kv[0][1] == 1, kv[0])):
        pairs = [(e.src, e.dst) for e in group]
        g.add_edges_from(pairs)
        nx.draw_networkx_edges(
            g, xy, edgelist=pairs, ax=ax, edge_color=EDGE_COLOURS[(kind, sign)],
            width=[_width(e.score, top, 0.6, 5.0) for e in group], style="solid" if sign == 1 else "dashed",
            arrows=True, arrowsize=9, connectionstyle=f"arc3,rad={rad}", node_size=900, alpha=0.9,
        )
    for kind in ("input", "head", "mlp", "logits"):
        group = [n for n in names if node_kind(n) == kind]
        nx.draw_networkx_nodes(g, xy, nodelist=group, ax=ax, node_color=NODE_COLOURS[kind], node_size=900,
                               node_shape="s" if kind in ("input", "logits") else "o", edgecolors="#111827", linewidths=0.6)
    nx.draw_networkx_labels(g, xy, labels={n: n for n in names}, ax=ax, font_size=7)
    handles = [Line2D([0], [0], color=EDGE_COLOURS[(k, 1)], lw=2, label=f"{k} (+)") for k in EDGE_KINDS]
    handles += [Line2D([0], [0], color=EDGE_COLOURS[(k, -1)], lw=2, ls="--", label=f"{k} (-)") for k in EDGE_KINDS]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    ax.set_title(title or f"circuit: {circuit.n_edges} edges, {circuit.n_nodes} nodes", fontsize=10)
    ax.axis("off")
    return _figure_png(fig)


def curve_png(
    curve: Any, fine: Any | None = None, marker: tuple[float, float] | None = None, unit: str = "edges", title: str | None = None
) -> bytes:
    """A PNG of faithfulness against the percentage of edges kept (log axis); ``curve`` and ``fine`` are
    :class:`~eapcore.curve.Curve`; ``marker`` is ``(percent, faithfulness)`` of the current circuit."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if fine is not None:
        ax.plot(fine.percents, fine.faithfulness, "-", color="#93c5fd", lw=1.5, label="finer grid")
    ax.plot(curve.percents, curve.faithfulness, "o-", color="#1d4ed8", lw=1.8, ms=5, label="MIB sizes")
    if marker is not None:
        ax.plot([marker[0]], [marker[1]], "*", color="#ef4444", ms=14, label="current circuit")
    ax.axhline(1.0, color="#6b7280", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel(f"{unit} kept (% of the graph)")
    ax.set_ylabel("faithfulness")
    ax.set_title(title or f"CPR {curve.cpr:.3f}   CMD {curve.cmd:.3f}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    return _figure_png(fig)


# ----- plotly -----


def heatmap_figure(scores: Scores) -> Any:
    """Plotly heatmap of edge scores, sources (rows) x destinations (columns); non-edges blank."""
    import plotly.graph_objects as go

    graph = scores.graph
    z = scores.edges.detach().double().cpu().clone()
    z[~graph.real_edge_mask] = float("nan")
    top = float(z.nan_to_num(0.0).abs().max()) or 1.0
    fig = go.Figure(
        go.Heatmap(
            z=z.tolist(), x=list(graph.dst_nodes), y=list(graph.src_nodes), colorscale="RdBu", zmid=0.0,
            zmin=-top, zmax=top, hovertemplate="%{y} -> %{x}<br>score %{z:.4g}<extra></extra>",
            colorbar={"title": {"text": "score"}}, hoverongaps=False,
        )
    )
    fig.update_layout(
        xaxis={"title": "destination (input of)", "tickangle": -60, "tickfont": {"size": 9}},
        yaxis={"title": "source (output of)", "autorange": "reversed", "tickfont": {"size": 9}},
        height=max(360, 16 * graph.n_forward + 160), margin={"l": 60, "r": 20, "t": 30, "b": 100},
    )
    return fig


def curve_figure(curve: Any, fine: Any | None = None, marker: tuple[float, float] | None = None, unit: str = "edges") -> Any:
    """Plotly faithfulness curve (log x axis) at the MIB sizes and a finer grid, with the current circuit."""
    import plotly.graph_objects as go

    fig = go.Figure()
    if fine is not None:
        fig.add_trace(go.Scatter(
            x=list(fine.percents), y=list(fine.faithfulness), mode="lines", name="finer grid", line={"color": "#93c5fd"},
            customdata=list(fine.n_edges), hovertemplate=f"%{{x:.3g}}% (%{{customdata}} {unit})<br>f = %{{y:.4f}}<extra></extra>",
        ))
    fig.add_trace(go.Scatter(
        x=list(curve.percents), y=list(curve.faithfulness), mode="lines+markers", name="MIB sizes",
        line={"color": "#1d4ed8"}, customdata=list(curve.n_edges),
        hovertemplate=f"%{{x:.3g}}% (%{{customdata}} {unit})<br>f = %{{y:.4f}}<extra></extra>",
    ))
    if marker is not None:
        fig.add_trace(go.Scatter(
            x=[marker[0]], y=[marker[1]], mode="markers", name="current circuit",
            marker={"symbol": "star", "size": 16, "color": "#ef4444"},
            hovertemplate="current: %{x:.3g}%<br>f = %{y:.4f}<extra></extra>",
        ))
    fig.add_hline(y=1.0, line={"dash": "dot", "color": "#6b7280", "width": 1})
    fig.update_layout(
        xaxis={"type": "log", "title": f"{unit} kept (% of the graph)"}, yaxis={"title": "faithfulness"},
        height=380, margin={"l": 50, "r": 20, "t": 40, "b": 50},
        title={"text": f"CPR {curve.cpr:.3f} (higher is better) · CMD {curve.cmd:.3f} (lower is better)", "font": {"size": 13}},
        legend={"orientation": "h", "y": -0.25},
    )
    return fig


# ----- edge-count grids -----


def log_grid(n_max: int, n_points: int = 120, dense_until: int = 300) -> list[int]:
    """Slider positions ``0..n_max``: every integer for small graphs, else a log-spaced set of integers
    (always including 0, 1 and ``n_max``)."""
    if n_max <= dense_until:
        return list(range(n_max + 1))
    values = {0, 1, n_max}
    for i in range(n_points):
        values.add(int(round(math.exp(math.log(n_max) * i / (n_points - 1)))))
    return sorted(v for v in values if 0 <= v <= n_max)


# ----- token-level diff of a prompt pair -----


def token_diff(tokenizer: Any, clean: str, corrupted: str) -> list[tuple[str, str, bool]]:
    """``[(clean_token, corrupted_token, differs)]`` position by position (no BOS); the shorter prompt
    is padded with ``''`` so a length mismatch shows."""
    def pieces(text: str) -> list[str]:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return [tokenizer.decode([i]) for i in ids]

    a, b = pieces(clean), pieces(corrupted)
    n = max(len(a), len(b))
    a += [""] * (n - len(a))
    b += [""] * (n - len(b))
    return [(x, y, x != y) for x, y in zip(a, b)]


def token_diff_html(rows: Sequence[tuple[str, str, bool]], unk: str | None = None) -> str:
    """Two aligned rows of token chips; differing tokens highlighted, unknown tokens outlined in red."""
    def chip(tok: str, differs: bool, side: str) -> str:
        bg = ("#fde68a" if side == "clean" else "#fecaca") if differs else "#f3f4f6"
        border = "2px solid #dc2626" if unk is not None and tok.strip() == unk else "1px solid #d1d5db"
        text = html.escape(tok.replace(" ", "·")) if tok else "∅"
        return (f'<span style="display:inline-block;margin:1px;padding:0 4px;border-radius:4px;background:{bg};'
                f'border:{border};font-family:monospace;font-size:0.85em">{text}</span>')

    clean = "".join(chip(a, d, "clean") for a, _, d in rows)
    corr = "".join(chip(b, d, "corrupted") for _, b, d in rows)
    label = 'style="display:inline-block;width:5.5em;font-size:0.8em;color:#6b7280"'
    return f'<div><span {label}>clean</span>{clean}</div><div><span {label}>corrupted</span>{corr}</div>'
