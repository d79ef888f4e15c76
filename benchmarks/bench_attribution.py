"""Attribution speed and memory against the floor: the raw Hugging Face model doing the same passes.

    python benchmarks/bench_attribution.py --model gpt2-small --n 32 --length 16 --batch-size 32 --steps 5

The floor for a method is the bare model's own work, with frozen weights and no hooks. For the gradient
methods: 2 forward passes without gradients (clean, corrupted), then one forward/backward pass to the
token embeddings per gradient pass of the method (EAP: 1, EAP-IG-inputs: ``--steps``, clean-corrupted: 2,
at the same interpolated embeddings; EAP-IG-activations: ``--steps`` per source group, 2·n_layers + 1
groups, at the clean embeddings). For ``exact``: one forward pass without gradients per removal (edge, or
node at ``--level node``) and batch. Ours is ``eapcore.attribute.attribute`` on the bridge loaded from
the same folder, on the same token ids. Both are timed interleaved in one process (warm-up, then
``--repeats`` rounds, median); peak memory is measured once each by the same method (see
``common.peak_memory_mib``). At node or neuron level the edge-level run of the same method is timed too
(``over_edge``). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402


def floor_alphas(spec: Any, n_layers: int) -> list[float]:
    """Where the floor takes its gradient passes: the method's own alphas, or, for activation interpolation,
    the clean embeddings once per step and source group."""
    from eapcore.methods import get_method

    if get_method(spec.method).runner == "activation-interpolation":
        return [1.0] * (spec.ig_steps * (2 * n_layers + 1))
    return spec.alphas()


def floor_fn(hf: Any, data: Any, alphas: list[float], metric: Any, batch_size: int, device: str) -> Callable[[], None]:
    """The floor: the raw model's forward passes and forward/backward passes to the embeddings."""
    from eapcore.metrics import readout

    embed = hf.get_input_embeddings()
    batches = list(data.batches(batch_size, device))

    def run() -> None:
        for batch in batches:
            with torch.no_grad():
                hf(batch.corrupted, use_cache=False)
                clean_logits = hf(batch.clean, use_cache=False).logits
                clean_readout = readout(clean_logits, batch.lengths) if metric.needs_clean_logits else None
                del clean_logits
                e_corr, e_clean = embed(batch.corrupted), embed(batch.clean)
            for alpha in alphas:
                x = (e_corr + alpha * (e_clean - e_corr)).requires_grad_(True)
                logits = hf(inputs_embeds=x, use_cache=False).logits
                metric.loss(readout(logits, batch.lengths), batch, clean_readout).backward()
                del logits, x

    return run


def forward_floor_fn(hf: Any, data: Any, passes: int, batch_size: int, device: str) -> Callable[[], None]:
    """The floor of exact patching: ``passes`` forward passes without gradients of each batch."""
    batches = list(data.batches(batch_size, device))

    def run() -> None:
        with torch.inference_mode():
            for batch in batches:
                for _ in range(passes):
                    hf(batch.clean, use_cache=False)

    return run


def ours_fn(bridge: Any, data: Any, spec: Any) -> Callable[[], None]:
    from eapcore.attribute import attribute

    return lambda: attribute(bridge, data, spec)


def check_same_model(hf: Any, bridge: Any, data: Any, device: str) -> float:
    """Max |logit difference| between the floor and the bridge on the first few prompts."""
    ids = next(iter(data.batches(4, device))).clean
    with torch.no_grad():
        return float((hf(ids, use_cache=False).logits - bridge(ids)).abs().max())


