"""Exact patching, EAP-IG-activations, information-flow routes, node/neuron levels and the zero/mean
interventions, each against an independent ground truth on a tiny model."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from eapcore.attribute import AttributionSpec, attribute
from eapcore.circuit import Circuit
from eapcore.data import DataError, PromptPairs, tokenize
from eapcore.evaluate import CircuitEvaluator
from eapcore.metrics import logit_diff, readout
from eapcore.models import model_graph

from reference_gpt2 import forward


@pytest.fixture(scope="module")
def hf64(tiny_dir):
    return GPT2LMHeadModel.from_pretrained(tiny_dir, dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def data(tiny64, pairs):
    return tokenize(pairs, tiny64.tokenizer)


def hand_metric(hf, graph, data, keep, ablate, neurons=None):
    """Mean logit difference with edges outside ``keep`` carrying ``ablate(batch, outputs)[u]``."""
    values = []
    with torch.no_grad():
        for batch in data.batches(1):
            corrupted = ablate(batch)
            logits, _, _ = forward(hf, graph, batch.clean, keep=keep, corrupted=corrupted, neurons=neurons)
            values.append(logit_diff(readout(logits, batch.lengths), batch))
    return torch.cat(values).mean().item()


def patched(hf, graph):
    return lambda batch: forward(hf, graph, batch.corrupted)[1]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]).double())[0, 1])


@pytest.mark.devices
def test_exact_equals_hand_patching(tiny64, hf64, data):
    """Every edge is checked by tests/test_evaluate.py's single-edge test; here a sample of scores."""
    graph = model_graph(tiny64)
    scores = attribute(tiny64, data, AttributionSpec(method="exact", batch_size=8)).edges
    full = hand_metric(hf64, graph, data, graph.real_edge_mask, patched(hf64, graph))
    edges = graph.real_edge_mask.nonzero().tolist()
    for r, c in edges[:: max(1, len(edges) // 8)]:
        keep = graph.real_edge_mask.clone()
        keep[r, c] = False
        expected = -(hand_metric(hf64, graph, data, keep, patched(hf64, graph)) - full)
        assert scores[r, c].item() == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_exact_node_level_ablates_one_node_at_a_time(tiny64, hf64, data):
    """Against the hook-free forward with all of a node's outgoing edges patched by hand."""
    graph = model_graph(tiny64)
    nodes = attribute(tiny64, data, AttributionSpec(method="exact", level="node", batch_size=8)).nodes
    full = hand_metric(hf64, graph, data, graph.real_edge_mask, patched(hf64, graph))
    for row in (0, 3, graph.n_forward - 1):
        keep = graph.real_edge_mask.clone()
        keep[row] = False
        expected = -(hand_metric(hf64, graph, data, keep, patched(hf64, graph)) - full)
        assert abs(expected) > 1e-3  # not vacuous
        assert nodes[row].item() == pytest.approx(expected, rel=1e-6, abs=1e-9)


@pytest.mark.devices
def test_eap_ig_activations_converges_toward_exact(tiny64, data):
    exact = attribute(tiny64, data, AttributionSpec(method="exact", batch_size=8)).edges
    real = model_graph(tiny64).real_edge_mask
    corr = {
        steps: pearson(attribute(tiny64, data, AttributionSpec(method="EAP-IG-activations", ig_steps=steps, batch_size=8)).edges[real], exact[real])
        for steps in (1, 8)
    }
    assert corr[8] > corr[1] and corr[8] > 0.9, corr


@pytest.mark.devices
def test_node_scores_are_row_sums_of_edge_scores_and_neuron_sums(tiny64, data):
    """EAP: ∂L/∂a_u = Σ over u's children of ∂L/∂h_v, so a node's score is its row of edge scores."""
    for method in ("EAP", "EAP-IG-inputs"):
        spec = dict(method=method, ig_steps=3, batch_size=3)
        edges = attribute(tiny64, data, AttributionSpec(**spec)).edges
        node = attribute(tiny64, data, AttributionSpec(level="node", **spec))
        neuron = attribute(tiny64, data, AttributionSpec(level="neuron", **spec))
        torch.testing.assert_close(node.nodes, edges.sum(1), rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(neuron.neurons.sum(-1), node.nodes, rtol=1e-9, atol=1e-12)
        assert neuron.neurons.shape == (model_graph(tiny64).n_forward, tiny64.cfg.d_model)


def _means(hf, graph, data, positional):
    outs = []
    with torch.no_grad():
        for batch in data.batches(1):
            o = torch.stack(forward(hf, graph, batch.clean)[1])  # [n_forward 1 pos d_model]
            outs.append(o[:, 0])
    if positional:
        return torch.stack(outs).mean(0)  # [n_forward pos d_model]
    return torch.cat(outs, dim=1).mean(1)  # every real position


@pytest.mark.devices
@pytest.mark.parametrize("intervention", ["zero", "mean", "mean-positional"])
def test_ablations_equal_explicit_replacement(intervention, tiny64, hf64, pairs):
    graph = model_graph(tiny64)
    if intervention == "mean-positional":  # equal lengths required
        pairs = PromptPairs.from_lists(["a b c d", "b c d e", "e f g h"], ["e b c d", "a c d e", "a f g h"], ["e", "g", "i"], ["a", "b", "c"])
    data = tokenize(pairs, tiny64.tokenizer)
    means = _means(hf64, graph, data, intervention == "mean-positional")

    def ablate(batch):
        P = batch.n_pos
        if intervention == "zero":
            return [torch.zeros(1, P, graph.cfg.d_model, dtype=torch.float64)] * graph.n_forward
        if intervention == "mean":
            return [means[u].expand(1, P, -1) for u in range(graph.n_forward)]
        return [means[u, :P].unsqueeze(0) for u in range(graph.n_forward)]

    ev = CircuitEvaluator(tiny64, data, batch_size=2, intervention=intervention)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        keep = graph.real_edge_mask & (torch.rand(graph.real_edge_mask.shape, generator=gen) < 0.6)
        ours = ev.evaluate(Circuit(graph, keep, torch.ones(graph.n_forward, dtype=torch.bool))).mean().item()
        assert ours == pytest.approx(hand_metric(hf64, graph, data, keep, ablate), rel=1e-5, abs=1e-6)


def test_mean_positional_refuses_unequal_lengths(tiny64, data):
    with pytest.raises(DataError, match="one token length"):
        CircuitEvaluator(tiny64, data, intervention="mean-positional").baseline()


@pytest.mark.parametrize("intervention", ["zero", "mean"])
def test_eap_with_zero_or_mean_ablation_is_first_order_patching(intervention, tiny64, hf64, data):
    """EAP under zero (mean) ablation is the first-order effect of moving one edge toward zero (the mean):
    d/dε of the loss of the hook-free forward whose edge (u, v) alone carries a_u + ε(ā_u − a_u), by
    central differences."""
    graph = model_graph(tiny64)
    ours = attribute(tiny64, data, AttributionSpec(method="EAP", intervention=intervention, batch_size=8)).edges
    means = _means(hf64, graph, data, positional=False) if intervention == "mean" else None
    eps = 1e-4

    def moved(step):
        def ablate(batch):
            clean = forward(hf64, graph, batch.clean)[1]
            return [a + step * ((0 if means is None else means[u]) - a) for u, a in enumerate(clean)]
        return ablate

    checked = 0
    for r, c in graph.real_edge_mask.nonzero().tolist()[::7]:
        keep = graph.real_edge_mask.clone()
        keep[r, c] = False
        expected = -(hand_metric(hf64, graph, data, keep, moved(eps)) - hand_metric(hf64, graph, data, keep, moved(-eps))) / (2 * eps)
        assert ours[r, c].item() == pytest.approx(expected, rel=1e-5, abs=1e-8)
        checked += abs(expected) > 1e-3
    assert checked >= 5
    assert not torch.allclose(ours, attribute(tiny64, data, AttributionSpec(method="EAP", batch_size=8)).edges)


def test_neuron_masks_are_honoured(tiny64, hf64, data):
    graph = model_graph(tiny64)
    gen = torch.Generator().manual_seed(2)
    neurons = torch.rand(graph.n_forward, graph.cfg.d_model, generator=gen) < 0.5
    keep = graph.real_edge_mask & (torch.rand(graph.real_edge_mask.shape, generator=gen) < 0.7)
    ev = CircuitEvaluator(tiny64, data, batch_size=3)
    ours = ev.evaluate(Circuit(graph, keep, torch.ones(graph.n_forward, dtype=torch.bool), neurons)).mean().item()
    expected = hand_metric(hf64, graph, data, keep, patched(hf64, graph), neurons=neurons)
    assert ours == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.devices
def test_information_flow_routes_match_direct_computation(tiny64, hf64, data):
    graph = model_graph(tiny64)
    ours = attribute(tiny64, data, AttributionSpec(method="information-flow-routes", batch_size=3)).edges
    expected = torch.zeros_like(ours, dtype=torch.float64)
    with torch.no_grad():
        for batch in data.batches(1):
            _, outs, inputs = forward(hf64, graph, batch.clean)
            for col, h in inputs.items():
                prev = int(graph.n_sources[col])
                x = torch.stack(outs[:prev])  # [prev 1 pos d]
                prox = (h.abs().sum(-1) - (h - x).abs().sum(-1)).clamp_min(0)
                prox = torch.nan_to_num(prox / prox.sum(0, keepdim=True))  # all-zero proximity: 0
                expected[:prev, col] += prox.mean(-1).sum(-1)
    torch.testing.assert_close(ours.double(), expected / len(data), rtol=1e-7, atol=1e-10)
    assert (ours >= 0).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "EAP-IG-inputs", "intervention": "zero"}, "needs the 'patching' intervention"),
        ({"method": "information-flow-routes", "level": "node"}, "edges only"),
        ({"intervention": "optimal"}, "unknown intervention"),
        ({"level": "head"}, "unknown level"),
    ],
)
def test_incompatible_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AttributionSpec(**kwargs)


