"""Regenerate the README's screenshots (``docs/*.png``) from the current app.

    python scripts/screenshots.py                 # every shot, into docs/
    python scripts/screenshots.py --only explore  # some of them (comma-separated names)
    python scripts/screenshots.py --list

Starts the real app (``streamlit run app.py`` on the demo model and the IOI task, 127.0.0.1, a free
port), drives Debian's headless Chromium through Playwright, and writes one PNG per entry of
:data:`SHOTS` (reduced to 256 colours, which keeps each one small). Run it again after any visible
change; to add a picture of a new page or panel, add a :class:`Shot` whose ``show`` function brings the
page into the state to photograph (the helpers below open pages, run the attribution and wait for the
app to settle). The last line printed is one JSON object listing the files written.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ui import server  # noqa: E402
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
TIMEOUT_MS = 240_000


# ----- driving the app -----


def settle(page: Any, ms: int = 600) -> None:
    """Wait until the script run has finished (no "Running" status), then a moment for iframes and charts."""
    page.wait_for_timeout(300)
    page.get_by_test_id("stStatusWidget").wait_for(state="hidden", timeout=TIMEOUT_MS)
    page.wait_for_timeout(ms)


def open_page(page: Any, name: str) -> None:
    """Click ``name`` in the sidebar's navigation (opening the sidebar first on a narrow screen)."""
    expand = page.get_by_test_id("stExpandSidebarButton")
    if expand.count() and expand.first.is_visible():
        expand.first.click()
        page.wait_for_timeout(800)  # the sidebar slides in
    page.get_by_test_id("stSidebarNav").get_by_role("link", name=name, exact=True).click()
    settle(page)
    collapse = page.get_by_test_id("stSidebarCollapseButton")
    if page.viewport_size["width"] < 640 and collapse.count() and collapse.first.is_visible():
        collapse.first.click()  # on a phone the open sidebar covers the page
        settle(page, 300)


def run_attribution(page: Any) -> None:
    """Run the default attribution (instant when the server has it cached) and wait for Explore's graph."""
    from playwright.sync_api import expect

    open_page(page, "Attribute")
    box = page.get_by_text("Open Explore when done")
    if not page.get_by_role("checkbox", name="Open Explore when done").is_checked():
        box.click()
        settle(page, 200)
    page.get_by_role("button", name="Run attribution").click()
    page.frame_locator('iframe[title="circuit graph"]').locator("canvas").first.wait_for(state="visible", timeout=TIMEOUT_MS)
    expect(page.get_by_text("CPR (area under f)").first).to_be_visible(timeout=TIMEOUT_MS)
    settle(page, 1200)


def set_size(page: Any, n: int) -> None:
    box = page.get_by_role("spinbutton", name="Exact count", exact=True)
    box.fill(str(n))
    box.press("Enter")
    settle(page, 1200)


def pick_node(page: Any, node: str) -> None:
    """Pick ``node`` in Explore's "Find a node" box (ringed in the graph, drilled into below it)."""
    page.get_by_role("combobox", name="Find a node").click()
    page.keyboard.type(node)
    page.get_by_role("option").first.wait_for()
    page.keyboard.press("Enter")
    settle(page, 1500)


def exclude(page: Any, name: str) -> None:
    """Exclude a node or an edge with Explore's circuit editor."""
    page.get_by_text("Edit the circuit").first.click()
    page.get_by_role("combobox", name="Exclude (edges or nodes)").click()
    page.keyboard.type(name)
    page.get_by_role("option", name=name, exact=True).wait_for()
    page.keyboard.press("Enter")  # the typed name (a click on the list could land while it re-renders)
    page.keyboard.press("Escape")
    settle(page, 1200)


# ----- the shots -----


@dataclass(frozen=True)
class Shot:
    """One picture: ``docs/{name}.png`` of a ``width`` x ``height`` window in the ``scheme`` colour scheme
    (``light`` or ``dark``: the browser's preference, which the app follows) after ``show(page)``."""

    name: str
    what: str
    show: Callable[[Any], None]
    width: int = 1440
    height: int = 1000
    scheme: str = "light"


def _model(page: Any) -> None:
    settle(page)


def _data(page: Any) -> None:
    open_page(page, "Data")


