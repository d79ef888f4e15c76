"""The benchmark scripts run end to end on tiny models and print their JSON record last (no timing asserted)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_attribution  # noqa: E402
import bench_evaluate  # noqa: E402
import bench_trust  # noqa: E402
import common  # noqa: E402


def last_json(capsys: pytest.CaptureFixture[str]) -> dict:
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1])


def test_bench_attribution_prints_ratios(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record = bench_attribution.main([
        "--model", str(tiny_dir), "--n", "6", "--length", "5", "--batch-size", "4", "--steps", "2",
        "--repeats", "1", "--warmup", "0", "--device", "cpu",
    ])
    line = last_json(capsys)
    assert line == json.loads(json.dumps(record))
    assert {"method", "floor_s", "ours_s", "ratio", "floor_peak_mib", "ours_peak_mib"} <= line.keys()
    assert line["method"] == "EAP-IG-inputs" and line["n"] == 6 and line["steps"] == 2
    assert line["floor_s"] > 0 and line["ours_s"] > 0
    assert line["ratio"] == pytest.approx(line["ours_s"] / line["floor_s"], rel=1e-2)


def test_bench_attribution_builds_a_random_shape(capsys: pytest.CaptureFixture[str]) -> None:
    bench_attribution.main([
        "--model", "gpt2-tiny", "--n", "3", "--length", "4", "--batch-size", "2", "--method", "clean-corrupted",
        "--repeats", "1", "--warmup", "0", "--device", "cpu",
    ])
    line = last_json(capsys)
    assert line["model"] == "gpt2-tiny" and line["method"] == "clean-corrupted" and line["steps"] == 2
    assert line["n_pos"] == 4


@pytest.mark.parametrize("method, level, keys", [
    ("EAP-IG-activations", "edge", set()), ("EAP-IG-inputs", "node", {"edge_s", "over_edge"}), ("exact", "edge", {"removals_per_s"}),
])
def test_bench_attribution_runs_every_method_and_level(method, level, keys, capsys: pytest.CaptureFixture[str]) -> None:
    record = bench_attribution.main([
        "--model", "gpt2-tiny", "--n", "3", "--length", "4", "--batch-size", "2", "--method", method, "--level", level,
        "--steps", "2", "--repeats", "1", "--warmup", "0", "--device", "cpu",
    ])
    assert last_json(capsys) == json.loads(json.dumps(record))
    assert record["method"] == method and record["level"] == level and keys <= record.keys()
    assert record["passes_per_batch"] == {"EAP-IG-activations": 2 + 5 * 2, "EAP-IG-inputs": 2 + 2, "exact": 46}[method]  # gpt2-tiny: 2 layers, 2 heads, 46 edges


def test_the_activations_floor_takes_a_gradient_pass_per_step_and_group() -> None:
    from eapcore.attribute import AttributionSpec

    assert bench_attribution.floor_alphas(AttributionSpec("EAP-IG-activations", 3), n_layers=2) == [1.0] * 15
    assert bench_attribution.floor_alphas(AttributionSpec("EAP-IG-inputs", 3), n_layers=2) == [0.0, 1 / 3, 2 / 3]


@pytest.mark.parametrize("method, passes", [("EAP", (2, 1)), ("EAP-IG-inputs", (2, 3)), ("clean-corrupted", (2, 2))])
def test_floor_does_the_method_s_passes(method: str, passes: tuple[int, int]) -> None:
    """2 forward passes without gradients, then one forward/backward per gradient step, on the raw model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from eapcore.attribute import AttributionSpec
    from eapcore.metrics import get_metric

    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=15, n_positions=16)).eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    calls: list[bool] = []
    hf.register_forward_hook(lambda module, args, kwargs, out: calls.append(torch.is_grad_enabled()), with_kwargs=True)
    grads: list[int] = []

    def count_embedding_grads(module, args, kwargs) -> None:
        if kwargs.get("inputs_embeds") is not None:
            kwargs["inputs_embeds"].register_hook(lambda g: grads.append(1))

    hf.transformer.register_forward_pre_hook(count_embedding_grads, with_kwargs=True)
    spec = AttributionSpec(method, 3)
    data = common.random_pairs(5, 4, 15)
    bench_attribution.floor_fn(hf, data, spec.alphas(), get_metric("logit_diff"), 3, "cpu")()
    n_batches = 2
    assert calls.count(False) == passes[0] * n_batches
    assert calls.count(True) == passes[1] * n_batches == len(grads)


