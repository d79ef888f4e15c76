"""``eapcore mib-export`` and ``eapcore mib-check``: an MIB circuit-track submission folder, written from
attribution runs and checked as MIB's loader and leaderboard evaluator read it (docs/mib.md)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from eapcore.cli.common import CommandFailed
from eapcore.distributed import Context


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("mib-export", help="write runs as an MIB submission folder ({task}_{model}); prints one JSON object")
    e.add_argument("--runs", nargs="+", required=True, help=".pt or .json score files written by attribute or run-jobs")
    e.add_argument("--task", nargs="+", help="MIB task of each run (one value: all runs), e.g. ioi, mcqa, arc-easy; "
                                             "default: the task a run-jobs file records")
    e.add_argument("--model-name", nargs="+", help="MIB model of each run (one value: all runs): gpt2, qwen2.5, "
                                                   "gemma2, llama3; default: the model the run records")
    e.add_argument("--out", required=True, help="the submission folder")
    e.add_argument("--circuits", action="store_true",
                   help="write 9 binary circuits at MIB's sizes (0.1%% to 50%% of the edges) instead of the scores")
    e.add_argument("--signed", action="store_true", help="with --circuits: rank edges by signed score, not |score|")
    e.add_argument("--format", default="pt", choices=("pt", "json"))
    e.add_argument("--force", action="store_true", help="replace circuit files already in a {task}_{model} folder")
    e.set_defaults(run=run_export, context=lambda args: Context())
    c = sub.add_parser("mib-check", help="check an MIB submission folder; exit status 1 when MIB would reject it")
    c.add_argument("folder", help="the submission folder that holds the {task}_{model} folders")
    c.set_defaults(run=run_check, context=lambda args: Context())


def _per_run(values: list[str] | None, n: int, flag: str) -> list[str | None]:
    if values is None:
        return [None] * n
    if len(values) not in (1, n):
        raise ValueError(f"{flag} has {len(values)} values for {n} runs; give one value for all runs, or one per run")
    return values * n if len(values) == 1 else values


def _from_run(given: str | None, provenance: dict, key: str, path: str, flag: str) -> str:
    value = given or provenance.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{path} does not record its {key}; pass {flag}")
    return value


def run_export(args: argparse.Namespace, ctx: Context) -> None:
    from eapcore.export import load_circuit
    from eapcore.mib import MODELS, check_submission, find_model, folder_name, task_name, write_folder

    tasks = _per_run(args.task, len(args.runs), "--task")
    models = _per_run(args.model_name, len(args.runs), "--model-name")
    plan: dict[str, tuple[str, Any, str, str]] = {}
    for path, task, model in zip(args.runs, tasks, models):
        scores, _ = load_circuit(path)
        task = task_name(_from_run(task, scores.provenance, "task", path, "--task"))
        recorded = model is None
        model = _from_run(model, scores.provenance, "model", path, "--model-name")
        mib = find_model(model)
        if mib is None and recorded and not model.replace(".", "").replace("-", "").isalnum():
            raise ValueError(f"{path} records the model {model!r}, not one of MIB's ({', '.join(MODELS)}); pass "
                             "--model-name")
        folder = folder_name(scores, task, model, args.circuits)
        if folder in plan:
            raise ValueError(f"{plan[folder][0]} and {path} both go to {folder}; MIB takes one run per task and model")
        plan[folder] = (path, scores, task, model)
    written = {}
    for folder, (path, scores, task, model) in plan.items():
        files = write_folder(args.out, scores, task, model, circuits=args.circuits, fmt=args.format,
                             absolute=not args.signed, force=args.force)
        written[folder] = [f.name for f in files]
        print(f"{path} -> {args.out}/{folder}: {len(files)} file(s)", file=sys.stderr)
    report = check_submission(args.out)
    print("\n".join(report.lines()))
    print(json.dumps({"out": args.out, "written": written, "check": report.to_dict()}))
    if not report.ok:
        raise CommandFailed(f"{len(report.problems)} problem(s) in {args.out}: {report.problems[0]}")


def run_check(args: argparse.Namespace, ctx: Context) -> None:
    from eapcore.mib import check_submission

    report = check_submission(args.folder)
    print("\n".join(report.lines()))
    print(json.dumps(report.to_dict()))
    if not report.ok:
        raise CommandFailed(f"{len(report.problems)} problem(s) in {args.folder}, e.g. {report.problems[0]}")
