"""Latency of the trust checks: verify, compare and per-example evaluation, each against its yardstick.

    python benchmarks/bench_trust.py --model demo --data ioi --n 256 --threads 1

* ``verify``: ``verify.verify`` of the top ``--top-k`` edges of an EAP-IG run, from a fresh evaluator (its
  corrupted run and cached inputs are prepared inside the timing, as a first click would), in seconds;
* ``compare``: ``compare.compare`` of three runs (``--runs``) against one ``faithfulness_curve`` (the first
  run's), both on a prepared evaluator (baseline and m(∅) cached); the three runs' curves one after the
  other (``curves``) show what compare adds to them;
* ``per_example``: ``per_example.per_example`` of the top ``--percent``% circuit (with its 1000-resample
  bootstrap) against one slider move (``CircuitEvaluator.evaluate`` of the same circuit).

Verify is timed in its own interleaved rounds (``--verify-repeats``), the rest together (``--repeats``);
each ratio comes from one run. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
from bench_evaluate import make_scores  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = common.parser(__doc__, model="demo", data="ioi", n=256, batch_size=128)
    p.add_argument("--runs", default="EAP-IG-inputs,EAP,clean-corrupted",
                   help="comma-separated attribution methods (or 'random') whose runs are compared; the first is verified")
    p.add_argument("--top-k", type=int, default=50, help="edges verified against exact patching")
    p.add_argument("--percent", type=float, default=5.0, help="the circuit for per-example evaluation: the top PERCENT%%")
    p.add_argument("--verify-repeats", type=int, default=3)
    common.add_run_arguments(p, repeats=7, warmup=2)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    from eapcore.compare import compare
    from eapcore.curve import edges_for_percent, faithfulness_curve
    from eapcore.evaluate import CircuitEvaluator
    from eapcore.per_example import per_example
    from eapcore.select import top_n
    from eapcore.verify import verify

    _, bridge, data, task_metric = common.setup(args)
    metric = args.metric or task_metric
    methods = args.runs.split(",")
    runs = {m: make_scores(bridge, data, m, metric, args.batch_size, args.seed) for m in methods}
    first = runs[methods[0]]
    circuit = top_n(first, edges_for_percent(first.graph, args.percent))
    evaluator = CircuitEvaluator(bridge, data, metric, batch_size=args.batch_size)
    evaluator.baseline()
    evaluator.empty_metric()

    def fresh_verify() -> Any:
        return verify(CircuitEvaluator(bridge, data, metric, batch_size=args.batch_size), first, args.top_k)

    light = {
        "compare": lambda: compare(evaluator, runs),
        "curve": lambda: faithfulness_curve(evaluator, first),
        "curves": lambda: [faithfulness_curve(evaluator, scores) for scores in runs.values()],
        "per_example": lambda: per_example(evaluator, circuit),
        "move": lambda: evaluator.evaluate(circuit),
    }
    with common.frozen_gc():
        heavy = common.time_interleaved({"verify": fresh_verify}, args.verify_repeats, 0, args.device)
        t = common.time_interleaved(light, args.repeats, args.warmup, args.device)
    ms = {k: 1000 * t.median(k) for k in light}
    checked, found = fresh_verify(), per_example(evaluator, circuit)

    cfg = bridge.cfg
    print(f"machine: {common.machine(args.device)}")
    print(f"model: {args.model} ({cfg.n_layers} layers x {cfg.n_heads} heads x d_model {cfg.d_model}, {args.dtype}), "
          f"{first.graph.n_edges} edges; data: {args.data}, {len(data)} pairs; batch {args.batch_size}; metric {metric}")
    print(f"verify top {checked.k}: {heavy.spread('verify')} (Pearson {checked.pearson:.3f}, Spearman "
          f"{checked.spearman:.3f}, signs {checked.sign_agreement:.0%}, complement {checked.complement_faithfulness:.3f})")
    for k in light:
        print(f"{k:12s} {t.spread(k)}")
    print(f"compare of {len(runs)} runs = {ms['compare'] / ms['curve']:.2f}x one curve, {ms['compare'] / ms['curves']:.2f}x "
          f"the {len(runs)} runs' curves; per-example "
          f"(faithfulness {found.faithfulness:.3f}, 95% [{found.interval[0]:.3f}, {found.interval[1]:.3f}]) = "
          f"{ms['per_example'] / ms['move']:.2f}x one move of {circuit.n_edges} edges")
    record = {
        "model": args.model, "device": args.device, "machine": common.machine(args.device), "dtype": args.dtype,
        "n": len(data), "batch_size": args.batch_size, "runs": methods, "top_k": checked.k,
        "verify_s": round(heavy.median("verify"), 3), "verify_cpu_s": round(heavy.cpu_median("verify"), 3),
        **{f"{k}_ms": round(v, 2) for k, v in ms.items()},
        **{f"{k}_cpu_ms": round(1000 * t.cpu_median(k), 2) for k in light},
        "compare_over_curve": round(ms["compare"] / ms["curve"], 3),
        "compare_over_curves": round(ms["compare"] / ms["curves"], 3),
        "compare_over_curve_cpu": round(t.cpu_median("compare") / t.cpu_median("curve"), 3),
        "per_example_over_move_cpu": round(t.cpu_median("per_example") / t.cpu_median("move"), 3),
        "per_example_over_move": round(ms["per_example"] / ms["move"], 3),
        "pearson": checked.pearson, "spearman": checked.spearman, "sign_agreement": checked.sign_agreement,
        "repeats": args.repeats, "verify_repeats": args.verify_repeats, "threads": torch.get_num_threads(),
    }
    common.emit(record)
    return record


if __name__ == "__main__":
    main()
