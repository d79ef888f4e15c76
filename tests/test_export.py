"""Circuit files: exact round trips, EAP-IG layout, and refusal of unsafe or malformed files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eapcore.circuit import Circuit, Scores
from eapcore.export import load_circuit, load_json, load_pt, save_json, save_pt
from eapcore.graph import Graph, GraphConfig
from eapcore.select import top_n

from conftest import Evil, edit, json_edit

PROVENANCE = {"model": "gpt2", "steps": 5, "pair": [1, 2], "nested": {"none": None, "f": 0.1, "ok": True}}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def make(cfg: GraphConfig, neurons: bool = True) -> tuple[Scores, Circuit]:
    graph = Graph(cfg)
    g = torch.Generator().manual_seed(0)
    edges = torch.randn(graph.n_forward, graph.n_backward, generator=g).where(graph.real_edge_mask, 0.0)
    edges[0, 0], edges[0, 1] = -0.0, 1e-42  # signed zero and a subnormal survive
    nodes = torch.randn(graph.n_forward, generator=g)
    nodes[0] = float("nan")
    d = cfg.d_model
    scores = Scores(
        graph, edges, nodes, torch.randn(graph.n_forward, d, generator=g) if neurons else None, PROVENANCE
    )
    circuit = top_n(scores, graph.n_edges // 3)
    if neurons:
        neuron_mask = torch.rand(graph.n_forward, d, generator=g) > 0.5
        circuit = Circuit(graph, circuit.edges, circuit.nodes, neuron_mask)
    return scores, circuit


def assert_same(a: tuple[Scores, Circuit], b: tuple[Scores, Circuit]) -> None:
    (sa, ca), (sb, cb) = a, b
    assert sa.graph == sb.graph == ca.graph == cb.graph
    for x, y in [(sa.edges, sb.edges), (sa.nodes, sb.nodes), (sa.neurons, sb.neurons)]:
        assert (x is None and y is None) or torch.equal(bits(x), bits(y))
    for x, y in [(ca.edges, cb.edges), (ca.nodes, cb.nodes), (ca.neurons, cb.neurons)]:
        assert (x is None and y is None) or torch.equal(x, y)
    assert sb.provenance == sa.provenance


@pytest.mark.parametrize("save, load", [(save_pt, load_pt), (save_json, load_json)])
@pytest.mark.parametrize("neurons", [True, False])
def test_round_trip_is_exact(tmp_path: Path, save, load, neurons: bool) -> None:
    scores, circuit = make(GraphConfig(3, 2, d_model=4), neurons)
    path = tmp_path / ("c.pt" if save is save_pt else "c.json")
    save(path, scores, circuit)
    loaded = load(path, expected=scores.graph)
    assert_same((scores, circuit), loaded)
    assert_same((scores, circuit), load_circuit(path))


@pytest.mark.parametrize("save, suffix", [(save_pt, "pt"), (save_json, "json")])
def test_file_objects_read_and_write_what_paths_do(tmp_path: Path, save, suffix: str) -> None:
    """Saving into a BytesIO gives the file's bytes (.json exactly; .pt the same tensors), and loading
    from one gives what loading the path gives; messages name the file by ``name``."""
    import io

    scores, circuit = make(GraphConfig(2, 2, d_model=4))
    path = tmp_path / f"c.{suffix}"
    save(path, scores, circuit)
    buf = io.BytesIO()
    save(buf, scores, circuit)
    if suffix == "json":
        assert buf.getvalue() == path.read_bytes()
    from_path = load_circuit(path, expected=scores.graph)
    assert_same(from_path, load_circuit(io.BytesIO(buf.getvalue()), expected=scores.graph, name=f"upload.{suffix}"))
    assert_same(from_path, load_circuit(io.BytesIO(path.read_bytes()), name=f"x.{suffix}"))
    damaged = io.BytesIO(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ValueError, match=rf"^my upload\.{suffix} is not a valid eapcore/EAP-IG \.{suffix} circuit file"):
        load_circuit(damaged, name=f"my upload.{suffix}")
    with pytest.raises(ValueError, match=r"cannot load circuit file notes\.txt: unknown suffix"):
        load_circuit(io.BytesIO(b""), name="notes.txt")


@pytest.mark.parametrize("save, suffix", [(save_pt, "pt"), (save_json, "json")])
def test_defaults_without_scores_or_circuit(tmp_path: Path, save, suffix: str) -> None:
    scores, circuit = make(GraphConfig(2, 2), neurons=False)
    save(tmp_path / f"s.{suffix}", scores, None, provenance={"run": 1})
    only_scores, full = load_circuit(tmp_path / f"s.{suffix}")
    assert torch.equal(full.edges, scores.graph.real_edge_mask) and full.nodes.all()
    assert only_scores.provenance == {"run": 1}
    save(tmp_path / f"c.{suffix}", None, circuit)
    zeros, same = load_circuit(tmp_path / f"c.{suffix}")
    assert not zeros.edges.any() and torch.equal(same.edges, circuit.edges)
    with pytest.raises(ValueError, match="nothing to save"):
        save(tmp_path / f"n.{suffix}", None, None)


def test_pt_layout_matches_reference(tmp_path: Path) -> None:
    scores, circuit = make(GraphConfig(2, 2, d_model=4))
    save_pt(tmp_path / "c.pt", scores, circuit)
    data = torch.load(tmp_path / "c.pt", weights_only=True)
    graph = scores.graph
    assert data["cfg"] == {"n_layers": 2, "n_heads": 2, "parallel_attn_mlp": False, "d_model": 4}
    assert data["src_nodes"] == graph.src_nodes and data["dst_nodes"][-1] == "logits"
    assert data["dst_nodes"][:5] == ["a0.h0<q>", "a0.h1<q>", "a0.h0<k>", "a0.h1<k>", "a0.h0<v>"]
    assert data["edges_scores"].dtype == torch.float32 and data["edges_in_graph"].dtype == torch.bool
    assert {"nodes_scores", "neurons_scores", "neurons_in_graph", "nodes_in_graph"} <= set(data)
    assert data["eapcore"] == PROVENANCE


def test_json_layout_matches_reference(tmp_path: Path) -> None:
    scores, circuit = make(GraphConfig(2, 2, d_model=4), neurons=False)
    save_json(tmp_path / "c.json", scores, circuit)
    data = json.loads((tmp_path / "c.json").read_text())
    graph = scores.graph
    rows, cols = graph.real_edge_mask.nonzero(as_tuple=True)
    assert list(data["edges"]) == [graph.edge_name(r, c) for r, c in zip(rows.tolist(), cols.tolist())]
    assert list(data["nodes"]) == graph.node_names
    assert data["nodes"]["logits"] == {"in_graph": True}
    assert set(data["nodes"]["a0.h0"]) == {"in_graph", "score"}
    assert set(data["edges"]["input->a0.h0<q>"]) == {"score", "in_graph"}


def test_gpt2_small_json_has_every_edge(tmp_path: Path) -> None:
    graph = Graph(GraphConfig(12, 12))
    save_json(tmp_path / "c.json", None, Circuit.full(graph))
    assert len(json.loads((tmp_path / "c.json").read_text())["edges"]) == 32_491


# ----- refusals -----


@pytest.mark.parametrize("action", ["system", "open"])
def test_pickled_object_is_refused(tmp_path: Path, action: str) -> None:
    scores, circuit = make(GraphConfig(1, 1), neurons=False)
    marker = tmp_path / "pwned"
    save_pt(tmp_path / "ok.pt", scores, circuit)
    payload = torch.load(tmp_path / "ok.pt", weights_only=True)
    payload["eapcore"] = {"model": Evil(action, marker)}
    torch.save(payload, tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(ValueError, match="evil.pt.*non-tensor objects and was refused for safety"):
        load_pt(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize("keep", [0, 10, 0.5, -10])
def test_truncated_pt_is_refused(tmp_path: Path, keep: float) -> None:
    scores, circuit = make(GraphConfig(1, 2), neurons=False)
    save_pt(tmp_path / "c.pt", scores, circuit)
    raw = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "c.pt").write_bytes(raw[: int(keep * len(raw)) if isinstance(keep, float) else keep])
    with pytest.raises(ValueError, match=r"c\.pt is not a valid eapcore/EAP-IG \.pt circuit"):
        load_pt(tmp_path / "c.pt")


def test_truncated_json_is_refused(tmp_path: Path) -> None:
    scores, circuit = make(GraphConfig(1, 2), neurons=False)
    save_json(tmp_path / "c.json", scores, circuit)
    text = (tmp_path / "c.json").read_text()
    (tmp_path / "c.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"c\.json is not a valid .*not valid JSON"):
        load_json(tmp_path / "c.json")


@pytest.mark.parametrize("save", [save_pt, save_json])
def test_other_config_is_refused(tmp_path: Path, save) -> None:
    path = tmp_path / ("c.pt" if save is save_pt else "c.json")
    save(path, None, Circuit.full(Graph(GraphConfig(12, 12))))
    shapes = "is for a model with 12 layers x 12 heads.*the loaded model has 4 layers x 4 heads"
    with pytest.raises(ValueError, match=shapes):
        load_circuit(path, expected=Graph(GraphConfig(4, 4)))


def pt_payload(tmp_path: Path) -> dict:
    scores, circuit = make(GraphConfig(2, 2), neurons=False)
    save_pt(tmp_path / "c.pt", scores, circuit)
    return torch.load(tmp_path / "c.pt", weights_only=True)


@pytest.mark.parametrize(
    "change, message",
    [
        ("missing key", "'edges_in_graph'.* missing"),
        ("non-real cell", "not edges of the graph"),
        ("names", "'src_nodes' does not list"),
        ("shape", r"'nodes_in_graph' has shape \(6,\) but this graph needs \(7,\)"),
        ("dtype", "must be a bool tensor"),
        ("cfg", "n_layers.*must be an integer"),
    ],
)
def test_malformed_pt_is_refused(tmp_path: Path, change: str, message: str) -> None:
    data = pt_payload(tmp_path)
    edit(data, change)
    torch.save(data, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=message):
        load_pt(tmp_path / "bad.pt")


@pytest.mark.parametrize(
    "change, message",
    [
        ("missing edge", "1 of the graph's 46 edges are missing, e.g. 'a0.h1->m0'"),
        ("unknown edge", "1 unknown edge name.*'a0.h0->a9.h0<q>'"),
        ("backwards edge", "1 unknown edge name.*'m1->a0.h0<q>'"),
        ("score type", r"edge 'input->m0'\['score'\] must be a number, got '0.5'"),
        ("in_graph type", r"\['in_graph'\] must be a bool, got 1"),
        ("node type", r"node 'm0'\['in_graph'\] must be a bool"),
        ("missing node", "1 node.* missing, e.g. 'm1'"),
        ("partial node scores", "some nodes have 'score'"),
        ("no edges", "required key 'edges' is missing"),
    ],
)
def test_malformed_json_is_refused(tmp_path: Path, change: str, message: str) -> None:
    scores, circuit = make(GraphConfig(2, 2), neurons=False)
    save_json(tmp_path / "c.json", scores, circuit)
    data = json.loads((tmp_path / "c.json").read_text())
    json_edit(data, change)
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        load_json(tmp_path / "bad.json")


def test_duplicate_json_edge_is_refused(tmp_path: Path) -> None:
    save_json(tmp_path / "c.json", None, Circuit.full(Graph(GraphConfig(1, 1))))
    text = (tmp_path / "c.json").read_text()
    entry = '"input->m0": {"score": 0.0, "in_graph": true}'
    (tmp_path / "dup.json").write_text(text.replace(entry, f"{entry}, {entry}"))
    with pytest.raises(ValueError, match="'input->m0' appears more than once"):
        load_json(tmp_path / "dup.json")


def test_bad_suffix_and_bad_provenance(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown suffix '\.csv'.*\.pt or \.json"):
        load_circuit(tmp_path / "c.csv")
    scores, _ = make(GraphConfig(1, 1), neurons=False)
    with pytest.raises(ValueError, match=r"provenance\['model'\] is a Tensor"):
        save_pt(tmp_path / "c.pt", scores, None, provenance={"model": torch.zeros(1)})


def test_mismatched_scores_and_circuit_are_refused(tmp_path: Path) -> None:
    scores, _ = make(GraphConfig(1, 1), neurons=False)
    with pytest.raises(ValueError, match="circuit is for"):
        save_json(tmp_path / "c.json", scores, Circuit.full(Graph(GraphConfig(2, 1))))
