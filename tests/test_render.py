"""The pictures (ui.layout, ui.graph_html, ui.figures: offline pyvis page, static PNGs, plotly figures,
layout, token chips) and the engine helpers they use (eapcore.sizes grids, eapcore.tokens diffs)."""

from __future__ import annotations

import re

import pytest
import torch

from eapcore import sizes, tokens
from eapcore.circuit import Circuit, Scores
from eapcore.curve import Curve
from eapcore.graph import Graph, GraphConfig
from eapcore.select import top_n
from ui import figures, graph_html, layout

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def graph() -> Graph:
    return Graph(GraphConfig(n_layers=2, n_heads=3, d_model=8))


@pytest.fixture(scope="module")
def scores(graph: Graph) -> Scores:
    gen = torch.Generator().manual_seed(0)
    edges = torch.randn(graph.n_forward, graph.n_backward, generator=gen) * graph.real_edge_mask
    return Scores(graph, edges)


@pytest.fixture(scope="module")
def circuit(scores: Scores) -> Circuit:
    return top_n(scores, 25)


def test_layout_puts_input_at_the_bottom_and_logits_at_the_top(graph: Graph) -> None:
    pos = layout.node_positions(graph)
    assert set(pos) == set(graph.node_names)
    level = {n: p[1] for n, p in pos.items()}
    assert level["input"] == min(level.values()) and level["logits"] == max(level.values())
    for row in range(graph.n_forward):  # every real edge points upwards
        for col in range(graph.n_backward):
            if graph.real_edge_mask[row, col]:
                assert level[graph.src_nodes[row]] < level[graph.dst_node_of_column[col]]
    assert len({pos[n] for n in graph.node_names}) == graph.n_nodes  # no two nodes on one spot


def test_parallel_layout_keeps_heads_and_mlp_of_a_layer_on_one_row() -> None:
    g = Graph(GraphConfig(n_layers=2, n_heads=2, parallel_attn_mlp=True))
    pos = layout.node_positions(g)
    assert pos["a1.h0"][1] == pos["m1"][1] and pos["m1"][0] > pos["a1.h1"][0]
    assert len({pos[n] for n in g.node_names}) == g.n_nodes


def test_edge_kinds_and_circuit_edges(scores: Scores, circuit: Circuit) -> None:
    assert [layout.edge_kind(n) for n in ("a1.h0<q>", "a1.h0<k>", "a0.h2<v>", "m1", "logits")] == ["q", "k", "v", "other", "other"]
    edges = layout.circuit_edges(scores, circuit)
    assert len(edges) == circuit.n_edges
    mags = [abs(e.score) for e in edges]
    assert mags == sorted(mags, reverse=True)
    for e in edges:
        row, col = scores.graph.parse_edge_name(e.name)
        assert circuit.edges[row, col] and e.score == pytest.approx(float(scores.edges[row, col]))
    assert len(layout.circuit_edges(scores, circuit, max_edges=5)) == min(5, circuit.n_edges)


def test_pyvis_html_is_offline_and_has_the_circuit(scores: Scores, circuit: Circuit) -> None:
    page = graph_html.pyvis_html(scores, circuit)
    remote = re.findall(r"""(?:src|href)\s*=\s*["']\s*(?:https?:)?//[^"']*""", page, flags=re.I)
    assert remote == [], remote
    assert "bootstrap" not in page.lower()
    assert "new vis.Network" in page and "vis-network" in page.lower()  # library inlined
    for e in layout.circuit_edges(scores, circuit):
        assert f'"{e.src}"' in page and f"score {e.score:+.4g}" in page  # nodes and hover titles
    assert f'"color": "{layout.NODE_COLOURS["logits"]}"' in page
    assert '"dashes": true' in page and '"dashes": false' in page  # both signs present


def test_pyvis_html_of_an_empty_circuit_still_renders(scores: Scores, graph: Graph) -> None:
    page = graph_html.pyvis_html(scores, Circuit.empty(graph))
    assert '"input"' in page and '"logits"' in page


def test_strip_remote_resources() -> None:
    page = ('<head><link href="https://cdn.x/b.css" rel="stylesheet" />\n<script src="https://cdn.x/b.js" '
            'integrity="x"></script><script>var a = "https://keep.me";</script><!-- <script src="../x.js"> --></head>')
    out = graph_html.strip_remote_resources(page)
    assert "cdn.x" not in out and "../x.js" not in out and 'var a = "https://keep.me"' in out


