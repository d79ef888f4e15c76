"""Pictures of scores and circuits for the pages and the downloads: plotly figures (heatmap of edge
scores, bars of node scores, the faithfulness curve), static PNGs (matplotlib + networkx: no browser or
system package) titled and tagged with where they came from, a table of neuron scores and token chips.

Plotly figures take their background and fonts from the app's theme (light or dark); the colours set
here read on both. PNGs are always drawn on white.
"""

from __future__ import annotations

import html
import io
from typing import Any, Sequence

from eapcore.circuit import Circuit, Scores
from eapcore.select import EDGES
from ui.layout import (
    EDGE_COLOURS, FADED_ALPHA, NODE_COLOURS, PICKED, GraphStyle, circuit_edges, curvature, edge_label, in_circuit,
    legend_items, node_kind, node_positions, node_sizes, top_score, width,
)

CURVE, FINE, MARKER, GUIDE = "#3b82f6", "#93c5fd", "#ef4444", "#9ca3af"
PERCENT_TICKS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)


def percent_label(p: float) -> str:
    return f"{p:g}%"


# ----- static PNGs -----


def _png(fig: Any, title: str, description: str = "", dpi: int = 130) -> bytes:
    """The figure as PNG bytes, with ``title`` and ``description`` also stored as PNG text chunks."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight",
                metadata={"Title": title, "Description": description or title, "Software": "eapcore"})
    plt.close(fig)
    return buf.getvalue()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def circuit_png(scores: Scores, circuit: Circuit, max_edges: int = 600, title: str | None = None,
                style: GraphStyle = GraphStyle()) -> bytes:
    """A PNG of the circuit with the same layout, sizes, colours and ``style`` as the interactive graph
    (light theme), its legend beside it."""
    plt = _pyplot()
    import networkx as nx
    from matplotlib import patheffects

    graph = scores.graph
    edges = circuit_edges(scores, circuit, max_edges)
    pos, sizes = node_positions(graph), node_sizes(scores)
    inside = in_circuit(edges)
    drawn = [n for n in graph.node_names if n in inside or style.faded or n == style.picked]
    area = {n: 900.0 if sizes.fraction(n) is None or node_kind(n) == "input" else (12 + 30 * sizes.fraction(n)) ** 2
            for n in drawn}
    g = nx.MultiDiGraph()
    g.add_nodes_from(drawn)
    xs, levels = [p[0] for p in pos.values()], [p[1] for p in pos.values()]
    spread, height = max(xs) - min(xs) + 1, max(levels) + 1
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * spread + 2.5), max(5.0, 0.9 * height + 1.5)))
    top = top_score(edges)
    groups: dict[tuple[str, int, float], list] = {}
    for e in edges:
        groups.setdefault((e.kind, 1 if e.score >= 0 else -1, curvature(e, pos)), []).append(e)
    for (kind, sign, rad), group in sorted(groups.items(), key=lambda kv: (kv[0][1] == 1, kv[0])):
        pairs = [(e.src, e.dst) for e in group]
        g.add_edges_from(pairs)
        nx.draw_networkx_edges(
            g, pos, edgelist=pairs, ax=ax, edge_color=EDGE_COLOURS["light"][(kind, sign)],
            width=[width(e.score, top, 0.6, 5.0) for e in group], style="solid" if sign == 1 else "dashed",
            arrows=True, arrowsize=9, connectionstyle=f"arc3,rad={rad}", nodelist=drawn,
            node_size=[area[n] for n in drawn], alpha=0.9,
        )
        if style.edge_labels:
            nx.draw_networkx_edge_labels(
                nx.DiGraph(pairs), pos, edge_labels={(e.src, e.dst): edge_label(e) for e in group}, ax=ax, font_size=6,
                connectionstyle=f"arc3,rad={rad}",
                bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8},
            )
    for name in drawn:
        kind = node_kind(name)
        shape = "s" if kind in ("input", "logits") else "o"
        nx.draw_networkx_nodes(g, pos, nodelist=[name], ax=ax, node_color=NODE_COLOURS[kind], node_size=area[name],
                               node_shape=shape, alpha=1.0 if name in inside else FADED_ALPHA, edgecolors="#111827",
                               linewidths=0.6)
        if name == style.picked:
            nx.draw_networkx_nodes(g, pos, nodelist=[name], ax=ax, node_color="none", node_size=area[name] + 250,
                                   node_shape=shape, edgecolors=PICKED, linewidths=3.0)
        text = ax.text(*pos[name], name, fontsize=7, ha="center", va="center", alpha=1.0 if name in inside else 0.5)
        text.set_path_effects([patheffects.withStroke(linewidth=2, foreground="white")])
    ax.legend(handles=_legend_handles(legend_items(sizes, style)), loc="upper left", bbox_to_anchor=(1.0, 1.0),
              fontsize=7, frameon=False)
    ax.set_xlim(min(xs) - 0.8, max(xs) + 0.8)
    ax.set_ylim(min(levels) - 0.6, max(levels) + 0.6)
    title = title or f"circuit: {circuit.n_edges} edges, {circuit.n_nodes} nodes"
    ax.set_title(title, fontsize=9, wrap=True)
    ax.axis("off")
    return _png(fig, title)


def _legend_handles(items: list[tuple[str, str, str]]) -> list:
    """Matplotlib legend entries for :func:`ui.layout.legend_items`."""
    from matplotlib.lines import Line2D

    def handle(kind: str, colour: str, text: str) -> Line2D:
        if kind == "node":
            return Line2D([], [], ls="", marker="o", ms=7, mfc=colour, mec="#111827", mew=0.6, label=text)
        if kind == "ring":
            return Line2D([], [], ls="", marker="o", ms=7, mfc="none", mec=colour, mew=2.5, label=text)
        if kind.startswith("edge"):
            return Line2D([], [], color=colour, lw=2, ls="--" if kind == "edge-" else "-", label=text)
        return Line2D([], [], ls="", label=text)

    return [handle(*item) for item in items]


def curve_png(curve: Any, fine: Any | None = None, marker: tuple[float, float] | None = None, unit: str = EDGES,
              title: str | None = None, total: int | None = None) -> bytes:
    """A PNG of the faithfulness curve (see :func:`curve_figure` for the arguments)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    x = _x_of(unit, total)
    if fine is not None:
        ax.plot(x(fine), fine.faithfulness, "-", color=FINE, lw=1.5, label="finer grid")
    ax.plot(x(curve), curve.faithfulness, "o-", color=CURVE, lw=1.8, ms=5, label="MIB sizes")
    if marker is not None:
        ax.plot([_marker_x(marker, unit, total)], [marker[1]], "*", color=MARKER, ms=14, label="current circuit")
    ax.axhline(1.0, color=GUIDE, lw=0.8, ls=":")
    if unit == EDGES:
        ax.set_xscale("log")
        ax.set_xticks(PERCENT_TICKS, [percent_label(p) for p in PERCENT_TICKS])
        ax.minorticks_off()
    ax.set_xlabel(_x_title(unit, total))
    ax.set_ylabel("faithfulness")
    scores_line = f"CPR {curve.cpr:.3f} (higher is better), CMD {curve.cmd:.3f} (lower is better)"
    ax.set_title(f"{title}\n{scores_line}" if title else scores_line, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    return _png(fig, title or scores_line, f"{title or ''} {scores_line}".strip())


def _x_of(unit: str, total: int | None):
    """Curves are drawn against the percentage of edges (log axis) or the number of nodes (linear)."""
    if unit == EDGES:
        return lambda c: list(c.percents)
    return lambda c: list(c.n_edges)


def _marker_x(marker: tuple[float, float], unit: str, total: int | None) -> float:
    return marker[0] if unit == EDGES or not total else marker[0] * total / 100


def _x_title(unit: str, total: int | None) -> str:
    if unit == EDGES:
        return "edges kept (% of the graph's edges, log scale)"
    return f"nodes kept (of {total} scored nodes)" if total else "nodes kept"


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
        xaxis={"title": {"text": "destination (input of)", "font": {"size": 14}}, "tickangle": -60, "tickfont": {"size": 12}},
        yaxis={"title": {"text": "source (output of)", "font": {"size": 14}}, "autorange": "reversed",
               "tickfont": {"size": 12}},
        height=max(420, 20 * graph.n_forward + 200), margin={"l": 70, "r": 20, "t": 30, "b": 120},
    )
    return fig


