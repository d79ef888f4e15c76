"""The explorer in a real browser: `streamlit run app.py` on 127.0.0.1 driven by Playwright through
Debian's headless Chromium (no browser download). Loads the default model, runs the attribution, moves
the slider with the keyboard, waits for the faithfulness to change and for the pyvis canvas, downloads
every export and checks each file, and saves screenshots (to $EAPCORE_SCREENSHOTS or a temporary
folder). Other tests cancel a long attribution with the Cancel button and then run one to the end; have a
second session wait for the model behind another's run, leave the queue and read the server's memory; type
quickly into the pairs editor; check the graph on a phone-sized screen and in the dark theme; and
check, without a browser, what an interruption leaves behind on the shared model.

With CI=true a missing Chromium or Playwright is a failure, not a skip.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from eapcore.attribute import AttributionSpec, attribute
from eapcore.data import PromptPairs
from eapcore.models import ModelSpec, model_lock

from conftest import TIMEOUT_MS, TOY, Browser, attached_hooks, expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_browser_flow(browser: Browser, shots: Path) -> None:
    import urllib.request

    from ui.widgets import FAVICON

    page = browser.page
    page.screenshot(path=shots / "1_model.png")
    icon = page.evaluate("document.querySelector('link[rel*=icon]').href")  # the asset, served as is
    with urllib.request.urlopen(icon) as r:
        assert r.read() == FAVICON.read_bytes() and len(FAVICON.read_bytes()) < 1024

    page.get_by_role("link", name="Data").first.click()
    expect(page.get_by_text("Token preview")).to_be_visible()
    page.screenshot(path=shots / "2_data.png")

    page.get_by_role("link", name="Attribute").first.click()
    run = page.get_by_role("button", name="Run attribution")
    expect(run).to_be_enabled()
    start = time.perf_counter()
    run.click()
    frame = page.frame_locator('iframe[title="circuit graph"]')
    frame.locator("canvas").first.wait_for(state="visible")
    to_graph = time.perf_counter() - start

    faith = page.get_by_test_id("stMetric").filter(has_text="Faithfulness").get_by_test_id("stMetricValue").first
    expect(faith).to_have_text(re.compile(r"^\s*-?\d+\.\d{4}\s*$"))
    before = faith.inner_text().strip()
    expect(page.get_by_text("CPR (area under f)").first).to_be_visible()
    page.screenshot(path=shots / "3_explore.png")

    slider = page.get_by_role("slider").first
    slider.focus()
    start = time.perf_counter()
    page.keyboard.press("End")  # the whole graph: faithfulness 1
    expect(faith).not_to_have_text(before)
    to_faith = time.perf_counter() - start
    expect(faith).to_have_text(re.compile(r"^\s*1\.0000\s*$"))
    frame.locator("canvas").first.wait_for(state="visible")
    slider.focus()
    page.keyboard.press("Home")  # the empty circuit: faithfulness 0
    expect(faith).to_have_text(re.compile(r"^\s*-?0\.0000\s*$"))
    edges = page.get_by_test_id("stMetric").filter(has_text="Edges (after pruning)").get_by_test_id("stMetricValue").first
    total = int(edges.inner_text().split("/")[1].replace(",", ""))
    set_number(page, "Exact count", max(8, total // 12))  # the number box, for an exact size
    expect(faith).not_to_have_text(re.compile(r"^\s*-?0\.0000\s*$"))
    frame.locator("canvas").first.wait_for(state="visible")
    expect(page.get_by_text("CPR (area under f)").first).to_be_visible()
    page.wait_for_timeout(500)  # let the iframe draw before the picture (the test waited on selectors)
    page.screenshot(path=shots / "4_explore_slider.png")

    shown = faith.inner_text().strip()
    page.get_by_role("link", name="Export").first.click()
    expect(page.get_by_role("button", name=".pt (EAP-IG)")).to_be_visible()
    page.screenshot(path=shots / "5_export.png")
    check_downloads(page, shots, shown)
    print(f"\nscreenshots in {shots}; Run attribution -> graph canvas {to_graph:.2f} s; "
          f"slider End -> faithfulness {to_faith:.2f} s")
    browser.assert_clean()


def download(page: Any, label: str, folder: Path) -> Path:
    """Click a download button and save what the browser receives (a button whose data fails gives none)."""
    with page.expect_download(timeout=60_000) as started:
        page.get_by_role("button", name=label).click()
    target = folder / started.value.suggested_filename
    started.value.save_as(target)
    assert started.value.failure() is None, (label, started.value.failure())
    return target


def check_downloads(page: Any, folder: Path, faithfulness: str) -> None:
    """Every export button gives a file that is what it says: .pt loads weights-only and through
    eapcore.export, .json parses and loads, the PNGs are PNGs titled with their provenance, and all of
    them hold the circuit the page names (its edges and the faithfulness Explore showed)."""
    import json

    from PIL import Image

    from eapcore.export import load_circuit

    caption = page.get_by_text(re.compile(r"→ [\d,]+ edges and \d+ nodes after pruning")).inner_text()
    edges, nodes = (int(x.replace(",", "")) for x in re.search(r"→ ([\d,]+) edges and (\d+) nodes", caption).groups())
    assert f"faithfulness {faithfulness}" in caption
    files = {label: download(page, label, folder) for label in (".pt (EAP-IG)", ".json (EAP-IG)", "Circuit PNG", "Curve PNG")}
    raw = torch.load(files[".pt (EAP-IG)"], weights_only=True)
    assert int(raw["edges_in_graph"].sum()) == edges and raw["eapcore"]["evaluation"]["faithfulness"] == pytest.approx(
        float(faithfulness), abs=1e-4)
    doc = json.loads(files[".json (EAP-IG)"].read_text())
    assert sum(e["in_graph"] for e in doc["edges"].values()) == edges
    for label in (".pt (EAP-IG)", ".json (EAP-IG)"):
        scores, circuit = load_circuit(files[label])
        assert (circuit.n_edges, circuit.n_nodes) == (edges, nodes) and scores.provenance["model"] == raw["eapcore"]["model"]
    for label in ("Circuit PNG", "Curve PNG"):
        blob = files[label].read_bytes()
        assert blob.startswith(b"\x89PNG\r\n\x1a\n") and len(blob) > 1000
        image = Image.open(files[label])
        image.load()
        title = image.text["Title"]
        assert title.startswith(str(raw["eapcore"]["model"]) + " · ") and f"faithfulness {faithfulness}" in title, title


def set_number(page: Any, label: str, value: int) -> None:
    box = page.get_by_role("spinbutton", name=label, exact=True)
    box.fill(str(value))
    box.press("Enter")


def set_run_size(page: Any, steps: int, batch: int) -> None:
    """Set IG steps, then the batch size, each time waiting until the page's caption counts the new value.
    A value typed while an earlier rerun is still in flight can be lost (Streamlit redraws the box with the
    old value when that rerun ends; on a loaded machine reruns take seconds), so it is typed again then."""
    caption = page.get_by_text(re.compile(r"^\d+ pairs \(.*\) · \d+ passes over batches of \d+"))
    n_pairs, now = map(int, re.search(r"^(\d+) pairs.*batches of (\d+)", caption.inner_text()).groups())
    for label, value, size in (("IG steps", steps, now), ("Batch size", batch, batch)):
        wanted = f"· {-(-n_pairs // size) * (2 + steps)} passes over batches of {size}"
        for attempt in range(3):
            set_number(page, label, value)
            try:
                expect(caption).to_contain_text(wanted, timeout=TIMEOUT_MS // 6)
                break
            except AssertionError:
                if attempt == 2:
                    raise


def run_to_the_end(page: Any, steps: int) -> None:
    """A short run on the Attribute page (Open Explore off): its scores' caption shows when it is done."""
    set_run_size(page, steps, 64)
    page.get_by_role("button", name="Run attribution").click()
    expect(page.get_by_text(re.compile(r"^done in \d+\.\d s$"))).to_be_visible()
    expect(page.get_by_text(re.compile(rf"^EAP-IG-inputs \({steps} steps\), logit_diff"))).to_be_visible()
    sidebar = page.get_by_test_id("stSidebar")  # redrawn after the page, so it already names these scores
    expect(sidebar.get_by_text(re.compile(rf"^Scores: EAP-IG-inputs \({steps} steps\)"))).to_be_visible()


