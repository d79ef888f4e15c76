"""Comparing runs (eapcore.compare): overlap, Spearman and disagreements against a direct computation from
the saved files in plain Python (its own ranking, ranks and pruning by node names); curves against
faithfulness_curve; runs for different graphs or data refused, naming both."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from eapcore.attribute import AttributionSpec, attribute
from eapcore.circuit import Scores
from eapcore.cli import main
from eapcore.compare import check_comparable, compare, iou
from eapcore.data import PromptPairs, tokenize
from eapcore.curve import MIB_PERCENTS, faithfulness_curve
from eapcore.evaluate import CircuitEvaluator
from eapcore.export import load_pt, save_pt
from eapcore.graph import Graph, GraphConfig
from eapcore.models import load_model, model_graph
from eapcore.tasks import get_task

from conftest import plain_pearson, plain_ranks

METHODS = ("EAP", "EAP-IG-inputs", "clean-corrupted")


@pytest.fixture(scope="module", params=["tiny", "demo"])
def setup(request, tiny64, pairs, tmp_path_factory):
    """(model, data, {file: scores}) with three methods' runs saved as .pt files and loaded back."""
    if request.param == "tiny":
        model, data = tiny64, tokenize(pairs, tiny64.tokenizer)
    else:
        model = load_model("demo", device="cpu", dtype="float32")
        p = PromptPairs.from_csv(get_task("ioi").csv)
        data = tokenize(PromptPairs(p.clean[:16], p.corrupted[:16], p.correct[:16], p.incorrect[:16]), model.tokenizer)
    folder = tmp_path_factory.mktemp(request.param)
    runs = {}
    for method in METHODS:
        path = str(folder / f"{method}.pt")
        save_pt(path, attribute(model, data, AttributionSpec(method, 3, batch_size=8)), None)
        runs[path] = load_pt(path, model_graph(model))[0]
    return model, data, runs


def _from_file(path: str) -> tuple[list[str], list[float]]:
    """(edge names, scores) of the real edges, read straight from the file, row-major."""
    raw = torch.load(path, weights_only=True)
    real, scores = raw["edges_in_graph"].tolist(), raw["edges_scores"].tolist()
    names, values = [], []
    for r, src in enumerate(raw["src_nodes"]):
        for c, dst in enumerate(raw["dst_nodes"]):
            if real[r][c]:
                names.append(f"{src}->{dst}")
                values.append(scores[r][c])
    return names, values


def _plain_top(names: list[str], values: list[float], n: int) -> set[str]:
    """The n edges with the largest |score| (earlier edge first among ties), pruned to input -> logits paths."""
    order = sorted(range(len(values)), key=lambda i: (-abs(values[i]), i))
    edges = {names[i] for i in order[:n]}
    while True:
        parents = {e.split("->")[0] for e in edges}
        children = {e.split("->")[1].split("<")[0] for e in edges}
        live = lambda node, side: node == "logits" or node in side  # noqa: E731
        kept = {e for e in edges if (e.startswith("input->") or e.split("->")[0] in children)
                and live(e.split("->")[1].split("<")[0], parents)}
        if kept == edges:
            return edges
        edges = kept


def test_overlap_spearman_and_disagreements_equal_a_direct_computation(setup):
    model, data, runs = setup
    result = compare(CircuitEvaluator(model, data, batch_size=8), runs)
    files = list(runs)
    n_edges = model_graph(model).n_edges
    assert result.sizes == tuple(int(p / 100 * n_edges) for p in MIB_PERCENTS)  # MIB's int(pct * n)
    assert list(result.overlap) == list(result.spearman) == [(files[0], files[1]), (files[0], files[2]), (files[1], files[2])]
    for a, b in result.overlap:
        (names, va), (_, vb) = _from_file(a), _from_file(b)
        expected = []
        for n in result.sizes:
            ea, eb = _plain_top(names, va, n), _plain_top(names, vb, n)
            expected.append(len(ea & eb) / len(ea | eb) if ea | eb else 1.0)
        assert result.overlap[a, b] == pytest.approx(tuple(expected), abs=1e-12)
        ra, rb = plain_ranks([abs(v) for v in va]), plain_ranks([abs(v) for v in vb])
        assert result.spearman[a, b] == pytest.approx(plain_pearson(ra, rb), rel=1e-9)
        top = result.disagreements[a, b][0]
        gap = [abs(x - y) for x, y in zip(ra, rb)]
        assert abs(top.rank_a - top.rank_b) == max(gap)
        i = names.index(top.edge)
        assert (top.rank_a, top.rank_b) == (len(names) + 1 - ra[i], len(names) + 1 - rb[i])
        assert (top.score_a, top.score_b) == (va[i], vb[i])
        gaps = [abs(d.rank_a - d.rank_b) for d in result.disagreements[a, b]]
        assert gaps == sorted(gaps, reverse=True) and len(gaps) == 10
    assert any(0 < v < 1 for values in result.overlap.values() for v in values)  # the runs differ somewhere


