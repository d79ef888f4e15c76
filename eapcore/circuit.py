"""Value types shared by the engine: scores over a graph, and a circuit (a mask over it)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from eapcore.graph import Graph


@dataclass(frozen=True, eq=False)
class Scores:
    """Attribution scores over a :class:`Graph`.

    ``edges``: ``[n_forward, n_backward]`` float32, 0 outside real edges; positive means corrupting the
    edge hurts the task. ``nodes``: ``[n_forward]`` (node level) and ``neurons``: ``[n_forward, d_model]``
    (neuron level) when attribution was run at that level. ``provenance`` records how they were made
    (model, data fingerprint, method, steps, intervention, versions).
    """

    graph: Graph
    edges: torch.Tensor
    nodes: torch.Tensor | None = None
    neurons: torch.Tensor | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def cpu(self) -> "Scores":
        move = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
        return replace(self, edges=move(self.edges), nodes=move(self.nodes), neurons=move(self.neurons))


@dataclass(frozen=True, eq=False)
class Circuit:
    """A subgraph: ``edges`` ``[n_forward, n_backward]`` bool (only real edges), ``nodes`` ``[n_forward]``
    bool (``logits`` is always in and not stored), optional ``neurons`` ``[n_forward, d_model]`` bool."""

    graph: Graph
    edges: torch.Tensor
    nodes: torch.Tensor
    neurons: torch.Tensor | None = None

    @property
    def n_edges(self) -> int:
        return int(self.edges.sum())

    @property
    def n_nodes(self) -> int:
        """Included source nodes (input, heads, MLPs); ``logits`` is not counted, as in the reference."""
        return int(self.nodes.sum())

    @classmethod
    def full(cls, graph: Graph) -> "Circuit":
        return cls(graph, graph.real_edge_mask.clone(), torch.ones(graph.n_forward, dtype=torch.bool))

    @classmethod
    def empty(cls, graph: Graph) -> "Circuit":
        return cls(
            graph,
            torch.zeros(graph.n_forward, graph.n_backward, dtype=torch.bool),
            torch.zeros(graph.n_forward, dtype=torch.bool),
        )
