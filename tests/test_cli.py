"""The headless CLI on a local checkpoint folder: attribute writes a graph, evaluate prints JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from eapcore.cli import main

from conftest import CSV


@pytest.fixture()
def csv_path(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text(CSV)
    return path


@pytest.mark.devices
@pytest.mark.parametrize("suffix", [".pt", ".json"])
def test_attribute_then_evaluate(tiny_dir, csv_path, tmp_path, capsys, suffix, device):
    out = tmp_path / f"graph{suffix}"
    assert main(["attribute", "--model", str(tiny_dir), "--data", str(csv_path), "--method", "EAP-IG-inputs",
                 "--ig-steps", "3", "--batch-size", "2", "--out", str(out), "--device", device]) == 0
    assert out.exists()
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tiny_dir), "--data", str(csv_path), "--circuit", str(out), "--top-n", "10",
                 "--device", device]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"n_edges", "n_nodes", "metric", "clean_metric", "corrupted_metric", "faithfulness"} <= set(result)
    assert 0 < result["n_edges"] <= 10


def test_bad_input_exits_nonzero_with_one_line(tiny_dir, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("clean,corrupted\na,b\n")
    proc = subprocess.run(
        [sys.executable, "-m", "eapcore", "attribute", "--model", str(tiny_dir), "--data", str(bad), "--out", str(tmp_path / "x.pt")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "missing column(s) correct, incorrect" in proc.stderr.strip().splitlines()[-1]


def test_missing_model_fails_fast_with_advice(tmp_path, csv_path, capsys):
    assert main(["attribute", "--model", "no-such-org/no-such-model", "--data", str(csv_path), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert "no-such-org/no-such-model" in err and "local" in err