def _attribute(page: Any) -> None:
    run_attribution(page)
    open_page(page, "Attribute")
    steps = page.get_by_role("spinbutton", name="IG steps", exact=True)  # a run not made yet: its cost shows
    steps.fill("10")
    steps.press("Enter")
    settle(page)
    page.get_by_text("Scores (sources × destinations)").scroll_into_view_if_needed()
    settle(page, 1000)


def _explore(page: Any) -> None:
    run_attribution(page)


def _explore_curve(page: Any) -> None:
    run_attribution(page)
    page.get_by_text("CPR (area under f)").first.scroll_into_view_if_needed()
    settle(page, 800)


def _explore_graph(page: Any) -> None:
    run_attribution(page)
    page.locator('iframe[title="circuit graph"]').scroll_into_view_if_needed()
    settle(page, 800)


def _explore_drilldown(page: Any) -> None:
    run_attribution(page)
    pick_node(page, "a3.h0")
    page.get_by_text("Edit the circuit").first.evaluate("e => e.scrollIntoView({block: 'start'})")  # the picker at the top
    settle(page, 1000)


def _explore_edit(page: Any) -> None:
    run_attribution(page)
    page.get_by_text("Show nodes outside the circuit").click()
    settle(page, 600)
    exclude(page, "a1.h2")  # a head of the top circuit
    pick_node(page, "a3.h0")
    page.get_by_text("Faithfulness").first.scroll_into_view_if_needed()
    settle(page, 800)


def _export(page: Any) -> None:
    run_attribution(page)
    open_page(page, "Export")


def choose(page: Any, label: str, option: str) -> None:
    """Pick ``option`` in the select box labelled ``label``."""
    page.get_by_test_id("stSelectbox").filter(has_text=label).first.click()
    page.get_by_role("option", name=option, exact=True).click()
    settle(page, 300)


def runs(page: Any, methods: Sequence[str] = ("EAP", "clean-corrupted", "EAP-IG-inputs")) -> None:
    """One run of each method (the last is the one Explore shows), staying on the Attribute page."""
    from playwright.sync_api import expect

    open_page(page, "Attribute")
    if page.get_by_role("checkbox", name="Open Explore when done").is_checked():
        page.get_by_text("Open Explore when done").click()
        settle(page, 200)
    for method in methods:
        choose(page, "Method", method)
        page.get_by_role("button", name="Run attribution").click()
        expect(page.get_by_test_id("stSidebar").get_by_text(re.compile(rf"^Scores: {re.escape(method)}[ ,]"))).to_be_visible(
            timeout=TIMEOUT_MS)
        settle(page)


def panel(page: Any, title: str, button: str | None, done: str) -> None:
    """Open Explore's panel ``title``, click its ``button`` (if any), wait for ``done`` and bring it to the top."""
    from playwright.sync_api import expect

    runs(page)
    open_page(page, "Explore")
    expect(page.get_by_text("CPR (area under f)").first).to_be_visible(timeout=TIMEOUT_MS)
    page.get_by_text(title).click()
    settle(page)
    if button:
        page.get_by_role("button", name=button, exact=True).click()
    expect(page.get_by_text(done).first).to_be_attached(timeout=TIMEOUT_MS)  # (a table cell is drawn on a canvas)
    settle(page, 1000)
    to_top(page, title)


