"""Circuit files that move between eapcore, EAP-IG and MIB.

``.pt``: a ``torch.save`` of plain tensors, lists and dicts (``cfg``, ``src_nodes``, ``dst_nodes``,
``edges_scores`` ``[n_forward, n_backward]`` float32, ``edges_in_graph`` bool, ``nodes_in_graph``
``[n_forward]`` bool, optional ``nodes_scores`` / ``neurons_scores`` / ``neurons_in_graph``), read back
with ``weights_only=True`` only. ``.json``: ``{"cfg", "nodes": {name: {"in_graph", "score"?}},
"edges": {"parent->child<q>": {"score", "in_graph"}}}``. Both carry our provenance under ``eapcore``, and
there, under ``edits``, the hand edits that made the circuit (:func:`eapcore.edits.from_provenance` reads
them back).

Every function takes a path or an open binary file (``io.BytesIO``, an upload); messages name the file
by its path, its ``name`` argument or the file object's own ``name``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import IO, Any

import torch

from eapcore.circuit import Circuit, Scores
from eapcore.edits import Edits
from eapcore.graph import Graph
from eapcore.schema import (
    FileCheck,
    describe,
    graph_for,
    parse_json,
    plain,
    read_json_edges,
    read_json_nodes,
)

PathLike = str | os.PathLike
Target = PathLike | IO[bytes]
_DAMAGED = "the file may be truncated or corrupted: export or download it again"
REQUIRED_PT_KEYS = ("cfg", "src_nodes", "dst_nodes", "edges_scores", "edges_in_graph", "nodes_in_graph")


def _own(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A detached CPU copy that owns its storage (``torch.save`` writes whole storages)."""
    return t.detach().to("cpu", dtype).clone()


def _payload(
    scores: Scores | None, circuit: Circuit | None, provenance: dict | None, edits: Edits | None = None
) -> dict[str, Any]:
    """The ``.pt`` dict; the ``.json`` file is written from it too. ``edits`` replace any in ``provenance``."""
    if scores is None and circuit is None:
        raise ValueError("nothing to save: pass scores, a circuit, or both")
    graph = scores.graph if scores is not None else circuit.graph
    if circuit is not None and circuit.graph != graph:
        raise ValueError(
            f"the scores are for {describe(graph.cfg)} but the circuit is for {describe(circuit.graph.cfg)}; "
            "save a circuit selected from these scores"
        )
    real = graph.real_edge_mask
    out: dict[str, Any] = {
        "cfg": graph.cfg.to_dict(),
        "src_nodes": list(graph.src_nodes),
        "dst_nodes": list(graph.dst_nodes),
        "edges_scores": torch.zeros(real.shape),
        "edges_in_graph": real.clone(),
        "nodes_in_graph": torch.ones(graph.n_forward, dtype=torch.bool),
    }
    if scores is not None:
        out["edges_scores"] = torch.where(real, _own(scores.edges, torch.float32), 0.0)
        if scores.nodes is not None:
            out["nodes_scores"] = _own(scores.nodes, torch.float32)
        if scores.neurons is not None:
            out["neurons_scores"] = _own(scores.neurons, torch.float32)
    if circuit is not None:
        out["edges_in_graph"] = _own(circuit.edges, torch.bool) & real
        out["nodes_in_graph"] = _own(circuit.nodes, torch.bool)
        if circuit.neurons is not None:
            out["neurons_in_graph"] = _own(circuit.neurons, torch.bool)
    if provenance is None:
        provenance = scores.provenance if scores is not None else {}
    provenance = {k: v for k, v in provenance.items() if k != "edits"}
    if edits:
        edits.check(graph)
        provenance["edits"] = edits.to_dict()
    out["eapcore"] = plain(provenance)
    return out


def _values(graph: Graph, tables: dict[str, Any], provenance: dict) -> tuple[Scores, Circuit]:
    """Scores and circuit from checked tables (the ``.pt`` key names)."""
    scores = Scores(
        graph,
        torch.where(graph.real_edge_mask, tables["edges_scores"], 0.0),
        tables.get("nodes_scores"),
        tables.get("neurons_scores"),
        provenance,
    )
    circuit = Circuit(
        graph, tables["edges_in_graph"], tables["nodes_in_graph"], tables.get("neurons_in_graph")
    )
    return scores, circuit


