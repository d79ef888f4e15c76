"""Checks for circuit files, written as code: the graph config, provenance, and the ``.json`` layout.

Every check raises ``ValueError`` naming the file, what is wrong, the offending value and the fix.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, NoReturn

import torch

from eapcore.graph import Graph, GraphConfig

_OTHER_MODEL = "Is the file for another model, or edited? Load the model it was made for, or export the circuit again"
NodeTables = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


class FileCheck:
    """Raises errors that name the file and its format: ``fail = FileCheck(path, ".pt"); fail("why")``."""

    def __init__(self, path: Any, kind: str) -> None:
        self.path, self.kind = path, kind

    def __call__(self, problem: str) -> NoReturn:
        raise ValueError(f"{self.path} is not a valid eapcore/EAP-IG {self.kind} circuit file: {problem}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_bool(x: Any) -> bool:
    return isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def describe(cfg: GraphConfig) -> str:
    """``12 layers x 12 heads`` (plus ``, parallel attention/MLP`` and ``, d_model 768`` when set)."""
    parallel = ", parallel attention/MLP" if cfg.parallel_attn_mlp else ""
    width = f", d_model {cfg.d_model}" if cfg.d_model else ""
    return f"{cfg.n_layers} layers x {cfg.n_heads} heads{parallel}{width}"


def graph_for(cfg: Any, fail: FileCheck, expected: Graph | None) -> Graph:
    """The graph a file's ``cfg`` describes; must match ``expected`` (``d_model`` only if both know it)."""
    if not isinstance(cfg, dict):
        fail(f"'cfg' must be a dict, got {type(cfg).__name__}")
    for key, check, kind in (
        ("n_layers", _is_int, "an integer"),
        ("n_heads", _is_int, "an integer"),
        ("parallel_attn_mlp", _is_bool, "a bool"),
        ("d_model", _is_int, "an integer"),
    ):
        if key in cfg and not check(cfg[key]):
            fail(f"cfg[{key!r}] must be {kind}, got {cfg[key]!r}")
    if "n_layers" not in cfg or "n_heads" not in cfg:
        fail(f"cfg {cfg!r} lacks n_layers or n_heads")
    found = GraphConfig.from_dict(cfg)
    if expected is None:
        return Graph(found)
    if not fits(found, expected.cfg):
        raise ValueError(
            f"circuit file {fail.path} is for a model with {describe(found)}, but the loaded model has "
            f"{describe(expected.cfg)}; load the model the circuit was made for, or recompute the scores"
        )
    return expected


def fits(found: GraphConfig, want: GraphConfig) -> bool:
    """Whether a file's graph ``found`` is the loaded model's ``want`` (``d_model`` only if both know it)."""
    shape = lambda c: (c.n_layers, c.n_heads, c.parallel_attn_mlp)  # noqa: E731
    return shape(found) == shape(want) and not (found.d_model and want.d_model and found.d_model != want.d_model)


def plain(obj: Any, where: str = "provenance") -> Any:
    """``obj`` as JSON-like primitives (tuples become lists, dataclasses dicts); ``ValueError`` otherwise."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        return [plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        for key in obj:
            if not isinstance(key, str):
                raise ValueError(f"{where} has a non-string key {key!r}; use string keys")
        return {k: plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    raise ValueError(
        f"{where} is a {type(obj).__name__} ({obj!r:.80}); provenance may hold only str, int, float, "
        "bool, None, lists and dicts"
    )


def parse_json(text: str, fail: FileCheck) -> dict:
    """``json.loads`` that also refuses duplicate keys (an edge listed twice)."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
        out = dict(pairs)
        if len(out) != len(pairs):
            seen: set[str] = set()
            dup = next(k for k, _ in pairs if k in seen or seen.add(k))
            fail(f"key {dup!r} appears more than once; list every node and edge once")
        return out

    try:
        data = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        fail(f"it is not valid JSON ({e}); the file may be truncated or corrupted: export or download it again")
    if not isinstance(data, dict):
        fail(f"the top level must be an object, got {type(data).__name__}")
    for key in ("cfg", "nodes", "edges"):
        if key not in data:
            fail(f"the required key {key!r} is missing (found {sorted(data)})")
    for key in ("nodes", "edges", "eapcore"):
        if key in data and not isinstance(data[key], dict):
            fail(f"{key!r} must be an object, got {type(data[key]).__name__}")
    return data


def _field(entry: Any, key: str, check: Any, kind: str, where: str, fail: FileCheck) -> Any:
    if not isinstance(entry, dict):
        fail(f"{where} must be an object, got {entry!r:.80}")
    if key not in entry:
        fail(f"{where} lacks {key!r}")
    if not check(entry[key]):
        fail(f"{where}[{key!r}] must be {kind}, got {entry[key]!r:.80}")
    return entry[key]


