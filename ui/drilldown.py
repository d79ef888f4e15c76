"""What the picked node does, on one prompt pair (:func:`eapcore.inspection.inspect_node`): a head's
attention (clean and corrupted side by side, and the read-out position's row as bars), the tokens the
node pushes up and down at the read-out position, its direct effect on the metric, its edges in the
current circuit and its node score.

Keys: ``inspect_pair`` (int, the pair; widget ``w_inspect_pair``).
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from eapcore.circuit import Circuit, Scores
from eapcore.data import PromptPairs
from eapcore.inspection import NodeReport, inspect_node
from eapcore.models import ModelSpec
from ui import cache, state, widgets

CLEAN, CORRUPTED = "#3b82f6", "#f97316"
DIRECT_HELP = ("m(L) − m(L − d): the metric minus the metric with the node's direct path to the logits removed, "
               "where d is the node's output at the read-out position (the last token) read through the final norm "
               "with its scale frozen at the clean run, and the unembedding. Positive: the node's direct path raises "
               "the metric (for kl_div, lower is better).")
PROMOTE_HELP = "Largest (smallest) entries of the node's direct logits on the clean prompt, at the read-out position."


def report(spec: ModelSpec, pairs: PromptPairs, pair: int, node: str, metric: str, scores: Scores,
           circuit: Circuit) -> NodeReport:
    """The drill-down of ``node`` on ``pair`` (the pair's runs are kept per model, so the next node is quick)."""
    return inspect_node(cache.get_model(spec), cache.get_data(spec, pairs), pair, node, metric, scores, circuit)


def _labels(tokens: list[str]) -> list[str]:
    return [f"{i}: {t!r}"[: 24] for i, t in enumerate(tokens)]


def attention_figure(pattern: Any, tokens: list[str], title: str) -> Any:
    """Plotly heatmap of one head's attention ``[pos pos]``: query positions down, key positions across."""
    import plotly.graph_objects as go

    n = len(tokens)
    labels = _labels(tokens)
    fig = go.Figure(go.Heatmap(
        z=pattern.tolist(), x=list(range(n)), y=list(range(n)), zmin=0.0, zmax=1.0, colorscale="Blues",
        customdata=[[(labels[q], labels[k]) for k in range(n)] for q in range(n)],
        hovertemplate="query %{customdata[0]}<br>key %{customdata[1]}<br>attention %{z:.3f}<extra></extra>",
        colorbar={"title": {"text": "attention"}, "thickness": 10},
    ))
    axis = {"tickmode": "array", "tickvals": list(range(n)), "ticktext": labels, "tickfont": {"size": 11}}
    fig.update_layout(
        title={"text": title, "font": {"size": 13}}, height=max(300, 22 * n + 140),
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
        xaxis={**axis, "title": {"text": "key"}, "tickangle": -60, "side": "bottom"},
        yaxis={**axis, "title": {"text": "query"}, "autorange": "reversed"},
    )
    return fig


def last_row_figure(rows: Any, tokens: tuple[list[str], list[str]]) -> Any:
    """Plotly bars of where the read-out position attends, clean and corrupted, per key position."""
    import plotly.graph_objects as go

    clean, corrupted = tokens
    ticks = [f"{i}: {a!r}" if a == b else f"{i}: {a!r}/{b!r}" for i, (a, b) in enumerate(zip(clean, corrupted))]
    fig = go.Figure([
        go.Bar(x=list(range(len(clean))), y=rows[0].tolist(), name="clean", marker={"color": CLEAN},
               hovertemplate="key %{x}<br>clean %{y:.3f}<extra></extra>"),
        go.Bar(x=list(range(len(clean))), y=rows[1].tolist(), name="corrupted", marker={"color": CORRUPTED},
               hovertemplate="key %{x}<br>corrupted %{y:.3f}<extra></extra>"),
    ])
    fig.update_layout(
        barmode="group", height=300, margin={"l": 10, "r": 10, "t": 40, "b": 10}, legend={"orientation": "h", "y": 1.12},
        title={"text": "Attention of the last position (the read-out) to each key", "font": {"size": 13}},
        xaxis={"tickmode": "array", "tickvals": list(range(len(ticks))), "ticktext": ticks, "tickangle": -60},
        yaxis={"title": {"text": "attention"}, "range": [0, 1]},
    )
    return fig


def _table(rows: list[tuple[str, float]], name: str, value: str) -> Any:
    import pandas as pd

    return pd.DataFrame(rows, columns=[name, value])


def pair_picker(pairs: PromptPairs) -> int:
    """A searchable select box over the prompt pairs; returns the chosen index."""
    s = st.session_state
    if not 0 <= s.get("inspect_pair", 0) < len(pairs):
        s.inspect_pair = 0
    state.widget_value("w_inspect_pair", "inspect_pair")
    s.setdefault("w_inspect_pair", 0)
    st.selectbox("Prompt pair", range(len(pairs)), key="w_inspect_pair",
                 format_func=lambda i: f"pair {i + 1}: {pairs.clean[i][:80]}",
                 on_change=lambda: setattr(s, "inspect_pair", s.w_inspect_pair))
    return int(s.get("inspect_pair", 0))


def panel(spec: ModelSpec, pairs: PromptPairs, scores: Scores, circuit: Circuit, metric: str, node: str | None) -> None:
    """The drill-down of the picked node (or a hint to pick one)."""
    if node is None:
        st.caption("Find a node above the graph to see what it does: where a head attends, which tokens it pushes "
                   "up or down, its direct effect and its edges.")
        return
    st.subheader(f"Node `{node}`")
    pair = pair_picker(pairs)
    with state.guard(f"Drill-down into {node}"):
        found = report(spec, pairs, pair, node, metric, scores, circuit)
        show(found, metric)


def show(found: NodeReport, metric: str) -> None:
    """Render a :class:`NodeReport`."""
    edges = found.edges
    values: dict[str, str] = {}
    helps = {"Direct effect, clean": DIRECT_HELP, "Direct effect, corrupted": DIRECT_HELP}
    if edges is not None and edges.score is not None:
        values["Node score"] = f"{edges.score:.4g}"
        helps["Node score"] = f"From {edges.score_from}: positive means ablating the node hurts the task."
    if found.direct_effect is not None:
        values["Direct effect, clean"] = f"{found.direct_effect[0]:+.4f}"
        values["Direct effect, corrupted"] = f"{found.direct_effect[1]:+.4f}"
    if values:
        widgets.metric_row(values, helps)
        st.caption(f"Direct effects on `{metric}` at the read-out position (the last token).")
    if found.attention is not None:
        left, right = st.columns(2)
        left.plotly_chart(attention_figure(found.attention[0], found.tokens[0], "clean"), width="stretch")
        right.plotly_chart(attention_figure(found.attention[1], found.tokens[1], "corrupted"), width="stretch")
        st.plotly_chart(last_row_figure(found.last_row, found.tokens), width="stretch")
    if found.promotes:
        left, right = st.columns(2)
        left.markdown("**Promotes** (clean run)", help=PROMOTE_HELP)
        left.dataframe(_table(found.promotes, "token", "direct logit"), hide_index=True, width="stretch")
        right.markdown("**Suppresses** (clean run)", help=PROMOTE_HELP)
        right.dataframe(_table(found.suppresses, "token", "direct logit"), hide_index=True, width="stretch")
    if edges is not None:
        left, right = st.columns(2)
        left.markdown(f"**Incoming edges in the circuit** ({len(edges.incoming)})")
        left.dataframe(_table(edges.incoming, "edge", "score"), hide_index=True, width="stretch")
        right.markdown(f"**Outgoing edges in the circuit** ({len(edges.outgoing)})")
        right.dataframe(_table(edges.outgoing, "edge", "score"), hide_index=True, width="stretch")