def test_cancel_stops_attribution_and_a_second_run_completes(browser: Browser, shots: Path) -> None:
    """A long run (200 IG steps, batch 1) is stopped by Cancel: the page says so and keeps the scores of
    the run before; the next run then finishes (so the model lock was released)."""
    page = browser.page
    page.get_by_role("link", name="Attribute").first.click()
    page.get_by_text("Open Explore when done").click()  # stay on this page
    run_to_the_end(page, 2)

    set_run_size(page, 200, 1)
    page.get_by_role("button", name="Run attribution").click()
    cancel = page.get_by_role("button", name="Cancel")
    expect(page.get_by_text(re.compile(r"^\d+/\d+ passes · "))).to_be_visible()  # it runs
    page.screenshot(path=shots / "6_attribution_running.png")
    cancel.click()
    expect(page.get_by_text("Attribution cancelled; the previous scores are kept.")).to_be_visible()
    expect(cancel).to_have_count(0)
    expect(page.get_by_text(re.compile(r"^EAP-IG-inputs \(2 steps\), logit_diff"))).to_be_visible()  # still the old scores
    page.screenshot(path=shots / "7_attribution_cancelled.png")

    run_to_the_end(page, 3)
    expect(page.get_by_text("Attribution cancelled")).to_have_count(0)
    browser.assert_clean()


