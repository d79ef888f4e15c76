"""The Mechanistic Interpretability Benchmark (MIB) circuit track: its models and tasks, and submission folders
written and checked as its loader and leaderboard evaluator read them (its datasets' columns: eapcore.mib_data).

A submission is a folder with one sub-folder per ``{task}_{model}`` (``ioi_gpt2``, ``arc-easy_llama3``), each
holding either one file of real-valued importance scores (``.pt`` or ``.json``, every edge scored) or 9 binary
circuits with at most 0.1, 0.2, 0.5, 1, 2, 5, 10, 20 and 50 % of the graph's edges (the evaluator sorts them by
size and adds the full model as 100 %). ``.pt`` files need ``cfg``, ``src_nodes``, ``dst_nodes``,
``edges_scores``, ``edges_in_graph`` and ``nodes_in_graph``; ``.json`` files ``cfg``, ``nodes`` and ``edges``;
``cfg`` needs ``n_layers``, ``n_heads``, ``parallel_attn_mlp`` and ``d_model``. See docs/mib.md.

One line each for a page: ``write_folder(out, scores, "ioi", "gpt2")`` and ``check_submission(out).ok``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from eapcore.circuit import Circuit, Scores
from eapcore.curve import MIB_PERCENTS, size_for_percent
from eapcore.export import load_circuit, save_json, save_pt
from eapcore.graph import GraphConfig
from eapcore.schema import describe
from eapcore.select import top_n


@dataclass(frozen=True)
class MIBModel:
    """A model on MIB's board: its folder-name spelling, checkpoint, graph (grouped-query attention ungrouped)
    and edge count as MIB's evaluator has it."""

    name: str
    checkpoint: str
    cfg: GraphConfig
    n_edges: int
    aliases: tuple[str, ...] = ()


MODELS = {m.name: m for m in (
    MIBModel("gpt2", "gpt2", GraphConfig(12, 12, False, 768), 32_491, ("openai-community/gpt2", "gpt2-small")),
    MIBModel("qwen2.5", "Qwen/Qwen2.5-0.5B", GraphConfig(24, 14, False, 896), 179_749),
    MIBModel("gemma2", "google/gemma-2-2b", GraphConfig(26, 8, False, 2304), 74_218),
    MIBModel("llama3", "meta-llama/Llama-3.1-8B", GraphConfig(32, 32, False, 4096), 1_592_881),
)}
# Task (folder-name spelling) -> the models the leaderboard scores it on.
TASKS = {
    "ioi": ("gpt2", "qwen2.5", "gemma2", "llama3"),
    "mcqa": ("qwen2.5", "gemma2", "llama3"),
    "arithmetic-addition": ("llama3",),
    "arithmetic-subtraction": ("llama3",),
    "arc-easy": ("gemma2", "llama3"),
    "arc-challenge": ("llama3",),
}
CIRCUIT_PERCENTS = MIB_PERCENTS[:-1]  # the 9 binary circuits; the evaluator adds the full model as 100 %
IMPORTANCES = "importances"  # the file name MIB's own scripts write


def find_model(name: str) -> MIBModel | None:
    """The MIB model called ``name`` (its MIB name, checkpoint or an alias, any case), else ``None``."""
    key = name.strip().lower()
    return next((m for m in MODELS.values() if key in {m.name, m.checkpoint.lower(), *m.aliases}), None)


def model_of_graph(cfg: GraphConfig) -> MIBModel | None:
    """The MIB model whose graph ``cfg`` is (``d_model`` compared when ``cfg`` knows it)."""
    return next((m for m in MODELS.values() if _same_graph(cfg, m.cfg)), None)


def _same_graph(found: GraphConfig, want: GraphConfig) -> bool:
    shape = lambda c: (c.n_layers, c.n_heads, c.parallel_attn_mlp)  # noqa: E731
    return shape(found) == shape(want) and (not found.d_model or found.d_model == want.d_model)


def task_name(task: str) -> str:
    """MIB's folder spelling of a task: ``arc_easy`` -> ``arc-easy``."""
    return task.strip().lower().replace("_", "-")


# ----- export -----


def folder_name(scores: Scores, task: str, model: str, circuits: bool = False) -> str:
    """``{task}_{model}`` in MIB's spelling, after checking that ``scores`` can be written there: a model that
    is MIB's must have MIB's graph (another model is written as given); ``circuits`` need edge scores."""
    task, mib = task_name(task), find_model(model)
    model = mib.name if mib else model.strip()
    if not re.fullmatch(r"[A-Za-z0-9.\-]+", task) or not re.fullmatch(r"[A-Za-z0-9.\-]+", model):
        raise ValueError(f"task {task!r} and model {model!r} may hold only letters, digits, '.' and '-' (the folder "
                         "name is {task}_{model}, e.g. ioi_gpt2)")
    graph = scores.graph
    if mib is not None and (not _same_graph(graph.cfg, mib.cfg) or graph.n_edges != mib.n_edges):
        raise ValueError(
            f"these scores are for a graph of {describe(graph.cfg)} ({graph.n_edges:,} edges), but MIB's {mib.name} "
            f"({mib.checkpoint}) has {describe(mib.cfg)} ({mib.n_edges:,} edges); attribute {mib.checkpoint}"
        )
    if circuits and not bool((scores.edges[graph.real_edge_mask] != 0).any()):
        raise ValueError("these scores have no edge scores (a node- or neuron-level run?); export them as importance "
                         "scores (without --circuits)")
    return f"{task}_{model}"