def node_bars_figure(scores: Scores) -> Any:
    """Plotly bars of node scores, in graph order (``input``, then per layer its heads and its MLP),
    coloured by kind; unscored nodes are left out."""
    import plotly.graph_objects as go

    graph = scores.graph
    values = scores.nodes.detach().double().cpu().tolist()
    names = [n for n, v in zip(graph.src_nodes, values) if v == v]
    kept = [v for v in values if v == v]
    fig = go.Figure(go.Bar(
        x=names, y=kept, marker={"color": [NODE_COLOURS[node_kind(n)] for n in names]},
        hovertemplate="%{x}<br>score %{y:.4g}<extra></extra>",
    ))
    fig.update_layout(
        xaxis={"title": {"text": "node (input, then each layer's heads and MLP)", "font": {"size": 14}},
               "tickangle": -60, "tickfont": {"size": 12}, "type": "category"},
        yaxis={"title": {"text": "node score", "font": {"size": 14}}, "tickfont": {"size": 12}, "zeroline": True},
        height=420, margin={"l": 70, "r": 20, "t": 30, "b": 110}, bargap=0.15,
    )
    return fig


def neuron_table(scores: Scores, k: int = 5) -> Any:
    """A table (pandas) of each node's score and its ``k`` dimensions with the largest ``|score|``."""
    import pandas as pd

    graph = scores.graph
    neurons = scores.neurons.detach().double().cpu()
    rows = []
    for i, name in enumerate(graph.src_nodes):
        order = neurons[i].abs().argsort(descending=True)[:k].tolist()
        dims = " · ".join(f"d{d} {neurons[i, d].item():+.3g}" for d in order)
        rows.append({"node": name, "node score": float(neurons[i].sum()), f"top {k} dimensions (by |score|)": dims})
    return pd.DataFrame(rows)