def profile(fn: Callable[[], None], rows: int, device: str) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch_profile(activities=activities) as prof:
        fn()
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def build_parser() -> argparse.ArgumentParser:
    p = common.parser(__doc__, model="gpt2-small", data="random", n=32, batch_size=32)
    p.add_argument("--steps", type=int, default=5, help="IG steps (EAP-IG-inputs)")
    p.add_argument("--method", default="EAP-IG-inputs",
                   choices=("EAP", "EAP-IG-inputs", "clean-corrupted", "EAP-IG-activations", "exact"))
    p.add_argument("--level", default="edge", choices=("edge", "node", "neuron"))
    common.add_run_arguments(p, repeats=5, warmup=1)
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="also print a torch.profiler table of one run of ours (top ROWS ops)")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    from eapcore.attribute import AttributionSpec
    from eapcore.methods import get_method
    from eapcore.metrics import get_metric
    from eapcore.models import model_graph

    hf, bridge, data, task_metric = common.setup(args)
    spec = AttributionSpec(args.method, args.steps, args.metric or task_metric, batch_size=args.batch_size,
                           level=args.level)
    metric = get_metric(spec.metric)
    diff = check_same_model(hf, bridge, data, args.device)
    graph, method = model_graph(bridge), get_method(args.method)
    if args.method == "exact":
        removals = spec.passes_per_batch(graph)
        floor = forward_floor_fn(hf, data, removals, spec.batch_size, args.device)
    else:
        floor = floor_fn(hf, data, floor_alphas(spec, bridge.cfg.n_layers), metric, spec.batch_size, args.device)
    fns = {"floor": floor, "ours": ours_fn(bridge, data, spec)}
    if args.level != "edge":
        fns["edge"] = ours_fn(bridge, data, replace(spec, level="edge"))

    with common.frozen_gc():
        t = common.time_interleaved(fns, args.repeats, args.warmup, args.device)
        floor_mib, how = common.peak_memory_mib(floor, args.device)
        ours_mib, _ = common.peak_memory_mib(fns["ours"], args.device)
    if args.profile:
        profile(fns["ours"], args.profile, args.device)

    cfg, n_pos = bridge.cfg, int(data.data.lengths.max())
    print(f"machine: {common.machine(args.device)}")
    print(f"model: {args.model} ({cfg.n_layers} layers x {cfg.n_heads} heads x d_model {cfg.d_model}, "
          f"{args.dtype}); floor vs bridge max |logit diff| {diff:.2e}")
    print(f"data: {args.data}, {len(data)} pairs x {n_pos} tokens; batch {args.batch_size}; {args.method} at "
          f"{args.level} level, {spec.passes_per_batch(graph)} passes per batch")
    print(f"floor: {t.spread('floor')}; peak +{floor_mib:.1f} MiB")
    print(f"ours:  {t.spread('ours')}; peak +{ours_mib:.1f} MiB")
    ratio = t.median("ours") / t.median("floor")
    mem_ratio = ours_mib / floor_mib if floor_mib > 0 else float("nan")
    cpu_ratio = t.cpu_median("ours") / t.cpu_median("floor")
    print(f"ratio ours/floor: time {ratio:.2f}x (CPU time {cpu_ratio:.2f}x), peak memory {mem_ratio:.2f}x  (memory: {how})")
    extra: dict[str, Any] = {}
    if "edge" in fns:
        extra = {"edge_s": round(t.median("edge"), 4), "edge_cpu_s": round(t.cpu_median("edge"), 4),
                 "over_edge": round(t.median("ours") / t.median("edge"), 3),
                 "over_edge_cpu": round(t.cpu_median("ours") / t.cpu_median("edge"), 3)}
        print(f"edge level: {t.spread('edge')}; {args.level} level / edge level: {extra['over_edge']:.2f}x "
              f"(CPU time {extra['over_edge_cpu']:.2f}x)")
    if args.method == "exact":
        n_removed = graph.n_edges if args.level == "edge" else graph.n_forward
        extra["removals_per_s"] = round(n_removed / t.median("ours"), 2)
        print(f"exact: {n_removed} removals, {extra['removals_per_s']:.1f} per second")
    record = {
        "method": args.method, "level": args.level, "model": args.model, "device": args.device,
        "machine": common.machine(args.device),
        "dtype": args.dtype, "n": len(data), "n_pos": n_pos, "batch_size": args.batch_size,
        "steps": len(spec.alphas()) if method.runner == "input-interpolation" else args.steps if method.steps else 0,
        "passes_per_batch": spec.passes_per_batch(graph),
        "floor_s": round(t.median("floor"), 4), "ours_s": round(t.median("ours"), 4), "ratio": round(ratio, 3),
        "floor_cpu_s": round(t.cpu_median("floor"), 4), "ours_cpu_s": round(t.cpu_median("ours"), 4),
        "cpu_ratio": round(cpu_ratio, 3),
        "floor_peak_mib": round(floor_mib, 1), "ours_peak_mib": round(ours_mib, 1), "mem_ratio": round(mem_ratio, 3),
        "memory_method": how, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "floor_runs_s": [round(x, 4) for x in t.runs["floor"]], "ours_runs_s": [round(x, 4) for x in t.runs["ours"]],
        **extra,
    }
    common.emit(record)
    return record


if __name__ == "__main__":
    main()
