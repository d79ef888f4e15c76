"""Hand edits of a circuit. Ground truth: ``evaluate --include/--exclude`` equals evaluating a circuit file
whose ``in_graph`` flags were edited here by hand (top-n chosen by sorting the file's scores, edits applied
by their names), then pruned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eapcore.circuit import Circuit, Scores
from eapcore.cli import main
from eapcore.edits import Edits, apply_edits, from_provenance
from eapcore.export import load_circuit, load_json, save_json, save_pt
from eapcore.graph import Graph, GraphConfig
from eapcore.select import prune, top_n

CSV = "clean,corrupted,correct,incorrect\n" + "\n".join(
    ["a b c d,e b c d,e,a", "b c d e f,a c d e f,g,b", "c d e,f d e,f,c", "d e f g h i,a e f g h i,j,d"]
)
GRAPH = Graph(GraphConfig(3, 2, False, 8))


def _random_scores(graph: Graph = GRAPH, seed: int = 0) -> Scores:
    g = torch.Generator().manual_seed(seed)
    return Scores(graph, torch.randn(graph.n_forward, graph.n_backward, generator=g) * graph.real_edge_mask)


def _child(edge: str) -> str:
    return edge.split("->")[1].split("<")[0]


def _hand_edit(data: dict, n: int, include: list[str], exclude: list[str]) -> dict:
    """Top-n by |score| (ties: file order, which is row-major), then the edits as the docs define them."""
    edges = data["edges"]
    ranked = sorted(edges, key=lambda e: -abs(edges[e]["score"]))
    keep = set(ranked[:n])
    members = {"input", "logits"} | {e.split("->")[0] for e in keep} | {_child(e) for e in keep}
    members |= {name for name in include if name in data["nodes"]}
    for name in include:
        if name in edges:
            keep.add(name)
        else:  # a node: every edge between it and the circuit's nodes
            keep |= {e for e in edges if (e.split("->")[0] == name and _child(e) in members)
                     or (_child(e) == name and e.split("->")[0] in members)}
    for name in exclude:
        keep -= {name} if name in edges else {e for e in keep if name in (e.split("->")[0], _child(e))}
    for e in edges:
        edges[e]["in_graph"] = e in keep
    parents = {e.split("->")[0] for e in keep}
    for node, entry in data["nodes"].items():
        entry["in_graph"] = node == "logits" or node in parents
    return data


@pytest.fixture()
def scored(tiny_dir, tmp_path):
    csv = tmp_path / "pairs.csv"
    csv.write_text(CSV)
    graph = tmp_path / "graph.json"
    assert main(["attribute", "--model", str(tiny_dir), "--data", str(csv), "--method", "EAP", "--out", str(graph),
                 "--device", "cpu"]) == 0
    return csv, graph


def _evaluate(capsys, tiny_dir, csv, circuit, *extra) -> dict:
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tiny_dir), "--data", str(csv), "--circuit", str(circuit), "--device", "cpu",
                 *extra]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_edits_equal_a_hand_edited_file(tiny_dir, scored, tmp_path, capsys):
    csv, graph_file = scored
    data = json.loads(graph_file.read_text())
    ranked = sorted(data["edges"], key=lambda e: -abs(data["edges"][e]["score"]))
    n = 8
    top = ranked[:n]
    include = [ranked[20], "a1.h1" if not any("a1.h1" in e for e in top) else "a0.h0"]
    exclude = [top[0], next(e.split("->")[0] for e in top[1:] if not e.startswith("input"))]
    edited = _evaluate(capsys, tiny_dir, csv, graph_file, "--top-n", str(n), "--include", *include, "--exclude", *exclude)

    hand = tmp_path / "hand.json"
    hand.write_text(json.dumps(_hand_edit(data, n, include, exclude)))
    scores, circuit = load_json(hand)
    save_json(tmp_path / "pruned.json", scores, prune(circuit))
    expected = _evaluate(capsys, tiny_dir, csv, tmp_path / "pruned.json")
    for key in ("n_edges", "n_nodes", "metric", "faithfulness", "clean_metric", "empty_metric"):
        assert edited[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key
    plain = _evaluate(capsys, tiny_dir, csv, graph_file, "--top-n", str(n))
    assert edited["unedited"] == pytest.approx({k: plain[k] for k in ("n_edges", "n_nodes", "metric", "faithfulness")})
    assert edited["edits"]["include"] == include and edited["edits"]["exclude"] == exclude
    assert edited["metric"] != pytest.approx(plain["metric"], abs=1e-3), (edited, plain)  # not vacuous


def test_cli_unknown_name_is_one_line_with_the_nearest(tiny_dir, scored, capsys):
    csv, graph_file = scored
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tiny_dir), "--data", str(csv), "--circuit", str(graph_file), "--top-n", "5",
                 "--device", "cpu", "--exclude", "a1.h0->a1.h1<q>", "--include", "a7.h0"]) == 2
    err = capsys.readouterr().err
    assert "'a1.h0->a1.h1<q>' (nearest: " in err and "'a7.h0' (nearest: 'a1.h0'" in err


def test_excluding_a_node_removes_all_its_edges():
    scores = _random_scores()
    result = apply_edits(top_n(scores, 40, prune=False), Edits(exclude=("a1.h0", "m0")))
    rows, cols = result.circuit.edges.nonzero(as_tuple=True)
    touched = {GRAPH.src_nodes[r] for r in rows.tolist()} | {GRAPH.dst_node_of_column[c] for c in cols.tolist()}
    assert not touched & {"a1.h0", "m0"} and result.circuit.n_edges > 0
    assert result.unedited.n_edges == prune(top_n(scores, 40, prune=False)).n_edges
    assert not result.dropped


def test_an_included_node_joins_the_circuit_wired_to_it():
    scores = _random_scores()
    selected = top_n(scores, 6, prune=False)
    node = next(n for n in GRAPH.src_nodes[1:] if not selected.nodes[GRAPH.src_index[n]])
    circuit = apply_edits(selected, Edits(include=(node,))).circuit
    row = GRAPH.src_index[node]
    assert circuit.nodes[row]
    for which in "qkv" if node.startswith("a") else [""]:
        child = f"{node}<{which}>" if which else node
        assert circuit.edges[0, GRAPH.dst_index[child]]  # input -> node
    assert circuit.edges[row, GRAPH.logits_column]  # node -> logits
    assert (circuit.edges & ~(selected.edges | _touching(node))).sum() == 0  # nothing else was added


def _touching(node: str) -> torch.Tensor:
    row = GRAPH.src_index[node]
    mask = torch.zeros(GRAPH.n_forward, GRAPH.n_backward, dtype=torch.bool)
    mask[row] = True
    for col, name in enumerate(GRAPH.dst_node_of_column):
        mask[:, col] |= name == node
    return mask & GRAPH.real_edge_mask


def test_included_edge_that_pruning_drops_is_reported():
    result = apply_edits(Circuit.empty(GRAPH), Edits(include=("a0.h0->m0",)))
    assert result.circuit.n_edges == 0 and result.dropped == ("a0.h0->m0",)
    kept = apply_edits(Circuit.empty(GRAPH), Edits(include=("input->m0", "m0->logits")))
    assert kept.circuit.n_edges == 2 and not kept.dropped


@pytest.mark.parametrize("edits, message", [
    (Edits(include=("a0.h1->a2.h1<x>",)), r"'a0\.h1->a2\.h1<x>' \(nearest: 'a0\.h1->a2\.h1<"),
    (Edits(exclude=("m1->a0.h0<q>",)), r"unknown node or edge name\(s\) .*'m1->a0\.h0<q>'"),
    (Edits(include=("a0.h1", "m9")), r"'m9' \(nearest: 'm2', 'm1', 'm0'\)"),
    (Edits(include=("m1",), exclude=("m1",)), "'m1' both to include and to exclude"),
    (Edits(include=("a0.h1->m1",), exclude=("m1",)), r"'a0\.h1->m1' touch an excluded node"),
    (Edits(exclude=("logits",)), "'logits' cannot be included or excluded"),
])
def test_bad_edits_are_refused(edits, message):
    with pytest.raises(ValueError, match=message):
        apply_edits(top_n(_random_scores(), 10, prune=False), edits)


@pytest.mark.parametrize("save, suffix", [(save_pt, ".pt"), (save_json, ".json")])
def test_edits_travel_with_the_exported_circuit(tmp_path: Path, save, suffix):
    scores = Scores(GRAPH, _random_scores().edges, provenance={"method": "EAP", "edits": {"include": ["stale"]}})
    edits = Edits(include=("a1.h0",), exclude=("input->m0",))
    result = apply_edits(top_n(scores, 10, prune=False), edits)
    save(tmp_path / f"c{suffix}", scores, result.circuit, edits=edits)
    loaded, circuit = load_circuit(tmp_path / f"c{suffix}", expected=GRAPH)
    assert from_provenance(loaded.provenance, GRAPH) == edits
    assert torch.equal(circuit.edges, result.circuit.edges) and loaded.provenance["method"] == "EAP"
    save(tmp_path / f"plain{suffix}", scores, result.unedited)  # no edits: the stale record is not carried over
    assert from_provenance(load_circuit(tmp_path / f"plain{suffix}")[0].provenance, GRAPH) == Edits()


def test_bad_recorded_edits_are_refused():
    with pytest.raises(ValueError, match=r"recorded edits are not valid: unknown .*'a5\.h0'"):
        from_provenance({"edits": {"include": ["a5.h0"], "exclude": []}}, GRAPH)
    with pytest.raises(ValueError, match="recorded edits are not valid: edits must be an object"):
        from_provenance({"edits": {"include": [], "remove": []}}, GRAPH)
    with pytest.raises(ValueError, match="must be lists of names"):
        from_provenance({"edits": {"include": "a0.h0"}}, GRAPH)
