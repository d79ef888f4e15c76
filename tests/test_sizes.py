"""Engine helpers the explorer presents: circuit sizes by level (eapcore.sizes, select.top), the gap that
faithfulness divides by (eapcore.gap), unknown words (eapcore.tokens), what attribute() records and what
its progress counts to."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eapcore.attribute import AttributionSpec, attribute
from eapcore.circuit import Scores
from eapcore.data import PromptPairs, tokenize
from eapcore.curve import MIB_PERCENTS
from eapcore.evaluate import CircuitEvaluator
from eapcore.gap import faithfulness, gap_warning, no_gap
from eapcore.graph import Graph, GraphConfig
from eapcore.methods import METHODS
from eapcore.models import source_name
from eapcore.select import by_nodes, prune, selection, top, top_n, unit_of
from eapcore.sizes import default_size, fine_grid, sizes_for_percents, unit_count
from eapcore.tokens import UnknownWord, unknown_words


@pytest.fixture(scope="module")
def graph() -> Graph:
    return Graph(GraphConfig(n_layers=4, n_heads=4, d_model=8))


def node_scores(graph: Graph, unscored: int = 0) -> Scores:
    nodes = torch.linspace(-1, 2, graph.n_forward)
    nodes[:unscored] = float("nan")
    return Scores(graph, torch.zeros(graph.n_forward, graph.n_backward), nodes, provenance={"level": "node"})


def edge_scores(graph: Graph) -> Scores:
    gen = torch.Generator().manual_seed(0)
    return Scores(graph, torch.randn(graph.n_forward, graph.n_backward, generator=gen) * graph.real_edge_mask,
                  provenance={"level": "edge"})


def test_units_and_default_sizes(graph: Graph) -> None:
    edges, nodes = edge_scores(graph), node_scores(graph, unscored=1)
    assert unit_of(edges) == "edges" and unit_count(edges) == graph.n_edges == 479
    assert default_size(edges) == 24  # 5% of 479
    assert unit_of(nodes) == "nodes" and unit_count(nodes) == graph.n_forward - 1 == 20
    assert default_size(nodes) == 4  # 20% of 20 nodes, not "20 of 21"
    assert unit_of(Scores(graph, edges.edges, provenance={"level": "node"})) == "edges"  # no node scores: by edge


def test_node_curves_step_through_whole_nodes(graph: Graph) -> None:
    nodes = node_scores(graph)
    percents, sizes = fine_grid(nodes)
    assert sizes == list(range(1, 22)) and percents[-1] == pytest.approx(100.0)
    assert sizes_for_percents(nodes, MIB_PERCENTS) == [0, 0, 0, 0, 0, 1, 2, 4, 10, 21]  # MIB's int(p/100 · n)
    edge_percents, edge_sizes = fine_grid(edge_scores(graph))
    assert len(edge_percents) == 25 and edge_sizes[-1] == graph.n_edges


def test_top_chooses_by_the_scores_level(graph: Graph) -> None:
    edges, nodes = edge_scores(graph), node_scores(graph)
    for n in (0, 3, 30):
        assert torch.equal(top(edges, n).edges, top_n(edges, n).edges)
        assert selection(edges, n) == {"method": "top_n", "n": n, "absolute": True, "pruned": True}
        unpruned = top(edges, n, prune=False)  # the selection hand edits apply to: exactly n edges
        assert unpruned.n_edges == n and torch.equal(prune(unpruned).edges, top(edges, n).edges)
    for n in (0, 3, 21):
        assert torch.equal(top(nodes, n, absolute=False).edges, by_nodes(nodes, n, absolute=False).edges)
        assert selection(nodes, n, False)["method"] == "by_nodes"
        assert torch.equal(top(nodes, n, False, prune=False).edges, by_nodes(nodes, n, False, prune=False).edges)


def test_gap() -> None:
    assert no_gap(11.67, 11.67 + 1e-5) and not no_gap(11.67, 0.32)
    assert no_gap(0.0, 5e-7) and not no_gap(0.0, 0.01)  # kl_div: clean 0
    assert faithfulness(5.0, 11.0, 1.0) == pytest.approx(0.4)
    assert faithfulness(5.0, 11.0, 11.0 - 1e-6) is None
    assert gap_warning(11.67, 0.32, "logit_diff") is None
    message = gap_warning(11.67, 11.66, "logit_diff")
    assert "differ by 0.01" in message and "logit_diff" in message and "noise" in message


def test_identical_clean_and_corrupted_give_undefined_faithfulness(tiny32, pairs) -> None:
    """Clean = corrupted data: the evaluator's clean run and empty circuit coincide, so gap.faithfulness
    says undefined instead of a ratio of rounding noise."""
    same = PromptPairs.from_lists(pairs.clean, pairs.clean, pairs.correct, pairs.incorrect)
    evaluator = CircuitEvaluator(tiny32, tokenize(same, tiny32.tokenizer), "logit_diff")
    base = evaluator.baseline()
    assert no_gap(base.clean, evaluator.empty_metric()) and gap_warning(base.clean, base.corrupted, "logit_diff")
    value = evaluator.evaluate(top_n(edge_scores(evaluator.graph), 5)).mean().item()
    assert faithfulness(value, base.clean, evaluator.empty_metric()) is None


def test_unknown_words_are_the_ones_the_tokenizer_maps_to_unk(tiny32) -> None:
    pairs = PromptPairs.from_lists(["a b zebra d", "a b"], ["e b c d", "c dog"], ["e", "f"], ["a", "b"])
    assert unknown_words(tiny32.tokenizer, pairs) == [UnknownWord(1, "clean", "zebra"), UnknownWord(2, "corrupted", "dog")]
    by_hand = [w for w in "a b zebra d".split() if tiny32.tokenizer.convert_tokens_to_ids(w) == tiny32.tokenizer.unk_token_id]
    assert by_hand == ["zebra"]
    assert unknown_words(tiny32.tokenizer, pairs, limit=1) == [UnknownWord(1, "clean", "zebra")]


def test_attribute_records_the_models_name(tiny32, tiny_dir: Path, pairs) -> None:
    scores = attribute(tiny32, tokenize(pairs, tiny32.tokenizer), AttributionSpec("EAP", batch_size=4))
    assert scores.provenance["model"] == str(tiny_dir)
    from eapcore.models import DEMO_MODEL_DIR

    assert source_name(str(DEMO_MODEL_DIR)) == "demo" and source_name("gpt2") == "gpt2"


@pytest.mark.parametrize("method", list(METHODS))
def test_total_passes_is_what_progress_counts_to(method: str, tiny32, pairs) -> None:
    data = tokenize(pairs, tiny32.tokenizer)
    spec = AttributionSpec(method, 2, "logit_diff", "patching", 3)
    seen: list[tuple[int, int]] = []
    attribute(tiny32, data, spec, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (spec.total_passes(Graph(GraphConfig(2, 2, d_model=8)), len(data)),) * 2