def write_folder(
    out: str | Path, scores: Scores, task: str, model: str, circuits: bool = False, fmt: str = "pt",
    absolute: bool = True, force: bool = False,
) -> list[Path]:
    """Write ``scores`` as ``out/{task}_{model}/`` (:func:`folder_name`): ``importances.{fmt}``, or with
    ``circuits`` the 9 pruned top-k circuits at MIB's sizes (ranked by ``|score|`` when ``absolute``).
    Returns the files written."""
    if fmt not in ("pt", "json"):
        raise ValueError(f"unknown format {fmt!r}; choose pt or json")
    name = folder_name(scores, task, model, circuits)
    folder = Path(out) / name
    task, model = name.rsplit("_", 1)
    old = _circuit_files(folder) if folder.is_dir() else []
    if old and not force:
        raise ValueError(f"{folder} already holds {len(old)} circuit file(s), e.g. {old[0].name}; write elsewhere, "
                         "or replace them (--force)")
    folder.mkdir(parents=True, exist_ok=True)
    for f in old:
        f.unlink()
    save = save_json if fmt == "json" else save_pt
    provenance = {**scores.provenance, "mib": {"task": task, "model": model}}
    if not circuits:
        path = folder / f"{IMPORTANCES}.{fmt}"
        save(path, scores, None, provenance)
        return [path]
    paths = []
    for p in CIRCUIT_PERCENTS:
        path = folder / f"edges_{p:g}pct.{fmt}"
        save(path, None, top_n(scores, size_for_percent(scores.graph.n_edges, p), absolute=absolute), provenance)
        paths.append(path)
    return paths


# ----- check -----


@dataclass
class Report:
    """What :func:`check_submission` found: ``problems`` (MIB would fail or mis-score the submission),
    ``warnings`` (it would be skipped in part, or is incomplete) and ``notes``; ``folders`` maps each
    ``{task}_{model}`` folder to its form."""

    root: Path
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    folders: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        return ([f"problem: {p}" for p in self.problems] + [f"warning: {w}" for w in self.warnings]
                + [f"note: {n}" for n in self.notes] + [f"ok: {name}: {form}" for name, form in self.folders.items()])

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, "warnings": self.warnings, "notes": self.notes,
                "folders": self.folders}


def _circuit_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in (".pt", ".json"))


def _ranking_folder(name: str) -> bool:
    """The evaluator reads ``abs-True``/``abs-False``-like folders as fixing the ranking of those inside."""
    name = name.lower()
    return "abs" in name and ("true" in name or "false" in name)


def check_submission(root: str | Path) -> Report:
    """Check a submission folder as MIB's loader and leaderboard evaluator will read it (never unpickling)."""
    root = Path(root)
    report = Report(root)
    if not root.is_dir():
        report.problems.append(f"{root} is not a folder; pass the folder that holds the {{task}}_{{model}} folders")
        return report
    folders = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        folders += sorted(p for p in d.iterdir() if p.is_dir()) if _ranking_folder(d.name) else [d]
    loose = _circuit_files(root)
    if loose:
        report.warnings.append(f"{root}: {len(loose)} circuit file(s) outside the {{task}}_{{model}} folders, e.g. "
                               f"{loose[0].name}; the evaluator ignores them")
    if not folders:
        report.problems.append(f"{root} holds no {{task}}_{{model}} folders (e.g. ioi_gpt2); write them with mib-export")
    pairs = [pair for d in folders if (pair := _check_folder(d, report)) is not None]
    models = sorted({m for t, m in pairs if t in TASKS and m in MODELS})
    tasks = sorted({t for t, m in pairs if t in TASKS and m in MODELS})
    if len(models) < 2 or len(tasks) < 2:
        report.warnings.append(
            f"a complete submission has circuits for at least 2 of MIB's models and 2 of its tasks; this one has "
            f"models {models} and tasks {tasks}"
        )
    return report