@pytest.mark.devices
@pytest.mark.parametrize("method, level", [("EAP-IG-inputs", "edge"), ("EAP", "neuron"), ("EAP-IG-activations", "edge")])
def test_chunked_buffer_gives_the_same_scores(method, level, tiny64, data):
    """Splitting the Δ buffer into windows of source rows (for memory) changes no score."""
    spec = dict(method=method, level=level, ig_steps=2, batch_size=4)
    whole = attribute(tiny64, data, AttributionSpec(**spec))
    for chunks in (2, 5):
        split = attribute(tiny64, data, AttributionSpec(chunks=chunks, **spec))
        torch.testing.assert_close(split.edges, whole.edges, rtol=1e-12, atol=1e-15)
        if level != "edge":
            torch.testing.assert_close(split.neurons, whole.neurons, rtol=1e-12, atol=1e-15)


def test_row_windows_cover_the_rows_once(tiny64):
    from eapcore.recording import row_windows

    graph = model_graph(tiny64)
    for chunks in range(1, 6):
        windows = row_windows(graph, chunks)
        assert windows[0].start == 0 and windows[-1].stop == graph.n_forward
        assert all(a.stop == b.start for a, b in zip(windows, windows[1:])) and len(windows) <= chunks
    with pytest.raises(ValueError, match="chunks must be between 1 and 5"):
        row_windows(graph, 6)
