"""The circuit as an interactive, offline HTML page (pyvis / vis-network, library inlined, no CDN).

Every node of the graph sits where :func:`ui.layout.node_positions` puts it (physics off); nodes outside
the circuit are faded or transparent, so the view, fitted to all of them, is the same for every circuit
of a graph and nodes never move between slider moves. In a narrow frame (a phone) the layout is squeezed
sideways so that the labels stay readable after the view is fitted; the page re-fits when the frame is
resized. A legend sits under the graph (folded on a phone). Hover a node or an edge for its score; drag to pan, scroll or
pinch to zoom.
"""

from __future__ import annotations

import functools
import html
import json
import re
from pathlib import Path

from eapcore.circuit import Circuit, Scores
from ui.layout import (
    FADED_ALPHA, NODE_COLOURS, NODE_TEXT, PAGE_BACKGROUND, PAGE_TEXT, PICKED, GraphStyle, circuit_edges, curvature,
    edge_colour, edge_label, in_circuit, legend_items, node_kind, node_positions, node_sizes, top_score, width,
)

X_SPACING, Y_SPACING = 170, 95

_REMOTE_TAG = re.compile(
    r"<link\b[^>]*href=\"https?://[^\"]*\"[^>]*>|<script\b[^>]*src=\"https?://[^\"]*\"[^>]*>\s*</script>",
    re.IGNORECASE | re.DOTALL,
)
_EMPTY_HEADING = re.compile(r"<center>\s*<h1>\s*</h1>\s*</center>", re.IGNORECASE)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)

# Squeeze x positions to the frame's width (never below 35%, never wider than laid out), then fit.
_FIT_TO_FRAME = """
<script>
(function () {
  var box = document.getElementById("mynetwork");
  var x0 = {};
  nodes.get().forEach(function (n) { x0[n.id] = n.x; });
  var xs = Object.keys(x0).map(function (k) { return x0[k]; });
  var spread = Math.max.apply(null, xs) - Math.min.apply(null, xs) + %(margin)d;
  function place() {
    network.setSize("100%%", box.clientHeight + "px");  // the frame less the legend
    var squeeze = Math.min(1, Math.max(0.35, (box.clientWidth - 24) / spread));
    nodes.update(Object.keys(x0).map(function (k) { return {id: k, x: x0[k] * squeeze}; }));
    network.fit();
  }
  var legend = document.getElementById("legend");
  legend.open = window.innerWidth >= 600;
  place();
  window.addEventListener("resize", place);
  legend.addEventListener("toggle", place);
  %(picked)s
})();
</script>
"""


def strip_remote_resources(page: str) -> str:
    """Remove ``<link href=http...>`` and ``<script src=http...></script>`` tags (pyvis's Bootstrap CDN)."""
    return _COMMENT.sub("", _EMPTY_HEADING.sub("", _REMOTE_TAG.sub("", page)))


_LAYOUT_CSS = """
html, body { height: 100%; margin: 0; background: transparent; }
body { display: flex; flex-direction: column; }
.card { flex: 1 1 auto; min-height: 0; }
#mynetwork { border: none !important; height: 100% !important; }
.legend { flex: 0 0 auto; padding: 2px 6px; font: 12px sans-serif; color: TEXT_COLOUR; }
.legend summary { cursor: pointer; }
.legend div { display: flex; flex-wrap: wrap; gap: 2px 12px; }
.legend span { display: inline-flex; align-items: center; gap: 4px; white-space: nowrap; }
.legend i { display: inline-block; }
"""


def _rgba(colour: str, alpha: float) -> str:
    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _legend(items: list[tuple[str, str, str]]) -> str:
    """The legend as a strip of HTML under the graph, folded into one line in a narrow frame (a phone)."""
    marks = {
        "node": '<i style="width:10px;height:10px;border-radius:50%%;background:%s"></i>',
        "ring": '<i style="width:8px;height:8px;border-radius:50%%;border:3px solid %s"></i>',
        "edge": '<i style="width:18px;border-top:3px solid %s"></i>',
        "edge-": '<i style="width:18px;border-top:3px dashed %s"></i>',
        "note": "",
    }
    spans = [f"<span>{marks[kind] % colour if colour else marks[kind]}{html.escape(text)}</span>"
             for kind, colour, text in items]
    return f'<details class="legend" id="legend"><summary>Legend</summary><div>{"".join(spans)}</div></details>'


