"""Attribution speed and memory against the floor: the raw Hugging Face model doing the same passes.

    python benchmarks/bench_attribution.py --model gpt2-small --n 32 --length 16 --batch-size 32 --steps 5

The floor for a method is the bare model's own work, with frozen weights and no hooks: 2 forward passes
without gradients (clean, corrupted), then one forward/backward pass to the token embeddings per
gradient step (EAP: 1, EAP-IG-inputs: ``--steps``, clean-corrupted: 2) at the same interpolated
embeddings. Ours is ``eapcore.attribute.attribute`` on the bridge loaded from the same folder, on the
same token ids. Both are timed interleaved in one process (warm-up, then ``--repeats`` rounds, median);
peak memory is measured once each by the same method (see ``common.peak_memory_mib``). The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402


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
    p.add_argument("--method", default="EAP-IG-inputs", choices=("EAP", "EAP-IG-inputs", "clean-corrupted"))
    common.add_run_arguments(p, repeats=5, warmup=1)
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="also print a torch.profiler table of one run of ours (top ROWS ops)")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    from eapcore.attribute import AttributionSpec
    from eapcore.metrics import get_metric

    hf, bridge, data, task_metric = common.setup(args)
    spec = AttributionSpec(args.method, args.steps, args.metric or task_metric, batch_size=args.batch_size)
    metric = get_metric(spec.metric)
    diff = check_same_model(hf, bridge, data, args.device)
    floor, ours = floor_fn(hf, data, spec.alphas(), metric, spec.batch_size, args.device), ours_fn(bridge, data, spec)

    with common.frozen_gc():
        t = common.time_interleaved({"floor": floor, "ours": ours}, args.repeats, args.warmup, args.device)
        floor_mib, how = common.peak_memory_mib(floor, args.device)
        ours_mib, _ = common.peak_memory_mib(ours, args.device)
    if args.profile:
        profile(ours, args.profile, args.device)

    cfg, n_pos = bridge.cfg, int(data.data.lengths.max())
    print(f"machine: {common.machine(args.device)}")
    print(f"model: {args.model} ({cfg.n_layers} layers x {cfg.n_heads} heads x d_model {cfg.d_model}, "
          f"{args.dtype}); floor vs bridge max |logit diff| {diff:.2e}")
    print(f"data: {args.data}, {len(data)} pairs x {n_pos} tokens; batch {args.batch_size}; {args.method}, "
          f"{len(spec.alphas())} gradient step(s)")
    print(f"floor: {t.spread('floor')}; peak +{floor_mib:.1f} MiB")
    print(f"ours:  {t.spread('ours')}; peak +{ours_mib:.1f} MiB")
    ratio = t.median("ours") / t.median("floor")
    mem_ratio = ours_mib / floor_mib if floor_mib > 0 else float("nan")
    cpu_ratio = t.cpu_median("ours") / t.cpu_median("floor")
    print(f"ratio ours/floor: time {ratio:.2f}x (CPU time {cpu_ratio:.2f}x), peak memory {mem_ratio:.2f}x  (memory: {how})")
    record = {
        "method": args.method, "model": args.model, "device": args.device, "machine": common.machine(args.device),
        "dtype": args.dtype, "n": len(data), "n_pos": n_pos, "batch_size": args.batch_size, "steps": len(spec.alphas()),
        "floor_s": round(t.median("floor"), 4), "ours_s": round(t.median("ours"), 4), "ratio": round(ratio, 3),
        "floor_cpu_s": round(t.cpu_median("floor"), 4), "ours_cpu_s": round(t.cpu_median("ours"), 4),
        "cpu_ratio": round(cpu_ratio, 3),
        "floor_peak_mib": round(floor_mib, 1), "ours_peak_mib": round(ours_mib, 1), "mem_ratio": round(mem_ratio, 3),
        "memory_method": how, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "floor_runs_s": [round(x, 4) for x in t.runs["floor"]], "ours_runs_s": [round(x, 4) for x in t.runs["ours"]],
    }
    common.emit(record)
    return record


if __name__ == "__main__":
    main()