def curve_figure(curve: Any, fine: Any | None = None, marker: tuple[float, float] | None = None,
                 unit: str = EDGES, total: int | None = None) -> Any:
    """Plotly faithfulness curve at the MIB sizes and a finer grid, with the current circuit.

    ``curve`` and ``fine`` are :class:`~eapcore.evaluate.Curve`; ``marker`` is ``(percent, faithfulness)``.
    Edge curves use a log axis of percentages (labelled in full); node curves use whole node counts
    (``total`` nodes), since a percentage of a few dozen nodes is always a whole number of them."""
    import plotly.graph_objects as go

    x = _x_of(unit, total)
    hover = f"%{{customdata[0]}} {unit} (%{{customdata[1]:.3g}}%)<br>f = %{{y:.4f}}<extra></extra>"
    fig = go.Figure()
    if fine is not None:
        fig.add_trace(go.Scatter(
            x=x(fine), y=list(fine.faithfulness), mode="lines", name="finer grid", line={"color": FINE},
            customdata=list(zip(fine.n_edges, fine.percents)), hovertemplate=hover,
        ))
    fig.add_trace(go.Scatter(
        x=x(curve), y=list(curve.faithfulness), mode="lines+markers", name="MIB sizes", line={"color": CURVE},
        customdata=list(zip(curve.n_edges, curve.percents)), hovertemplate=hover,
    ))
    if marker is not None:
        fig.add_trace(go.Scatter(
            x=[_marker_x(marker, unit, total)], y=[marker[1]], mode="markers", name="current circuit",
            marker={"symbol": "star", "size": 16, "color": MARKER},
            hovertemplate="current circuit<br>f = %{y:.4f}<extra></extra>",
        ))
    fig.add_hline(y=1.0, line={"dash": "dot", "color": GUIDE, "width": 1})
    xaxis: dict[str, Any] = {"title": {"text": _x_title(unit, total)}}
    if unit == EDGES:
        xaxis.update(type="log", tickvals=list(PERCENT_TICKS), ticktext=[percent_label(p) for p in PERCENT_TICKS])
    fig.update_layout(
        xaxis=xaxis, yaxis={"title": {"text": "faithfulness"}},
        height=380, margin={"l": 50, "r": 20, "t": 40, "b": 50},
        title={"text": f"CPR {curve.cpr:.3f} (higher is better) · CMD {curve.cmd:.3f} (lower is better)", "font": {"size": 13}},
        legend={"orientation": "h", "y": -0.25},
    )
    return fig


