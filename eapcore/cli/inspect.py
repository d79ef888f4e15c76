"""``eapcore inspect``: one node on one prompt pair (attention, direct logits and effect); prints one JSON object."""

from __future__ import annotations

import argparse
import json

from eapcore.cli.common import add_model_and_pairs, load_data
from eapcore.distributed import Context


def register(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("inspect", help="drill down into one node on one prompt pair; prints one JSON object")
    add_model_and_pairs(i)
    i.add_argument("--node", required=True, help="input, a head such as a1.h2, an MLP such as m0, or logits")
    i.add_argument("--pair", type=int, default=0, help="index of the prompt pair (0 = the first row)")
    i.add_argument("--top-k", type=int, default=10, help="how many promoted and suppressed tokens to list")
    i.add_argument("--circuit", help="a .pt or .json graph: also list the node's edges in it and its node score")
    i.add_argument("--top-n", type=int, help="with --circuit: the top-n edges by |score| instead of the stored circuit")
    i.set_defaults(run=run)


def run(args: argparse.Namespace, ctx: Context) -> None:
    from eapcore.export import load_circuit
    from eapcore.inspection import inspect_node
    from eapcore.models import model_graph
    from eapcore.select import top_n

    if args.top_n is not None and args.circuit is None:
        raise ValueError("--top-n selects edges from a scored graph: pass --circuit FILE too")
    model, data, metric = load_data(args, ctx)
    scores = circuit = None
    if args.circuit is not None:
        scores, circuit = load_circuit(args.circuit, expected=model_graph(model))
        if args.top_n is not None:
            circuit = top_n(scores, args.top_n)
    report = inspect_node(model, data, args.pair, args.node, metric, scores, circuit, args.top_k)
    print(json.dumps(report.to_dict()))
