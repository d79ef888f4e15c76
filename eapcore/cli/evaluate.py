"""``eapcore evaluate``: a circuit's metric and faithfulness on prompt pairs, or (``--curve``) the faithfulness
curve over MIB's sizes with CPR/CMD under both rankings and on both axes; prints one JSON object."""

from __future__ import annotations

import argparse
import json
from typing import Any

from eapcore.cli.common import add_model_and_data, dry_run_inputs, load_data, print_estimate, print_json
from eapcore.distributed import Context


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("evaluate", help="evaluate a circuit from a scored graph; prints one JSON object")
    add_model_and_data(e)
    e.add_argument("--circuit", required=True, help="a .pt or .json graph written by `attribute` or EAP-IG")
    size = e.add_mutually_exclusive_group()
    size.add_argument("--top-n", type=int, help="keep the top-n edges by |score|")
    size.add_argument("--threshold", type=float, help="keep edges with |score| >= threshold")
    size.add_argument("--curve", action="store_true",
                      help="faithfulness at MIB's 10 sizes under signed and absolute ranking; CPR/CMD on the linear "
                           "and the log axis, and which of them MIB's leaderboard reports (docs/mib.md)")
    e.add_argument("--include", nargs="+", action="extend", default=[], metavar="EDGE_OR_NODE",
                   help="force edges (a0.h1->a2.h3<q>, m1->logits) or nodes (a0.h1, m1, input) into the selected "
                        "edges before pruning; the output then also gives the unedited circuit's faithfulness")
    e.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="EDGE_OR_NODE",
                   help="remove edges, or nodes with all their edges, from the selected edges before pruning")
    e.add_argument("--per-example", action="store_true",
                   help="add each pair's metric and faithfulness and a bootstrap 95%% interval of the faithfulness")
    e.set_defaults(run=run)


def run(args: argparse.Namespace, ctx: Context) -> None:
    if args.dry_run:
        return _dry_run(args)
    if args.per_example and (ctx.active or args.curve):
        raise ValueError("--per-example evaluates one circuit in one process; use it without --curve and without torchrun")
    from eapcore.distributed import check_size, collective, reduce_means, shard
    from eapcore.edits import Edits, apply_edits
    from eapcore.evaluate import CircuitEvaluator, normalized
    from eapcore.export import load_circuit
    from eapcore.models import model_graph
    from eapcore.select import threshold, top_n

    edits = Edits(tuple(args.include), tuple(args.exclude))
    if edits and args.curve:
        raise ValueError("--include/--exclude edit one circuit and --curve ranks circuits of many sizes; use one of them")
    model, data, metric = load_data(args, ctx)
    scores, stored = collective(lambda: load_circuit(args.circuit, expected=model_graph(model)), ctx)
    if args.curve:
        return _curve(args, ctx, model, data, metric, scores)
    prune = not edits  # edits apply to the selected edges before pruning
    if args.top_n is not None:
        circuit = top_n(scores, args.top_n, prune=prune)
    elif args.threshold is not None:
        circuit = threshold(scores, args.threshold, prune=prune)
    else:
        circuit = stored
    circuits = {"metric": circuit}
    if edits:
        edited = apply_edits(circuit, edits)
        circuit = circuits["metric"] = edited.circuit
        circuits["unedited"] = edited.unedited
    check_size(len(data), ctx)
    part = shard(data, ctx.rank, ctx.world) if ctx.active else data
    pairs: dict = {}

    def local() -> dict[str, float]:
        evaluator = CircuitEvaluator(model, part, metric, args.batch_size, args.intervention, reference=data)
        if args.per_example:
            pairs.update(_per_example(evaluator, circuit))
        base = evaluator.baseline()
        values = {key: evaluator.evaluate(c).mean().item() for key, c in circuits.items()}
        return {**values, "clean": base.clean, "corrupted": base.corrupted, "empty": evaluator.empty_metric()}

    means = reduce_means(collective(local, ctx), len(part), len(data), ctx)
    if not ctx.main:
        return
    result = {
        "n_edges": circuit.n_edges,
        "n_nodes": circuit.n_nodes,
        "metric": means["metric"],
        "clean_metric": means["clean"],
        "corrupted_metric": means["corrupted"],
        "empty_metric": means["empty"],
        "faithfulness": normalized(means["metric"], means["clean"], means["empty"]),
        "intervention": args.intervention,
    }
    if edits:
        result["edits"] = {**edits.to_dict(), "dropped": list(edited.dropped)}
        result["unedited"] = {"n_edges": edited.unedited.n_edges, "n_nodes": edited.unedited.n_nodes,
                              "metric": means["unedited"],
                              "faithfulness": normalized(means["unedited"], means["clean"], means["empty"])}
    print_json({**result, **pairs})


def _curve(args: argparse.Namespace, ctx: Context, model: Any, data: Any, metric: str, scores: Any) -> None:
    from eapcore.curve import curve_metrics, mib_circuits, mib_curves_of_metrics
    from eapcore.distributed import check_size, collective, reduce_means, shard
    from eapcore.evaluate import CircuitEvaluator

    check_size(len(data), ctx)
    part = shard(data, ctx.rank, ctx.world) if ctx.active else data
    circuits = mib_circuits(scores)

    def local() -> dict[str, float]:
        evaluator = CircuitEvaluator(model, part, metric, args.batch_size, args.intervention, reference=data)
        metrics = curve_metrics(evaluator, circuits)
        return {"clean": evaluator.baseline().clean, "empty": evaluator.empty_metric(),
                **{f"m{i:03d}": m for i, m in enumerate(metrics)}}

    means = reduce_means(collective(local, ctx), len(part), len(data), ctx)
    if not ctx.main:
        return
    metrics = [means[f"m{i:03d}"] for i in range(len(circuits))]
    curves = mib_curves_of_metrics(scores.graph, metrics, means["clean"], means["empty"])
    report = curves.to_dict()
    board, public = report["leaderboard"], report["public_script_default"]
    print(f"MIB leaderboard ({board['axis']} axis): CPR {board['CPR']:.4f} (signed ranking), CMD {board['CMD']:.4f} "
          f"(absolute ranking); MIB's run_evaluation.py default ({public['ranking']}, {public['axis']} axis): "
          f"CPR {public['CPR']:.4f}, CMD {public['CMD']:.4f}")
    print(json.dumps({"n_examples": len(data), "intervention": args.intervention, "clean_metric": means["clean"],
                      "empty_metric": means["empty"], **report}))


def _per_example(evaluator: Any, circuit: Any) -> dict[str, Any]:
    from eapcore.per_example import per_example

    found = per_example(evaluator, circuit)
    rows = zip(found.metric.tolist(), found.clean.tolist(), found.corrupted.tolist(), found.empty.tolist(),
               found.pair_faithfulness.tolist())
    return {
        "per_example": [{"pair": i, "metric": m, "clean": c, "corrupted": k, "empty": e, "faithfulness": f}
                        for i, (m, c, k, e, f) in enumerate(rows)],
        "faithfulness_ci": list(found.interval),
    }


def _dry_run(args: argparse.Namespace) -> None:
    from eapcore.memory import evaluation_estimate

    shape, pairs, _, batches, device, n_devices = dry_run_inputs(args)
    est = evaluation_estimate(shape, batches, args.dtype, device, n_devices)
    print_estimate(args, shape, len(pairs), f"evaluate, {args.intervention}", est)
