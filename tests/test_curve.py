"""eapcore.curve: MIB's sizes, CPR/CMD on both axes against hand-computed areas, both rankings, and the
`evaluate --curve` command."""

from __future__ import annotations

import json
import math

import pytest

from eapcore.attribute import AttributionSpec, attribute
from eapcore.curve import (
    LEADERBOARD,
    LEADERBOARD_AXIS,
    MIB_PERCENTS,
    Curve,
    MIBCurves,
    faithfulness_curve,
    fine_percents,
    mib_curves,
    size_for_percent,
)
from eapcore.data import tokenize
from eapcore.evaluate import CircuitEvaluator
from eapcore.export import save_pt
from eapcore.select import top_n

# The toy curve of docs/mib.md, its areas worked out by hand there.
TOY = Curve((0.1, 1.0, 10.0, 100.0), (0, 0, 0, 0), (0.2, 0.5, 1.5, 1.0))
LN10 = math.log(10)


def test_toy_curve_areas_equal_the_documented_formulas_on_both_axes():
    # linear x = 0.001, 0.01, 0.1, 1: steps 0.009, 0.09, 0.9
    assert TOY.area_under("linear") == pytest.approx(0.009 * 0.35 + 0.09 * 1.0 + 0.9 * 1.25)  # 1.21815
    assert TOY.area_from_1("linear") == pytest.approx(0.009 * 0.65 + 0.09 * 0.5 + 0.9 * 0.25)  # 0.27585
    # log x = ln 0.001 ... ln 1: every step is ln 10
    assert TOY.area_under("log") == pytest.approx(LN10 * (0.35 + 1.0 + 1.25))  # 5.98672
    assert TOY.area_from_1("log") == pytest.approx(LN10 * (0.65 + 0.5 + 0.25))  # 3.22362
    assert (TOY.cpr, TOY.cmd) == (TOY.area_under("linear"), TOY.area_from_1("linear"))
    assert TOY.average == pytest.approx(0.8)
    d = TOY.to_dict()
    assert d["area_under"] == {"linear": pytest.approx(1.21815), "log": pytest.approx(LN10 * 2.6)}
    assert d["faithfulnesses"] == [0.2, 0.5, 1.5, 1.0] and d["ranking"] == "absolute"


def test_leaderboard_takes_cpr_from_the_signed_and_cmd_from_the_absolute_ranking():
    signed = Curve(TOY.percents, TOY.n_edges, TOY.faithfulness, absolute=False)
    absolute = Curve(TOY.percents, TOY.n_edges, (0.0, 0.25, 0.75, 1.0), absolute=True)
    curves = MIBCurves(signed, absolute)
    assert LEADERBOARD == {"CPR": ("signed", "area_under"), "CMD": ("absolute", "area_from_1")}
    assert LEADERBOARD_AXIS == "log"
    assert curves.leaderboard() == {"CPR": pytest.approx(LN10 * 2.6), "CMD": pytest.approx(LN10 * (0.875 + 0.5 + 0.125))}
    assert curves.leaderboard("linear")["CMD"] == pytest.approx(0.009 * 0.875 + 0.09 * 0.5 + 0.9 * 0.125)
    d = curves.to_dict()
    assert d["public_script_default"] == {"ranking": "signed", "axis": "linear", "CPR": pytest.approx(1.21815),
                                         "CMD": pytest.approx(0.27585)}


def test_flat_and_ramp_curves():
    flat = Curve(MIB_PERCENTS, tuple(range(10)), (1.0,) * 10)
    assert flat.cpr == pytest.approx(0.999) and flat.cmd == pytest.approx(0.0)
    assert flat.area_under("log") == pytest.approx(math.log(1000))  # the log axis is not normalised, as in MIB
    ramp = Curve((0.0, 100.0), (0, 10), (0.0, 1.0))
    assert ramp.cpr == pytest.approx(0.5) and ramp.cmd == pytest.approx(0.5)
    with pytest.raises(ValueError, match="log axis needs sizes above 0%"):
        ramp.area_under("log")
    assert set(ramp.to_dict()["area_under"]) == {"linear"}


