"""Headless command line: ``python -m eapcore attribute|evaluate|run-jobs ...``.

It is also the ``torchrun`` entry point: ``torchrun --nproc-per-node N -m eapcore attribute ...`` shares
the prompt pairs among N processes and all-reduces the scores; rank 0 writes the file (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from eapcore.attribute import LEVELS, METHODS, AttributionSpec
from eapcore.data import PromptPairs, TokenizedPairs, tokenize
from eapcore.distributed import Context, DistributedError, PeerFailed
from eapcore.interventions import INTERVENTIONS
from eapcore.metrics import METRICS
from eapcore.models import DTYPES, ModelSpec
from eapcore.tasks import TASKS, get_task

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
ERRORS = (ValueError, TypeError, OSError, FloatingPointError, MemoryError, DistributedError)


def _placement(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when available; under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device-map", choices=DEVICE_MAPS,
                   help="split a model too big for one GPU over this machine's GPUs (excludes --device)")
    p.add_argument("--n-devices", type=int, help="split the model over this many GPUs (excludes --device)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="'demo', a Hugging Face name, or a local save_pretrained folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="CSV with columns clean,corrupted,correct,incorrect")
    src.add_argument("--task", choices=sorted(TASKS), help="a shipped task (default: ioi when --data is absent)")
    p.add_argument("--metric", choices=sorted(METRICS), help="default: the task's metric, else logit_diff")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--intervention", default="patching", choices=INTERVENTIONS,
                   help="what an ablated edge carries; mean/mean-positional average over the data's clean prompts")
    _placement(p)
    p.add_argument("--dry-run", action="store_true",
                   help="print the estimated peak memory of this run and exit without loading the model")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eapcore", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("attribute", help="score every edge and write a .pt or .json graph")
    _common(a)
    a.add_argument("--method", default="EAP-IG-inputs", choices=METHODS)
    a.add_argument("--ig-steps", type=int, default=5)
    a.add_argument("--level", default="edge", choices=LEVELS, help="score edges, nodes or neurons (d_model dims)")
    a.add_argument("--chunks", type=int, default=1,
                   help="split the activation-difference buffer into this many windows of source rows: the same "
                        "scores with 1/chunks of its memory, for more passes")
    a.add_argument("--out", required=True, help="output file, .pt or .json")
    e = sub.add_parser("evaluate", help="evaluate a circuit from a scored graph; prints one JSON object")
    _common(e)
    e.add_argument("--circuit", required=True, help="a .pt or .json graph written by `attribute` or EAP-IG")
    size = e.add_mutually_exclusive_group()
    size.add_argument("--top-n", type=int, help="keep the top-n edges by |score|")
    size.add_argument("--threshold", type=float, help="keep edges with |score| >= threshold")
    j = sub.add_parser("run-jobs", help="run every combination in a TOML job file; resumable (see examples/job.toml)")
    j.add_argument("job", help="a TOML job file: models x tasks x methods x ig_steps (x interventions x levels)")
    j.add_argument("--out-dir", help="where the results and manifest.json go (default: the job's out_dir, else results/)")
    j.add_argument("--force", action="store_true", help="run every combination again, even when its output exists")
    j.add_argument("--dry-run", action="store_true", help="list the runs, what each would do and its memory estimate; run nothing")
    return parser


def _model_spec(args: argparse.Namespace, ctx: Context) -> ModelSpec:
    return ModelSpec(args.model, ctx.device or args.device, args.dtype, device_map=args.device_map, n_devices=args.n_devices)


def _pairs(args: argparse.Namespace) -> tuple[PromptPairs, str]:
    if args.data:
        return PromptPairs.from_csv(args.data), args.metric or "logit_diff"
    task = get_task(args.task or "ioi")
    return PromptPairs.from_csv(task.csv), args.metric or task.metric


def _load_data(args: argparse.Namespace, ctx: Context) -> tuple[Any, TokenizedPairs, str]:
    """(model, tokenized pairs, metric). The CSV is read and checked before the model is loaded, so a bad
    file fails in a moment even when the model is large."""
    from eapcore.distributed import collective
    from eapcore.models import load_model

    pairs, metric = collective(lambda: _pairs(args), ctx)
    model = collective(lambda: load_model(_model_spec(args, ctx)), ctx)
    data = collective(lambda: tokenize(pairs, model.tokenizer, model.cfg.n_ctx), ctx)
    return model, data, metric


def _check_out(path: str) -> None:
    if not path.endswith((".pt", ".json")):
        raise ValueError(f"--out {path!r} must end in .pt or .json")


def _progress_bar(desc: str, enabled: bool, **kwargs: Any):
    from tqdm import tqdm

    return tqdm(total=0, desc=desc, unit="pass", disable=not enabled, **kwargs)


def _bar_callback(bar: Any):
    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return progress


def _attribute(args: argparse.Namespace, ctx: Context) -> None:
    from eapcore.distributed import attribute_parallel
    from eapcore.export import save_json, save_pt

    _check_out(args.out)
    # fail fast on a refused combination, before loading the model (the metric is checked once the data is read)
    AttributionSpec(args.method, args.ig_steps, "logit_diff", args.intervention, args.batch_size, args.level, args.chunks)
    model, data, metric = _load_data(args, ctx)
    spec = AttributionSpec(args.method, args.ig_steps, metric, args.intervention, args.batch_size, args.level, args.chunks)
    with _progress_bar(args.method, ctx.main) as bar:
        scores = attribute_parallel(model, data, spec, ctx, progress=_bar_callback(bar)).cpu()
    if not ctx.main:
        return
    provenance = {**scores.provenance, "model": args.model}
    save = save_json if args.out.endswith(".json") else save_pt
    save(args.out, scores, None, provenance)
    workers = f" by {ctx.world} processes" if ctx.active else ""
    print(f"wrote {args.out}: {scores.graph.n_edges} edges scored on {len(data)} pairs{workers}", file=sys.stderr)


def _evaluate(args: argparse.Namespace, ctx: Context) -> None:
    from eapcore.distributed import check_size, collective, reduce_means, shard
    from eapcore.evaluate import CircuitEvaluator, normalized
    from eapcore.export import load_circuit
    from eapcore.models import model_graph
    from eapcore.select import threshold, top_n

    model, data, metric = _load_data(args, ctx)
    scores, stored = collective(lambda: load_circuit(args.circuit, expected=model_graph(model)), ctx)
    if args.top_n is not None:
        circuit = top_n(scores, args.top_n)
    elif args.threshold is not None:
        circuit = threshold(scores, args.threshold)
    else:
        circuit = stored
    check_size(len(data), ctx)
    part = shard(data, ctx.rank, ctx.world) if ctx.active else data

    def local() -> dict[str, float]:
        evaluator = CircuitEvaluator(model, part, metric, args.batch_size, args.intervention, reference=data)
        base = evaluator.baseline()
        return {"metric": evaluator.evaluate(circuit).mean().item(), "clean": base.clean, "corrupted": base.corrupted,
                "empty": evaluator.empty_metric()}

    means = reduce_means(collective(local, ctx), len(part), len(data), ctx)
    if not ctx.main:
        return
    print(json.dumps({
        "n_edges": circuit.n_edges,
        "n_nodes": circuit.n_nodes,
        "metric": means["metric"],
        "clean_metric": means["clean"],
        "corrupted_metric": means["corrupted"],
        "empty_metric": means["empty"],
        "faithfulness": normalized(means["metric"], means["clean"], means["empty"]),
        "intervention": args.intervention,
    }))


def _dry_run(args: argparse.Namespace) -> None:
    """Estimate without loading weights: the shape from config.json, the batches from the tokenizer."""
    from eapcore.memory import attribution_estimate, batch_shapes, evaluation_estimate, shape_of_config
    from eapcore.models import _resolve_source

    source = _resolve_source(args.model)
    shape = shape_of_config(source)
    pairs, metric = _pairs(args)
    lengths = _token_lengths(source, pairs, shape.n_ctx)
    batches = batch_shapes(lengths, args.batch_size)
    device, n_devices = _estimate_device(args)
    if args.command == "attribute":
        AttributionSpec(args.method, args.ig_steps, metric, args.intervention, args.batch_size, args.level, args.chunks)
        est = attribution_estimate(shape, batches, args.method, args.dtype, device, args.level, n_devices,
                                   chunks=args.chunks, ig_steps=args.ig_steps)
        chunked = f", {args.chunks} chunks" if args.chunks > 1 else ""
        what = f"{args.method} ({args.ig_steps} steps), {args.level} level, {args.intervention}{chunked}"
    else:
        est = evaluation_estimate(shape, batches, args.dtype, device, n_devices)
        what = f"evaluate, {args.intervention}"
    print(f"{args.model}: {shape.architecture}, {shape.n_layers} layers x {shape.n_heads} heads x d_model {shape.d_model}, "
          f"{shape.n_params:,} parameters; {len(pairs)} pairs; {what}")
    print(est.table())


def _estimate_device(args: argparse.Namespace) -> tuple[str, int]:
    import torch

    if args.device_map is not None or (args.n_devices or 1) > 1:
        n = args.n_devices or (torch.cuda.device_count() or 1)
        return ("cuda" if torch.cuda.is_available() else "cpu"), n
    from eapcore.models import default_device

    return args.device or default_device(), 1


def _token_lengths(source: str, pairs: PromptPairs, n_ctx: int | None) -> list[int]:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load the tokenizer of {source!r}: {e}") from e
    return tokenize(pairs, tokenizer, n_ctx).data.lengths.tolist()


def _run_jobs(args: argparse.Namespace, job: Any, ctx: Context) -> int:
    from tqdm import tqdm

    from eapcore.distributed import broadcast
    from eapcore.jobs import Runner, plan

    out_dir = Path(args.out_dir) if args.out_dir else (job.out_dir or Path("results"))
    records = broadcast(plan(job, out_dir, args.force) if ctx.main else None, ctx)
    pending = [r for r in records if r.status == "pending"]
    if args.dry_run:
        if ctx.main:
            _jobs_dry_run(job, records)
        return 0
    if ctx.main:
        counts = {s: sum(r.status == s for r in records) for s in ("pending", "exists", "invalid")}
        print(f"{args.job}: {len(records)} runs: {counts['pending']} to run, {counts['exists']} already done, "
              f"{counts['invalid']} invalid; writing to {out_dir}", file=sys.stderr)
    outer = tqdm(total=len(pending), desc="runs", unit="run", disable=not ctx.main, position=0)
    inner: dict[str, Any] = {}

    def on_start(rec: Any, i: int, n: int):
        # in a log file nested bars are noise; a line per run is written below instead
        bar = _progress_bar(rec.file, ctx.main and sys.stderr.isatty(), position=1, leave=False)
        inner["bar"] = bar
        return _bar_callback(bar)

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
        raise _JobsFailed(f"{len(failed)} run(s) failed, e.g. {failed[0].file}: {failed[0].message}; see {out_dir / 'manifest.json'}")
    return 0


class _JobsFailed(Exception):
    pass


def _one_line(error: BaseException) -> str:
    return " ".join(part.strip() for part in str(error).splitlines() if part.strip())


def _jobs_dry_run(job: Any, records: list) -> None:
    from eapcore.memory import attribution_estimate, batch_shapes, human, shape_of_config
    from eapcore.models import _resolve_source, default_device

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
            source = _resolve_source(run.model.source)
            if source not in shapes:
                shapes[source] = shape_of_config(source)
            key = (source, run.task.csv)
            if key not in lengths:
                lengths[key] = _token_lengths(source, PromptPairs.from_csv(run.task.csv), shapes[source].n_ctx)
            est = attribution_estimate(shapes[source], batch_shapes(lengths[key], job.batch_size), run.settings.method,
                                       job.dtype, device, run.settings.level, chunks=run.settings.chunks,
                                       ig_steps=run.settings.ig_steps)
            estimate = human(est.total)
        print(f"{rec.file:<{width}}  {rec.status:<8}  {estimate}{'  ' + rec.message if rec.message else ''}")


def main(argv: Sequence[str] | None = None) -> int:
    from eapcore.distributed import quiet_if_not_main, setup, teardown

    args = build_parser().parse_args(argv)
    ctx = Context()
    try:
        if args.command == "run-jobs":
            from eapcore.jobfile import load_job

            job = load_job(args.job)
            ctx = setup(job.device, job.device_map) if not args.dry_run else ctx
            quiet_if_not_main(ctx)
            return _run_jobs(args, job, ctx)
        if args.dry_run:
            _dry_run(args)
            return 0
        ctx = setup(args.device, args.device_map)
        quiet_if_not_main(ctx)
        {"attribute": _attribute, "evaluate": _evaluate}[args.command](args, ctx)
    except _JobsFailed as e:
        print(f"eapcore {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except ERRORS as e:
        if not (isinstance(e, PeerFailed) and not ctx.main):
            where = f"[rank {ctx.rank}] " if ctx.active and not ctx.main else ""
            print(f"eapcore {args.command}: error: {where}{_one_line(e)}", file=sys.stderr)
        return 2
    finally:
        teardown(ctx)
    return 0