def test_circuit_png_renders_without_a_browser(scores: Scores, circuit: Circuit) -> None:
    png = figures.circuit_png(scores, circuit)
    assert png.startswith(PNG_MAGIC) and len(png) > 5_000
    assert figures.circuit_png(scores, Circuit.empty(scores.graph)).startswith(PNG_MAGIC)


def test_curve_png_and_figure() -> None:
    curve = Curve((0.1, 1.0, 10.0, 100.0), (1, 2, 20, 200), (0.1, 0.4, 0.9, 1.0))
    fine = Curve((0.1, 0.5, 5.0, 50.0, 100.0), (1, 1, 10, 100, 200), (0.1, 0.3, 0.8, 0.95, 1.0))
    assert figures.curve_png(curve, fine, (3.0, 0.7)).startswith(PNG_MAGIC)
    fig = figures.curve_figure(curve, fine, (3.0, 0.7))
    names = [t.name for t in fig.data]
    assert names == ["finer grid", "MIB sizes", "current circuit"]
    assert fig.layout.xaxis.type == "log" and f"CPR {curve.cpr:.3f}" in fig.layout.title.text
    assert list(fig.data[2].x) == [3.0] and list(fig.data[2].y) == [0.7]


def test_heatmap_is_sources_by_destinations(scores: Scores, graph: Graph) -> None:
    fig = figures.heatmap_figure(scores)
    z = torch.tensor(fig.data[0].z, dtype=torch.float64)
    assert z.shape == (graph.n_forward, graph.n_backward)
    assert list(fig.data[0].y) == graph.src_nodes and list(fig.data[0].x) == graph.dst_nodes
    assert z[~graph.real_edge_mask].isnan().all()
    assert torch.allclose(z[graph.real_edge_mask], scores.edges[graph.real_edge_mask].double())


@pytest.mark.parametrize("n_max", [0, 5, 300, 301, 32_491, 231_877])
def test_log_grid(n_max: int) -> None:
    grid = sizes.log_grid(n_max)
    assert grid[0] == 0 and grid[-1] == n_max and grid == sorted(set(grid))
    if n_max <= 300:
        assert grid == list(range(n_max + 1))
    else:
        assert 1 in grid and len(grid) <= 125
        steps = list(zip(grid[1:], grid[2:]))
        assert all(b == a + 1 or b / a < 1.2 for a, b in steps)  # log-spaced: small relative steps


def test_token_diff_marks_differing_tokens(tiny32) -> None:
    rows = tokens.token_diff(tiny32.tokenizer, "a b c d", "e b c x")
    assert [d for _, _, d in rows] == [True, False, False, True]
    assert rows[0][:2] == ("a", "e")
    html = figures.token_diff_html(rows)
    assert html.count("#fde68a") == 2 and html.count("#fecaca") == 2
    mismatch = tokens.token_diff(tiny32.tokenizer, "a b c", "a b")
    assert mismatch[-1] == ("c", "", True)
    assert "<script>" not in figures.token_diff_html([("<script>", "x", True)])


# ----- what the pictures say: full tick labels, readable fonts, titles, node views, both themes -----


def png_text(png: bytes) -> dict[str, str]:
    """The PNG's text chunks (title and description), read by Pillow."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(png))
    image.load()
    return dict(image.text)


def test_curve_axis_labels_every_tick_in_full() -> None:
    """The log axis of percentages names each tick (0.1%, 0.2%, ... 100%), not plotly's minor digits."""
    curve = Curve((0.1, 1.0, 10.0, 100.0), (1, 2, 20, 200), (0.1, 0.4, 0.9, 1.0))
    axis = figures.curve_figure(curve).layout.xaxis
    assert list(axis.tickvals) == [0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100]
    assert list(axis.ticktext) == ["0.1%", "0.2%", "0.5%", "1%", "2%", "5%", "10%", "20%", "50%", "100%"]


