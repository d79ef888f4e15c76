"""``eapcore compare``: several runs' faithfulness curves, CPR/CMD, circuit overlap and rank correlation."""

from __future__ import annotations

import argparse

from eapcore.cli.common import (
    add_model_and_data, bar_callback, load_data, one_process, print_evaluation_estimate, print_json, progress_bar,
)
from eapcore.distributed import Context


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("compare", help="compare runs (score files) on one model and data; prints one JSON object")
    add_model_and_data(c)
    c.add_argument("--runs", nargs="+", required=True, metavar="FILE",
                   help=".pt or .json graphs written by `attribute` or EAP-IG, all for this model")
    c.set_defaults(run=run, context=one_process)


def run(args: argparse.Namespace, ctx: Context) -> None:
    if args.dry_run:
        return print_evaluation_estimate(args, f"compare {len(args.runs)} runs")
    from eapcore.compare import check_comparable, compare
    from eapcore.evaluate import CircuitEvaluator
    from eapcore.export import load_circuit
    from eapcore.models import model_graph

    if len(set(args.runs)) < len(args.runs):
        raise ValueError(f"--runs names a file more than once ({' '.join(args.runs)}); give each run once")
    check_comparable({path: load_circuit(path)[0] for path in args.runs})  # before the model is loaded
    model, data, metric = load_data(args, ctx)
    runs = {path: load_circuit(path, expected=model_graph(model))[0] for path in args.runs}
    evaluator = CircuitEvaluator(model, data, metric, args.batch_size, args.intervention)
    with progress_bar("compare", True) as bar:
        result = compare(evaluator, runs, progress=bar_callback(bar))
    key = "|".join
    print_json({
        "sizes": list(result.sizes),
        "percents": list(result.percents),
        "runs": [{"file": label, "method": runs[label].provenance.get("method"), "cpr": result.curves[label].cpr,
                  "cmd": result.curves[label].cmd, "faithfulness": list(result.curves[label].faithfulness)}
                 for label in result.labels],
        "overlap": {key(pair): list(values) for pair, values in result.overlap.items()},
        "spearman": {key(pair): r for pair, r in result.spearman.items()},
        "disagreements": {key(pair): [{"edge": d.edge, "rank_a": d.rank_a, "rank_b": d.rank_b} for d in found]
                          for pair, found in result.disagreements.items()},
        "intervention": args.intervention,
    })
