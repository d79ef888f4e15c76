"""``eapcore attribute``: score every edge (or node, or neuron) and write a ``.pt`` or ``.json`` graph."""

from __future__ import annotations

import argparse
import sys

from eapcore.attribute import LEVELS, METHODS, AttributionSpec
from eapcore.cli.common import (
    add_model_and_data, bar_callback, dry_run_inputs, load_data, print_estimate, progress_bar,
)
from eapcore.distributed import Context


def register(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("attribute", help="score every edge and write a .pt or .json graph")
    add_model_and_data(a)
    a.add_argument("--method", default="EAP-IG-inputs", choices=METHODS)
    a.add_argument("--ig-steps", type=int, default=5)
    a.add_argument("--level", default="edge", choices=LEVELS, help="score edges, nodes or neurons (d_model dims)")
    a.add_argument("--chunks", type=int, default=1,
                   help="split the activation-difference buffer into this many windows of source rows: the same "
                        "scores with 1/chunks of its memory, for more passes")
    a.add_argument("--out", required=True, help="output file, .pt or .json")
    a.set_defaults(run=run)


def _spec(args: argparse.Namespace, metric: str) -> AttributionSpec:
    return AttributionSpec(args.method, args.ig_steps, metric, args.intervention, args.batch_size, args.level, args.chunks)


def run(args: argparse.Namespace, ctx: Context) -> None:
    if args.dry_run:
        return _dry_run(args)
    from eapcore.distributed import attribute_parallel
    from eapcore.export import save_json, save_pt

    if not args.out.endswith((".pt", ".json")):
        raise ValueError(f"--out {args.out!r} must end in .pt or .json")
    _spec(args, "logit_diff")  # fail fast on a refused combination, before loading the model
    model, data, metric = load_data(args, ctx)
    spec = _spec(args, metric)
    with progress_bar(args.method, ctx.main) as bar:
        scores = attribute_parallel(model, data, spec, ctx, progress=bar_callback(bar)).cpu()
    if not ctx.main:
        return
    save = save_json if args.out.endswith(".json") else save_pt
    save(args.out, scores, None)
    workers = f" by {ctx.world} processes" if ctx.active else ""
    print(f"wrote {args.out}: {scores.graph.n_edges} edges scored on {len(data)} pairs{workers}", file=sys.stderr)


def _dry_run(args: argparse.Namespace) -> None:
    from eapcore.memory import attribution_estimate

    shape, pairs, metric, batches, device, n_devices = dry_run_inputs(args)
    _spec(args, metric)
    est = attribution_estimate(shape, batches, args.method, args.dtype, device, args.level, n_devices,
                               chunks=args.chunks, ig_steps=args.ig_steps)
    chunked = f", {args.chunks} chunks" if args.chunks > 1 else ""
    print_estimate(args, shape, len(pairs), f"{args.method} ({args.ig_steps} steps), {args.level} level, "
                   f"{args.intervention}{chunked}", est)