# ----- token chips -----


def token_diff_html(rows: Sequence[tuple[str, str, bool]], unk: str | None = None) -> str:
    """Two aligned rows of token chips; differing tokens highlighted, unknown tokens outlined in red.
    The chips carry their own text colour, so they read on light and dark pages."""
    def chip(tok: str, differs: bool, side: str) -> str:
        bg = ("#fde68a" if side == "clean" else "#fecaca") if differs else "#f3f4f6"
        border = "2px solid #dc2626" if unk is not None and tok.strip() == unk else "1px solid #d1d5db"
        text = html.escape(tok.replace(" ", "·")) if tok else "∅"
        return (f'<span style="display:inline-block;margin:1px;padding:0 4px;border-radius:4px;background:{bg};'
                f'color:#111827;border:{border};font-family:monospace;font-size:0.85em">{text}</span>')

    clean = "".join(chip(a, d, "clean") for a, _, d in rows)
    corr = "".join(chip(b, d, "corrupted") for _, b, d in rows)
    label = 'style="display:inline-block;width:5.5em;font-size:0.8em;color:#6b7280"'
    return f'<div><span {label}>clean</span>{clean}</div><div><span {label}>corrupted</span>{corr}</div>'


# ----- trust checks: runs compared, estimates verified, prompts, interventions -----

RUNS = ("#3b82f6", "#f97316", "#10b981", "#a855f7", "#ef4444", "#eab308", "#06b6d4", "#ec4899")
COMPLEMENT = "#9ca3af"


def curves_figure(curves: dict[str, Any]) -> Any:
    """The faithfulness curves of several runs (label -> :class:`~eapcore.curve.Curve`) on one log axis of
    percentages of the graph's edges."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, (label, curve) in enumerate(curves.items()):
        fig.add_trace(go.Scatter(
            x=list(curve.percents), y=list(curve.faithfulness), mode="lines+markers", name=label,
            line={"color": RUNS[i % len(RUNS)]}, customdata=list(zip(curve.n_edges, curve.percents)),
            hovertemplate=f"{html.escape(label)}<br>%{{customdata[0]}} edges (%{{customdata[1]:.3g}}%)<br>"
                          "f = %{y:.4f}<extra></extra>",
        ))
    fig.add_hline(y=1.0, line={"dash": "dot", "color": GUIDE, "width": 1})
    fig.update_layout(
        xaxis={"title": {"text": _x_title(EDGES, None)}, "type": "log", "tickvals": list(PERCENT_TICKS),
               "ticktext": [percent_label(p) for p in PERCENT_TICKS]},
        yaxis={"title": {"text": "faithfulness"}}, height=400, margin={"l": 50, "r": 20, "t": 30, "b": 50},
        legend={"orientation": "h", "y": -0.25},
    )
    return fig


def overlap_figure(labels: Sequence[str], overlap: Sequence[Sequence[float]], size: str) -> Any:
    """Heatmap of the circuits' pairwise overlap (intersection over union, 0 to 1) at one size."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Heatmap(
        z=[list(row) for row in overlap], x=list(labels), y=list(labels), zmin=0.0, zmax=1.0, colorscale="Blues",
        text=[[f"{v:.2f}" for v in row] for row in overlap], texttemplate="%{text}",
        hovertemplate="%{y}<br>%{x}<br>overlap (IoU) %{z:.3f}<extra></extra>", colorbar={"title": {"text": "IoU"}},
    ))
    fig.update_layout(title={"text": f"Overlap of the circuits at {size}", "font": {"size": 13}},
                      yaxis={"autorange": "reversed"}, height=max(300, 60 * len(labels) + 180),
                      margin={"l": 20, "r": 20, "t": 40, "b": 20})
    return fig