def to_top(page: Any, text: str) -> None:
    """Scroll the page so that ``text`` is at the top, just below the app's header."""
    page.get_by_text(text, exact=True).first.evaluate("e => e.scrollIntoView({block: 'start'})")
    page.mouse.move(page.viewport_size["width"] // 2, page.viewport_size["height"] // 2)
    page.mouse.wheel(0, -70)
    settle(page, 600)


def _verify(page: Any) -> None:
    panel(page, "Verify: estimates against exact patching", "Verify", "The worst-estimated edges")


def _per_prompt(page: Any) -> None:
    panel(page, "Per prompt: each pair's faithfulness", None, "95% interval")


def _robustness(page: Any) -> None:
    panel(page, "Robustness: every intervention", "Run every intervention", "circuit faithfulness")


def _areas(page: Any) -> None:
    panel(page, "CPR and CMD both ways: MIB's leaderboard, its public script", None, "MIB's leaderboard reports")


def _compare(page: Any) -> None:
    from playwright.sync_api import expect

    runs(page)
    open_page(page, "Compare")
    button = page.get_by_role("button", name="Compare", exact=True)
    if button.count():
        button.click()
    expect(page.get_by_text("Overlap of the circuits at 5%")).to_be_visible(timeout=TIMEOUT_MS)
    settle(page, 1500)


def _compare_overlap(page: Any) -> None:
    _compare(page)
    to_top(page, "Overlap of the circuits")


def _export_mib(page: Any) -> None:
    from playwright.sync_api import expect

    run_attribution(page)
    open_page(page, "Export")
    page.get_by_role("button", name="Write the submission").click()
    expect(page.get_by_text(re.compile("Passes MIB's format check"))).to_be_visible(timeout=TIMEOUT_MS)
    to_top(page, "Submit to MIB")


SHOTS = [
    Shot("explore", "Explore: the slider, the numbers and the circuit graph", _explore, height=1250),
    Shot("explore-curve", "Explore: the faithfulness curve with CPR and CMD", _explore_curve, height=1000),
    Shot("explore-drilldown", "Explore: a node picked, ringed in the graph, and its drill-down", _explore_drilldown,
         height=1500),
    Shot("explore-edit", "Explore: a hand edit, its change in faithfulness, nodes outside the circuit faded",
         _explore_edit, height=1250),
    Shot("model", "Model page", _model, height=900),
    Shot("data", "Data page: baselines and the token preview", _data, height=1250),
    Shot("attribute", "Attribute page: settings and the score heatmap", _attribute, height=1100),
    Shot("export", "Export page", _export, height=900),
    Shot("explore-dark", "Explore in the dark theme", _explore, height=1250, scheme="dark"),
    Shot("explore-phone", "Explore's circuit graph on a phone-sized screen", _explore_graph, width=390, height=844),
    Shot("compare", "Compare: three runs' curves and CPR/CMD both ways", _compare, height=1400),
    Shot("compare-overlap", "Compare: the overlap heatmap and where two runs differ", _compare_overlap, height=1250),
    Shot("explore-verify", "Explore's Verify panel: estimates against exact patching", _verify, height=1150),
    Shot("explore-per-prompt", "Explore's Per prompt panel: each pair, with the bootstrap interval", _per_prompt, height=1250),
    Shot("explore-robustness", "Explore's Robustness panel: every intervention", _robustness, height=900),
    Shot("explore-areas", "Explore: CPR and CMD both ways, as MIB's leaderboard and its public script", _areas, height=700),
    Shot("export-mib", "Export: an MIB submission written and checked", _export_mib, height=1000),
]


# ----- the server and the browser -----


def small_png(png: bytes) -> bytes:
    """The screenshot reduced to a 256-colour palette (a third to a fifth of the size, same look)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def take(browser: Any, url: str, shot: Shot, out_dir: Path) -> Path:
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": shot.width, "height": shot.height}, color_scheme=shot.scheme)
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        expect(page.get_by_text("Data ready")).to_be_visible(timeout=TIMEOUT_MS)
        shot.show(page)
        path = out_dir / f"{shot.name}.png"
        path.write_bytes(small_png(page.screenshot()))
        return path
    finally:
        context.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "docs"), help="folder for the PNGs (default: docs/)")
    p.add_argument("--only", help="comma-separated shot names (default: all)")
    p.add_argument("--list", action="store_true", help="list the shots and exit")
    p.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.list:
        for shot in SHOTS:
            print(f"{shot.name:<16} {shot.width}x{shot.height} {shot.scheme:<5} {shot.what}")
        return {"shots": [s.name for s in SHOTS]}
    names = [n.strip() for n in args.only.split(",")] if args.only else [s.name for s in SHOTS]
    unknown = sorted(set(names) - {s.name for s in SHOTS})
    if unknown:
        raise SystemExit(f"unknown shot(s) {', '.join(unknown)}; --list shows them")
    from playwright.sync_api import sync_playwright

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "streamlit.log"
        with server.running({"EAPCORE_APP_MODEL": "demo", "EAPCORE_APP_DATA": "ioi"}, log) as url, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS, headless=True)
            try:
                for shot in (s for s in SHOTS if s.name in names):
                    start = time.perf_counter()
                    path = take(browser, url, shot, out_dir)
                    written.append(str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path))
                    print(f"{path}: {path.stat().st_size / 1024:.0f} kB in {time.perf_counter() - start:.1f} s")
            finally:
                browser.close()
        if re.search(r"^Traceback", log.read_text(), re.MULTILINE):
            raise RuntimeError(f"the app logged an error while the screenshots were taken:\n{log.read_text()[-3000:]}")
    record = {"written": written}
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
