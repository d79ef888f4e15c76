"""Batch jobs: a TOML file of models × tasks × methods × IG steps (× interventions × levels), run headless.

``python -m eapcore run-jobs job.toml --out-dir results/`` expands every combination, writes one
standard ``.pt`` (or ``.json``) per run, named from its spec, plus ``manifest.json``, and skips runs
whose output already exists with the same model, data, method, steps, intervention, level and metric,
so an interrupted job resumes where it stopped. Outputs are written atomically (a temporary file, then
a rename), so a crash never leaves a half-written result behind. See ``examples/job.toml``.

Job file keys (a value may be a single item or a list, except where noted)::

    models        = ["demo", "gpt2", "path/to/folder", {name = "tiny", path = "tiny_model"}]   # required
    tasks         = ["ioi", {name = "mine", csv = "pairs.csv", metric = "prob_diff"}]         # required
    methods       = ["EAP", "EAP-IG-inputs"]     # default "EAP-IG-inputs"
    ig_steps      = [5, 10]                      # default 5; methods without steps run once
    interventions = "patching"                   # default "patching"
    levels        = "edge"                       # default "edge"
    metric        = "logit_diff"                 # optional: overrides every task's metric
    batch_size    = 32                           # one integer
    chunks        = 1                            # one integer: Δ-buffer windows (same scores, less memory)
    device, dtype, device_map, n_devices         # as on the command line
    format        = "pt"                         # or "json"
    out_dir       = "results"                    # optional; --out-dir wins

Relative paths are relative to the job file. Combinations the engine refuses (e.g. EAP-IG-inputs with
the ``zero`` intervention) are listed in the manifest as ``invalid`` with the reason, not run.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from eapcore.attribute import LEVELS, METHODS, AttributionSpec
from eapcore.interventions import INTERVENTIONS
from eapcore.metrics import METRICS

STEPLESS = ("EAP", "clean-corrupted", "information-flow-routes", "exact")
FORMATS = ("pt", "json")
_KEYS = {
    "models", "tasks", "methods", "ig_steps", "interventions", "levels", "metric", "batch_size", "device", "dtype",
    "device_map", "n_devices", "format", "out_dir", "chunks",
}


class JobError(ValueError):
    """A job file that cannot be run; the message names the key, the value and the fix."""


@dataclass(frozen=True)
class ModelEntry:
    name: str  # as written in the file names and the provenance
    source: str  # what load_model gets: demo, a hub name, or a folder


@dataclass(frozen=True)
class TaskEntry:
    name: str
    csv: str
    metric: str


@dataclass(frozen=True)
class Settings:
    """The arguments of an :class:`AttributionSpec` (kept even when the engine refuses the combination)."""

    method: str
    ig_steps: int
    metric: str
    intervention: str
    batch_size: int
    level: str
    chunks: int = 1


@dataclass(frozen=True)
class Run:
    """One combination: the model, the task and the attribution settings; ``file`` is the output's name."""

    model: ModelEntry
    task: TaskEntry
    settings: Settings
    file: str
    invalid: str | None = None  # why the engine refuses this combination

    @property
    def spec(self) -> AttributionSpec:
        return AttributionSpec(**asdict(self.settings))


@dataclass(frozen=True)
class Job:
    path: Path
    runs: tuple[Run, ...]
    batch_size: int
    device: str | None
    dtype: str
    device_map: str | None
    n_devices: int | None
    format: str
    out_dir: Path | None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"


def _as_list(raw: dict, key: str, default: list) -> list:
    value = raw.get(key, default)
    return list(value) if isinstance(value, list) else [value]


def _choices(raw: dict, key: str, default: list, allowed: tuple, what: str) -> list:
    values = _as_list(raw, key, default)
    if not values:
        raise JobError(f"{key} is empty; list at least one {what}")
    for v in values:
        if v not in allowed:
            raise JobError(f"{key}: unknown {what} {v!r}; choose from {', '.join(map(str, allowed))}")
    return list(dict.fromkeys(values))


