"""Batch jobs, run headless: ``python -m eapcore run-jobs job.toml --out-dir results/``.

Every combination of the job file (:mod:`eapcore.jobfile`, ``examples/job.toml``) becomes one standard
``.pt`` (or ``.json``) named from its spec, plus ``manifest.json``. A run whose output already exists
with the same model, data, method, steps, intervention, level and metric is skipped, so an interrupted
job resumes where it stopped; outputs are written atomically (a temporary file, then a rename), so a
crash never leaves a half-written result behind.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from eapcore.jobfile import Job, Run
from eapcore.methods import get_method

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
    return same and (not get_method(spec.method).steps or p.get("ig_steps") == spec.ig_steps)


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
        return cls(run.file, run.model.source, run.task.name, s.method, s.ig_steps if get_method(s.method).steps else None,
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
        from eapcore.data import PromptPairs
        from eapcore.distributed import PeerFailed, attribute_parallel, collective
        from eapcore.export import save_json, save_pt
        from eapcore.vocabulary import tokenize_for

        progress = self.on_start(rec, i, n)
        start = time.perf_counter()
        try:
            if run.task.csv not in data_cache:
                data_cache[run.task.csv] = collective(
                    lambda: tokenize_for(PromptPairs.from_csv(run.task.csv), model), self.ctx
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
