"""Data-parallel attribution: sharding, the weighted reduction, and a real 2-process gloo run under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from eapcore.attribute import AttributionSpec, attribute
from eapcore.data import PromptPairs, tokenize
from eapcore.distributed import Context, check_size, shard, shard_bounds
from eapcore.export import load_pt
from eapcore.models import model_graph

ROWS = [  # seven pairs (an odd number, so the two shards differ in size), mixed lengths
    ("a b c d", "e b c d", "e", "a"), ("b c d e f", "a c d e f", "g", "b"), ("c d e", "f d e", "f", "c"),
    ("d e f g h i", "a e f g h i", "j", "d"), ("e f g h", "b f g h", "i", "f"), ("a c e g", "i c e g", "i", "g"),
    ("b d f h j", "k d f h j", "l", "h"),
]


@pytest.fixture(scope="module")
def seven_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist") / "seven.csv"
    path.write_text("clean,corrupted,correct,incorrect\n" + "\n".join(",".join(r) for r in ROWS) + "\n")
    return path


@pytest.mark.parametrize("n,world", [(7, 2), (8, 3), (5, 5), (3, 1)])
def test_shards_cover_the_data_once_in_order(n, world):
    bounds = [shard_bounds(n, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_shard_slices_every_field(tiny32, pairs):
    data = tokenize(pairs, tiny32.tokenizer)
    parts = [shard(data, r, 3) for r in range(3)]
    assert sum(len(p) for p in parts) == len(data)
    for field in data.data.__dataclass_fields__:
        assert torch.equal(torch.cat([getattr(p.data, field) for p in parts]), getattr(data.data, field))
    assert parts[1].fingerprint.startswith(data.fingerprint)


def test_too_few_pairs_for_the_processes_is_a_clear_error():
    with pytest.raises(ValueError, match="3 prompt pair.*4 processes"):
        check_size(3, Context(rank=0, world=4))
    check_size(3, Context())  # alone, any size is fine


@pytest.mark.parametrize("method,intervention,level", [
    ("EAP-IG-inputs", "patching", "edge"), ("EAP", "mean", "node"), ("information-flow-routes", "patching", "edge"),
])
def test_size_weighted_shard_means_equal_the_whole(tiny64, pairs, method, intervention, level):
    """What the all-reduce computes, Σ n_rank · scores_rank / N, is the single-process mean (float64 model)."""
    data = tokenize(pairs, tiny64.tokenizer)
    spec = AttributionSpec(method, 3, "logit_diff", intervention, 2, level)
    whole = attribute(tiny64, data, spec)
    parts = [shard(data, r, 3) for r in range(3)]
    local = [attribute(tiny64, p, spec, reference=data) for p in parts]
    for key in ("edges", "nodes"):
        if getattr(whole, key) is None:
            continue
        combined = sum(getattr(s, key).double() * len(p) for s, p in zip(local, parts)) / len(data)
        torch.testing.assert_close(combined, getattr(whole, key).double(), rtol=1e-9, atol=1e-12)


_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def _torchrun(args: list[str], env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "eapcore", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tiny32, tiny_dir, seven_csv, tmp_path):
    """``torchrun --nproc-per-node 2 -m eapcore attribute`` (gloo on CPU, 4 + 3 pairs) writes the same scores as one
    process (the same model folder, float32); rank 0 alone writes and prints; the other rank stays quiet."""
    spec = AttributionSpec("EAP-IG-inputs", 3, "logit_diff", "patching", 2)
    data = tokenize(PromptPairs.from_csv(seven_csv), tiny32.tokenizer, tiny32.cfg.n_ctx)
    single = attribute(tiny32, data, spec)
    proc = _torchrun(["attribute", "--model", str(tiny_dir), "--data", str(seven_csv), "--method", "EAP-IG-inputs",
                      "--ig-steps", "3", "--batch-size", "2", "--device", "cpu", "--out", str(tmp_path / "two.pt")], _ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parallel, _ = load_pt(tmp_path / "two.pt")
    scale = float(single.edges.abs().max())
    assert scale > 0
    torch.testing.assert_close(parallel.edges, single.edges, rtol=1e-5, atol=1e-6 * scale)
    assert parallel.provenance["n_examples"] == single.provenance["n_examples"] == 7
    assert parallel.provenance["data"] == single.provenance["data"]
    assert parallel.provenance["data_parallel"] == {"world_size": 2, "shard": "contiguous"}
    wrote = [line for line in proc.stderr.splitlines() if line.startswith("wrote ")]
    assert wrote == [f"wrote {tmp_path / 'two.pt'}: {single.graph.n_edges} edges scored on 7 pairs by 2 processes"]


@pytest.mark.slow
def test_torchrun_errors_are_one_line_per_rank_and_nonzero(tiny_dir, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("clean,corrupted\na,b\n")
    proc = _torchrun(["attribute", "--model", str(tiny_dir), "--data", str(bad), "--device", "cpu", "--out",
                      str(tmp_path / "x.pt")], _ENV)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("eapcore attribute: error:")]
    assert errors and all("missing column(s) correct, incorrect" in line for line in errors)
    assert not (tmp_path / "x.pt").exists()


def test_device_map_auto_loads_through_the_multi_device_boot(tiny_dir, tiny32, seven_csv, tmp_path):
    """``--device-map auto`` goes through TransformerLens's accelerate-dispatched boot; on a machine without GPUs
    everything lands on the CPU and the scores equal a plain ``--device cpu`` load."""
    from eapcore.cli import main
    from eapcore.models import ModelSpec, load_model, model_device

    model = load_model(ModelSpec(str(tiny_dir), device_map="auto"))
    if not torch.cuda.is_available():
        assert str(model_device(model)) == "cpu"
    out = tmp_path / "auto.pt"
    assert main(["attribute", "--model", str(tiny_dir), "--data", str(seven_csv), "--method", "EAP", "--batch-size", "4",
                 "--device-map", "auto", "--out", str(out)]) == 0
    data = tokenize(PromptPairs.from_csv(seven_csv), tiny32.tokenizer, tiny32.cfg.n_ctx)
    expected = attribute(tiny32, data, AttributionSpec("EAP", 1, "logit_diff", "patching", 4))
    torch.testing.assert_close(load_pt(out)[0].edges, expected.edges)


def test_device_and_device_map_exclude_each_other(tiny_dir, seven_csv, tmp_path, capsys):
    from eapcore.cli import main

    assert main(["attribute", "--model", str(tiny_dir), "--data", str(seven_csv), "--device", "cpu", "--device-map", "auto",
                 "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exclude each other" in err[0]


@pytest.mark.parametrize("intervention", ["patching", "mean"])
def test_size_weighted_shard_evaluations_equal_the_whole(tiny64, pairs, intervention):
    """What ``evaluate`` reduces under torchrun: each rank's means over its shard (means over all pairs for the mean
    intervention), weighted by shard size, are the single-process means."""
    from eapcore.circuit import Circuit
    from eapcore.evaluate import CircuitEvaluator

    data = tokenize(pairs, tiny64.tokenizer)
    graph = model_graph(tiny64)
    half = torch.rand(graph.real_edge_mask.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    circuit = Circuit(graph, graph.real_edge_mask & half, torch.ones(graph.n_forward, dtype=torch.bool))

    def means(part):
        ev = CircuitEvaluator(tiny64, part, "logit_diff", 3, intervention, reference=data)
        return torch.tensor([ev.evaluate(circuit).mean().item(), ev.baseline().clean, ev.empty_metric()], dtype=torch.float64)

    parts = [shard(data, r, 3) for r in range(3)]
    combined = sum(means(p) * len(p) for p in parts) / len(data)
    torch.testing.assert_close(combined, means(data), rtol=1e-10, atol=1e-10)