def test_a_second_session_waits_its_turn_and_sees_what_the_server_keeps(chromium, shots: Path) -> None:
    """Two sessions on one server. While the first runs a long attribution, the second's Attribute page says
    the model is busy; its own run waits with "Waiting for the model: position 1" and Cancel leaves the
    queue (its earlier scores kept). Once the first is cancelled too, the second's next run finishes, and
    its Model page lists the shared model and results with their sizes."""
    first, second = chromium(), chromium()
    for b in (first, second):
        b.page.get_by_role("link", name="Attribute").first.click()
        b.page.get_by_text("Open Explore when done").click()  # stay on this page
    run_to_the_end(second.page, 2)

    set_run_size(first.page, 200, 1)
    first.page.get_by_role("button", name="Run attribution").click()
    expect(first.page.get_by_text(re.compile(r"^\d+/\d+ passes · "))).to_be_visible()  # it holds the model

    page = second.page
    set_run_size(page, 3, 64)  # each change redraws the page, which now finds the model busy
    expect(page.get_by_text(re.compile(r"^The model is busy with another session's run"))).to_be_visible()
    page.get_by_role("button", name="Run attribution").click()
    expect(page.get_by_text("Waiting for the model: position 1 (other sessions' runs go first)")).to_be_visible()
    page.screenshot(path=shots / "8_waiting_for_the_model.png")
    page.get_by_role("button", name="Cancel").click()
    expect(page.get_by_text("Attribution cancelled; the previous scores are kept.")).to_be_visible()
    expect(page.get_by_text(re.compile(r"^EAP-IG-inputs \(2 steps\), logit_diff"))).to_be_visible()

    first.page.get_by_role("button", name="Cancel").click()
    expect(first.page.get_by_text("Attribution cancelled; no scores were changed.")).to_be_visible()
    run_to_the_end(page, 3)  # the queue is empty again: this run gets the model

    page.get_by_role("link", name="Model").first.click()
    page.get_by_text("Server memory: what is kept for all sessions").click()
    expect(page.get_by_text(re.compile(r"^cpu: cache \S+ \S+ of \S+ \S+; the server process uses"))).to_be_visible()
    table = page.get_by_test_id("stDataFrame")
    expect(table).to_be_visible()
    expect(table.locator("th")).to_have_text(["kind", "what", "size", "last used"])
    for kind in ("model", "data", "result"):  # the grid's accessible table holds the cells' text
        expect(table.locator("td").filter(has_text=re.compile(rf"^{kind}$")).first).to_be_attached()
    page.screenshot(path=shots / "9_server_memory.png")
    first.assert_clean()
    second.assert_clean()


