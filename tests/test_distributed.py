"""Data-parallel attribution: sharding, the weighted reduction, and a real 2-process gloo run under torchrun;
models split over devices (--device-map): the multi-device boot, and the engine's moves between devices."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from eapcore.attribute import AttributionSpec, attribute
from eapcore.data import PromptPairs, tokenize
from eapcore.distributed import Context, check_size, collective, shard
from eapcore.export import load_pt
from eapcore.models import model_graph

from conftest import cuda_devices

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


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_cover_every_pair_once_and_share_the_work(tiny32, pairs, world):
    """Every field of every pair lands in exactly one shard, the sizes differ by at most one, and pairs sorted by
    length give every shard about the same number of tokens (contiguous shards gave the last one the longest)."""
    data = tokenize(pairs, tiny32.tokenizer)
    parts = [shard(data, r, world) for r in range(world)]
    sizes = [len(p) for p in parts]
    assert sum(sizes) == len(data) and max(sizes) - min(sizes) <= 1
    rows = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    for field in data.data.__dataclass_fields__:
        whole = getattr(data.data, field)
        together = torch.cat([getattr(p.data, field) for p in parts])
        assert rows(together.reshape(len(data), -1)) == rows(whole.reshape(len(data), -1))
    assert parts[-1].fingerprint.startswith(data.fingerprint) and len({p.fingerprint for p in parts}) == world
    by_length = sorted(range(len(pairs)), key=lambda i: len(pairs.clean[i].split()))
    ordered = tokenize(PromptPairs(*(tuple(getattr(pairs, f)[i] for i in by_length)
                                     for f in ("clean", "corrupted", "correct", "incorrect"))), tiny32.tokenizer)
    tokens = [int(shard(ordered, r, world).data.lengths.sum()) for r in range(world)]
    assert max(tokens) - min(tokens) <= int(ordered.data.lengths.max())


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
    assert parallel.provenance["data_parallel"] == {"world_size": 2, "shard": "interleaved"}
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
    everything lands on the CPU and the scores equal a plain ``--device cpu`` load (with GPUs, the model lands on
    them: float32 on another device, hence the tolerance)."""
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
    scale = float(expected.edges.abs().max())
    torch.testing.assert_close(load_pt(out)[0].edges, expected.edges, rtol=1e-4, atol=1e-5 * scale)


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


def test_a_rank_that_cannot_reach_the_others_reports_its_own_error():
    """A failing rank whose all-reduce fails too (here: no process group; on a GPU: a CUDA error that broke its
    device) raises its own error, not the collective's, and exits; torchrun then stops the other ranks."""
    def fail():
        raise ValueError("row 3: the real problem")

    with pytest.raises(ValueError, match="row 3: the real problem"):
        collective(fail, Context(rank=1, world=2))
    assert collective(lambda: 7, Context()) == 7


# ----- models split over devices -----

METHODS = [("EAP-IG-inputs", "patching", "edge"), ("EAP", "mean", "node"), ("EAP-IG-activations", "patching", "edge"),
           ("information-flow-routes", "patching", "edge")]


def test_information_flow_moves_what_it_reads_to_each_layer_s_device(tiny32):
    """On a model split over GPUs a destination's hook runs on its layer's device while the source outputs and
    the scores live on the first. PyTorch's fake tensors check the devices of every operation without a GPU
    (two fake CUDA devices here): each block is computed on the hook's device and added to the scores' device."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from eapcore.attribute import Routes
    from eapcore.gradients import Accumulator
    from eapcore.sites import destinations

    graph = model_graph(tiny32)
    first, second = torch.device("cuda:0"), torch.device("cuda:1")
    with FakeTensorMode():
        outs = torch.empty(graph.n_forward, 2, 3, graph.cfg.d_model, device=first)
        acc = Accumulator(graph, "edge", torch.zeros(graph.n_forward, graph.n_backward, device=first), None)
        routes = Routes(outs, torch.full((2, 3), 1 / 3, device=first), acc)
        for d in destinations(graph):  # every layer's destinations on the second device, the logits' too
            routes(torch.empty(2, 3, *([graph.cfg.n_heads] if d.cols.stop - d.cols.start > 1 else []), graph.cfg.d_model,
                               device=second), d)
        assert acc.edges.device == first and set(routes.on_device) == {first, second}


def _split_model_matches_the_cpu(spec, tiny_dir, pairs):
    """Every method, and circuit evaluation (the engine ``auto`` picks: sparse on one device, hooked on several; and
    the hooked one), on the model of ``spec`` give the CPU's float32 numbers."""
    from eapcore.circuit import Circuit
    from eapcore.evaluate import CircuitEvaluator
    from eapcore.models import load_model

    cpu, split = load_model(str(tiny_dir), device="cpu", dtype="float32"), load_model(spec)
    data = tokenize(pairs, cpu.tokenizer)
    for method, intervention, level in METHODS:
        aspec = AttributionSpec(method, 3, "logit_diff", intervention, 3, level)
        expected, ours = attribute(cpu, data, aspec), attribute(split, data, aspec)
        for key in ("edges", "nodes"):
            if getattr(expected, key) is not None:
                scale = float(getattr(expected, key).abs().max())
                torch.testing.assert_close(getattr(ours, key), getattr(expected, key), rtol=1e-4, atol=1e-5 * scale)
    graph = model_graph(cpu)
    circuit = Circuit(graph, graph.real_edge_mask & (torch.rand(graph.real_edge_mask.shape,
                      generator=torch.Generator().manual_seed(0)) < 0.5), torch.ones(graph.n_forward, dtype=torch.bool))
    expected = CircuitEvaluator(cpu, data, batch_size=3).evaluate(circuit, reuse_clean=False)
    for engine in ("auto", "hooked"):
        ours = CircuitEvaluator(split, data, batch_size=3, engine=engine).evaluate(circuit, reuse_clean=False)
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    return split


@pytest.mark.cuda
def test_device_map_auto_on_a_gpu_gives_the_cpu_scores(tiny_dir, pairs):
    from eapcore.models import ModelSpec, model_device

    model = _split_model_matches_the_cpu(ModelSpec(str(tiny_dir), device_map="auto"), tiny_dir, pairs)
    assert model_device(model).type == "cuda"


@pytest.mark.cuda
def test_a_model_split_over_two_gpus_gives_the_cpu_scores(tiny_dir, pairs):
    """``--n-devices 2``: the layers on two GPUs, so that every hook that reads the first device's buffers
    (recording, Δ, gradients, patches, information-flow routes, read-outs) runs on the second one too."""
    from eapcore.models import ModelSpec

    cuda_devices(2)
    model = _split_model_matches_the_cpu(ModelSpec(str(tiny_dir), n_devices=2), tiny_dir, pairs)
    assert len({p.device for p in model.parameters()}) == 2
