"""The explorer as a user feels it: a real `streamlit run app.py` on 127.0.0.1 driven by Chromium.

    python benchmarks/bench_explorer.py --pairs 128 --moves 10

Times, on the demo model and the first ``--pairs`` pairs of the IOI task: from the click on "Run
attribution" (EAP-IG-inputs, 5 steps) to the circuit graph's canvas on the Explore page, and, once the
faithfulness curve is drawn, each slider move (one arrow key) to the updated faithfulness number. A move
that leaves the faithfulness unchanged (two sizes that prune to the same circuit) is not counted. Needs
Playwright and a Chromium (``--chromium``, default Debian's ``/usr/bin/chromium``). The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(Path(__file__).resolve().parent), str(ROOT)]

import common  # noqa: E402
from ui import server  # noqa: E402

NUMBER = re.compile(r"^\s*-?\d+\.\d{4}\s*$")


def drive(url: str, chromium: str, moves: int, settle_ms: int) -> tuple[float, list[tuple[int, float]]]:
    """(seconds from Run attribution to the graph, (circuit size, seconds) per counted slider move)."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=120_000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.set_default_timeout(120_000)
        page.goto(url)
        expect(page.get_by_text("Data ready")).to_be_visible()
        page.get_by_role("link", name="Attribute").first.click()
        run = page.get_by_role("button", name="Run attribution")
        expect(run).to_be_enabled()
        start = time.perf_counter()
        run.click()
        page.frame_locator('iframe[title="circuit graph"]').locator("canvas").first.wait_for(state="visible")
        to_graph = time.perf_counter() - start
        expect(page.get_by_text("CPR (area under f)").first).to_be_visible()  # the curve is computed once
        faith = page.get_by_test_id("stMetric").filter(has_text="Faithfulness").get_by_test_id("stMetricValue").first
        expect(faith).to_have_text(NUMBER)
        slider, box, times = page.get_by_role("slider").first, page.get_by_role("spinbutton", name="Exact count"), []
        for _ in range(moves):
            before = faith.inner_text().strip()
            slider.focus()
            start = time.perf_counter()
            page.keyboard.press("ArrowRight")
            try:
                expect(faith).not_to_have_text(before, timeout=5_000)
                times.append((int(box.input_value()), time.perf_counter() - start))
            except AssertionError:
                pass  # the same circuit after pruning: nothing to update
            page.wait_for_timeout(settle_ms)  # let the rest of the page (graph, curve marker) settle
        browser.close()
    return to_graph, times


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="what the app loads: 'demo', a hub name or a local folder")
    p.add_argument("--pairs", type=int, default=128, help="the first PAIRS pairs of the IOI task")
    p.add_argument("--moves", type=int, default=10, help="slider moves (arrow key presses) to time")
    p.add_argument("--settle-ms", type=int, default=1000, help="pause after each move before the next key press")
    p.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    from eapcore.tasks import get_task

    with tempfile.TemporaryDirectory() as tmp:
        lines = get_task("ioi").csv.read_text().splitlines(keepends=True)  # one pair per line (no quoted newlines)
        csv = Path(tmp) / "ioi_first.csv"
        csv.write_text("".join(lines[: args.pairs + 1]))
        env = {"EAPCORE_APP_MODEL": args.model, "EAPCORE_APP_DATA": str(csv)}
        with server.running(env, Path(tmp) / "streamlit.log") as url:
            to_graph, moves = drive(url, args.chromium, args.moves, args.settle_ms)
    seconds = [t for _, t in moves]
    record = {
        "model": args.model, "pairs": args.pairs, "machine": common.machine("cpu"),
        "run_to_graph_s": round(to_graph, 2), "moves_counted": len(moves),
        "move_median_s": round(statistics.median(seconds), 3) if moves else None,
        "move_max_s": round(max(seconds), 3) if moves else None, "moves": [[n, round(t, 3)] for n, t in moves],
    }
    print(f"Run attribution -> graph: {to_graph:.2f} s; slider move -> faithfulness: median "
          f"{record['move_median_s']} s, max {record['move_max_s']} s over {len(moves)} moves")
    common.emit(record)
    return record


if __name__ == "__main__":
    main()