def test_bench_evaluate_prints_latencies(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["clean", "corrupted", "correct", "incorrect"])
        w.writerows([["a b c d", "e b c d", "e", "a"], ["b c d e f", "a c d e f", "g", "b"], ["c d e", "f d e", "f", "c"]])
    record = bench_evaluate.main([
        "--model", str(tiny_dir), "--data", str(path), "--n", "3", "--batch-size", "2", "--scores", "EAP",
        "--repeats", "1", "--warmup", "0", "--device", "cpu",
    ])
    line = last_json(capsys)
    assert line == json.loads(json.dumps(record))
    assert {"move_ms", "step_ms", "curve_ms", "forward_ms"} <= line.keys()
    assert line["n"] == 3 and all(line[k] > 0 for k in ("move_ms", "step_ms", "curve_ms", "forward_ms"))
    assert line["step_edges"][1] == line["step_edges"][0] + 1  # a one-edge move


def test_bench_inspect_prints_latencies(capsys: pytest.CaptureFixture[str]) -> None:
    import bench_inspect

    record = bench_inspect.main(["--model", "gpt2-tiny", "--data", "random", "--n", "6", "--length", "5",
                                 "--batch-size", "4", "--repeats", "1", "--warmup", "0", "--device", "cpu"])
    assert last_json(capsys) == json.loads(json.dumps(record))
    assert all(record[k] > 0 for k in ("inspect_new_pair_ms", "inspect_mlp_ms", "edit_ms", "move_ms", "session_ms"))
    assert record["guess_s"] > 0 and record["measured_estimate_s"] > 0


def test_bench_trust_prints_ratios(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record = bench_trust.main([
        "--model", str(tiny_dir), "--data", "random", "--n", "4", "--length", "5", "--batch-size", "2",
        "--runs", "EAP,clean-corrupted,random", "--top-k", "3", "--repeats", "1", "--warmup", "0",
        "--verify-repeats", "1", "--device", "cpu",
    ])
    line = last_json(capsys)
    assert line == json.loads(json.dumps(record))
    assert line["top_k"] == 3 and line["runs"] == ["EAP", "clean-corrupted", "random"]
    assert all(line[k] > 0 for k in ("verify_s", "compare_ms", "curve_ms", "curves_ms", "per_example_ms", "move_ms"))
    assert line["compare_over_curve"] == pytest.approx(line["compare_ms"] / line["curve_ms"], rel=1e-2)


def test_random_scores_cover_every_real_edge(tiny32) -> None:
    from eapcore.models import model_graph

    scores = bench_evaluate.make_scores(tiny32, None, "random", "logit_diff", 4, 0)
    graph = model_graph(tiny32)
    assert bool((scores.edges != 0).eq(graph.real_edge_mask).all())


@pytest.mark.devices
def test_peak_memory_sees_an_allocation(device: str) -> None:
    """64 MiB on the device: the CPU's resident memory, or the CUDA allocator's peak (of the last GPU, so that
    a benchmark run with --device cuda:K reads cuda:K and not cuda:0)."""
    if device == "cuda":
        device = f"cuda:{torch.cuda.device_count() - 1}"

    def allocate() -> None:
        x = torch.ones(64, 2**20 // 4, device=device)  # 64 MiB, touched
        del x

    mib, how = common.peak_memory_mib(allocate, device)
    assert 48 < mib < 200, (mib, how)
    if device != "cpu":
        assert common.machine(device).startswith(torch.cuda.get_device_name(torch.device(device)))


def test_missing_model_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no config.json"):
        with common.model_folder(str(tmp_path)):
            pass


@pytest.mark.browser
@pytest.mark.slow
def test_bench_explorer_times_a_real_browser(capsys: pytest.CaptureFixture[str]) -> None:
    import bench_explorer
    from conftest import CHROMIUM, require

    require(Path(CHROMIUM).exists(), f"Chromium not found at {CHROMIUM}")
    record = bench_explorer.main(["--pairs", "16", "--moves", "3", "--chromium", CHROMIUM])
    assert last_json(capsys) == json.loads(json.dumps(record))
    assert record["pairs"] == 16 and record["run_to_graph_s"] > 0 and record["moves_counted"] == len(record["moves"])


def test_bench_panels_times_the_app_checks(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os

    import bench_panels
    import pandas as pd

    from conftest import TOY

    pd.DataFrame(TOY).to_csv(tmp_path / "toy.csv", index=False)
    before = os.environ.get("EAPCORE_APP_MODEL")
    record = bench_panels.main(["--model", str(tiny_dir), "--data", str(tmp_path / "toy.csv"), "--pairs", "6",
                                "--repeats", "1", "--top-k", "3"])
    assert os.environ.get("EAPCORE_APP_MODEL") == before  # the app's environment is restored
    for name in ("move", "verify", "per_prompt", "robustness", "compare", "areas", "compare_kept"):
        assert record[f"{name}_ms"] > 0
    assert last_json(capsys) == record
