"""``eapcore verify``: a run's top-k edge scores against the exact effect of removing each edge."""

from __future__ import annotations

import argparse
import sys

from eapcore.cli.common import (
    add_model_and_data, bar_callback, load_data, one_process, print_evaluation_estimate, print_json, progress_bar,
)
from eapcore.distributed import Context


def register(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("verify", help="check a run's top-k scores against exact patching; prints one JSON object")
    add_model_and_data(v)
    v.add_argument("--circuit", required=True, help="a .pt or .json graph written by `attribute` or EAP-IG")
    v.add_argument("--top-k", type=int, required=True,
                   help="verify the k edges with the largest |score| (one evaluation each); the complement is that of "
                        "the top-k circuit")
    v.set_defaults(run=run, context=one_process)


def run(args: argparse.Namespace, ctx: Context) -> None:
    if args.dry_run:
        return print_evaluation_estimate(args, f"verify top {args.top_k}")
    from eapcore.evaluate import CircuitEvaluator
    from eapcore.export import load_circuit
    from eapcore.models import model_graph
    from eapcore.verify import check_top_k, verify

    check_top_k(args.top_k)
    model, data, metric = load_data(args, ctx)
    scores, _ = load_circuit(args.circuit, expected=model_graph(model))
    evaluator = CircuitEvaluator(model, data, metric, args.batch_size, args.intervention)
    with progress_bar("verify", True) as bar:
        result = verify(evaluator, scores, args.top_k, progress=bar_callback(bar))
    if result.note:
        print(f"note: {result.note}", file=sys.stderr)
    print_json({
        "k": result.k,
        "pearson": result.pearson,
        "spearman": result.spearman,
        "sign_agreement": result.sign_agreement,
        "complement_faithfulness": result.complement_faithfulness,
        "edges": [{"edge": e.edge, "estimate": e.estimate, "exact": e.exact} for e in result.edges],
        "worst": [e.edge for e in result.worst()],
        "note": result.note,
        "intervention": args.intervention,
    })
