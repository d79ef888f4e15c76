"""Job files: a TOML file of models × tasks × methods × IG steps (× interventions × levels), parsed and checked.

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
import os
import re
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from eapcore.attribute import AttributionSpec
from eapcore.interventions import INTERVENTIONS
from eapcore.methods import LEVELS, METHODS, get_method
from eapcore.metrics import METRICS
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
    """A task of the job: its name, its CSV and the metric it is scored with."""

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
    method = f"{spec.method}-{spec.ig_steps}" if get_method(spec.method).steps else spec.method
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
        for n_steps in (steps if get_method(method).steps else steps[:1]):
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
