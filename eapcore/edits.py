"""Hand edits of a circuit: force-include or exclude edges and nodes, named as in the ``.json`` format.

Edits apply to a *selected* edge set before pruning (e.g. the top-n edges, unpruned); the result is then
pruned as usual (:func:`eapcore.select.prune`)::

    edited = prune((selected ∪ included) − excluded)

* including an edge (``a0.h1->a2.h3<q>``, ``m1->logits``) adds it;
* including a node u (``a0.h1``, ``m1``, ``input``) adds every real edge between u and the *circuit's
  nodes*: ``input``, ``logits``, the endpoints of the selected edges and the other included nodes. So u
  gets ``input -> u`` (each of a head's q/k/v inputs) and ``u -> logits``, lies on an input-to-logits path
  and survives pruning (unless exclusions cut it off), wired to the circuit it joins;
* excluding an edge removes it; excluding a node removes every edge into and out of it.

Exclusions win over the edges that a node inclusion adds. Naming an edge or node both ways, or including
an edge of an excluded node, is an error; ``logits`` cannot be edited (it is always in the circuit).
Included edges and nodes that pruning drops (no path from ``input`` or to ``logits``) are reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from eapcore.circuit import Circuit
from eapcore.graph import Graph
from eapcore.names import edge_names, unknown_error
from eapcore.select import column_node, prune


@lru_cache(maxsize=8)
def _edge_index(graph: Graph) -> dict[str, tuple[int, int]]:
    rows, cols = graph.real_edge_mask.nonzero(as_tuple=True)
    return dict(zip(edge_names(graph), zip(rows.tolist(), cols.tolist())))


@dataclass(frozen=True)
class Edits:
    """Names to force into (``include``) and out of (``exclude``) a circuit: edges or nodes."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for what in ("include", "exclude"):
            names = getattr(self, what)
            if isinstance(names, str) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"edits: {what} must be a list of node or edge names, got {names!r:.80}")
            object.__setattr__(self, what, tuple(dict.fromkeys(n.strip() for n in names)))

    def __bool__(self) -> bool:
        return bool(self.include or self.exclude)

    def to_dict(self) -> dict[str, list[str]]:
        return {"include": list(self.include), "exclude": list(self.exclude)}

    @classmethod
    def from_dict(cls, data: Any, graph: Graph) -> "Edits":
        """Edits read back from a file (``{"include": [...], "exclude": [...]}``), checked against ``graph``."""
        if not isinstance(data, dict) or set(data) - {"include", "exclude"}:
            raise ValueError(f"edits must be an object with the lists 'include' and 'exclude', got {data!r:.120}")
        edits = cls(tuple(_names(data.get("include", []))), tuple(_names(data.get("exclude", []))))
        edits.check(graph)
        return edits

    def check(self, graph: Graph) -> None:
        """Raise ``ValueError`` for unknown names (with the nearest valid ones) and for conflicting edits."""
        _resolve(self, graph)


