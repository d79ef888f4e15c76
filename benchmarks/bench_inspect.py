"""Latency of the exploration tools: node drill-down, a hand edit, a session, and the cost estimate's accuracy.

    python benchmarks/bench_inspect.py --model demo --data ioi --n 256 --threads 1

* drill-down (``inspection.inspect_node`` with the node's edges in the top-5% circuit): a head on a pair not
  seen before (the pair's runs and the layer's attention computed), another node on a seen pair (MLP), and a
  head of a seen layer;
* an edit (``edits.apply_edits`` of one included node and one excluded edge, then ``CircuitEvaluator.evaluate``)
  against a plain slider move (``select.top_n`` then ``evaluate``), the corrupted run cached as in the app;
* a session of three runs saved to and loaded from memory (``session.save_session`` / ``load_session``);
* the attribution time estimate (``cost.estimate_cost``): the first guess before any run and the estimate
  from the first run's measured speed, each against the real time of a run on twice the pairs.

All timed interleaved in one process (warm-up, ``--repeats`` rounds, median). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import itertools
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = common.parser(__doc__, model="demo", data="ioi", n=256, batch_size=128)
    p.add_argument("--percent", type=float, default=5.0, help="circuit size: the top PERCENT%% of edges")
    common.add_run_arguments(p, repeats=15, warmup=2)
    return p


def _halves(data: Any) -> tuple[Any, Any]:
    """The first half of the pairs, and all of them (for the cost estimate)."""
    from eapcore.data import Batch, TokenizedPairs

    d, half = data.data, len(data) // 2
    first = Batch(*(getattr(d, f)[:half] for f in d.__dataclass_fields__))
    return TokenizedPairs(first, data.fingerprint + "-half"), data


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    from eapcore import cost
    from eapcore.attribute import AttributionSpec, attribute
    from eapcore.data import PromptPairs
    from eapcore.edits import Edits, apply_edits
    from eapcore.curve import edges_for_percent
    from eapcore.evaluate import CircuitEvaluator
    from eapcore.inspection import inspect_node
    from eapcore.models import ModelSpec
    from eapcore.select import top_n
    from eapcore.session import Run, Session, load_session, save_session

    _, bridge, data, task_metric = common.setup(args)
    metric = args.metric or task_metric
    spec = AttributionSpec("EAP-IG-inputs", 5, metric, batch_size=32)

    half, full = _halves(data)
    guess = cost.estimate_cost(bridge, full, spec)
    cost.timed_attribute(bridge, half, spec)  # the first run: its speed is recorded
    measured = cost.estimate_cost(bridge, full, spec)
    start = time.perf_counter()
    scores = attribute(bridge, full, spec)
    real_s = time.perf_counter() - start

    graph = scores.graph
    n_edges = edges_for_percent(graph, args.percent)
    circuit = top_n(scores, n_edges)
    layers, heads = graph.cfg.n_layers, graph.cfg.n_heads
    head, other_head, mlp = f"a{layers - 1}.h0", f"a{layers - 1}.h{heads - 1}", f"m{layers // 2}"
    fresh = itertools.count(1)  # pair 0 is the seen pair; every "new pair" run takes the next one
    inspect_node(bridge, data, 0, head, metric, scores, circuit)

    evaluator = CircuitEvaluator(bridge, data, metric, batch_size=args.batch_size)
    evaluator.baseline()
    evaluator.empty_metric()
    outside = next(n for n in graph.src_nodes[1:] if not circuit.nodes[graph.src_index[n]])
    edits = Edits(include=(outside,), exclude=(graph.edge_name(*circuit.edges.nonzero()[0].tolist()),))

    pairs = PromptPairs.from_lists(["a"], ["b"], ["c"], ["d"])
    session = Session(graph, ModelSpec(args.model), pairs, "bench", metric,
                      tuple(Run(spec, scores, f"run {i}", f"key{i}") for i in range(3)), 0, n_edges, True, edits, head)

    def session_round_trip() -> None:
        buffer = io.BytesIO()
        save_session(buffer, session)
        load_session(buffer.getvalue(), expected=graph)

    fns = {
        "inspect_new_pair": lambda: inspect_node(bridge, data, next(fresh) % len(data), head, metric, scores, circuit),
        "inspect_mlp": lambda: inspect_node(bridge, data, 0, mlp, metric, scores, circuit),
        "inspect_head": lambda: inspect_node(bridge, data, 0, other_head, metric, scores, circuit),
        "move": lambda: evaluator.evaluate(top_n(scores, n_edges)),
        "edit": lambda: evaluator.evaluate(apply_edits(top_n(scores, n_edges, prune=False), edits).circuit),
        "session": session_round_trip,
        "estimate": lambda: cost.estimate_cost(bridge, full, spec),
    }
    if args.repeats + args.warmup >= len(data):
        raise SystemExit(f"--repeats + --warmup must be below the number of pairs ({len(data)}): each new-pair run takes one")
    with common.frozen_gc():
        t = common.time_interleaved(fns, args.repeats, args.warmup, args.device)
    ms = {k: 1000 * t.median(k) for k in fns}
    worst = {k: 1000 * max(t.runs[k]) for k in fns}

    cfg = bridge.cfg
    print(f"machine: {common.machine(args.device)}")
    print(f"model: {args.model} ({cfg.n_layers} layers x {cfg.n_heads} heads x d_model {cfg.d_model}, {args.dtype}); "
          f"data: {args.data}, {len(data)} pairs; top {args.percent}% = {n_edges} edges")
    for k in fns:
        print(f"{k:17s} {t.spread(k).replace('s (', ' s (')}; CPU time {1000 * t.cpu_median(k):.1f} ms")
    print(f"edit vs slider move: {ms['edit'] / ms['move']:.2f}x")
    print(f"cost: {spec.method} on {len(full)} pairs took {real_s:.2f} s; first guess {guess.seconds:.2f} s "
          f"({guess.seconds / real_s:.2f}x), from the measured speed of {len(half)} pairs {measured.seconds:.2f} s "
          f"({measured.seconds / real_s:.2f}x); peak memory estimate {measured.memory.total / 2**20:.0f} MiB")
    record = {
        "model": args.model, "device": args.device, "machine": common.machine(args.device), "dtype": args.dtype,
        "n": len(data), "n_edges": n_edges,
        **{f"{k}_ms": round(v, 2) for k, v in ms.items()},
        **{f"{k}_max_ms": round(v, 2) for k, v in worst.items() if k.startswith("inspect")},
        "edit_over_move": round(ms["edit"] / ms["move"], 3),
        "attribution_s": round(real_s, 3), "guess_s": round(guess.seconds, 3), "measured_estimate_s": round(measured.seconds, 3),
        "guess_over_real": round(guess.seconds / real_s, 3), "measured_over_real": round(measured.seconds / real_s, 3),
        "repeats": args.repeats, "threads": torch.get_num_threads(),
    }
    common.emit(record)
    return record


if __name__ == "__main__":
    main()
