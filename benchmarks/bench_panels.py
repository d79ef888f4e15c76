"""The trust checks as the app runs them: Streamlit's AppTest runs the real page scripts, caches and session
state (no browser), on the demo model and the first ``--pairs`` pairs of the IOI task.

    python benchmarks/bench_panels.py --pairs 256 --repeats 5 --threads 1

Each check is timed from its click (or from the rerun that opens its panel) to the end of the page's script
run, against a **slider move** measured in the same run (Explore's number box set to a size whose circuit is
not kept yet, panels closed): Explore's **Verify** (top ``--top-k`` edges of the EAP-IG-inputs run), **Per prompt** (a slider move
with the panel open: the new circuit evaluated pair by pair, with its bootstrap), **Robustness** (every
intervention), **CPR/CMD both ways** (the curve under both rankings), and the Compare page's **compare** of
three runs (EAP-IG-inputs, EAP, clean-corrupted). "cold": the checks' kept results and remembered circuits
(``ui.cache.checks``, ``ui.cache.circuit_metrics``) emptied before each repeat; "kept": the same again at once,
which is what moving back to a size costs. Robustness's first click also prepares the zero, mean and
mean-positional evaluators (reported on its own). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(Path(__file__).resolve().parent), str(ROOT)]

import common  # noqa: E402

METHODS = ("EAP-IG-inputs", "EAP", "clean-corrupted")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="'demo' or a save_pretrained folder")
    p.add_argument("--data", default="ioi", help="a shipped task or a CSV of prompt pairs")
    p.add_argument("--pairs", type=int, default=256, help="the first PAIRS pairs of the data")
    p.add_argument("--top-k", type=int, default=50, help="edges Verify checks")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the app's OMP_NUM_THREADS)")
    return p


def checked(at: Any) -> Any:
    problems = [e.value for e in at.error] + [str(e.value) for e in at.exception]
    if problems:
        raise RuntimeError(f"the app showed an error: {problems[0]}")
    return at


def seconds(action: Callable[[], Any]) -> tuple[float, float]:
    """(wall, process CPU) seconds of ``action``: the script runs in a thread of this process, so with one
    torch thread its CPU time barely depends on other load."""
    start, cpu = time.perf_counter(), time.process_time()
    checked(action())
    return time.perf_counter() - start, time.process_time() - cpu


def measure(args: argparse.Namespace) -> tuple[dict[str, list[tuple[float, float]]], tuple[int, int]]:
    """(wall, CPU) seconds per repeat of every timed step, and the two circuit sizes the slider moves between."""
    from streamlit.testing.v1 import AppTest

    from ui import cache

    def forget(rerun: bool = False) -> None:
        """Empty the checks' stores (and rerun, so that the page shows its button again)."""
        cache.checks().clear()
        cache.circuit_metrics().clear()
        if rerun:
            checked(at.run())

    at = checked(AppTest.from_file(str(ROOT / "app.py"), default_timeout=900).run())
    at.switch_page("pages/attribute.py").run()
    at.checkbox(key="w_open_explore").set_value(False)
    for method in reversed(METHODS):  # the last one made (EAP-IG-inputs) is the one Explore shows
        at.selectbox(key="w_method").set_value(method)
        checked(at.button(key="run_attribution").click().run())
    at.switch_page("pages/explore.py")
    checked(at.run())
    base = int(at.session_state["n_edges"])
    sizes = (base, 2 * base)
    box = lambda n: lambda: at.number_input(key="w_n_box").set_value(n).run()  # noqa: E731
    times: dict[str, list[tuple[float, float]]] = {}

    def add(name: str, value: tuple[float, float]) -> None:
        times.setdefault(name, []).append(value)

    def panel(key: str, on: bool) -> Any:
        at.session_state[key] = on
        return checked(at.run())

    for r in range(args.repeats):
        forget()  # a size not seen before: its circuit is evaluated
        add("move", seconds(box(sizes[(r + 1) % 2])))
    checked(box(sizes[0])())

    panel("w_per_prompt_open", True)
    for r in range(args.repeats):
        forget()
        add("per_prompt", seconds(box(sizes[1])))
        checked(box(sizes[0])())
        add("per_prompt_kept", seconds(box(sizes[1])))
        checked(box(sizes[0])())
    panel("w_per_prompt_open", False)

    panel("w_verify_open", True)
    at.number_input(key="w_verify_k").set_value(args.top_k)
    checked(at.run())
    for _ in range(args.repeats):
        forget(rerun=True)
        add("verify", seconds(lambda: at.button(key="run_verify").click().run()))
        add("verify_kept", seconds(at.run))
    panel("w_verify_open", False)

    panel("w_robustness_open", True)
    for r in range(args.repeats + 1):
        forget(rerun=True)
        add("robustness_first" if r == 0 else "robustness", seconds(lambda: at.button(key="run_robustness").click().run()))
        add("robustness_kept", seconds(at.run))
    panel("w_robustness_open", False)

    for _ in range(args.repeats):
        forget()
        add("areas", seconds(lambda: panel("w_areas_open", True)))
        add("areas_kept", seconds(at.run))
        panel("w_areas_open", False)

    at.switch_page("pages/compare.py")
    checked(at.run())
    for _ in range(args.repeats):
        forget(rerun=True)
        add("compare", seconds(lambda: at.button(key="run_compare").click().run()))
        add("compare_kept", seconds(at.run))
    return times, sizes


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    import pandas as pd
    import torch

    from eapcore.tasks import TASKS

    source = TASKS[args.data].csv if args.data in TASKS else Path(args.data)
    with tempfile.TemporaryDirectory(prefix="bench-panels-") as tmp:
        csv = Path(tmp) / "pairs.csv"
        pd.read_csv(source, dtype=str, keep_default_na=False).head(args.pairs).to_csv(csv, index=False)
        env = {"EAPCORE_APP_MODEL": args.model, "EAPCORE_APP_DATA": str(csv), "EAPCORE_APP_DEVICE": "cpu",
               "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
        before, threads = {k: os.environ.get(k) for k in env}, torch.get_num_threads()
        os.environ.update(env)
        torch.set_num_threads(args.threads)
        try:
            times, sizes = measure(args)
            machine = common.machine("cpu")
        finally:
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            torch.set_num_threads(threads)
    ms = {name: 1000 * statistics.median(wall for wall, _ in values) for name, values in times.items()}
    cpu = {name: 1000 * statistics.median(c for _, c in values) for name, values in times.items()}
    print(f"machine: {machine}")
    print(f"model: {args.model}; data: {args.data}, {args.pairs} pairs; runs {', '.join(METHODS)}; sizes {sizes}; "
          f"verify top {args.top_k}; {args.repeats} repeats")
    for name, values in times.items():
        extra = "" if name == "move" else f" = {ms[name] / ms['move']:.2f}x a slider move ({cpu[name] / cpu['move']:.2f}x CPU)"
        walls = [1000 * wall for wall, _ in values]
        print(f"{name:18s} median {ms[name]:8.1f} ms, CPU {cpu[name]:8.1f} ms (wall min {min(walls):.1f}, "
              f"max {max(walls):.1f}){extra}")
    record = {"model": args.model, "pairs": args.pairs, "top_k": args.top_k, "repeats": args.repeats,
              "threads": args.threads, "runs": list(METHODS), **{f"{k}_ms": round(v, 1) for k, v in ms.items()},
              **{f"{k}_cpu_ms": round(v, 1) for k, v in cpu.items()},
              **{f"{k}_over_move": round(v / ms["move"], 2) for k, v in ms.items() if k != "move"},
              **{f"{k}_over_move_cpu": round(v / cpu["move"], 2) for k, v in cpu.items() if k != "move"}}
    common.emit(record)
    return record


if __name__ == "__main__":
    main()
