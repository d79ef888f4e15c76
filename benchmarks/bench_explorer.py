"""The explorer as a user feels it: a real `streamlit run app.py` on 127.0.0.1 driven by Chromium.

    python benchmarks/bench_explorer.py --pairs 128 --moves 10

Times, on the demo model and the first ``--pairs`` pairs of the IOI task: from the click on "Run
attribution" (EAP-IG-inputs, 5 steps) to the circuit graph's canvas on the Explore page, and, once the
faithfulness curve is drawn, each slider move (one arrow key) to the updated faithfulness number. A move
that leaves the faithfulness unchanged (two sizes that prune to the same circuit) is not counted. Then
``--picks`` node picks (Enter in the "Find a node" box) to the node's drill-down on the page and to the end
of the script run (the graph redrawn with the node ringed), and ``--edits`` hand edits (a node excluded) to
the edited circuit's evaluation on the page. Needs Playwright and a Chromium
(``--chromium``, default Debian's ``/usr/bin/chromium``). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
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


NODES = ("a3.h0", "m1", "a2.h1", "a1.h2", "input", "a0.h3", "m2", "a3.h2")


def picks(page: Any, n: int) -> list[tuple[str, float, float]]:
    """(node, seconds to its drill-down heading, seconds to the end of the run) per node picked."""
    done = page.get_by_test_id("stStatusWidget")
    out = []
    for node in (NODES * n)[:n]:
        page.get_by_role("combobox", name="Find a node").click()
        page.keyboard.type(node)
        page.get_by_role("option").first.wait_for()
        start = time.perf_counter()
        page.keyboard.press("Enter")
        page.wait_for_function("n => [...document.querySelectorAll('h3')].some(h => h.innerText.trim() === 'Node ' + n)",
                               arg=node, polling="raf")
        shown = time.perf_counter() - start
        page.wait_for_timeout(50)
        done.wait_for(state="hidden")
        out.append((node, shown, time.perf_counter() - start))
        page.wait_for_timeout(300)
    return out


def edits(page: Any, n: int) -> list[float]:
    """Seconds from a hand edit (a node excluded) to the edited circuit's evaluation on the page (the line
    comparing it with the unedited circuit); the edit is cleared before the next one."""
    from playwright.sync_api import expect

    summary = page.get_by_text(re.compile(r"^Edited: "))
    page.get_by_text("Edit the circuit").first.click()
    out = []
    for i in range(n):
        for _ in range(3):  # headless Chromium's select box sometimes closes on Enter without choosing: again
            page.get_by_role("combobox", name="Exclude (edges or nodes)").click()
            page.keyboard.type(NODES[i % len(NODES)])
            page.get_by_role("option", name=NODES[i % len(NODES)], exact=True).wait_for()
            start = time.perf_counter()
            page.keyboard.press("Enter")
            try:
                expect(page.get_by_test_id("stMultiSelect").filter(has_text="Exclude")).to_contain_text(
                    NODES[i % len(NODES)], timeout=10_000)
                break
            except AssertionError:
                page.keyboard.press("Escape")
        expect(summary).to_be_visible()
        out.append(time.perf_counter() - start)
        page.keyboard.press("Escape")
        page.get_by_test_id("stStatusWidget").wait_for(state="hidden")
        page.get_by_role("button", name="Clear the edits").click()
        expect(summary).to_have_count(0)
        page.get_by_text("Edit the circuit").first.click()
        page.wait_for_timeout(300)
    return out


def drive(url: str, chromium: str, moves: int, settle_ms: int, n_picks: int = 0,
          n_edits: int = 0) -> tuple[float, list[tuple[int, float]], list[tuple[str, float, float]], list[float]]:
    """(seconds from Run attribution to the graph, (circuit size, seconds) per counted slider move,
    :func:`picks`, :func:`edits`)."""
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
        picked = picks(page, n_picks)
        edited = edits(page, n_edits)
        browser.close()
    return to_graph, times, picked, edited


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moves", type=int, default=10, help="slider moves (arrow key presses) to time")
    p.add_argument("--settle-ms", type=int, default=1000, help="pause after each move before the next key press")
    p.add_argument("--picks", type=int, default=8, help="nodes picked for the drill-down (timed)")
    p.add_argument("--edits", type=int, default=4, help="hand edits (timed)")
    common.add_app_arguments(p, pairs=128)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        csv = common.first_ioi_pairs(args.pairs, Path(tmp))
        env = {"EAPCORE_APP_MODEL": args.model, "EAPCORE_APP_DATA": str(csv)}
        with server.running(env, Path(tmp) / "streamlit.log") as url:
            to_graph, moves, picked, edited = drive(url, args.chromium, args.moves, args.settle_ms, args.picks, args.edits)
    seconds = [t for _, t in moves]

    def median(values: list[float]) -> float | None:
        return round(statistics.median(values), 3) if values else None

    record = {
        "model": args.model, "pairs": args.pairs, "machine": common.machine("cpu"),
        "run_to_graph_s": round(to_graph, 2), "moves_counted": len(moves),
        "move_median_s": median(seconds), "move_max_s": round(max(seconds), 3) if moves else None,
        "moves": [[n, round(t, 3)] for n, t in moves],
        "pick_to_drilldown_median_s": median([t for _, t, _ in picked]),
        "pick_to_run_end_median_s": median([t for _, _, t in picked]),
        "picks": [[node, round(a, 3), round(b, 3)] for node, a, b in picked],
        "edit_median_s": median(edited), "edits": [round(t, 3) for t in edited],
    }
    print(f"Run attribution -> graph: {to_graph:.2f} s; slider move -> faithfulness: median "
          f"{record['move_median_s']} s, max {record['move_max_s']} s over {len(moves)} moves; node pick -> "
          f"drill-down: median {record['pick_to_drilldown_median_s']} s (run ends: {record['pick_to_run_end_median_s']} "
          f"s); edit -> faithfulness: median {record['edit_median_s']} s")
    common.emit(record)
    return record


if __name__ == "__main__":
    main()
