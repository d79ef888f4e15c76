"""eapcore against TransformerLens's own attribution patching (``transformer_lens.tools.analysis.attribution_patching``)
on the demo model, loaded by ``eapcore.models.load_model`` and handed to TransformerLens as it is.

TransformerLens scores edges per position in the denoising form, (a_clean − a_corrupt) · ∂m/∂(input) at the
corrupt run; eapcore's EAP is (a_corrupted − a_clean) · ∂L/∂(input) at the clean run, L = −m for a metric where
higher is better. So with the prompts swapped (TransformerLens's clean = our corrupted) its scores are ours
with the sign flipped, per position: summed over positions and averaged over examples they are our EAP
scores. Its faithfulness ablates every edge outside a circuit with the corrupt run's output, as eapcore's
``patching`` does, and normalises per example by the clean and corrupt metrics, as eapcore's faithfulness
does with the full and the empty circuit.

Tolerances: scores to 1e-12 (float64) and 1e-5 (float32) of the largest score, faithfulness to 1e-12 and
1e-5 absolute; measured 3e-15 and 1.5e-6 (scores), 5e-16 and 1.3e-7 (faithfulness). In float32 the two
tools take gradients along different hook paths (eapcore's unsplit backend rebuilds per-head gradients
through the norm), which rounds differently.
"""

from __future__ import annotations

import re

import pytest
import torch

from eapcore.attribute import AttributionSpec, attribute
from eapcore.circuit import Circuit
from eapcore.data import PromptPairs, tokenize
from eapcore.evaluate import CircuitEvaluator
from eapcore.metrics import get_metric, readout
from eapcore.models import load_model, model_graph
from eapcore.select import top_n
from eapcore.tasks import get_task

tl = pytest.importorskip("transformer_lens.tools.analysis.attribution_patching")

TOLERANCE = {"float64": {"scores": 1e-12, "faithfulness": 1e-12}, "float32": {"scores": 1e-5, "faithfulness": 1e-5}}
N_EXAMPLES = 2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["float64", "float32"])
def setup(request):
    model = load_model("demo", device="cpu", dtype=request.param)
    pairs = PromptPairs.from_csv(get_task("ioi").csv.read_bytes())
    data = tokenize(PromptPairs(*(getattr(pairs, f)[:N_EXAMPLES] for f in ("clean", "corrupted", "correct", "incorrect"))),
                    model.tokenizer)
    return request.param, model, data


def _metric_fn(batch):
    """TransformerLens's metric: logits ``[1 pos d_vocab]`` of one example -> its logit difference."""
    metric = get_metric("logit_diff")
    return lambda logits: metric(readout(logits, batch.lengths), batch).sum()


def _node(node) -> str:
    """A TransformerLens node as an eapcore node name (``a1.h2<q>``, ``m0``, ``input``, ``logits``)."""
    head = f"a{node.layer}.h{node.head}"
    return {"embed": "input", "attn_head_out": head, "mlp_out": f"m{node.layer}", "mlp_in": f"m{node.layer}",
            "logits": "logits", "q_input": f"{head}<q>", "k_input": f"{head}<k>", "v_input": f"{head}<v>"}[node.kind]


def test_eap_scores_equal_transformer_lens_attribution_patching(setup):
    dtype, model, data = setup
    graph = model_graph(model)
    theirs = torch.zeros(graph.n_forward, graph.n_backward, dtype=torch.float64)
    for batch in data.batches(1):  # one unpadded pair at a time, clean and corrupted swapped
        result = tl.attribution_patch(model, batch.corrupted, batch.clean, _metric_fn(batch),
                                      tl.EdgeAttributionConfig(granularity="edge"))
        for (writer, reader), score in result.edge_scores.items():  # summed over positions
            theirs[graph.src_index[_node(writer)], graph.dst_index[_node(reader)]] -= score / len(data)
    scale = float(theirs.abs().max())
    assert scale > 1e-2 and int((theirs.abs() > 1e-3 * scale).sum()) > graph.n_edges // 2  # not vacuous
    for backend in ("unsplit", "split"):
        ours = attribute(model, data, AttributionSpec(method="EAP", batch_size=N_EXAMPLES, backend=backend)).edges
        torch.testing.assert_close(ours.double(), theirs, rtol=0, atol=TOLERANCE[dtype]["scores"] * scale)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())  # neither tool left state behind


def test_faithfulness_equals_transformer_lens_ablate_outside(setup):
    dtype, model, data = setup
    graph = model_graph(model)
    scores = attribute(model, data, AttributionSpec(method="EAP", batch_size=N_EXAMPLES))
    evaluator = CircuitEvaluator(model, data, batch_size=N_EXAMPLES)
    full, empty = evaluator.evaluate(Circuit.full(graph)), evaluator.evaluate(Circuit.empty(graph))
    for n in (24, 100):  # 5% and 20% of the demo graph's 479 edges
        circuit = top_n(scores, n)
        ours = (evaluator.evaluate(circuit) - empty) / (full - empty)  # per example
        edges = circuit.edges.nonzero().tolist()
        for i, batch in enumerate(data.batches(1)):
            kept = [(_tl_node(graph, graph.src_nodes[r], p, False), _tl_node(graph, graph.dst_nodes[c], p, True))
                    for r, c in edges for p in range(batch.n_pos)]
            theirs = tl.faithfulness(model, batch.clean, batch.corrupted, _metric_fn(batch), kept).recovered
            assert abs(theirs) > 1e-2  # not vacuous
            assert ours[i].item() == pytest.approx(theirs, abs=TOLERANCE[dtype]["faithfulness"])


def _tl_node(graph, name: str, position: int, reader: bool):
    """An eapcore node name at ``position`` as a TransformerLens node (the inverse of :func:`_node`)."""
    if name == "input":
        return tl.Node("embed", position)
    if name == "logits":
        return tl.Node("logits", position, graph.cfg.n_layers - 1)
    if m := re.fullmatch(r"a(\d+)\.h(\d+)(?:<([qkv])>)?", name):
        kind = f"{m[3]}_input" if m[3] else "attn_head_out"
        return tl.Node(kind, position, int(m[1]), int(m[2]))
    return tl.Node("mlp_in" if reader else "mlp_out", position, int(name[1:]))
