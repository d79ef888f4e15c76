"""Node and edge names as the ``.json`` circuit format spells them, looked up with nearest-name advice.

Nodes: ``input``, ``a{layer}.h{head}``, ``m{layer}``, ``logits``. Edges: ``parent->child`` with the
child's q/k/v input for heads, e.g. ``a0.h1->a2.h3<q>``, ``m1->logits``.
"""

from __future__ import annotations

import difflib
from typing import Iterable

from eapcore.graph import Graph


def nearest(name: str, valid: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` names of ``valid`` closest to ``name`` (difflib's ratio), best first."""
    return difflib.get_close_matches(name, list(valid), n=n, cutoff=0.5)


def unknown_error(what: str, unknown: list[str], valid: list[str], graph: Graph) -> ValueError:
    """``ValueError`` naming every unknown name and, for each, the nearest valid ones."""
    from eapcore.schema import describe

    hints = []
    for name in unknown:
        close = nearest(name, valid)
        hints.append(f"{name!r} (nearest: {', '.join(map(repr, close))})" if close else repr(name))
    return ValueError(
        f"unknown {what} in a graph with {describe(graph.cfg)}: {'; '.join(hints)}. Nodes are named like 'input', "
        "'a0.h1', 'm1', 'logits'; edges like 'a0.h1->a2.h3<q>' or 'm1->logits'"
    )


def edge_names(graph: Graph) -> list[str]:
    """Every real edge's name, row-major."""
    rows, cols = graph.real_edge_mask.nonzero(as_tuple=True)
    return [graph.edge_name(r, c) for r, c in zip(rows.tolist(), cols.tolist())]


def check_node(graph: Graph, name: str, sources_only: bool = False) -> str:
    """``name`` if it is a node of ``graph`` (a source node when ``sources_only``), else ``ValueError``."""
    valid = graph.src_nodes if sources_only else graph.node_names
    if name not in valid:
        raise unknown_error("node", [name], valid, graph)
    return name
