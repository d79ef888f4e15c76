"""Circuit-evaluation latency: slider moves, a 10-point MIB faithfulness curve, and a bare forward pass.

    python benchmarks/bench_evaluate.py --model demo --data ioi --n 256

A slider move (``move``) is ``CircuitEvaluator.evaluate(circuit)`` for a top-n circuit from nothing kept
(``forget()`` first: every node the circuit needs is computed), with the corrupted source outputs already
cached (the evaluator is prepared once, as the app does); choosing the circuit (``select.top_n``) is timed
separately. A one-edge move (``step``) is the evaluation of a circuit that differs by one edge from the
one evaluated just before (the top-n circuit and the next larger top-k circuit that adds one edge, in
turn), which recomputes only what that edge reaches. The curve is ``faithfulness_curve`` over the 10 MIB
percentages, with the clean baseline and the empty circuit's metric already cached. The forward pass is
the raw Hugging Face model over the same prompts and batches, without gradients; the bridge's own forward
(no hooks) is reported too. All are timed interleaved in one process (warm-up, ``--repeats`` rounds,
median). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402


def make_scores(bridge: Any, data: Any, how: str, metric: str, batch_size: int, seed: int) -> Any:
    """Edge scores to select circuits from: an attribution method's, or random ones (``random``)."""
    from eapcore.circuit import Scores
    from eapcore.models import model_graph

    if how == "random":
        graph = model_graph(bridge)
        g = torch.Generator().manual_seed(seed)
        edges = torch.randn(graph.n_forward, graph.n_backward, generator=g) * graph.real_edge_mask
        return Scores(graph, edges)
    from eapcore.attribute import AttributionSpec, attribute

    return attribute(bridge, data, AttributionSpec(how, 5, metric, batch_size=batch_size)).cpu()


def one_edge_more(scores: Any, circuit: Any, n_edges: int) -> Any:
    """The first top-k circuit (k > ``n_edges``, pruned) with exactly one edge more than ``circuit``; else
    ``circuit`` with its best-scored missing edge between two of its nodes added."""
    from eapcore.circuit import Circuit
    from eapcore.select import top_n

    for k in range(n_edges + 1, min(scores.graph.n_edges, n_edges + 50) + 1):
        bigger = top_n(scores, k)
        if int((bigger.edges != circuit.edges).sum()) == 1:
            return bigger
    graph = scores.graph
    missing = graph.real_edge_mask & ~circuit.edges
    flat = torch.where(missing, scores.edges.abs().float(), torch.full_like(scores.edges.float(), -1.0)).flatten()
    edges = circuit.edges.clone()
    edges.view(-1)[int(flat.argmax())] = True
    return Circuit(graph, edges, circuit.nodes)


def time_steps(step: Any, n: int, device: str) -> tuple[list[float], list[float]]:
    """(wall, CPU) seconds of ``n`` calls of ``step`` in a row."""
    step()
    walls, cpus = [], []
    for _ in range(n):
        common.sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        common.sync(device)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return walls, cpus