def _names(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise ValueError(f"edits: 'include' and 'exclude' must be lists of names, got {value!r:.120}")
    return value


@dataclass(frozen=True)
class _Resolved:
    """Edits as masks: edges ``[n_forward n_backward]`` bool, nodes ``[n_forward]`` bool."""

    include_edges: torch.Tensor
    include_nodes: torch.Tensor
    exclude_edges: torch.Tensor
    exclude_nodes: torch.Tensor


def _resolve(edits: Edits, graph: Graph) -> _Resolved:
    index = _edge_index(graph)
    if "logits" in edits.include + edits.exclude:
        raise ValueError("'logits' cannot be included or excluded: it is always in the circuit; name its edges "
                         "instead, e.g. 'm0->logits'")
    unknown = [n for n in edits.include + edits.exclude if n not in index and n not in graph.src_index]
    if unknown:
        raise unknown_error("node or edge name(s)", unknown, graph.node_names + list(index), graph)
    both = sorted(set(edits.include) & set(edits.exclude))
    if both:
        raise ValueError(f"edits name {', '.join(map(repr, both))} both to include and to exclude; keep one")
    masks = []
    for names in (edits.include, edits.exclude):
        edges = torch.zeros(graph.n_forward, graph.n_backward, dtype=torch.bool)
        nodes = torch.zeros(graph.n_forward, dtype=torch.bool)
        for name in names:
            if name in index:
                edges[index[name]] = True
            else:
                nodes[graph.src_index[name]] = True
        masks += [edges, nodes]
    resolved = _Resolved(*masks)
    cut = _node_edges(graph, resolved.exclude_nodes) & resolved.include_edges
    if cut.any():
        names = [graph.edge_name(r, c) for r, c in cut.nonzero().tolist()]
        raise ValueError(f"included edge(s) {', '.join(map(repr, names))} touch an excluded node; include the edge "
                         "or exclude the node, not both")
    return resolved


def _node_edges(graph: Graph, nodes: torch.Tensor) -> torch.Tensor:
    """``[n_forward n_backward]``: every real edge out of or into a node of ``nodes`` ``[n_forward]``."""
    into = torch.cat([nodes, nodes.new_zeros(1)])[column_node(graph)]  # columns that are their inputs
    return (nodes[:, None] | into[None, :]) & graph.real_edge_mask


@dataclass(frozen=True)
class EditedCircuit:
    """``circuit``: the edited, pruned circuit; ``unedited``: the selection pruned without edits (to show the
    change in faithfulness); ``dropped``: included edges and nodes that are not in ``circuit``."""

    circuit: Circuit
    unedited: Circuit
    edits: Edits
    dropped: tuple[str, ...]


def apply_edits(selected: Circuit, edits: Edits) -> EditedCircuit:
    """Apply ``edits`` to ``selected`` (an *unpruned* selection such as ``top_n(scores, n, prune=False)``),
    then prune; see the module docstring for what including a node means."""
    graph = selected.graph
    r = _resolve(edits, graph)
    real, F = graph.real_edge_mask, graph.n_forward
    edges = selected.edges.cpu() & real
    col_node = column_node(graph)  # [n_backward]: the node each column feeds, F for logits
    members = torch.zeros(F + 1, dtype=torch.bool)  # the circuit's nodes, logits last
    members[[0, F]] = True
    members[:F] |= edges.any(1) | r.include_nodes
    members[col_node[edges.any(0)]] = True
    into_included = torch.cat([r.include_nodes, r.include_nodes.new_zeros(1)])[col_node]
    wired = (r.include_nodes[:, None] & members[col_node][None, :]) | (members[:F, None] & into_included[None, :])
    added = (wired & real) | r.include_edges
    edges = (edges | added) & ~r.exclude_edges & ~_node_edges(graph, r.exclude_nodes)
    nodes = (selected.nodes.cpu() | added.any(1)) & ~r.exclude_nodes
    neurons = selected.neurons
    if neurons is not None:
        neurons = neurons.cpu() | (added.any(1) & ~selected.nodes.cpu())[:, None]
    circuit = prune(Circuit(graph, edges, nodes, neurons))
    dropped = [graph.edge_name(i, j) for i, j in (r.include_edges & ~circuit.edges).nonzero().tolist()]
    dropped += [graph.src_nodes[i] for i in (r.include_nodes & ~circuit.nodes).nonzero().flatten().tolist()]
    return EditedCircuit(circuit, prune(selected), edits, tuple(dropped))


def from_provenance(provenance: dict, graph: Graph) -> Edits:
    """The edits recorded in a circuit file's ``eapcore`` provenance (none: empty), checked against ``graph``."""
    if "edits" not in provenance:
        return Edits()
    try:
        return Edits.from_dict(provenance["edits"], graph)
    except ValueError as e:
        raise ValueError(f"the circuit file's recorded edits are not valid: {e}") from None
