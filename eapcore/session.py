"""A whole exploration in one file: model, prompt pairs, every attribution run, and what was being looked at.

The file is a zip archive of two members, so nothing in it is ever unpickled:

* ``session.json``: ``{"format": "eapcore-session", "version": 1, "graph": cfg, "model": ModelSpec,
  "data": {"label", "metric", "clean", "corrupted", "correct", "incorrect"}, "runs": [{"label", "key",
  "spec": AttributionSpec, "provenance", "tensors": [...]}], "selected", "size", "absolute", "edits",
  "node", "page"}``;
* ``scores.safetensors``: each run's ``run{i}.edges`` ``[n_forward n_backward]`` and, when present,
  ``run{i}.nodes`` ``[n_forward]`` and ``run{i}.neurons`` ``[n_forward d_model]``.

:func:`load_session` checks everything (sizes before reading, the format version, types and shapes, the
graph against the loaded model's, the specs, pairs, edits and names) and only then builds the
:class:`Session`: a refused file changes nothing.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, NoReturn

import torch

from eapcore.attribute import AttributionSpec
from eapcore.circuit import Scores
from eapcore.data import PromptPairs
from eapcore.edits import Edits
from eapcore.graph import Graph, GraphConfig
from eapcore.metrics import METRICS
from eapcore.models import DTYPES, ModelSpec
from eapcore.schema import describe, fits, plain

FORMAT = "eapcore-session"
VERSION = 1
MAX_BYTES = 2**30  # a session file, and each member unpacked
_MEMBERS = {"session.json", "scores.safetensors"}
_DAMAGED = "the file may be truncated or corrupted: save the session again"


@dataclass(frozen=True, eq=False)
class Run:
    """One attribution run: its spec, its scores, the label shown for it and the app's key for it."""

    spec: AttributionSpec
    scores: Scores
    label: str = ""
    key: str = ""


@dataclass(frozen=True, eq=False)
class Session:
    """What an exploration holds. ``selected``: index into ``runs`` (or ``None``); ``size``: the circuit
    size (edges, or nodes for node-level runs); ``node``: the picked node; ``page``: the page shown."""

    graph: Graph
    model: ModelSpec
    pairs: PromptPairs
    data_label: str
    metric: str
    runs: tuple[Run, ...] = ()
    selected: int | None = None
    size: int | None = None
    absolute: bool = True
    edits: Edits = field(default_factory=Edits)
    node: str | None = None
    page: str | None = None


# ----- saving -----


def save_session(target: str | os.PathLike | IO[bytes], session: Session) -> None:
    """Write ``session`` to a path (replaced only once fully written) or a binary file object."""
    _check_values(session)
    tensors: dict[str, torch.Tensor] = {}
    runs = []
    for i, run in enumerate(session.runs):
        names = [n for n in ("edges", "nodes", "neurons") if getattr(run.scores, n) is not None]
        for n in names:
            tensors[f"run{i}.{n}"] = getattr(run.scores, n).detach().cpu().clone()  # runs may share storage
        runs.append({"label": run.label, "key": run.key, "spec": asdict(run.spec),
                     "provenance": plain(run.scores.provenance), "tensors": names})
    meta = {
        "format": FORMAT, "version": VERSION, "graph": session.graph.cfg.to_dict(), "model": asdict(session.model),
        "data": {"label": session.data_label, "metric": session.metric, "clean": list(session.pairs.clean),
                 "corrupted": list(session.pairs.corrupted), "correct": [list(a) for a in session.pairs.correct],
                 "incorrect": [list(a) for a in session.pairs.incorrect]},
        "runs": runs, "selected": session.selected, "size": session.size, "absolute": session.absolute,
        "edits": session.edits.to_dict(), "node": session.node, "page": session.page,
    }
    from safetensors.torch import save

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("session.json", json.dumps(meta))
        z.writestr("scores.safetensors", save(tensors))
    if isinstance(target, (str, os.PathLike)):
        tmp = Path(f"{os.fspath(target)}.part")
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, target)
    else:
        target.write(buffer.getvalue())


def _check_values(session: Session) -> None:
    """Refuse a session that would not load back (so that saving never writes a file that cannot be read)."""
    for run in session.runs:
        if run.scores.graph.cfg != session.graph.cfg:
            raise ValueError(f"run {run.label!r} has scores for {describe(run.scores.graph.cfg)}, but the session's "
                             f"model has {describe(session.graph.cfg)}")
    problem = _view_problem(session.graph, len(session.runs), session.selected, session.size, session.node)
    if problem:
        raise ValueError(f"cannot save the session: {problem}")
    session.edits.check(session.graph)


