"""``eapcore evaluate``: a circuit's metric and faithfulness on prompt pairs; prints one JSON object."""

from __future__ import annotations

import argparse
import json

from eapcore.cli.common import add_model_and_data, dry_run_inputs, load_data, print_estimate
from eapcore.distributed import Context


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("evaluate", help="evaluate a circuit from a scored graph; prints one JSON object")
    add_model_and_data(e)
    e.add_argument("--circuit", required=True, help="a .pt or .json graph written by `attribute` or EAP-IG")
    size = e.add_mutually_exclusive_group()
    size.add_argument("--top-n", type=int, help="keep the top-n edges by |score|")
    size.add_argument("--threshold", type=float, help="keep edges with |score| >= threshold")
    e.set_defaults(run=run)


def run(args: argparse.Namespace, ctx: Context) -> None:
    if args.dry_run:
        return _dry_run(args)
    from eapcore.distributed import check_size, collective, reduce_means, shard
    from eapcore.evaluate import CircuitEvaluator, normalized
    from eapcore.export import load_circuit
    from eapcore.models import model_graph
    from eapcore.select import threshold, top_n

    model, data, metric = load_data(args, ctx)
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
    from eapcore.memory import evaluation_estimate

    shape, pairs, _, batches, device, n_devices = dry_run_inputs(args)
    est = evaluation_estimate(shape, batches, args.dtype, device, n_devices)
    print_estimate(args, shape, len(pairs), f"evaluate, {args.intervention}", est)
