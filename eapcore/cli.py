"""Headless command line: ``python -m eapcore attribute|evaluate ...`` (also the torchrun entry point)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from eapcore.attribute import LEVELS, METHODS, AttributionSpec, attribute
from eapcore.interventions import INTERVENTIONS
from eapcore.data import PromptPairs, TokenizedPairs, tokenize
from eapcore.metrics import METRICS
from eapcore.models import DTYPES, ModelSpec, load_model
from eapcore.tasks import TASKS, get_task


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="'demo', a Hugging Face name, or a local save_pretrained folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="CSV with columns clean,corrupted,correct,incorrect")
    src.add_argument("--task", choices=sorted(TASKS), help="a shipped task (default: ioi when --data is absent)")
    p.add_argument("--metric", choices=sorted(METRICS), help="default: the task's metric, else logit_diff")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--intervention", default="patching", choices=INTERVENTIONS,
                   help="what an ablated edge carries; mean/mean-positional average over the data's clean prompts")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eapcore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("attribute", help="score every edge and write a .pt or .json graph")
    _common(a)
    a.add_argument("--method", default="EAP-IG-inputs", choices=METHODS)
    a.add_argument("--ig-steps", type=int, default=5)
    a.add_argument("--level", default="edge", choices=LEVELS, help="score edges, nodes or neurons (d_model dims)")
    a.add_argument("--out", required=True, help="output file, .pt or .json")
    e = sub.add_parser("evaluate", help="evaluate a circuit from a scored graph; prints one JSON object")
    _common(e)
    e.add_argument("--circuit", required=True, help="a .pt or .json graph written by `attribute` or EAP-IG")
    size = e.add_mutually_exclusive_group()
    size.add_argument("--top-n", type=int, help="keep the top-n edges by |score|")
    size.add_argument("--threshold", type=float, help="keep edges with |score| >= threshold")
    return parser


def _load_data(args: argparse.Namespace, model) -> tuple[TokenizedPairs, str]:
    if args.data:
        pairs, metric = PromptPairs.from_csv(args.data), args.metric or "logit_diff"
    else:
        task = get_task(args.task or "ioi")
        pairs, metric = PromptPairs.from_csv(task.csv), args.metric or task.metric
    return tokenize(pairs, model.tokenizer, model.cfg.n_ctx), metric


def _attribute(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from eapcore.export import save_json, save_pt

    model = load_model(ModelSpec(args.model, args.device, args.dtype))
    data, metric = _load_data(args, model)
    spec = AttributionSpec(args.method, args.ig_steps, metric, args.intervention, args.batch_size, args.level)
    with tqdm(total=0, desc=args.method, unit="pass") as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        scores = attribute(model, data, spec, progress=progress).cpu()
    provenance = {**scores.provenance, "model": args.model}
    save = save_json if args.out.endswith(".json") else save_pt
    if not args.out.endswith((".pt", ".json")):
        raise ValueError(f"--out {args.out!r} must end in .pt or .json")
    save(args.out, scores, None, provenance)
    print(f"wrote {args.out}: {scores.graph.n_edges} edges scored on {len(data)} pairs", file=sys.stderr)


def _evaluate(args: argparse.Namespace) -> None:
    from eapcore.evaluate import CircuitEvaluator, normalized
    from eapcore.export import load_circuit
    from eapcore.models import model_graph
    from eapcore.select import threshold, top_n

    model = load_model(ModelSpec(args.model, args.device, args.dtype))
    data, metric = _load_data(args, model)
    scores, stored = load_circuit(args.circuit, expected=model_graph(model))
    if args.top_n is not None:
        circuit = top_n(scores, args.top_n)
    elif args.threshold is not None:
        circuit = threshold(scores, args.threshold)
    else:
        circuit = stored
    evaluator = CircuitEvaluator(model, data, metric, args.batch_size, args.intervention)
    base, empty = evaluator.baseline(), evaluator.empty_metric()
    value = evaluator.evaluate(circuit).mean().item()
    print(json.dumps({
        "n_edges": circuit.n_edges,
        "n_nodes": circuit.n_nodes,
        "metric": value,
        "clean_metric": base.clean,
        "corrupted_metric": base.corrupted,
        "empty_metric": empty,
        "faithfulness": normalized(value, base.clean, empty),
        "intervention": args.intervention,
    }))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        {"attribute": _attribute, "evaluate": _evaluate}[args.command](args)
    except (ValueError, TypeError, OSError, FloatingPointError) as e:
        print(f"eapcore {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