def test_curves_are_faithfulness_curves(setup):
    model, data, runs = setup
    evaluator = CircuitEvaluator(model, data, batch_size=8)
    seen = []
    result = compare(evaluator, runs, progress=lambda done, total: seen.append((done, total)))
    for path, scores in runs.items():
        curve = faithfulness_curve(evaluator, scores)
        assert result.curves[path] == curve
        assert (result.curves[path].cpr, result.curves[path].cmd) == (curve.cpr, curve.cmd)
    total = len(runs) * len(MIB_PERCENTS)
    assert seen == [(i, total) for i in range(1, total + 1)]


def test_runs_for_different_graphs_or_data_are_refused_naming_both(setup):
    _, _, runs = setup
    (a, sa), (b, sb) = list(runs.items())[:2]
    other = Graph(GraphConfig(3, 2, d_model=8))
    with pytest.raises(ValueError, match=f"runs {a} and other.pt are for different graphs.*3 layers x 2 heads"):
        check_comparable({a: sa, "other.pt": Scores(other, torch.zeros(other.n_forward, other.n_backward))})
    moved = replace(sb, provenance={**sb.provenance, "data": "0123456789abcdef"})
    with pytest.raises(ValueError, match=f"runs {a} and {b} were attributed on different data.*0123456789abcdef"):
        check_comparable({a: sa, b: moved})
    check_comparable({a: sa, b: replace(sb, provenance={})})  # an EAP-IG file without provenance: no data to compare
    with pytest.raises(ValueError, match="at least one run"):
        check_comparable({})


def test_iou_of_two_empty_circuits_is_one():
    empty = torch.zeros(3, 4, dtype=torch.bool)
    assert iou(empty, empty) == 1.0
    one = empty.clone()
    one[0, 0] = True
    assert iou(one, empty) == 0.0 and iou(one, one) == 1.0


def test_compare_cli(tiny_dir, tmp_path, capsys):
    from conftest import save_tiny_gpt2
    from conftest import CSV

    csv, other_csv = tmp_path / "pairs.csv", tmp_path / "other.csv"
    csv.write_text(CSV)
    other_csv.write_text(CSV.replace("a b c d,e b c d", "a b c e,f b c e"))
    files = []
    for method in METHODS[:2]:
        files.append(str(tmp_path / f"{method}.pt"))
        assert main(["attribute", "--model", str(tiny_dir), "--data", str(csv), "--method", method, "--out", files[-1],
                     "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["compare", "--model", str(tiny_dir), "--data", str(csv), "--runs", *files, "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    key = f"{files[0]}|{files[1]}"
    assert {"sizes", "runs", "overlap", "spearman"} <= out.keys()
    assert [r["file"] for r in out["runs"]] == files and [r["method"] for r in out["runs"]] == list(METHODS[:2])
    assert all(len(r["faithfulness"]) == len(out["sizes"]) and {"cpr", "cmd"} <= r.keys() for r in out["runs"])
    assert list(out["overlap"]) == [key] and len(out["overlap"][key]) == len(out["sizes"]) and -1 <= out["spearman"][key] <= 1

    wide = save_tiny_gpt2(tmp_path / "wide", n_layer=3)
    other_graph, other_data = str(tmp_path / "wide.pt"), str(tmp_path / "other-data.pt")
    assert main(["attribute", "--model", str(wide), "--data", str(csv), "--method", "EAP", "--out", other_graph,
                 "--device", "cpu"]) == 0
    assert main(["attribute", "--model", str(tiny_dir), "--data", str(other_csv), "--method", "EAP", "--out", other_data,
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    for other, words in ((other_graph, "different graphs"), (other_data, "different data")):
        assert main(["compare", "--model", str(tiny_dir), "--data", str(csv), "--runs", files[0], other]) == 2
        err = capsys.readouterr().err
        assert f"runs {files[0]} and {other}" in err and words in err
    assert main(["compare", "--model", str(tiny_dir), "--data", str(csv), "--runs", files[0], files[0]]) == 2
    assert "more than once" in capsys.readouterr().err