def _all_or_none(nodes: dict, names: list[str], key: str, fail: FileCheck) -> bool:
    having = {name for name in names if isinstance(nodes[name], dict) and key in nodes[name]}
    if having and len(having) != len(names):
        missing = next(name for name in names if name not in having)
        fail(f"some nodes have {key!r} and some do not (e.g. {missing!r} lacks it); give it for all or none")
    return bool(having)


def read_json_nodes(nodes: dict, graph: Graph, fail: FileCheck) -> NodeTables:
    """``nodes_in_graph`` ``[n_forward]`` and optional ``nodes_scores`` ``[n_forward]``,
    ``neurons_in_graph`` / ``neurons_scores`` ``[n_forward, d_model]`` from the ``nodes`` object."""
    names = graph.src_nodes
    unknown = sorted(set(nodes) - set(graph.node_names))
    if unknown:
        fail(f"{len(unknown)} unknown node name(s), e.g. {unknown[0]!r}; nodes are {names[:3]} ... 'logits'. {_OTHER_MODEL}")
    missing = [name for name in names if name not in nodes]
    if missing:
        fail(f"{len(missing)} node(s) missing, e.g. {missing[0]!r}; every node of the graph must be listed")
    in_graph = [_field(nodes[n], "in_graph", _is_bool, "a bool", f"node {n!r}", fail) for n in names]
    scores = None
    if _all_or_none(nodes, names, "score", fail):
        values = [_field(nodes[n], "score", _is_number, "a number", f"node {n!r}", fail) for n in names]
        scores = torch.tensor(values, dtype=torch.float32)
    neurons_in = neurons_scores = None
    d_model = graph.cfg.d_model
    is_bools = lambda v: isinstance(v, list) and len(v) == d_model and all(map(_is_bool, v))  # noqa: E731
    is_numbers = lambda v: isinstance(v, list) and len(v) == d_model and all(map(_is_number, v))  # noqa: E731
    if _all_or_none(nodes, names, "neurons", fail):
        kind = f"{d_model} bools"
        lists = [_field(nodes[n], "neurons", is_bools, kind, f"node {n!r}", fail) for n in names]
        neurons_in = torch.tensor(lists, dtype=torch.bool)
    if _all_or_none(nodes, names, "neurons_scores", fail):
        kind = f"{d_model} numbers"
        lists = [_field(nodes[n], "neurons_scores", is_numbers, kind, f"node {n!r}", fail) for n in names]
        neurons_scores = torch.tensor(lists, dtype=torch.float32)
    return torch.tensor(in_graph, dtype=torch.bool), scores, neurons_in, neurons_scores


def read_json_edges(edges: dict, graph: Graph, fail: FileCheck) -> tuple[torch.Tensor, torch.Tensor]:
    """``edges_scores`` float32 and ``edges_in_graph`` bool, both ``[n_forward, n_backward]``; every
    real edge must be listed exactly once."""
    unknown, cells = [], []
    for name in edges:
        try:
            cells.append(graph.parse_edge_name(name))
        except ValueError:
            unknown.append(name)
    if unknown:
        fail(f"{len(unknown)} unknown edge name(s), e.g. {unknown[0]!r}; edges look like 'input->a0.h0<q>'. {_OTHER_MODEL}")
    if len(cells) != graph.n_edges:
        listed = torch.zeros_like(graph.real_edge_mask)
        listed[tuple(torch.tensor(cells, dtype=torch.long).reshape(-1, 2).T)] = True
        row, col = (graph.real_edge_mask & ~listed).nonzero()[0].tolist()
        fail(
            f"{graph.n_edges - len(cells)} of the graph's {graph.n_edges} edges are missing, e.g. "
            f"{graph.edge_name(row, col)!r}; every edge must be listed"
        )
    values = [_field(e, "score", _is_number, "a number", f"edge {n!r}", fail) for n, e in edges.items()]
    flags = [_field(e, "in_graph", _is_bool, "a bool", f"edge {n!r}", fail) for n, e in edges.items()]
    rows, cols = torch.tensor(cells, dtype=torch.long).T
    scores = torch.zeros(graph.n_forward, graph.n_backward)
    scores[rows, cols] = torch.tensor(values, dtype=torch.float32)
    in_graph = torch.zeros(graph.n_forward, graph.n_backward, dtype=torch.bool)
    in_graph[rows, cols] = torch.tensor(flags, dtype=torch.bool)
    return scores, in_graph
