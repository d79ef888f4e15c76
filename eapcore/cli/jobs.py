"""``eapcore run-jobs``: every combination of a TOML job file, resumable (see ``examples/job.toml``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from eapcore.cli.common import CommandFailed, bar_callback, progress_bar, token_lengths
from eapcore.data import PromptPairs
from eapcore.distributed import Context


def register(sub: argparse._SubParsersAction) -> None:
    j = sub.add_parser("run-jobs", help="run every combination in a TOML job file; resumable (see examples/job.toml)")
    j.add_argument("job", help="a TOML job file: models x tasks x methods x ig_steps (x interventions x levels)")
    j.add_argument("--out-dir", help="where the results and manifest.json go (default: the job's out_dir, else results/)")
    j.add_argument("--force", action="store_true", help="run every combination again, even when its output exists")
    j.add_argument("--dry-run", action="store_true", help="list the runs, what each would do and its memory estimate; run nothing")
    j.set_defaults(run=run, context=context)


def context(args: argparse.Namespace) -> Context:
    """The job file's device decides the process group (read once here, again in :func:`run`)."""
    from eapcore.distributed import setup
    from eapcore.jobfile import load_job

    job = load_job(args.job)
    return Context() if args.dry_run else setup(job.device, job.device_map)


def run(args: argparse.Namespace, ctx: Context) -> None:
    from tqdm import tqdm

    from eapcore.distributed import broadcast
    from eapcore.jobfile import load_job
    from eapcore.jobs import Runner, plan

    job = load_job(args.job)
    out_dir = Path(args.out_dir) if args.out_dir else (job.out_dir or Path("results"))
    records = broadcast(plan(job, out_dir, args.force) if ctx.main else None, ctx)
    pending = [r for r in records if r.status == "pending"]
    if args.dry_run:
        if ctx.main:
            _dry_run(job, records)
        return
    if ctx.main:
        counts = {s: sum(r.status == s for r in records) for s in ("pending", "exists", "invalid")}
        print(f"{args.job}: {len(records)} runs: {counts['pending']} to run, {counts['exists']} already done, "
              f"{counts['invalid']} invalid; writing to {out_dir}", file=sys.stderr)
    outer = tqdm(total=len(pending), desc="runs", unit="run", disable=not ctx.main, position=0)
    inner: dict[str, Any] = {}

    def on_start(rec: Any, i: int, n: int):
        # in a log file nested bars are noise; a line per run is written below instead
        bar = progress_bar(rec.file, ctx.main and sys.stderr.isatty(), position=1, leave=False)
        inner["bar"] = bar
        return bar_callback(bar)

    def on_end(rec: Any, i: int, n: int) -> None:
        if "bar" in inner:
            inner.pop("bar").close()
        outer.update(1)
        if ctx.main:
            took = f" in {rec.seconds:.1f} s" if rec.seconds is not None else ""
            tail = f": {rec.message}" if rec.status == "failed" else ""
            outer.write(f"[{i}/{n}] {rec.file}: {rec.status}{took}{tail}", file=sys.stderr)

    with outer:
        Runner(job, out_dir, ctx, on_start, on_end).run(records)
    failed = [r for r in records if r.status == "failed"]
    if ctx.main:
        print(f"{len(pending) - len(failed)} of {len(pending)} runs done; manifest: {out_dir / 'manifest.json'}", file=sys.stderr)
    if failed:
        raise CommandFailed(f"{len(failed)} run(s) failed, e.g. {failed[0].file}: {failed[0].message}; see {out_dir / 'manifest.json'}")


def _dry_run(job: Any, records: list) -> None:
    from eapcore.memory import attribution_estimate, batch_shapes, human, shape_of_config
    from eapcore.models import default_device, resolve_source

    runs = {r.file: r for r in job.runs}
    shapes: dict[str, Any] = {}
    lengths: dict[tuple[str, str], list[int]] = {}
    width = max(len(r.file) for r in records)
    print(f"{'run':<{width}}  {'status':<8}  est. peak")
    device = job.device or default_device()
    for rec in records:
        run = runs[rec.file]
        estimate = ""
        if rec.status == "pending":
            source = resolve_source(run.model.source)
            if source not in shapes:
                shapes[source] = shape_of_config(source)
            key = (source, run.task.csv)
            if key not in lengths:
                lengths[key] = token_lengths(source, PromptPairs.from_csv(run.task.csv), shapes[source].n_ctx)
            est = attribution_estimate(shapes[source], batch_shapes(lengths[key], job.batch_size), run.settings.method,
                                       job.dtype, device, run.settings.level, chunks=run.settings.chunks,
                                       ig_steps=run.settings.ig_steps)
            estimate = human(est.total)
        print(f"{rec.file:<{width}}  {rec.status:<8}  {estimate}{'  ' + rec.message if rec.message else ''}")
