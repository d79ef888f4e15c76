"""One circuit under every intervention (eapcore.robustness) against hand patching with each intervention's
ablated values built by hand (tests/hand_patching.py)."""

from __future__ import annotations

import pytest
import torch

from eapcore.attribute import AttributionSpec, attribute
from eapcore.data import PromptPairs, tokenize
from eapcore.evaluate import CircuitEvaluator
from eapcore.interventions import INTERVENTIONS
from eapcore.models import model_graph
from eapcore.robustness import robustness
from eapcore.select import top_n

from hand_patching import hand_metrics


def _hand_faithfulness(model, graph, data, keep, intervention):
    m, full, empty = (hand_metrics(model, graph, data, k, intervention).mean().item()
                      for k in (keep, graph.real_edge_mask, torch.zeros_like(keep)))
    return (m - empty) / (full - empty)


def test_each_intervention_equals_hand_patching(tiny64, pairs):
    four = [i for i, c in enumerate(pairs.clean) if len(c.split()) == 4]  # mean-positional needs one length
    same_length = PromptPairs(*(tuple(getattr(pairs, f)[i] for i in four) for f in ("clean", "corrupted", "correct", "incorrect")))
    data = tokenize(same_length, tiny64.tokenizer)
    graph = model_graph(tiny64)
    circuit = top_n(attribute(tiny64, data, AttributionSpec("EAP")), graph.n_edges // 4)
    seen = []
    results = robustness(tiny64, data, circuit, batch_size=2, progress=lambda done, total: seen.append((done, total)))
    assert [r.intervention for r in results] == list(INTERVENTIONS) and seen == [(i, 4) for i in range(1, 5)]
    rest = graph.real_edge_mask & ~circuit.edges
    for r in results:
        assert r.note is None
        assert r.faithfulness == pytest.approx(_hand_faithfulness(tiny64, graph, data, circuit.edges, r.intervention), rel=1e-6)
        assert r.complement_faithfulness == pytest.approx(_hand_faithfulness(tiny64, graph, data, rest, r.intervention), rel=1e-6)
    assert len({round(r.faithfulness, 6) for r in results}) == 4  # the interventions do differ


def test_mean_positional_on_prompts_of_several_lengths_says_why(tiny64, pairs):
    data = tokenize(pairs, tiny64.tokenizer)
    circuit = top_n(attribute(tiny64, data, AttributionSpec("EAP")), 20)
    patching = CircuitEvaluator(tiny64, data, batch_size=3)
    results = {r.intervention: r for r in robustness(tiny64, data, circuit, evaluators={"patching": patching})}
    note = results["mean-positional"].note
    assert results["mean-positional"].faithfulness is None and "one token length" in note and "'mean'" in note
    assert results["patching"].faithfulness == patching.faithfulness(circuit)
    assert all(results[k].note is None and results[k].faithfulness is not None for k in ("patching", "zero", "mean"))
    with pytest.raises(ValueError, match="unknown intervention"):
        robustness(tiny64, data, circuit, interventions=("resample",))