def _view_problem(graph: Graph, n_runs: int, selected: Any, size: Any, node: Any) -> str | None:
    """What is wrong with the selected run, the circuit size or the picked node, if anything."""
    if selected is not None and (not _is_int(selected) or not 0 <= selected < n_runs):
        return f"'selected' must be the index of one of its {n_runs} runs or null, got {selected!r}"
    if size is not None and (not _is_int(size) or not 0 <= size <= graph.n_edges):
        return f"'size' must be a circuit size between 0 and {graph.n_edges} or null, got {size!r}"
    if node is not None and node not in graph.node_names:
        return f"'node' must be a node of the graph ({describe(graph.cfg)}) or null, got {node!r:.80}"
    return None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ----- loading -----


def load_session(source: str | os.PathLike | bytes | IO[bytes], expected: Graph | None = None) -> Session:
    """Read and check a session file (a path, its bytes, or a binary file object such as an upload); with
    ``expected`` (the loaded model's graph), a session for another model is refused."""
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else getattr(source, "name", "the session file")

    def fail(problem: str) -> NoReturn:
        raise ValueError(f"{name} is not a valid eapcore session file: {problem}")

    blob = _read(source, fail)
    meta, tensors = _unpack(blob, fail)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fail(f"its session.json does not say format {FORMAT!r}")
    version = meta.get("version")
    if not _is_int(version) or version < 1:
        fail(f"'version' must be a positive integer, got {version!r}")
    if version > VERSION:
        raise ValueError(f"{name} was saved by a newer eapcore (session format {version}; this one reads up to "
                         f"{VERSION}); update eapcore to load it")
    model = _model(meta.get("model"), fail)
    graph = _graph(meta.get("graph"), expected, name, model.name, fail)
    pairs, label, metric = _data(meta.get("data"), fail)
    runs = _runs(meta.get("runs"), tensors, graph, fail)
    for key, kind, check in (("absolute", "a bool", lambda v: isinstance(v, bool)),
                             ("page", "a string or null", lambda v: v is None or isinstance(v, str))):
        if not check(meta.get(key)):
            fail(f"{key!r} must be {kind}, got {meta.get(key)!r:.80}")
    problem = _view_problem(graph, len(runs), meta.get("selected"), meta.get("size"), meta.get("node"))
    if problem:
        fail(problem)
    try:
        edits = Edits.from_dict(meta.get("edits"), graph)
    except ValueError as e:
        fail(f"its edits are not valid: {e}")
    return Session(graph, model, pairs, label, metric, runs, meta["selected"], meta["size"], meta["absolute"], edits,
                   meta["node"], meta["page"])


def _read(source: Any, fail: Any) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        blob = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"session file {path} does not exist")
        if path.stat().st_size > MAX_BYTES:
            fail(f"it is {path.stat().st_size / 2**20:.0f} MiB, more than the limit of {MAX_BYTES // 2**20} MiB")
        blob = path.read_bytes()
    else:
        blob = source.read(MAX_BYTES + 1)
    if len(blob) > MAX_BYTES:
        fail(f"it is more than the limit of {MAX_BYTES // 2**20} MiB")
    return blob