def test_node_curves_count_whole_nodes() -> None:
    """At node level the x axis is the number of nodes (linear), and the marker sits on its node count."""
    curve = Curve((0.1, 5.0, 50.0, 100.0), (1, 1, 10, 21), (0.1, 0.1, 0.8, 1.0))
    fig = figures.curve_figure(curve, None, (100 * 4 / 21, 0.5), "nodes", 21)
    assert fig.layout.xaxis.type != "log" and "of 21 scored nodes" in fig.layout.xaxis.title.text
    assert list(fig.data[0].x) == [1, 1, 10, 21]
    assert list(fig.data[1].x) == pytest.approx([4.0])


def test_heatmap_labels_are_readable(scores: Scores) -> None:
    layout = figures.heatmap_figure(scores).layout
    assert layout.xaxis.tickfont.size >= 12 and layout.yaxis.tickfont.size >= 12


def test_node_bars_show_every_scored_node(graph: Graph) -> None:
    nodes = torch.arange(graph.n_forward, dtype=torch.float32) - 3
    nodes[2] = float("nan")  # unscored: left out
    fig = figures.node_bars_figure(Scores(graph, torch.zeros(graph.n_forward, graph.n_backward), nodes))
    kept = [i for i in range(graph.n_forward) if i != 2]
    assert list(fig.data[0].x) == [graph.src_nodes[i] for i in kept]
    assert list(fig.data[0].y) == [float(nodes[i]) for i in kept]


def test_neuron_table_lists_each_nodes_strongest_dimensions(graph: Graph) -> None:
    gen = torch.Generator().manual_seed(1)
    neurons = torch.randn(graph.n_forward, graph.cfg.d_model, generator=gen)
    scores = Scores(graph, torch.zeros(graph.n_forward, graph.n_backward), neurons.sum(1), neurons)
    table = figures.neuron_table(scores, k=3)
    assert list(table["node"]) == graph.src_nodes
    for i, cell in enumerate(table["top 3 dimensions (by |score|)"]):
        by_hand = sorted(range(graph.cfg.d_model), key=lambda d: -abs(float(neurons[i, d])))[:3]
        assert [int(part.split()[0][1:]) for part in cell.split(" · ")] == by_hand
        assert table["node score"][i] == pytest.approx(float(neurons[i].sum()), abs=1e-5)


def test_pngs_carry_their_title(scores: Scores, circuit: Circuit) -> None:
    title = "demo · EAP-IG-inputs (5 steps), logit_diff · task: ioi (256 pairs) · 22 edges · faithfulness 0.7210"
    assert png_text(figures.circuit_png(scores, circuit, title=title))["Title"] == title
    curve = Curve((0.1, 1.0, 10.0, 100.0), (1, 2, 20, 200), (0.1, 0.4, 0.9, 1.0))
    text = png_text(figures.curve_png(curve, None, (1.0, 0.4), title=title))
    assert text["Title"] == title and f"CPR {curve.cpr:.3f}" in text["Description"]


def test_graph_colours_follow_the_theme(scores: Scores, circuit: Circuit) -> None:
    """Light and dark pages draw the same edges in their theme's colours, on a transparent background."""
    for theme in layout.THEMES:
        page = graph_html.pyvis_html(scores, circuit, theme=theme)
        expected = {layout.edge_colour(e, theme) for e in layout.circuit_edges(scores, circuit)}
        assert all(f'"color": "{c}"' in page for c in expected), theme
        assert "background-color: transparent" in page
    assert layout.EDGE_COLOURS["light"] != layout.EDGE_COLOURS["dark"]


def test_token_chips_set_their_own_text_colour() -> None:
    """Chips have light backgrounds, so they name a dark text colour (the dark theme's text is light)."""
    chips = figures.token_diff_html([("a", "b", True), ("c", "c", False)])
    assert chips.count("color:#111827") == 4


def drawn_nodes(page: str) -> dict[str, dict]:
    """The vis-network nodes of a graph page, by name."""
    import json

    found = re.search(r"nodes = new vis\.DataSet\((\[.*?\])\);", page, flags=re.S)
    return {n["id"]: n for n in json.loads(found.group(1))}