def test_an_interrupted_attribution_leaves_the_shared_model_clean(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What Cancel does inside the server, without a browser: Streamlit stops the script by raising its
    RerunException from the progress bar update; the hooks are gone, the model lock is free, nothing is
    cached for the stopped run, and the same run afterwards gives the engine's scores exactly."""
    from streamlit.runtime.scriptrunner_utils.exceptions import RerunException
    from streamlit.runtime.scriptrunner_utils.script_requests import RerunData

    from ui import cache

    monkeypatch.setenv("EAPCORE_MODEL_ROOTS", str(tiny_dir))  # a folder the app may load
    spec = ModelSpec(str(tiny_dir), "cpu", "float32")
    pairs = PromptPairs.from_frame(pd.DataFrame(TOY))
    run = AttributionSpec(ig_steps=20, batch_size=2)

    def progress(done: int, total: int) -> None:
        if done == 7:  # inside the gradient passes of the second batch
            raise RerunException(RerunData())

    with pytest.raises(RerunException):
        cache.run_attribution(spec, pairs, run, progress)
    model = cache.get_model(spec)
    assert attached_hooks(model) == 0
    free: list[bool] = []

    def try_lock() -> None:
        lock = model_lock(model)
        free.append(lock.acquire(blocking=False))
        if free[-1]:
            lock.release()

    other = threading.Thread(target=try_lock)
    other.start()
    other.join()
    assert free == [True], "the model lock is still held after the interruption"
    assert cache.cached_attribution(spec, pairs, run) is None
    scores, _, timing = cache.run_attribution(spec, pairs, run)
    assert not timing.cached
    assert torch.equal(scores.edges, attribute(model, cache.get_data(spec, pairs), run).edges.cpu())


def test_typed_pairs_keep_every_quick_edit(browser: Browser, shots: Path) -> None:
    """Type into eight cells of the pairs editor in quick succession (a fast typist: 30 ms per key, the
    next cell a tenth of a second later): every edit arrives when the pairs are used, and all four
    columns are on screen at the default width. The editor sits in a form, so no rerun happens while
    typing. Two limits of Streamlit's grid remain, both faster than a person: it drops an edit whose
    Enter or Tab follows the last key within a few milliseconds (glide-data-grid's overlay editor), and
    it sends edits to the server 150 ms after the last one (a debounce), so a click on the button within
    150 ms of the last Enter would submit the table without that edit."""
    page = browser.page
    page.get_by_role("link", name="Data").first.click()
    page.get_by_text("Type pairs").click()
    grid = page.get_by_test_id("stDataFrame")
    expect(grid).to_be_visible()
    page.wait_for_timeout(500)
    box = grid.bounding_box()
    assert box["x"] + box["width"] <= page.viewport_size["width"]
    assert grid.locator("th").all_inner_texts() == ["clean", "corrupted", "correct", "incorrect"]
    scroll = grid.evaluate("g => [...g.querySelectorAll('.dvn-scroller')].map(s => [s.scrollWidth, s.clientWidth])")
    assert scroll and all(full <= shown + 1 for full, shown in scroll), scroll  # no column off to the side
    page.screenshot(path=shots / "8_typed_pairs.png")
    previews = page.get_by_text(re.compile(r"^correct .* · incorrect "))
    before = [previews.nth(i).inner_text() for i in range(4)]
    swapped = []
    for text in before:  # swap each pair's answers: valid tokens for any model the data was written for
        correct, incorrect = re.match(r"^correct (.*) · incorrect (.*)$", text).groups()
        swapped.append((incorrect, correct))
    page.mouse.click(box["x"] + 60, box["y"] + 35 + 17)  # row 1, first column
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")  # row 1, correct
    for correct, incorrect in swapped:
        page.keyboard.type(correct, delay=30)
        page.wait_for_timeout(40)
        page.keyboard.press("Tab")
        page.wait_for_timeout(100)
        page.keyboard.type(incorrect, delay=30)
        page.wait_for_timeout(40)
        page.keyboard.press("Enter")  # commits, and moves down a row
        page.wait_for_timeout(100)
        page.keyboard.press("ArrowLeft")  # back to the correct column
    page.wait_for_timeout(300)  # past the grid's 150 ms debounce (a person moving to the button takes longer)
    page.get_by_role("button", name="Use these pairs").click()
    expect(page.get_by_text(re.compile(r"^Data: typed pairs \(\d+ pairs\)"))).to_be_visible()
    after = [previews.nth(i).inner_text() for i in range(4)]
    assert after == [f"correct {c} · incorrect {i}" for c, i in swapped], (before, after)
    browser.assert_clean()


def graph_geometry(page: Any) -> dict:
    """From inside the graph's iframe: the canvas size, the view's scale and each node's place on screen."""
    frame = page.frame_locator('iframe[title="circuit graph"]')
    frame.locator("canvas").first.wait_for(state="visible")
    handle = page.locator('iframe[title="circuit graph"]').element_handle().content_frame()
    return handle.evaluate("""() => {
        const box = document.getElementById('mynetwork');
        const at = Object.entries(network.getPositions()).map(([id, p]) => [id, network.canvasToDOM(p)]);
        return {width: box.clientWidth, height: box.clientHeight, scale: network.getScale(), nodes: at,
                colours: edges.get().map(e => e.color)};
    }""")


@pytest.mark.parametrize("width, scheme", [(390, "light"), (1440, "dark")], ids=["phone", "dark"])
def test_graph_fits_a_phone_and_follows_a_dark_theme(chromium, shots: Path, width: int, scheme: str) -> None:
    """On a 390-px-wide phone every node of the graph is on screen with labels of at least 10 px; in a
    browser that prefers dark, the app is dark and the graph draws its edges in the dark theme's colours."""
    from ui.layout import EDGE_COLOURS

    browser = chromium(width, 1000, scheme)
    page = browser.page
    if width < 640:  # a phone: the sidebar opens over the page, and is closed again after choosing
        page.get_by_test_id("stExpandSidebarButton").click()
    page.get_by_role("link", name="Attribute").first.click()
    expect(page.get_by_role("button", name="Run attribution")).to_be_visible()
    if width < 640:
        page.get_by_test_id("stSidebarCollapseButton").click()
    page.get_by_role("button", name="Run attribution").click()
    expect(page.get_by_text("CPR (area under f)").first).to_be_visible()
    page.get_by_role("spinbutton", name="Exact count", exact=True).fill("30")  # a rerun: the theme is known by now
    page.get_by_role("spinbutton", name="Exact count", exact=True).press("Enter")
    expect(page.get_by_test_id("stMetric").filter(has_text="Faithfulness").first).to_be_visible()
    page.wait_for_timeout(1500)
    geometry = graph_geometry(page)
    page.locator('iframe[title="circuit graph"]').scroll_into_view_if_needed()
    page.screenshot(path=shots / f"9_graph_{scheme}_{width}.png")
    assert geometry["width"] <= width and 18 * geometry["scale"] >= 10, geometry["scale"]
    for name, p in geometry["nodes"]:
        assert 0 <= p["x"] <= geometry["width"] and 0 <= p["y"] <= geometry["height"], (name, p, geometry["width"])
    background = page.evaluate("getComputedStyle(document.querySelector('[data-testid=stApp]')).backgroundColor")
    dark = sum(map(int, re.findall(r"\d+", background)[:3])) < 3 * 96
    assert dark == (scheme == "dark"), background
    assert set(geometry["colours"]) <= set(EDGE_COLOURS[scheme].values()), geometry["colours"]
    browser.assert_clean()