def _unpack(blob: bytes, fail: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(parsed session.json, tensors) from the archive's bytes; nothing is unpickled or executed."""
    if blob[:1] == b"\x80":
        fail("it is a Python pickle, which eapcore never loads (unpickling can run code); it was not unpickled")
    try:
        archive = zipfile.ZipFile(io.BytesIO(blob))
        members = {info.filename: info for info in archive.infolist()}
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        fail(f"it is not a zip archive ({e}); {_DAMAGED}")
    if "data.pkl" in {n.rsplit("/", 1)[-1] for n in members}:
        fail("it is a torch.save file (it holds a pickle, data.pkl), not a session; it was not unpickled")
    if set(members) != _MEMBERS:
        fail(f"it must hold exactly {sorted(_MEMBERS)}, but holds {sorted(members)[:6]}")
    for info in members.values():
        if info.file_size > MAX_BYTES:
            fail(f"{info.filename} unpacks to {info.file_size / 2**20:.0f} MiB, more than the limit")
    try:
        text = archive.read("session.json").decode("utf-8")
        raw = archive.read("scores.safetensors")
    except (zipfile.BadZipFile, OSError, EOFError, UnicodeDecodeError, ValueError) as e:
        fail(f"it could not be read ({type(e).__name__}: {e!s:.120}); {_DAMAGED}")
    try:
        meta = json.loads(text, object_pairs_hook=_no_duplicates)
    except (json.JSONDecodeError, KeyError) as e:
        fail(f"its session.json is not valid JSON ({e}); {_DAMAGED}")
    from safetensors.torch import load

    try:
        tensors = load(raw)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for bad bytes
        fail(f"its scores.safetensors could not be read ({e!s:.120}); {_DAMAGED}")
    return meta, tensors


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise KeyError("a key appears more than once")
    return out


def _graph(cfg: Any, expected: Graph | None, name: str, model: str, fail: Any) -> Graph:
    if not isinstance(cfg, dict) or not all(_is_int(cfg.get(k)) and cfg[k] > 0 for k in ("n_layers", "n_heads")):
        fail(f"'graph' must hold positive integers n_layers and n_heads, got {cfg!r:.120}")
    found = GraphConfig.from_dict(cfg)
    if expected is None:
        return Graph(found)
    if not fits(found, expected.cfg):
        raise ValueError(f"{name} is a session for a model with {describe(found)}, but the loaded model has "
                         f"{describe(expected.cfg)}; load the model it was saved with ({model!r})")
    return expected


def _model(data: Any, fail: Any) -> ModelSpec:
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or data.get("dtype") not in DTYPES:
        fail(f"'model' must hold a model name and a dtype ({', '.join(DTYPES)}), got {data!r:.120}")
    optional = {"device": str, "device_map": str, "n_devices": int}
    bad = [k for k in data if k not in optional and k not in ("name", "dtype")]
    bad += [k for k, kind in optional.items() if data.get(k) is not None and type(data[k]) is not kind]
    if bad:
        fail(f"'model' has an unknown or mistyped field {bad[0]!r} (got {data.get(bad[0])!r:.80})")
    return ModelSpec(**data)


def _data(data: Any, fail: Any) -> tuple[PromptPairs, str, str]:
    if not isinstance(data, dict) or not isinstance(data.get("label"), str) or data.get("metric") not in METRICS:
        fail(f"'data' must hold a label and a metric ({', '.join(METRICS)}), got {str(data)[:120]!r}")
    columns = [data.get(c) for c in ("clean", "corrupted", "correct", "incorrect")]
    if not all(isinstance(c, list) for c in columns):
        fail("'data' must hold the lists clean, corrupted, correct and incorrect")
    try:
        return PromptPairs.from_lists(*columns), data["label"], data["metric"]
    except ValueError as e:
        fail(f"its prompt pairs are not valid: {e}")


def _runs(runs: Any, tensors: dict[str, torch.Tensor], graph: Graph, fail: Any) -> tuple[Run, ...]:
    if not isinstance(runs, list):
        fail(f"'runs' must be a list, got {type(runs).__name__}")
    shapes = {"edges": (graph.n_forward, graph.n_backward), "nodes": (graph.n_forward,),
              "neurons": (graph.n_forward, graph.cfg.d_model)}
    out, used = [], set()
    for i, run in enumerate(runs):
        where = f"run {i}"
        if not isinstance(run, dict) or not isinstance(run.get("label"), str) or not isinstance(run.get("key"), str):
            fail(f"{where} must hold a label and a key (strings)")
        if not isinstance(run.get("spec"), dict) or not isinstance(run.get("provenance"), dict):
            fail(f"{where} must hold a spec and a provenance (objects)")
        try:
            spec = AttributionSpec(**run["spec"])
        except (TypeError, ValueError) as e:
            fail(f"{where} has an invalid attribution spec ({e})")
        names = run.get("tensors")
        if not isinstance(names, list) or "edges" not in names or not set(names) <= set(shapes):
            fail(f"{where} must list its tensors: 'edges' and optionally 'nodes', 'neurons'; got {names!r:.80}")
        values = {}
        for n in names:
            key = f"{where.replace(' ', '')}.{n}"
            t = tensors.get(key)
            if t is None:
                fail(f"scores.safetensors lacks {key!r}")
            if not t.is_floating_point() or tuple(t.shape) != shapes[n]:
                fail(f"{key!r} must be a float tensor of shape {shapes[n]}, got {t.dtype} {tuple(t.shape)}")
            values[n] = t
            used.add(key)
        if (values["edges"][~graph.real_edge_mask] != 0).any():
            fail(f"{where}'s edge scores are not zero outside the graph's edges")
        scores = Scores(graph, values["edges"], values.get("nodes"), values.get("neurons"), run["provenance"])
        out.append(Run(spec, scores, run["label"], run["key"]))
    extra = sorted(set(tensors) - used)
    if extra:
        fail(f"scores.safetensors holds tensors no run names: {extra[:4]}")
    return tuple(out)