def pyvis_html(scores: Scores, circuit: Circuit, height_px: int = 620, max_edges: int = 600,
               theme: str = "light", style: GraphStyle = GraphStyle()) -> str:
    """A self-contained HTML page (vis-network inlined, no CDN) drawing ``circuit`` with its scores, in
    the colours of ``theme`` (``light`` or ``dark``) on a transparent background, drawn as ``style`` says."""
    from pyvis.network import Network

    graph = scores.graph
    edges = circuit_edges(scores, circuit, max_edges)
    pos, sizes = node_positions(graph), node_sizes(scores)
    inside = in_circuit(edges)
    net = Network(height=f"{height_px - 20}px", width="100%", directed=True, cdn_resources="remote",
                  bgcolor="transparent")
    text = PAGE_TEXT[theme]
    for name in sorted(graph.node_names, key=lambda n: (pos[n][1], pos[n][0])):
        x, level = pos[name]
        kind, shown = node_kind(name), name in inside or name == style.picked
        alpha = 1.0 if name in inside else FADED_ALPHA if shown or style.faded else 0.0
        fill = NODE_COLOURS[kind] if alpha == 1.0 else _rgba(NODE_COLOURS[kind], alpha)
        fraction = sizes.fraction(name)
        title = f"{name} ({kind})" + ("" if fraction is None else f"\n{sizes.what}: {sizes.strength[name]:.4g}")
        boxed = kind in ("input", "logits")
        label_colour = NODE_TEXT if boxed else text
        node = dict(
            label=name, title=title + ("" if name in inside else "\noutside the circuit"), x=x * X_SPACING,
            y=-level * Y_SPACING, shape="box" if boxed else "dot", physics=False, borderWidth=1,
            color=fill if name != style.picked else {"background": fill, "border": PICKED,
                                                      "highlight": {"background": fill, "border": PICKED}},
            font={"color": label_colour if alpha == 1.0 else _rgba(label_colour, min(1.0, 2 * alpha)), "size": 18},
        )
        if not boxed:
            node["size"] = 8 + 20 * (fraction or 0.0)
        if name == style.picked:
            node["borderWidth"] = 5
        if alpha == 0.0:  # keeps its place in the fitted view, draws nothing, answers no hover
            node.update(title=None, chosen=False)
        net.add_node(name, **node)
    top = top_score(edges)
    label_font = {"size": 12, "color": text, "strokeWidth": 3, "strokeColor": PAGE_BACKGROUND[theme], "align": "top"}
    for e in edges:
        bend = curvature(e, pos)
        smooth = {"enabled": True, "type": "curvedCW" if bend >= 0 else "curvedCCW", "roundness": abs(bend)}
        extra = {"label": edge_label(e), "font": label_font} if style.edge_labels else {}
        net.add_edge(
            e.src, e.dst, title=f"{e.name}\nscore {e.score:+.4g}", color=edge_colour(e, theme), width=width(e.score, top),
            dashes=e.score < 0, smooth=smooth if bend else {"enabled": False}, arrows="to", **extra,
        )
    net.toggle_physics(False)
    net.set_options(
        '{"physics": {"enabled": false}, "interaction": {"hover": true, "tooltipDelay": 80, "navigationButtons": false},'
        ' "edges": {"arrows": {"to": {"scaleFactor": 0.5}}}}'
    )
    # Rendered with the small "remote" template, then the CDN tags are swapped for the library inlined
    # (pyvis's "in_line" mode re-lexes the 500 kB library through jinja on every call).
    page = strip_remote_resources(net.generate_html(notebook=False))
    js, css = _vis_library()
    layout_css = _LAYOUT_CSS.replace("TEXT_COLOUR", text)
    page = page.replace("<head>", f"<head>\n<style>{css}\n{layout_css}</style>\n<script>{js}</script>", 1)
    picked = f"network.selectNodes({json.dumps([style.picked])});" if style.picked in graph.node_names else ""
    script = _FIT_TO_FRAME % {"margin": 2 * X_SPACING, "picked": picked}
    return page.replace("</body>", _legend(legend_items(sizes, style, theme)) + script + "</body>", 1)


@functools.cache
def _vis_library() -> tuple[str, str]:
    """vis-network's JavaScript and CSS as shipped inside the pyvis package (read once)."""
    import pyvis

    lib = Path(pyvis.__file__).parent / "lib" / "vis-9.1.2"
    js = (lib / "vis-network.min.js").read_text(encoding="utf-8")
    if "</script" in js.lower():
        raise RuntimeError("the bundled vis-network script cannot be inlined")
    return js, (lib / "vis-network.css").read_text(encoding="utf-8")
