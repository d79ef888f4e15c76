"""The explorer in a real browser: `streamlit run app.py` on 127.0.0.1 driven by Playwright through
Debian's headless Chromium (no browser download). Loads the default model, runs the attribution, moves
the slider with the keyboard, waits for the faithfulness to change and for the pyvis canvas, and saves
screenshots (to $EAPCORE_SCREENSHOTS or a temporary folder). A second test cancels a long attribution
with the Cancel button and then runs one to the end; a third checks, without a browser, what that
interruption leaves behind on the shared model.

With CI=true a missing Chromium or Playwright is a failure, not a skip.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from eapcore.attribute import AttributionSpec, attribute
from eapcore.data import PromptPairs
from eapcore.models import DEMO_MODEL_DIR, ModelSpec, model_lock
from eapcore.tasks import TASKS

from conftest import CHROMIUM, TOY, attached_hooks, require

pytestmark = [pytest.mark.browser, pytest.mark.slow]

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # reported by the browser fixture (a failure under CI=true)
    expect = sync_playwright = None

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
TIMEOUT_MS = 180_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"streamlit exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"streamlit did not become healthy in {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def server(tmp_path: Path):
    """`streamlit run app.py` on a free port of 127.0.0.1; killed at the end."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EAPCORE_APP_DEVICE": "cpu", "PYTHONPATH": str(ROOT)}
    if not ((DEMO_MODEL_DIR / "config.json").exists() and TASKS["ioi"].csv.exists()):
        from conftest import save_tiny_gpt2

        env["EAPCORE_APP_MODEL"] = str(save_tiny_gpt2(tmp_path / "tiny"))
        pd.DataFrame(TOY).to_csv(tmp_path / "toy.csv", index=False)
        env["EAPCORE_APP_DATA"] = str(tmp_path / "toy.csv")
    port = _free_port()
    log = tmp_path / "streamlit.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
             "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("EAPCORE_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class Browser:
    """A Chromium page on the app's server; ``outside`` collects requests that left 127.0.0.1."""

    page: Any
    url: str
    log: Path
    outside: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        assert self.outside == [], f"the app fetched resources from outside: {self.outside}"
        assert "Traceback" not in self.log.read_text(), self.log.read_text()[-3000:]


@pytest.fixture
def browser(server):
    require(Path(CHROMIUM).exists(), f"Chromium not found at {CHROMIUM}")
    require(sync_playwright is not None, "the playwright package is not installed")
    expect.set_options(timeout=TIMEOUT_MS)
    url, log = server
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = chromium.new_page(viewport={"width": 1440, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            b = Browser(page, url, log)
            page.on("request", lambda r: b.outside.append(r.url) if not r.url.startswith(("http://127.0.0.1", "data:", "blob:", "about:")) else None)
            page.goto(url)
            expect(page.get_by_text("graph edges")).to_be_visible()  # the default model loaded
            expect(page.get_by_text("Data ready")).to_be_visible()  # and the default task
            yield b
        finally:
            chromium.close()


def test_browser_flow(browser: Browser, shots: Path) -> None:
    page = browser.page
    page.screenshot(path=shots / "1_model.png")

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

    page.get_by_role("link", name="Export").first.click()
    expect(page.get_by_role("button", name=".pt (EAP-IG)")).to_be_visible()
    page.screenshot(path=shots / "5_export.png")
    print(f"\nscreenshots in {shots}; Run attribution -> graph canvas {to_graph:.2f} s; "
          f"slider End -> faithfulness {to_faith:.2f} s")
    browser.assert_clean()


def set_number(page: Any, label: str, value: int) -> None:
    box = page.get_by_role("spinbutton", name=label, exact=True)
    box.fill(str(value))
    box.press("Enter")


def set_run_size(page: Any, steps: int, batch: int) -> None:
    """Set IG steps, then the batch size, each time waiting until the page's caption counts the new value
    (typing into the second box while the first one's rerun is in flight can lose the value)."""
    caption = page.get_by_text(re.compile(r"^\d+ pairs \(.*\) · \d+ passes over batches of \d+"))
    n_pairs, now = map(int, re.search(r"^(\d+) pairs.*batches of (\d+)", caption.inner_text()).groups())
    for label, value, size in (("IG steps", steps, now), ("Batch size", batch, batch)):
        set_number(page, label, value)
        expect(caption).to_contain_text(f"· {-(-n_pairs // size) * (2 + steps)} passes over batches of {size}")


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


def test_an_interrupted_attribution_leaves_the_shared_model_clean(tiny_dir: Path) -> None:
    """What Cancel does inside the server, without a browser: Streamlit stops the script by raising its
    RerunException from the progress bar update; the hooks are gone, the model lock is free, nothing is
    cached for the stopped run, and the same run afterwards gives the engine's scores exactly."""
    from streamlit.runtime.scriptrunner_utils.exceptions import RerunException
    from streamlit.runtime.scriptrunner_utils.script_requests import RerunData

    from ui import cache

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