def _models(raw: dict, base: Path) -> list[ModelEntry]:
    out = []
    for item in _as_list(raw, "models", []):
        if isinstance(item, str):
            is_folder = item != "demo" and ((base / item).exists() or Path(item).exists())
            source, name = item, Path(item.rstrip("/")).name if is_folder else item  # a hub name keeps its org/
        elif isinstance(item, dict) and isinstance(item.get("name"), str):
            name, source = item["name"], item.get("path", item["name"])
            unknown = set(item) - {"name", "path"}
            if unknown or not isinstance(source, str):
                raise JobError(f"models: entry {item!r} may only have a string 'name' and 'path'")
        else:
            raise JobError(f"models: entry {item!r} must be a model name, a folder, or {{name = ..., path = ...}}")
        if source != "demo" and not Path(source).is_absolute() and (base / source).exists():
            source = str((base / source).resolve())
        out.append(ModelEntry(_slug(name.replace("/", "--")), source))
    if not out:
        raise JobError("models is missing or empty; e.g. models = [\"demo\"]")
    return out


def _tasks(raw: dict, base: Path) -> list[TaskEntry]:
    from eapcore.tasks import TASKS, get_task

    out = []
    for item in _as_list(raw, "tasks", []):
        if isinstance(item, str):
            if item not in TASKS:
                raise JobError(f"tasks: {item!r} is not a shipped task ({', '.join(TASKS)}); give a CSV as "
                               "{name = ..., csv = \"file.csv\", metric = ...}")
            task = get_task(item)
            out.append(TaskEntry(item, str(task.csv), task.metric))
        elif isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("csv"), str):
            unknown = set(item) - {"name", "csv", "metric"}
            if unknown:
                raise JobError(f"tasks: entry {item['name']!r} has unknown key(s) {sorted(unknown)}; use name, csv, metric")
            csv = Path(item["csv"])
            csv = csv if csv.is_absolute() else base / csv
            if not csv.is_file():
                raise JobError(f"tasks: the CSV of {item['name']!r} does not exist: {csv}")
            metric = item.get("metric", "logit_diff")
            if metric not in METRICS:
                raise JobError(f"tasks: {item['name']!r} has unknown metric {metric!r}; choose from {', '.join(METRICS)}")
            out.append(TaskEntry(_slug(item["name"]), str(csv.resolve()), metric))
        else:
            raise JobError(f"tasks: entry {item!r} must be a shipped task name or {{name = ..., csv = ..., metric = ...}}")
    if not out:
        raise JobError("tasks is missing or empty; e.g. tasks = [\"ioi\"]")
    return out


