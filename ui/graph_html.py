"""The circuit as an interactive, offline HTML page (pyvis / vis-network, library inlined, no CDN).

Nodes sit where :func:`ui.layout.node_positions` puts them (physics off). In a narrow frame (a phone)
the layout is squeezed sideways so that the labels stay readable after the view is fitted; the page
re-fits when the frame is resized. Hover an edge for its score; drag to pan, scroll or pinch to zoom.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from eapcore.circuit import Circuit, Scores
from ui.layout import (
    NODE_COLOURS, NODE_TEXT, circuit_edges, curvature, edge_colour, node_kind, node_positions,
    nodes_of, top_score, width,
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
    var squeeze = Math.min(1, Math.max(0.35, (box.clientWidth - 24) / spread));
    nodes.update(Object.keys(x0).map(function (k) { return {id: k, x: x0[k] * squeeze}; }));
    network.fit();
  }
  place();
  window.addEventListener("resize", place);
})();
</script>
"""


def strip_remote_resources(page: str) -> str:
    """Remove ``<link href=http...>`` and ``<script src=http...></script>`` tags (pyvis's Bootstrap CDN)."""
    return _COMMENT.sub("", _EMPTY_HEADING.sub("", _REMOTE_TAG.sub("", page)))


def pyvis_html(scores: Scores, circuit: Circuit, height_px: int = 620, max_edges: int = 600,
               theme: str = "light") -> str:
    """A self-contained HTML page (vis-network inlined, no CDN) drawing ``circuit`` with its scores, in
    the edge colours of ``theme`` (``light`` or ``dark``) on a transparent background."""
    from pyvis.network import Network

    edges = circuit_edges(scores, circuit, max_edges)
    pos = node_positions(scores.graph)
    net = Network(height=f"{height_px - 20}px", width="100%", directed=True, cdn_resources="remote",
                  bgcolor="transparent")
    strength: dict[str, float] = {}
    for e in edges:
        strength[e.src] = strength.get(e.src, 0.0) + abs(e.score)
    for name in sorted(nodes_of(edges), key=lambda n: (pos[n][1], pos[n][0])):
        x, level = pos[name]
        kind = node_kind(name)
        title = f"{name} ({kind})" + (f"\nsum |score| of outgoing edges: {strength[name]:.4g}" if name in strength else "")
        net.add_node(
            name, label=name, title=title, color=NODE_COLOURS[kind], x=x * X_SPACING, y=-level * Y_SPACING,
            shape="box" if kind in ("input", "logits") else "ellipse", font={"color": NODE_TEXT, "size": 18},
            physics=False,
        )
    top = top_score(edges)
    for e in edges:
        bend = curvature(e, pos)
        smooth = {"enabled": True, "type": "curvedCW" if bend >= 0 else "curvedCCW", "roundness": abs(bend)}
        net.add_edge(
            e.src, e.dst, title=f"{e.name}\nscore {e.score:+.4g}", color=edge_colour(e, theme), width=width(e.score, top),
            dashes=e.score < 0, smooth=smooth if bend else {"enabled": False}, arrows="to",
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
    page = page.replace("<head>", f"<head>\n<style>{css}\nbody {{ margin: 0; background: transparent; }}"
                                  f"\n#mynetwork {{ border: none !important; }}</style>\n<script>{js}</script>", 1)
    return page.replace("</body>", _FIT_TO_FRAME % {"margin": 2 * X_SPACING} + "</body>", 1)


@functools.cache
def _vis_library() -> tuple[str, str]:
    """vis-network's JavaScript and CSS as shipped inside the pyvis package (read once)."""
    import pyvis

    lib = Path(pyvis.__file__).parent / "lib" / "vis-9.1.2"
    js = (lib / "vis-network.min.js").read_text(encoding="utf-8")
    if "</script" in js.lower():
        raise RuntimeError("the bundled vis-network script cannot be inlined")
    return js, (lib / "vis-network.css").read_text(encoding="utf-8")
