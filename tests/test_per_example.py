"""Per-pair evaluation (eapcore.per_example): each pair equals evaluating it alone and hand patching, the
pairs average to the data set's figures, and the bootstrap interval matches a plain-Python bootstrap."""

from __future__ import annotations

import json
import random

import pytest
import torch

from eapcore.attribute import AttributionSpec, attribute
from eapcore.circuit import Circuit
from eapcore.cli import main
from eapcore.data import PromptPairs, tokenize
from eapcore.evaluate import CircuitEvaluator
from eapcore.models import load_model, model_graph
from eapcore.per_example import bootstrap_interval, per_example
from eapcore.select import top_n
from eapcore.tasks import get_task

from hand_patching import hand_metrics


def _row(pairs: PromptPairs, i: int) -> PromptPairs:
    return PromptPairs(pairs.clean[i:i + 1], pairs.corrupted[i:i + 1], pairs.correct[i:i + 1], pairs.incorrect[i:i + 1])


@pytest.fixture(scope="module", params=["tiny", "demo"])
def setup(request, tiny64, pairs):
    """(model, prompt pairs, a circuit of about a tenth of the edges)."""
    if request.param == "tiny":
        model = tiny64
    else:
        model = load_model("demo", device="cpu", dtype="float64")
        p = PromptPairs.from_csv(get_task("ioi").csv)
        pairs = PromptPairs(p.clean[:10], p.corrupted[:10], p.correct[:10], p.incorrect[:10])
    data = tokenize(pairs, model.tokenizer)
    scores = attribute(model, data, AttributionSpec("EAP", batch_size=4))
    return model, pairs, top_n(scores, model_graph(model).n_edges // 10)


def test_pairs_average_to_the_data_set_and_equal_each_pair_alone(setup):
    model, pairs, circuit = setup
    graph = model_graph(model)
    evaluator = CircuitEvaluator(model, tokenize(pairs, model.tokenizer), batch_size=3)
    found = per_example(evaluator, circuit)
    base = evaluator.baseline()
    assert found.metric.mean().item() == pytest.approx(evaluator.evaluate(circuit).mean().item(), rel=1e-12)
    assert found.clean.mean().item() == pytest.approx(base.clean, rel=1e-12)
    assert found.corrupted.mean().item() == pytest.approx(base.corrupted, rel=1e-12)
    assert found.empty.mean().item() == pytest.approx(evaluator.empty_metric(), rel=1e-12)
    assert found.faithfulness == pytest.approx(evaluator.faithfulness(circuit), rel=1e-12)
    for i in range(len(pairs)):
        alone = CircuitEvaluator(model, tokenize(_row(pairs, i), model.tokenizer))
        m, e = alone.evaluate(circuit).item(), alone.evaluate(Circuit.empty(graph)).item()
        c, k = (t.item() for t in alone.example_baseline())
        ours = (found.metric[i].item(), found.clean[i].item(), found.corrupted[i].item(), found.empty[i].item())
        assert ours == pytest.approx((m, c, k, e), rel=1e-9, abs=1e-9)
        assert found.pair_faithfulness[i].item() == pytest.approx((m - e) / (c - e), rel=1e-6)
    data = tokenize(pairs, model.tokenizer)
    torch.testing.assert_close(found.metric, hand_metrics(model, graph, data, circuit.edges), rtol=1e-9, atol=1e-9)


def _plain_bootstrap(m, c, e, n_resamples, seed):
    rng, n, values = random.Random(seed), len(m), []
    for _ in range(n_resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        mm, cc, ee = (sum(x[i] for i in idx) / n for x in (m, c, e))
        values.append((mm - ee) / (cc - ee))
    values.sort()
    return values[int(0.025 * n_resamples)], values[int(0.975 * n_resamples) - 1]


def test_bootstrap_interval_matches_a_plain_bootstrap():
    gen = torch.Generator().manual_seed(0)
    c = 3 + torch.randn(200, generator=gen, dtype=torch.float64)
    e = torch.randn(200, generator=gen, dtype=torch.float64)
    m = e + (c - e) * (0.7 + 0.3 * torch.randn(200, generator=gen, dtype=torch.float64))
    low, high = bootstrap_interval(m, c, e, n_resamples=4000, seed=1)
    plain = _plain_bootstrap(m.tolist(), c.tolist(), e.tolist(), 4000, seed=2)
    point = ((m.mean() - e.mean()) / (c.mean() - e.mean())).item()
    assert low < point < high
    width = high - low
    assert low == pytest.approx(plain[0], abs=0.08 * width) and high == pytest.approx(plain[1], abs=0.08 * width)
    assert bootstrap_interval(m, c, e, 4000, seed=1) == (low, high)  # seeded
    assert bootstrap_interval(m, c, e, 4000, seed=3) != (low, high)


def test_pairs_the_corruption_leaves_unchanged_are_undefined(tiny64, pairs):
    """A pair whose corrupted prompt is its clean prompt has clean = empty: its faithfulness is NaN."""
    same = PromptPairs(("a b c d",) + pairs.clean[1:], ("a b c d",) + pairs.corrupted[1:], pairs.correct, pairs.incorrect)
    evaluator = CircuitEvaluator(tiny64, tokenize(same, tiny64.tokenizer), batch_size=3)
    circuit = top_n(attribute(tiny64, evaluator.data, AttributionSpec("EAP")), 10)
    found = per_example(evaluator, circuit)
    assert found.pair_faithfulness[0].isnan() and not found.pair_faithfulness[1:].isnan().any()
    assert all(map(lambda x: x == x, found.interval))


def test_empty_circuit_interval_is_reported(tiny64, pairs):
    evaluator = CircuitEvaluator(tiny64, tokenize(pairs, tiny64.tokenizer), batch_size=3)
    found = per_example(evaluator, Circuit.empty(evaluator.graph))
    assert found.faithfulness == 0.0 and found.interval == (0.0, 0.0)
    assert (found.pair_faithfulness == 0).all()


def test_evaluate_cli_per_example(tiny_dir, tmp_path, capsys):
    from conftest import CSV

    csv = tmp_path / "pairs.csv"
    csv.write_text(CSV)
    run = tmp_path / "run.pt"
    assert main(["attribute", "--model", str(tiny_dir), "--data", str(csv), "--method", "EAP", "--out", str(run), "--device", "cpu"]) == 0
    capsys.readouterr()
    base = ["evaluate", "--model", str(tiny_dir), "--data", str(csv), "--circuit", str(run), "--top-n", "8", "--device", "cpu"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "per_example" not in plain
    assert main(base + ["--per-example"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: out[k] for k in plain} == plain
    assert [p["pair"] for p in out["per_example"]] == [0, 1, 2]
    assert all({"metric", "clean", "corrupted", "faithfulness"} <= p.keys() for p in out["per_example"])
    assert sum(p["metric"] for p in out["per_example"]) / 3 == pytest.approx(out["metric"], rel=1e-6)
    low, high = out["faithfulness_ci"]
    assert low <= high