def build_parser() -> argparse.ArgumentParser:
    p = common.parser(__doc__, model="demo", data="ioi", n=256, batch_size=128)  # the app evaluates in batches of 128
    p.add_argument("--scores", default="EAP-IG-inputs",
                   help="where the circuit's edge ranking comes from: an attribution method, or 'random'")
    p.add_argument("--percent", type=float, default=5.0, help="slider position: the top PERCENT%% of edges")
    common.add_run_arguments(p, repeats=7, warmup=2)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    from eapcore.curve import MIB_PERCENTS, edges_for_percent, faithfulness_curve
    from eapcore.evaluate import CircuitEvaluator
    from eapcore.select import top_n

    hf, bridge, data, task_metric = common.setup(args)
    metric = args.metric or task_metric
    scores = make_scores(bridge, data, args.scores, metric, args.batch_size, args.seed)
    n_edges = edges_for_percent(scores.graph, args.percent)
    circuit = top_n(scores, n_edges)

    evaluator = CircuitEvaluator(bridge, data, metric, batch_size=args.batch_size)
    common.sync(args.device)
    t0 = time.perf_counter()
    evaluator.baseline()  # runs and caches the corrupted source outputs and the clean/corrupted read-outs
    common.sync(args.device)
    prepare_s = time.perf_counter() - t0
    evaluator.empty_metric()  # cached m(∅), as after the first slider move in the app
    batches = list(data.batches(args.batch_size, args.device))
    neighbour = one_edge_more(scores, circuit, n_edges)
    pair = [circuit, neighbour]

    def move() -> None:
        evaluator.forget()
        evaluator.evaluate(circuit)

    def step() -> None:  # evaluations alternate between the two circuits, so each is a one-edge move
        evaluator.evaluate(pair[0])
        pair.reverse()

    def forward() -> None:
        with torch.inference_mode():
            for b in batches:
                hf(b.clean, use_cache=False)

    def bridge_forward() -> None:
        with torch.inference_mode():
            for b in batches:
                bridge(b.clean)

    fns = {
        "move": move,
        "select": lambda: top_n(scores, n_edges),
        "curve": lambda: faithfulness_curve(evaluator, scores),
        "forward": forward,
        "bridge_forward": bridge_forward,
    }
    with common.frozen_gc():
        t = common.time_interleaved(fns, args.repeats, args.warmup, args.device)
        steps = time_steps(step, args.repeats * 4, args.device)  # in a row, so each is a one-edge move
    ms = {k: 1000 * t.median(k) for k in fns}
    cpu_ms = {k: 1000 * t.cpu_median(k) for k in fns}
    curve = faithfulness_curve(evaluator, scores)

    cfg, n_pos = bridge.cfg, int(data.data.lengths.max())
    print(f"machine: {common.machine(args.device)}")
    print(f"model: {args.model} ({cfg.n_layers} layers x {cfg.n_heads} heads x d_model {cfg.d_model}, {args.dtype}), "
          f"{scores.graph.n_edges} edges")
    print(f"data: {args.data}, {len(data)} pairs, up to {n_pos} tokens; batch {args.batch_size}; metric {metric}")
    print(f"prepare (corrupted run cached, once): {1000 * prepare_s:.1f} ms")
    for k in fns:
        print(f"{k:15s} {t.spread(k).replace('s (', ' s (')}; CPU time {cpu_ms[k]:.1f} ms")
    print(f"slider move: top {args.percent}% = {n_edges} edges ({circuit.n_edges} after pruning): "
          f"evaluate {ms['move']:.1f} ms + select {ms['select']:.1f} ms; "
          f"{ms['move'] / ms['forward']:.2f}x the raw forward, {ms['move'] / ms['bridge_forward']:.2f}x the bridge forward")
    print(f"one-edge move ({circuit.n_edges} <-> {neighbour.n_edges} edges, in a row, median of {len(steps[0])}): "
          f"{1000 * statistics.median(steps[0]):.1f} ms (CPU time {1000 * statistics.median(steps[1]):.1f} ms) = "
          f"{1000 * statistics.median(steps[0]) / ms['forward']:.2f}x the raw forward")
    print(f"curve ({len(MIB_PERCENTS)} points, CPR {curve.cpr:.3f}, CMD {curve.cmd:.3f}): {ms['curve']:.1f} ms = "
          f"{ms['curve'] / ms['move']:.2f}x one move")
    record = {
        "model": args.model, "device": args.device, "machine": common.machine(args.device), "dtype": args.dtype,
        "n": len(data), "n_pos": n_pos, "batch_size": args.batch_size, "n_edges": n_edges,
        "move_ms": round(ms["move"], 2), "step_ms": round(1000 * statistics.median(steps[0]), 2),
        "step_cpu_ms": round(1000 * statistics.median(steps[1]), 2),
        "step_over_forward": round(1000 * statistics.median(steps[0]) / ms["forward"], 3),
        "step_edges": [circuit.n_edges, neighbour.n_edges],
        "select_ms": round(ms["select"], 2), "curve_ms": round(ms["curve"], 2),
        "forward_ms": round(ms["forward"], 2), "bridge_forward_ms": round(ms["bridge_forward"], 2),
        "prepare_ms": round(1000 * prepare_s, 2),
        **{f"{k}_cpu_ms": round(v, 2) for k, v in cpu_ms.items()},
        "curve_over_move": round(ms["curve"] / ms["move"], 3), "move_over_forward": round(ms["move"] / ms["forward"], 3),
        "repeats": args.repeats, "threads": torch.get_num_threads(),
    }
    common.emit(record)
    return record


if __name__ == "__main__":
    main()