def _check_folder(folder: Path, report: Report) -> tuple[str, str] | None:
    where, before = folder.relative_to(report.root), len(report.problems)
    task, sep, model = folder.name.rpartition("_")
    if not sep or not task or not model:
        report.problems.append(f"{where}: the folder name must be {{task}}_{{model}}, e.g. ioi_gpt2 or arc-easy_llama3")
        return None
    if "_" in task and task_name(task) in TASKS:
        report.problems.append(f"{where}: write the task as {task_name(task)!r} ({task_name(task)}_{model}); the "
                               "leaderboard splits result names at '_'")
    mib = MODELS.get(model)
    if mib is None:
        report.notes.append(f"{where}: {model!r} is not one of MIB's models ({', '.join(MODELS)}): checked everything "
                            "but the edge count; the leaderboard skips this folder")
    if task not in TASKS:
        report.warnings.append(f"{where}: {task!r} is not one of MIB's tasks ({', '.join(TASKS)}); the leaderboard "
                               "skips this folder")
    elif mib is not None and model not in TASKS[task]:
        report.warnings.append(f"{where}: the leaderboard scores {task} on {', '.join(TASKS[task])} only; it skips "
                               "this folder")
    files = _circuit_files(folder)
    n = len(files)
    if n == 0:
        report.problems.append(f"{where}: no .pt or .json circuit file; write {IMPORTANCES}.pt (scores) or 9 circuits")
        return task, model
    if n not in (1, 9):
        report.problems.append(
            f"{where}: {n} circuit files; MIB reads a folder as 1 file of importance scores or exactly 9 binary "
            f"circuits (at most {', '.join(f'{p:g}' for p in CIRCUIT_PERCENTS)} % of the edges)"
        )
        return task, model
    loaded = [_load(f, mib, report) for f in files]
    if any(x is None for x in loaded):
        return task, model
    if n == 1:
        _check_importances(files[0], *loaded[0], report)
    else:
        _check_circuits(files, [c for _, c in loaded], report)
    if len(report.problems) == before:
        report.folders[str(where)] = "importance scores" if n == 1 else "9 binary circuits"
    return task, model


def _load(path: Path, mib: MIBModel | None, report: Report) -> tuple[Scores, Circuit] | None:
    where = path.relative_to(report.root)
    try:
        scores, circuit = load_circuit(path)
    except (ValueError, OSError) as e:
        report.problems.append(str(e).replace(str(path), str(where)))
        return None
    missing = [k for k in ("n_layers", "n_heads", "parallel_attn_mlp", "d_model") if k not in _raw_cfg(path)]
    if missing:
        report.problems.append(f"{where}: cfg lacks {missing}; MIB's loader needs n_layers, n_heads, parallel_attn_mlp "
                               "and d_model")
        return None
    graph = scores.graph
    if mib is not None and (not _same_graph(graph.cfg, mib.cfg) or graph.cfg.d_model != mib.cfg.d_model
                            or graph.n_edges != mib.n_edges):
        report.problems.append(
            f"{where}: its graph has {graph.n_edges:,} edges ({describe(graph.cfg)}), but MIB's {mib.name} graph has "
            f"{mib.n_edges:,} ({describe(mib.cfg)}); export scores of {mib.checkpoint}"
        )
        return None
    return scores, circuit


def _raw_cfg(path: Path) -> dict:
    """The ``cfg`` dict as stored (``load_circuit`` has already checked the file)."""
    if path.suffix.lower() == ".pt":
        cfg = torch.load(path, weights_only=True, map_location="cpu")["cfg"]
    else:
        cfg = json.loads(path.read_text(encoding="utf-8"))["cfg"]
    return cfg


def _check_importances(path: Path, scores: Scores, circuit: Circuit, report: Report) -> None:
    where = path.relative_to(report.root)
    edges = scores.edges[scores.graph.real_edge_mask]
    tables = [t for t in (edges, scores.nodes, scores.neurons) if t is not None]
    if not all(bool(torch.isfinite(t).all()) for t in tables):
        report.problems.append(f"{where}: some scores are NaN or infinite; MIB ranks by score, so every score must "
                               "be a finite number")
    elif not any(bool((t != 0).any()) for t in tables):
        report.problems.append(f"{where}: every score is 0, so it ranks nothing; a single file must hold real-valued "
                               "importance scores (binary circuits come as 9 files)")


def _check_circuits(files: list[Path], circuits: list[Circuit], report: Report) -> None:
    graphs = {c.graph.cfg for c in circuits}
    if len(graphs) > 1:
        report.problems.append(f"{files[0].parent.relative_to(report.root)}: the 9 circuits are of different graphs "
                               f"({'; '.join(describe(g) for g in graphs)})")
        return
    total = circuits[0].graph.n_edges
    sized = sorted(zip((_weighted_edges(c) for c in circuits), files), key=lambda x: x[0])
    for i, (p, (count, path)) in enumerate(zip(CIRCUIT_PERCENTS, sized), start=1):
        limit = size_for_percent(total, p)
        if count > limit:
            report.problems.append(
                f"{path.relative_to(report.root)}: {count:g} edges, but the circuit that is {i}th by size must have at "
                f"most {p:g}% of the graph's {total:,} edges ({limit:,})"
            )


def _weighted_edges(circuit: Circuit) -> float:
    """MIB's ``weighted_edge_count``: edges, each weighted by its parent's share of neurons when given."""
    edges = (circuit.edges & circuit.graph.real_edge_mask).float()
    if circuit.neurons is None:
        return float(edges.sum())
    share = circuit.neurons.float().sum(1) / circuit.graph.cfg.d_model
    return float((edges * share[:, None]).sum())
