"""On a CUDA device: both attribution backends and both evaluation engines agree with each other and with
the CPU (the demo model, float32); the unsplit backend at every level, slider moves, stacked removals, half
precision, host-device synchronisations, and two GPUs under torchrun. Skipped without a GPU
(``benchmarks/gpu_check.sh`` runs them on a GPU machine)."""

from __future__ import annotations

import pytest
import torch

from eapcore.attribute import AttributionSpec, attribute
from eapcore.data import PromptPairs, tokenize
from eapcore.evaluate import CircuitEvaluator
from eapcore.models import load_model, model_graph
from eapcore.select import top_n
from eapcore.tasks import get_task

pytestmark = pytest.mark.cuda


def _data(model, n=32):
    pairs = PromptPairs.from_csv(get_task("ioi").csv.read_bytes())
    return tokenize(PromptPairs(*(getattr(pairs, f)[:n] for f in ("clean", "corrupted", "correct", "incorrect"))),
                    model.tokenizer)


def test_backends_and_engines_agree_on_cuda_and_with_the_cpu():
    cpu, gpu = load_model("demo", device="cpu"), load_model("demo", device="cuda")
    data = _data(cpu)
    reference = attribute(cpu, data, AttributionSpec(method="EAP-IG-inputs", batch_size=16)).edges
    scale = float(reference.abs().max())
    for backend in ("unsplit", "split"):
        scores = attribute(gpu, data, AttributionSpec(method="EAP-IG-inputs", batch_size=16, backend=backend))
        assert scores.provenance["backend"] == backend and scores.edges.device.type == "cpu"
        torch.testing.assert_close(scores.edges, reference, rtol=0, atol=1e-3 * scale)
    engines = {e: CircuitEvaluator(gpu, data, batch_size=16, engine=e) for e in ("sparse", "hooked")}
    on_cpu = CircuitEvaluator(cpu, data, batch_size=16)
    for n in (5, 24, 100, 479):
        circuit = top_n(attribute(cpu, data, AttributionSpec(method="EAP", batch_size=16)), n)
        expected = on_cpu.evaluate(circuit, reuse_clean=False)
        for ev in engines.values():
            torch.testing.assert_close(ev.evaluate(circuit, reuse_clean=False), expected, rtol=1e-3, atol=1e-3)


def _demo(device: str, dtype: str = "float32"):
    return load_model("demo", device=device, dtype=dtype)


def _close(ours, expected, rel=1e-3):
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(ours, expected, rtol=0, atol=rel * scale)


def test_unsplit_every_level_and_activations_equal_split_on_cuda():
    gpu = _demo("cuda")
    data = _data(gpu, 16)
    for method, level in [("EAP-IG-activations", "edge"), ("EAP-IG-activations", "neuron"), ("EAP", "node"),
                          ("EAP-IG-inputs", "neuron")]:
        spec = dict(method=method, level=level, ig_steps=3, batch_size=8)
        fast = attribute(gpu, data, AttributionSpec(**spec))
        plain = attribute(gpu, data, AttributionSpec(**spec, backend="split"))
        assert fast.provenance["backend"] == "unsplit"
        for part in ("edges",) if level == "edge" else ("nodes",):
            _close(getattr(fast, part), getattr(plain, part))


def test_slider_moves_and_removals_on_cuda():
    """Moves up and down reuse what the previous circuit computed; removals are stacked; both as the hooked pass."""
    from eapcore.circuit import Circuit

    gpu = _demo("cuda")
    data = _data(gpu, 32)
    scores = attribute(gpu, data, AttributionSpec(method="EAP", batch_size=16))
    moving = CircuitEvaluator(gpu, data, batch_size=16)
    hooked = CircuitEvaluator(gpu, data, batch_size=16, engine="hooked")
    assert moving.engine == "sparse"
    for n in (24, 25, 23, 40, 39, 120, 24, 5, 479, 6):
        circuit = top_n(scores, n)
        torch.testing.assert_close(moving.evaluate(circuit, reuse_clean=False), hooked.evaluate(circuit, reuse_clean=False),
                                   rtol=1e-3, atol=1e-3)
    graph = moving.graph
    removals = [tuple(e) for e in graph.real_edge_mask.nonzero().tolist()[::11]] + [(0, None), (7, None)]
    expected = []
    for row, col in removals:
        keep = graph.real_edge_mask.clone()
        keep[row, slice(None) if col is None else col] = False
        expected.append(hooked.evaluate(Circuit(graph, keep, torch.ones(graph.n_forward, dtype=torch.bool))))
    torch.testing.assert_close(moving.without(removals), torch.stack(expected), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_keeps_the_ranking_on_cuda(dtype):
    """CUDA kernels may accumulate in half precision where the CPU's do not: the unsplit backend's norm rebuild
    and step sums are float32 whatever the model's dtype."""
    scores = {}
    for d in ("float32", dtype):
        model = _demo("cuda", d)
        data = _data(model, 64)
        real = model_graph(model).real_edge_mask
        scores[d] = attribute(model, data, AttributionSpec(batch_size=32, ig_steps=16)).edges[real]
    full, half = scores["float32"].abs(), scores[dtype].abs()
    assert torch.isfinite(half).all()
    ranks = torch.stack([full.argsort().argsort(), half.argsort().argsort()]).double()
    assert torch.corrcoef(ranks)[0, 1] > 0.99
    assert len(set(full.topk(24).indices.tolist()) & set(half.topk(24).indices.tolist())) >= 22


def test_slider_moves_synchronise_once_on_cuda():
    """A slider move reads back its result once; nothing else in eapcore's code makes the host wait."""
    import warnings
    from pathlib import Path

    gpu = _demo("cuda")
    data = _data(gpu, 32)
    scores = attribute(gpu, data, AttributionSpec(method="EAP", batch_size=8))
    evaluator = CircuitEvaluator(gpu, data, batch_size=8)  # four batches
    evaluator.baseline()
    engine = str(Path(__file__).resolve().parent.parent / "eapcore")
    for n in (24, 25, 24, 60):
        circuit = top_n(scores, n)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                evaluator.evaluate(circuit)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        ours = [w for w in caught if "synchroniz" in str(w.message) and str(w.filename).startswith(engine)]
        # the result's read-back; the plan's copies come from pinned memory, asynchronously (eapcore.upload)
        assert len(ours) <= 1, [f"{w.filename}:{w.lineno}" for w in ours]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_under_torchrun_match_one_process(tmp_path):
    import os
    import subprocess
    import sys

    from eapcore.export import load_pt

    csv = tmp_path / "ioi16.csv"
    csv.write_text("\n".join(get_task("ioi").csv.read_text().splitlines()[:17]) + "\n")  # the header and 16 pairs
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "eapcore",
           "attribute", "--model", "demo", "--data", str(csv), "--method", "EAP-IG-inputs", "--batch-size", "4",
           "--device", "cuda", "--out", str(tmp_path / "two.pt")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    parallel, _ = load_pt(tmp_path / "two.pt")
    cpu = _demo("cpu")
    single = attribute(cpu, tokenize(PromptPairs.from_csv(csv), cpu.tokenizer), AttributionSpec("EAP-IG-inputs", batch_size=4))
    _close(parallel.edges, single.edges)
    assert parallel.provenance["data_parallel"]["world_size"] == 2