def test_every_node_keeps_its_place_whatever_the_circuit(scores: Scores, graph: Graph) -> None:
    """Positions come from the graph alone: two circuits draw every node of the graph at the same place (the
    layout's, scaled), so the fitted view is the same and nothing moves between slider moves."""
    pos = layout.node_positions(graph)
    pages = [graph_html.pyvis_html(scores, c) for c in (Circuit.empty(graph), top_n(scores, 5), top_n(scores, 75))]
    places = [{name: (n["x"], n["y"]) for name, n in drawn_nodes(p).items()} for p in pages]
    assert set(places[0]) == set(graph.node_names)
    assert places[0] == places[1] == places[2]
    assert places[0] == {n: (x * graph_html.X_SPACING, -y * graph_html.Y_SPACING) for n, (x, y) in pos.items()}


def test_nodes_outside_the_circuit_are_hidden_or_faded(scores: Scores, graph: Graph) -> None:
    circuit = top_n(scores, 5)
    inside = layout.in_circuit(layout.circuit_edges(scores, circuit))
    outside = sorted(set(graph.node_names) - inside)
    assert outside
    hidden = drawn_nodes(graph_html.pyvis_html(scores, circuit))
    faded = drawn_nodes(graph_html.pyvis_html(scores, circuit, style=layout.GraphStyle(faded=True)))
    for name in outside:
        assert hidden[name]["color"].endswith(",0.0)") and hidden[name]["chosen"] is False
        assert faded[name]["color"].endswith(f",{layout.FADED_ALPHA})") and "outside the circuit" in faded[name]["title"]
    for name in inside:
        assert hidden[name]["color"] == faded[name]["color"] == layout.NODE_COLOURS[layout.node_kind(name)]


def test_node_size_follows_the_node_score(scores: Scores, graph: Graph) -> None:
    """Without node scores a node's size measure is the sum of |score| of its outgoing edges in the whole
    graph; with them, |node score|. Sizes grow with it; the legend says which measure."""
    sizes = layout.node_sizes(scores)
    for i, name in enumerate(graph.src_nodes):
        by_hand = sum(abs(float(scores.edges[i, c])) for c in range(graph.n_backward) if graph.real_edge_mask[i, c])
        assert sizes.strength[name] == pytest.approx(by_hand, rel=1e-6)
    page = graph_html.pyvis_html(scores, top_n(scores, 30))
    nodes = drawn_nodes(page)
    dots = sorted((n for n in graph.src_nodes if "size" in nodes[n]), key=lambda n: sizes.strength[n])
    assert [nodes[n]["size"] for n in dots] == sorted(nodes[n]["size"] for n in dots)
    assert "node size: sum of |outgoing edge scores|" in page
    with_nodes = Scores(graph, scores.edges, torch.linspace(-3, 2, graph.n_forward))
    assert layout.node_sizes(with_nodes).strength["input"] == pytest.approx(3.0)
    assert "node size: |node score|" in graph_html.pyvis_html(with_nodes, top_n(scores, 30))


def test_the_picked_node_edge_labels_and_legend(scores: Scores, graph: Graph) -> None:
    circuit = top_n(scores, 20)
    style = layout.GraphStyle(edge_labels=True, picked="a1.h2")
    page = graph_html.pyvis_html(scores, circuit, style=style, theme="dark")
    node = drawn_nodes(page)["a1.h2"]
    assert node["color"]["border"] == layout.PICKED and node["borderWidth"] == 5
    assert 'network.selectNodes(["a1.h2"])' in page and "picked: a1.h2" in page
    for e in layout.circuit_edges(scores, circuit):
        assert f'"label": "{layout.edge_label(e)}"' in page
    assert layout.PAGE_TEXT["dark"] in page and 'id="legend"' in page
    assert '"label": "' + layout.edge_label(layout.circuit_edges(scores, circuit)[0]) not in graph_html.pyvis_html(scores, circuit)


def test_circuit_png_has_one_frame_for_every_circuit_of_a_graph(scores: Scores, graph: Graph) -> None:
    """The PNG lays out the whole graph whatever the circuit (same picture size), in every style."""
    from PIL import Image

    def size(png: bytes) -> tuple[int, int]:
        return Image.open(__import__("io").BytesIO(png)).size

    styles = [layout.GraphStyle(), layout.GraphStyle(faded=True, edge_labels=True, picked="a0.h1")]
    pngs = [figures.circuit_png(scores, c, title="t", style=st) for c in (Circuit.empty(graph), top_n(scores, 40)) for st in styles]
    assert all(p.startswith(PNG_MAGIC) for p in pngs)
    assert len({size(p) for p in pngs}) == 1