def test_sizes_are_mibs_int_of_fraction_times_count():
    # MIB: int(pct * n) with pct in (.001, .002, ..., 1); Qwen-2.5's 179,749 edges, by hand
    assert [size_for_percent(179_749, p) for p in MIB_PERCENTS] == [
        179, 359, 898, 1797, 3594, 8987, 17974, 35949, 89874, 179749]
    assert [p / 100 for p in MIB_PERCENTS] == [.001, .002, .005, .01, .02, .05, .1, .2, .5, 1]
    assert size_for_percent(479, 0.1) == 0 and size_for_percent(32_491, 0.1) == 32


def test_fine_percents():
    p = fine_percents(25)
    assert len(p) == 25 and p[0] == pytest.approx(0.1) and p[-1] == pytest.approx(100.0)
    assert all(b > a for a, b in zip(p, p[1:]))


@pytest.fixture(scope="module")
def scored(tiny64, pairs):
    data = tokenize(pairs, tiny64.tokenizer)
    return data, attribute(tiny64, data, AttributionSpec("EAP", 1, "logit_diff", "patching", 8))


def test_both_rankings_on_a_tiny_model(tiny64, scored):
    data, scores = scored
    evaluator = CircuitEvaluator(tiny64, data, batch_size=8)
    calls = []
    evaluate = evaluator.evaluate
    evaluator.evaluate = lambda c: calls.append(c) or evaluate(c)
    curves = mib_curves(evaluator, scores)
    n_calls, n = len(calls), scores.graph.n_edges
    for curve, absolute in ((curves.signed, False), (curves.absolute, True)):
        assert curve.absolute is absolute and curve.n_edges == tuple(int(p / 100 * n) for p in MIB_PERCENTS)
        for size, f in zip(curve.n_edges, curve.faithfulness):
            assert f == pytest.approx(evaluator.faithfulness(top_n(scores, size, absolute=absolute)), abs=1e-9)
        assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-9)
        assert curve == faithfulness_curve(evaluator, scores, absolute=absolute)
    distinct = {tuple(top_n(scores, s, absolute=a).edges.flatten().tolist()) for s in curves.signed.n_edges
                for a in (False, True)}
    assert n_calls == len(distinct) + 1  # each distinct circuit of the two curves once, and m(∅) for the baseline


def test_evaluate_curve_command(tiny_dir, tiny64, scored, tmp_path, capsys, pairs):
    from eapcore.cli import main

    data, scores = scored
    path = tmp_path / "scores.pt"
    save_pt(path, scores, None)
    csv = tmp_path / "pairs.csv"
    csv.write_text("clean,corrupted,correct,incorrect\n" + "\n".join(
        f'{c},{k},{a[0]},"{json.dumps(list(b)).replace(chr(34), chr(34) * 2)}"'
        for c, k, a, b in zip(pairs.clean, pairs.corrupted, pairs.correct, pairs.incorrect)))
    assert main(["evaluate", "--model", str(tiny_dir), "--data", str(csv), "--circuit", str(path), "--curve",
                 "--device", "cpu", "--dtype", "float64", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("MIB leaderboard (log axis): CPR")
    result = json.loads(out[-1])
    expected = mib_curves(CircuitEvaluator(tiny64, data, batch_size=8), scores)
    assert result["signed"]["faithfulnesses"] == pytest.approx(list(expected.signed.faithfulness), abs=1e-9)
    assert result["absolute"]["faithfulnesses"] == pytest.approx(list(expected.absolute.faithfulness), abs=1e-9)
    assert result["leaderboard"] == {"axis": "log", "CPR": pytest.approx(expected.signed.area_under("log")),
                                     "CMD": pytest.approx(expected.absolute.area_from_1("log"))}
    assert result["public_script_default"]["CPR"] == pytest.approx(expected.signed.area_under("linear"))