def _int(raw: dict, key: str, default: int | None) -> int | None:
    value = raw.get(key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise JobError(f"{key} must be a positive integer, got {value!r}")
    return value


def _str(raw: dict, key: str, default: str | None) -> str | None:
    value = raw.get(key, default)
    if value is not None and not isinstance(value, str):
        raise JobError(f"{key} must be a string, got {value!r}")
    return value


def file_name(model: ModelEntry, task: TaskEntry, spec: Settings, fmt: str) -> str:
    method = spec.method if spec.method in STEPLESS else f"{spec.method}-{spec.ig_steps}"
    parts = [model.name, task.name, method, spec.intervention, spec.level]
    if spec.metric != task.metric:
        parts.append(spec.metric)
    return "__".join(_slug(p) for p in parts) + f".{fmt}"


def load_job(path: str | os.PathLike) -> Job:
    """Read and check a job file; expand every combination (refused ones marked ``invalid``)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JobError(f"job file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise JobError(f"job file {path} is not valid TOML: {e}") from None
    unknown = set(raw) - _KEYS
    if unknown:
        raise JobError(f"job file {path}: unknown key(s) {sorted(unknown)}; the keys are {', '.join(sorted(_KEYS))}")
    base = path.resolve().parent
    models, tasks = _models(raw, base), _tasks(raw, base)
    methods = _choices(raw, "methods", ["EAP-IG-inputs"], METHODS, "method")
    steps = _as_list(raw, "ig_steps", [5])
    for s in steps:
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise JobError(f"ig_steps: {s!r} is not a positive integer")
    steps = list(dict.fromkeys(steps))
    interventions = _choices(raw, "interventions", ["patching"], INTERVENTIONS, "intervention")
    levels = _choices(raw, "levels", ["edge"], LEVELS, "level")
    metric = _str(raw, "metric", None)
    if metric is not None and metric not in METRICS:
        raise JobError(f"metric: unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    batch_size = _int(raw, "batch_size", 32)
    chunks = _int(raw, "chunks", 1)
    fmt = _str(raw, "format", "pt")
    if fmt not in FORMATS:
        raise JobError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    runs: list[Run] = []
    for model, task, method, intervention, level in itertools.product(models, tasks, methods, interventions, levels):
        for n_steps in (steps[:1] if method in STEPLESS else steps):
            settings = Settings(method, n_steps, metric or task.metric, intervention, batch_size, level, chunks)
            try:
                AttributionSpec(**asdict(settings))
                why = None
            except ValueError as e:
                why = str(e)
            runs.append(Run(model, task, settings, file_name(model, task, settings, fmt), why))
    seen: dict[str, Run] = {}
    for run in runs:
        if run.file in seen:
            raise JobError(
                f"two runs would both write {run.file} ({seen[run.file].model.source} and {run.model.source}); give the "
                "models or tasks distinct names with {name = ..., path = ...}"
            )
        seen[run.file] = run
    out_dir = _str(raw, "out_dir", None)
    return Job(
        path, tuple(runs), batch_size, _str(raw, "device", None), _str(raw, "dtype", "float32"),
        _str(raw, "device_map", None), _int(raw, "n_devices", None), fmt,
        None if out_dir is None else (Path(out_dir) if Path(out_dir).is_absolute() else base / out_dir),
    )


# ----- status of existing outputs -----


def _data_fingerprint(csv: str) -> str:
    from eapcore.data import PromptPairs

    return PromptPairs.from_csv(csv).fingerprint()


def existing_matches(path: Path, run: Run, fingerprint: str) -> bool:
    """Whether ``path`` holds this run's result already (same model, data, method, steps, intervention,
    level and metric, as recorded in its provenance). Unreadable or different files do not match."""
    from eapcore.export import load_circuit

    if not path.is_file():
        return False
    try:
        scores, _ = load_circuit(path)
    except (ValueError, OSError):
        return False
    p = scores.provenance
    spec = run.settings
    same = (
        p.get("model") == run.model.source and p.get("data") == fingerprint and p.get("method") == spec.method
        and p.get("intervention") == spec.intervention and p.get("level") == spec.level and p.get("metric") == spec.metric
    )
    return same and (spec.method in STEPLESS or p.get("ig_steps") == spec.ig_steps)


@dataclass
class Record:
    """One line of the manifest."""

    file: str
    model: str
    task: str
    method: str
    ig_steps: int | None
    intervention: str
    level: str
    metric: str
    batch_size: int
    status: str  # pending | done | exists | invalid | failed
    seconds: float | None = None
    message: str | None = None
    n_examples: int | None = None

    @classmethod
    def of(cls, run: Run, status: str, message: str | None = None) -> "Record":
        s = run.settings
        return cls(run.file, run.model.source, run.task.name, s.method, None if s.method in STEPLESS else s.ig_steps,
                   s.intervention, s.level, s.metric, s.batch_size, status, message=message)


def plan(job: Job, out_dir: Path, force: bool = False) -> list[Record]:
    """What each run will do: ``invalid`` (refused), ``exists`` (a matching output is there) or ``pending``."""
    fingerprints: dict[str, str] = {}
    records = []
    for run in job.runs:
        if run.invalid:
            records.append(Record.of(run, "invalid", run.invalid))
            continue
        if not force and (out_dir / run.file).exists():
            if run.task.csv not in fingerprints:
                fingerprints[run.task.csv] = _data_fingerprint(run.task.csv)
            if existing_matches(out_dir / run.file, run, fingerprints[run.task.csv]):
                records.append(Record.of(run, "exists"))
                continue
            records.append(Record.of(run, "pending", "an older output with a different spec or data will be replaced"))
            continue
        records.append(Record.of(run, "pending"))
    return records


def write_manifest(out_dir: Path, job: Job, records: list[Record]) -> Path:
    """``manifest.json``: the job file, when, and one record per run (written atomically)."""
    path = out_dir / "manifest.json"
    from eapcore import __version__

    body = {
        "job": str(job.path.resolve()),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "eapcore": __version__,
        "format": job.format,
        "counts": {s: sum(r.status == s for r in records) for s in ("done", "exists", "pending", "failed", "invalid")},
        "runs": [asdict(r) for r in records],
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# ----- running -----

Progress = Callable[[int, int], None]


@dataclass
class Runner:
    """Runs a job's pending records in order (models loaded once, data tokenized once per model), writing
    each output and the manifest as it goes. ``ctx`` is a :class:`eapcore.distributed.Context`: under
    torchrun every rank computes its shard and rank 0 writes."""

    job: Job
    out_dir: Path
    ctx: Any
    on_start: Callable[[Record, int, int], Progress | None] = lambda record, i, n: None
    on_end: Callable[[Record, int, int], None] = lambda record, i, n: None
    _models: dict[str, Any] = field(default_factory=dict)

    def run(self, records: list[Record]) -> list[Record]:
        from eapcore.distributed import PeerFailed, collective

        runs = {r.file: r for r in self.job.runs}
        todo = [rec for rec in records if rec.status == "pending"]
        if self.ctx.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_manifest(self.out_dir, self.job, records)
        by_model: dict[str, list[Record]] = {}
        for rec in todo:
            by_model.setdefault(runs[rec.file].model.source, []).append(rec)
        done = 0
        for source, group in by_model.items():
            try:
                model = collective(lambda: self._load(source), self.ctx)
            except (ValueError, TypeError, OSError, MemoryError, PeerFailed) as e:
                for rec in group:
                    rec.status, rec.message = "failed", f"could not load the model: {e}"
                    done += 1
                    self.on_end(rec, done, len(todo))
                self._save_manifest(records)
                continue
            data_cache: dict[str, Any] = {}
            for rec in group:
                done += 1
                self._one(model, runs[rec.file], rec, data_cache, done, len(todo))
                self._save_manifest(records)
            del model
        return records

    def _load(self, source: str) -> Any:
        from eapcore.models import ModelSpec, load_model

        job = self.job
        return load_model(ModelSpec(source, self.ctx.device or job.device, job.dtype, device_map=job.device_map,
                                    n_devices=job.n_devices))

    def _one(self, model: Any, run: Run, rec: Record, data_cache: dict, i: int, n: int) -> None:
        from eapcore.data import PromptPairs, tokenize
        from eapcore.distributed import PeerFailed, attribute_parallel, collective
        from eapcore.export import save_json, save_pt

        progress = self.on_start(rec, i, n)
        start = time.perf_counter()
        try:
            if run.task.csv not in data_cache:
                data_cache[run.task.csv] = collective(
                    lambda: tokenize(PromptPairs.from_csv(run.task.csv), model.tokenizer, model.cfg.n_ctx), self.ctx
                )
            data = data_cache[run.task.csv]
            scores = attribute_parallel(model, data, run.spec, self.ctx, progress=progress).cpu()
            if self.ctx.main:
                provenance = {**scores.provenance, "model": run.model.source, "task": run.task.name,
                              "job": {"file": str(self.job.path.name), "run": run.file}}
                target = self.out_dir / run.file
                tmp = target.with_name(target.name + ".tmp")
                (save_json if self.job.format == "json" else save_pt)(tmp, scores, None, provenance)
                os.replace(tmp, target)
            rec.status, rec.message, rec.n_examples = "done", None, len(data)
        except (ValueError, TypeError, OSError, FloatingPointError, MemoryError, PeerFailed) as e:
            rec.status, rec.message = "failed", str(e)
        rec.seconds = round(time.perf_counter() - start, 3)
        self.on_end(rec, i, n)

    def _save_manifest(self, records: list[Record]) -> None:
        if self.ctx.main:
            write_manifest(self.out_dir, self.job, records)
