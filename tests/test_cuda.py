"""On a CUDA device: both attribution backends and both evaluation engines agree with each other and with
the CPU (the demo model, float32). Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from eapcore.attribute import AttributionSpec, attribute
from eapcore.data import PromptPairs, tokenize
from eapcore.evaluate import CircuitEvaluator
from eapcore.models import load_model
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