# ----- .pt -----


def _is_file(target: Any) -> bool:
    return hasattr(target, "read") or hasattr(target, "write")


def _label(source: Target, name: str | None) -> str:
    """How messages name ``source``."""
    if name is not None:
        return name
    if _is_file(source):
        return str(getattr(source, "name", None) or "the uploaded file")
    return str(source)


def save_pt(
    target: Target, scores: Scores | None, circuit: Circuit | None, provenance: dict | None = None,
    edits: Edits | None = None,
) -> None:
    """Write scores and/or a circuit as an EAP-IG ``.pt`` file; ``provenance`` defaults to the scores'."""
    torch.save(_payload(scores, circuit, provenance, edits), target)


def _torch_load(source: Target, fail: FileCheck) -> Any:
    if not _is_file(source) and not Path(source).is_file():
        raise FileNotFoundError(f"circuit file {source} does not exist")
    try:
        return torch.load(source, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        opcode = re.search(r"Unsupported operand (\d+)", str(e))
        if opcode:  # garbage bytes, or a pickle the weights-only reader cannot parse: either way nothing ran
            fail(f"it could not be read (not a torch.save file of tensors: the weights-only reader stopped at pickle "
                 f"opcode {opcode.group(1)} and nothing was unpickled); {_DAMAGED}")
        if "weights only" in str(e).lower():
            fail("it contains non-tensor objects and was refused for safety (it was not unpickled)")
        fail(f"it could not be read ({type(e).__name__}); {_DAMAGED}")
    except Exception as e:  # torch raises RuntimeError, OSError, EOFError, KeyError, ... for bad bytes
        fail(f"it could not be read ({type(e).__name__}: {e!s:.120}); {_DAMAGED}")


def _check_tensor(data: dict, key: str, shape: tuple, kind: str, fail: FileCheck) -> torch.Tensor:
    t = data[key]
    if not isinstance(t, torch.Tensor):
        fail(f"{key!r} must be a tensor, got {type(t).__name__}")
    ok_dtype = t.dtype == torch.bool if kind == "bool" else t.is_floating_point()
    if not ok_dtype:
        fail(f"{key!r} must be a {kind} tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        fail(f"{key!r} has shape {tuple(t.shape)} but this graph needs {shape}")
    return t if kind == "bool" else t.float()


def _check_names(key: str, found: Any, names: list[str], fail: FileCheck) -> None:
    """``found`` must be exactly the graph's node names in order; the message shows the first difference."""
    if not isinstance(found, (list, tuple)) or not all(isinstance(n, str) for n in found):
        fail(f"{key!r} must be a list of node names, got {type(found).__name__}")
    found = list(found)
    if found == names:
        return
    i = next((i for i, (a, b) in enumerate(zip(found, names)) if a != b), min(len(found), len(names)))
    what = f"entry {i} is {found[i]!r}" if i < len(found) else f"it ends after {len(found)} names"
    want = f"{names[i]!r}" if i < len(names) else f"no entry (it has {len(names)} names)"
    fail(
        f"{key!r} does not list this graph's node names in order: {what} where the graph has {want}; the file "
        "is for another model or was edited: load the model it was made for, or export the circuit again"
    )


def load_pt(source: Target, expected: Graph | None = None, name: str | None = None) -> tuple[Scores, Circuit]:
    """Read a ``.pt`` circuit file (never a full unpickle) and check it against its own ``cfg`` and,
    when given, the ``expected`` graph of the loaded model."""
    fail = FileCheck(_label(source, name), ".pt")
    data = _torch_load(source, fail)
    if not isinstance(data, dict):
        fail(f"it holds a {type(data).__name__}, not a dict")
    missing = [key for key in REQUIRED_PT_KEYS if key not in data]
    if missing:
        fail(f"the required key(s) {missing} are missing (found {sorted(map(str, data))})")
    graph = graph_for(data["cfg"], fail, expected)
    for key, names in (("src_nodes", graph.src_nodes), ("dst_nodes", graph.dst_nodes)):
        _check_names(key, data[key], names, fail)
    F, B, d = graph.n_forward, graph.n_backward, graph.cfg.d_model
    shapes = {
        "edges_scores": ((F, B), "float"),
        "edges_in_graph": ((F, B), "bool"),
        "nodes_in_graph": ((F,), "bool"),
        "nodes_scores": ((F,), "float"),
        "neurons_scores": ((F, d), "float"),
        "neurons_in_graph": ((F, d), "bool"),
    }
    present = {key: spec for key, spec in shapes.items() if key in data}
    tables = {key: _check_tensor(data, key, shape, kind, fail) for key, (shape, kind) in present.items()}
    if (tables["edges_in_graph"] & ~graph.real_edge_mask).any():
        n_bad = int((tables["edges_in_graph"] & ~graph.real_edge_mask).sum())
        fail(f"'edges_in_graph' marks {n_bad} cell(s) that are not edges of the graph (backwards in time)")
    provenance = data.get("eapcore", {})
    if not isinstance(provenance, dict):
        fail(f"'eapcore' must be a dict, got {type(provenance).__name__}")
    return _values(graph, tables, provenance)


# ----- .json -----


def save_json(
    target: Target, scores: Scores | None, circuit: Circuit | None, provenance: dict | None = None,
    edits: Edits | None = None,
) -> None:
    """Write scores and/or a circuit as an EAP-IG ``.json`` file (real edges in row-major order)."""
    data = _payload(scores, circuit, provenance, edits)
    graph = scores.graph if scores is not None else circuit.graph
    nodes: dict[str, dict[str, Any]] = {
        name: {"in_graph": flag} for name, flag in zip(graph.src_nodes, data["nodes_in_graph"].tolist())
    }
    for key, out_key in (("nodes_scores", "score"), ("neurons_in_graph", "neurons"), ("neurons_scores",) * 2):
        if key in data:
            for name, value in zip(graph.src_nodes, data[key].tolist()):
                nodes[name][out_key] = value
    nodes["logits"] = {"in_graph": True}
    rows, cols = graph.real_edge_mask.nonzero(as_tuple=True)
    scores_list = data["edges_scores"][rows, cols].tolist()
    flags = data["edges_in_graph"][rows, cols].tolist()
    edges = {
        graph.edge_name(r, c): {"score": s, "in_graph": f}
        for r, c, s, f in zip(rows.tolist(), cols.tolist(), scores_list, flags)
    }
    blob = json.dumps({"cfg": data["cfg"], "nodes": nodes, "edges": edges, "eapcore": data["eapcore"]}).encode()
    if _is_file(target):
        target.write(blob)
    else:
        Path(target).write_bytes(blob)


def load_json(source: Target, expected: Graph | None = None, name: str | None = None) -> tuple[Scores, Circuit]:
    """Read and check a ``.json`` circuit file: types of every field, every real edge exactly once,
    and (when given) the ``expected`` graph of the loaded model."""
    fail = FileCheck(_label(source, name), ".json")
    try:
        blob = source.read() if _is_file(source) else Path(source).read_bytes()
        text = blob.decode("utf-8") if isinstance(blob, bytes) else blob
    except UnicodeDecodeError as e:
        fail(f"it is not UTF-8 text ({e})")
    data = parse_json(text, fail)
    graph = graph_for(data["cfg"], fail, expected)
    nodes_in, nodes_scores, neurons_in, neurons_scores = read_json_nodes(data["nodes"], graph, fail)
    edges_scores, edges_in = read_json_edges(data["edges"], graph, fail)
    tables = {
        "edges_scores": edges_scores,
        "edges_in_graph": edges_in,
        "nodes_in_graph": nodes_in,
        "nodes_scores": nodes_scores,
        "neurons_scores": neurons_scores,
        "neurons_in_graph": neurons_in,
    }
    return _values(graph, tables, data.get("eapcore", {}))


def load_circuit(source: Target, expected: Graph | None = None, name: str | None = None) -> tuple[Scores, Circuit]:
    """Load a ``.pt`` or ``.json`` circuit file, chosen by the suffix of its path (or of ``name``, for a
    file object)."""
    label = _label(source, name)
    suffix = Path(label).suffix.lower()
    if suffix == ".pt":
        return load_pt(source, expected, name=label)
    if suffix == ".json":
        return load_json(source, expected, name=label)
    raise ValueError(f"cannot load circuit file {label}: unknown suffix {suffix!r}; use a .pt or .json file")