def verify_figure(edges: Sequence[Any]) -> Any:
    """Scatter of each edge's estimate (its score) against the exact effect of removing it, with the
    identity line; ``edges`` are :class:`~eapcore.verify.EdgeCheck`."""
    import plotly.graph_objects as go

    xs, ys = [e.estimate for e in edges], [e.exact for e in edges]
    lo, hi = min(xs + ys + [0.0]), max(xs + ys + [0.0])
    fig = go.Figure([
        go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="estimate = exact",
                   line={"dash": "dot", "color": GUIDE, "width": 1}, hoverinfo="skip"),
        go.Scatter(x=xs, y=ys, mode="markers", name="edges", marker={"color": CURVE, "size": 8},
                   text=[e.edge for e in edges],
                   hovertemplate="%{text}<br>estimate %{x:.4g}<br>exact %{y:.4g}<extra></extra>"),
    ])
    fig.update_layout(xaxis={"title": {"text": "estimate (the run's score)"}},
                      yaxis={"title": {"text": "exact (loss change when the edge alone is removed)"}},
                      height=420, margin={"l": 60, "r": 20, "t": 20, "b": 50}, legend={"orientation": "h", "y": -0.2})
    return fig


def histogram_figure(values: Sequence[float], label: str = "faithfulness of each pair") -> Any:
    """Histogram of per-pair values (NaN left out) with lines at 0 and 1. The axis spans the middle 96% of
    the values and 0 to 1; values beyond it (pairs with a tiny clean − empty gap) are drawn at its ends."""
    import plotly.graph_objects as go
    import torch

    kept = torch.tensor([v for v in values if v == v], dtype=torch.float64)
    lo, hi = 0.0, 1.0
    if len(kept):
        q = torch.quantile(kept, torch.tensor([0.02, 0.98], dtype=torch.float64)).tolist()
        lo, hi = min(lo, q[0]), max(hi, q[1])
    outside = int(((kept < lo) | (kept > hi)).sum())
    fig = go.Figure(go.Histogram(x=kept.clamp(lo, hi).tolist(), marker={"color": CURVE},
                                 xbins={"start": lo, "end": hi, "size": (hi - lo) / 40},
                                 hovertemplate="%{x}<br>%{y} pairs<extra></extra>"))
    for x in (0.0, 1.0):
        fig.add_vline(x=x, line={"dash": "dot", "color": GUIDE, "width": 1})
    title = f"{label}" + (f" ({outside} pairs beyond the axis drawn at its ends)" if outside else "")
    fig.update_layout(xaxis={"title": {"text": title}, "range": [lo - (hi - lo) / 40, hi + (hi - lo) / 40]},
                      yaxis={"title": {"text": "pairs"}}, bargap=0.05, height=320,
                      margin={"l": 50, "r": 20, "t": 20, "b": 50})
    return fig


def robustness_figure(results: Sequence[Any]) -> Any:
    """Bars of the circuit's and its complement's faithfulness under each intervention (those with values);
    ``results`` are :class:`~eapcore.robustness.InterventionResult`."""
    import plotly.graph_objects as go

    shown = [r for r in results if r.faithfulness is not None]
    names = [r.intervention for r in shown]
    fig = go.Figure([
        go.Bar(x=names, y=[r.faithfulness for r in shown], name="circuit", marker={"color": CURVE},
               hovertemplate="%{x}<br>circuit f = %{y:.4f}<extra></extra>"),
        go.Bar(x=names, y=[r.complement_faithfulness for r in shown], name="complement", marker={"color": COMPLEMENT},
               hovertemplate="%{x}<br>complement f = %{y:.4f}<extra></extra>"),
    ])
    fig.add_hline(y=1.0, line={"dash": "dot", "color": GUIDE, "width": 1})
    fig.update_layout(barmode="group", xaxis={"title": {"text": "intervention (what removed edges carry)"}},
                      yaxis={"title": {"text": "faithfulness"}}, height=360,
                      margin={"l": 50, "r": 20, "t": 20, "b": 50}, legend={"orientation": "h", "y": -0.25})
    return fig
