"""Circuit selection and pruning, checked against independent re-derivations over edge names."""

from __future__ import annotations

from collections import deque

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eapcore.circuit import Circuit, Scores
from eapcore.graph import Graph, GraphConfig
from eapcore.select import by_nodes, greedy, prune, threshold, top_n


def random_scores(graph: Graph, seed: int, node_scores: bool = False) -> Scores:
    g = torch.Generator().manual_seed(seed)
    edges = torch.randn(graph.n_forward, graph.n_backward, generator=g) * graph.real_edge_mask
    nodes = torch.randn(graph.n_forward, generator=g) if node_scores else None
    return Scores(graph, edges, nodes)


def kept_edge_names(circuit: Circuit) -> list[str]:
    rows, cols = circuit.edges.nonzero(as_tuple=True)
    return [circuit.graph.edge_name(r, c) for r, c in zip(rows.tolist(), cols.tolist())]


def endpoints(edge: str) -> tuple[str, str]:
    parent, child = edge.split("->")
    return parent, child.split("<")[0]


def reachable(start: str, adjacency: dict[str, set[str]]) -> set[str]:
    seen, todo = {start}, deque([start])
    while todo:
        for nxt in adjacency.get(todo.popleft(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def assert_no_dangling(circuit: Circuit) -> None:
    """Every kept edge and node lies on an input -> logits path (BFS over edge names)."""
    names = kept_edge_names(circuit)
    forward: dict[str, set[str]] = {}
    backward: dict[str, set[str]] = {}
    for parent, child in map(endpoints, names):
        forward.setdefault(parent, set()).add(child)
        backward.setdefault(child, set()).add(parent)
    from_input, to_logits = reachable("input", forward), reachable("logits", backward)
    for parent, child in map(endpoints, names):
        assert parent in from_input and child in to_logits, (parent, child)
    kept_nodes = {n for n, on in zip(circuit.graph.src_nodes, circuit.nodes.tolist()) if on}
    assert kept_nodes == set(forward)
    assert all(node in from_input and node in to_logits for node in kept_nodes)


configs = st.builds(
    GraphConfig, n_layers=st.integers(1, 3), n_heads=st.integers(1, 3), parallel_attn_mlp=st.booleans()
)


def expected_edges(L: int, H: int, parallel: bool) -> int:
    into_heads = sum(3 * H * (1 + l * (H + 1)) for l in range(L))
    into_mlps = sum(1 + l * (H + 1) + (0 if parallel else H) for l in range(L))
    return into_heads + into_mlps + 1 + L * (H + 1)


# ----- graph counts -----


@pytest.mark.parametrize(
    "L, H, parallel, nodes, edges",
    [(12, 12, False, 158, 32_491), (24, 16, False, 410, 231_877), (32, 32, True, 1_058, 1_591_857)],
)
def test_graph_counts(L: int, H: int, parallel: bool, nodes: int, edges: int) -> None:
    graph = Graph(GraphConfig(L, H, parallel))
    assert (graph.n_nodes, graph.n_edges) == (nodes, edges)
    assert edges == expected_edges(L, H, parallel)


@given(configs)
def test_edge_count_formula(cfg: GraphConfig) -> None:
    assert Graph(cfg).n_edges == expected_edges(cfg.n_layers, cfg.n_heads, cfg.parallel_attn_mlp)


# ----- top_n / threshold / prune properties -----


@settings(max_examples=60, deadline=None)
@given(configs, st.integers(0, 2**31 - 1), st.floats(0, 1), st.booleans())
def test_top_n_exact_count_and_prune(cfg: GraphConfig, seed: int, frac: float, absolute: bool) -> None:
    graph = Graph(cfg)
    scores = random_scores(graph, seed)
    n = round(frac * graph.n_edges)
    raw = top_n(scores, n, absolute=absolute, prune=False)
    assert raw.n_edges == n
    assert not (raw.edges & ~graph.real_edge_mask).any()
    values = scores.edges.abs() if absolute else scores.edges
    if 0 < n < graph.n_edges:
        assert values[raw.edges].min() >= values[graph.real_edge_mask & ~raw.edges].max()
    pruned = prune(raw)
    assert not (pruned.edges & ~raw.edges).any()
    assert_no_dangling(pruned)
    again = prune(pruned)
    assert torch.equal(again.edges, pruned.edges) and torch.equal(again.nodes, pruned.nodes)
    assert torch.equal(top_n(scores, n, absolute=absolute).edges, pruned.edges)


@settings(max_examples=40, deadline=None)
@given(configs, st.integers(0, 2**31 - 1), st.floats(-2, 2), st.floats(0, 2), st.booleans())
def test_threshold_monotone(cfg: GraphConfig, seed: int, t: float, step: float, absolute: bool) -> None:
    scores = random_scores(Graph(cfg), seed)
    low = threshold(scores, t, absolute=absolute, prune=False)
    high = threshold(scores, t + step, absolute=absolute, prune=False)
    assert not (high.edges & ~low.edges).any()
    values = scores.edges.abs() if absolute else scores.edges
    assert torch.equal(low.edges, (values >= t) & scores.graph.real_edge_mask)
    assert_no_dangling(threshold(scores, t, absolute=absolute))


def test_top_n_ties_are_stable() -> None:
    graph = Graph(GraphConfig(2, 2))
    circuit = top_n(Scores(graph, graph.real_edge_mask.float()), 5, prune=False)
    first_five = graph.real_edge_mask.flatten().nonzero().squeeze(1)[:5]
    assert circuit.edges.flatten().nonzero().squeeze(1).tolist() == first_five.tolist()


@pytest.mark.parametrize("n", [-1, 10**6])
def test_top_n_rejects_bad_n(n: int) -> None:
    graph = Graph(GraphConfig(2, 2))
    with pytest.raises(ValueError, match=rf"n={n}.*{graph.n_edges}"):
        top_n(random_scores(graph, 0), n)


def test_prune_removes_dead_branches() -> None:
    graph = Graph(GraphConfig(2, 2))
    edges = torch.zeros_like(graph.real_edge_mask)
    for name in ["input->a0.h0<q>", "a0.h0->logits", "input->m1", "a1.h0->logits", "a0.h1->m0"]:
        edges[graph.parse_edge_name(name)] = True
    pruned = prune(Circuit(graph, edges, torch.ones(graph.n_forward, dtype=torch.bool)))
    assert sorted(kept_edge_names(pruned)) == ["a0.h0->logits", "input->a0.h0<q>"]
    assert [n for n, on in zip(graph.src_nodes, pruned.nodes.tolist()) if on] == ["input", "a0.h0"]


def test_prune_does_not_mutate() -> None:
    graph = Graph(GraphConfig(2, 2))
    circuit = top_n(random_scores(graph, 1), 7, prune=False)
    before = circuit.edges.clone(), circuit.nodes.clone()
    prune(circuit)
    assert torch.equal(circuit.edges, before[0]) and torch.equal(circuit.nodes, before[1])


def test_prune_honours_excluded_nodes_and_neurons() -> None:
    graph = Graph(GraphConfig(2, 2, d_model=4))
    full = Circuit.full(graph)
    nodes = full.nodes.clone()
    nodes[graph.mlp_index(0)] = False
    neurons = torch.ones(graph.n_forward, 4, dtype=torch.bool)
    neurons[graph.head_index(1, 1)] = False
    pruned = prune(Circuit(graph, full.edges, nodes, neurons))
    for gone in (graph.mlp_index(0), graph.head_index(1, 1)):
        assert not pruned.nodes[gone] and not pruned.edges[gone].any() and not pruned.neurons[gone].any()
    assert pruned.nodes.sum() == graph.n_forward - 2
    assert_no_dangling(pruned)


# ----- greedy -----


def brute_force_greedy(scores: Scores, n: int, absolute: bool) -> set[str]:
    """O(E n): repeatedly take the best edge (earliest on ties) whose child node is already in."""
    graph = scores.graph
    values = scores.edges.abs() if absolute else scores.edges
    rows, cols = graph.real_edge_mask.nonzero(as_tuple=True)
    edges = [(graph.edge_name(r, c), float(values[r, c])) for r, c in zip(rows.tolist(), cols.tolist())]
    inside, chosen = {"logits"}, set()
    for _ in range(n):
        best = None
        for name, value in edges:
            if name not in chosen and endpoints(name)[1] in inside and (best is None or value > best[1]):
                best = (name, value)
        chosen.add(best[0])
        inside.add(endpoints(best[0])[0])
    return chosen


@pytest.mark.parametrize("absolute", [True, False])
@pytest.mark.parametrize("cfg", [GraphConfig(2, 2), GraphConfig(3, 2, parallel_attn_mlp=True)])
def test_greedy_matches_brute_force(cfg: GraphConfig, absolute: bool) -> None:
    graph = Graph(cfg)
    scores = random_scores(graph, 3)
    for n in (0, 1, 10, graph.n_edges // 2, graph.n_edges):
        raw = greedy(scores, n, absolute=absolute, prune=False)
        assert raw.n_edges == n
        assert set(kept_edge_names(raw)) == brute_force_greedy(scores, n, absolute)


@settings(max_examples=30, deadline=None)
@given(configs, st.integers(0, 2**31 - 1), st.floats(0, 1))
def test_greedy_connected_to_logits(cfg: GraphConfig, seed: int, frac: float) -> None:
    graph = Graph(cfg)
    scores = random_scores(graph, seed)
    n = round(frac * graph.n_edges)
    raw = greedy(scores, n, prune=False)
    assert raw.n_edges == n
    backward: dict[str, set[str]] = {}
    for parent, child in map(endpoints, kept_edge_names(raw)):
        backward.setdefault(child, set()).add(parent)
    to_logits = reachable("logits", backward)
    assert all(endpoints(name)[1] in to_logits for name in kept_edge_names(raw))
    assert_no_dangling(greedy(scores, n))


def test_greedy_rejects_too_many_edges() -> None:
    graph = Graph(GraphConfig(1, 1))
    with pytest.raises(ValueError, match="reachable"):
        greedy(random_scores(graph, 0), graph.n_edges + 1)


def test_greedy_runs_on_gpt2_medium_shape() -> None:
    graph = Graph(GraphConfig(24, 16))
    circuit = greedy(random_scores(graph, 0), 2000)
    assert 0 < circuit.n_edges <= 2000


# ----- by_nodes -----


def test_by_nodes_keeps_top_and_unscored_nodes() -> None:
    graph = Graph(GraphConfig(2, 2))
    nodes = torch.tensor([float("nan"), 0.1, -5.0, 0.2, 3.0, 0.05, 0.3])
    scores = Scores(graph, torch.zeros(graph.n_forward, graph.n_backward), nodes)
    circuit = by_nodes(scores, 2, prune=False)
    kept = {graph.src_nodes[i] for i in (0, 2, 4)}  # input (NaN), a0.h1 (|-5|), a1.h0 (3)
    assert {n for n, on in zip(graph.src_nodes, circuit.nodes.tolist()) if on} == kept
    expected = {
        graph.edge_name(r, c)
        for r, c in graph.real_edge_mask.nonzero().tolist()
        if graph.src_nodes[r] in kept and graph.dst_node_of_column[c] in kept | {"logits"}
    }
    assert set(kept_edge_names(circuit)) == expected
    signed = by_nodes(scores, 2, absolute=False, prune=False)
    assert {n for n, on in zip(graph.src_nodes, signed.nodes.tolist()) if on} == {"input", "a1.h0", "m1"}
    assert_no_dangling(by_nodes(scores, 2))


def test_by_nodes_needs_node_scores() -> None:
    graph = Graph(GraphConfig(1, 1))
    with pytest.raises(ValueError, match="scores.nodes is None"):
        by_nodes(random_scores(graph, 0), 1)
    with pytest.raises(ValueError, match="scored"):
        by_nodes(random_scores(graph, 0, node_scores=True), graph.n_forward + 1)
