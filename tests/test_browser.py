"""The explorer in a real browser: `streamlit run app.py` on 127.0.0.1 driven by Playwright through
Debian's headless Chromium (no browser download). Loads the default model, runs the attribution, moves
the slider with the keyboard, waits for the faithfulness to change and for the pyvis canvas, and saves
screenshots (to $EAPCORE_SCREENSHOTS or a temporary folder).

With CI=true a missing Chromium or Playwright is a failure, not a skip.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from eapcore.models import DEMO_MODEL_DIR
from eapcore.tasks import TASKS

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TIMEOUT_MS = 180_000


def _require(ok: bool, why: str) -> None:
    if not ok:
        if IN_CI:
            pytest.fail(f"{why} (CI=true: the browser test must run; .ci/run installs Debian's chromium)")
        pytest.skip(why)


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
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import save_tiny_gpt2
        from test_app import TOY

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


def test_browser_flow(server, shots: Path) -> None:
    _require(Path(CHROMIUM).exists(), f"Chromium not found at {CHROMIUM}")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        _require(False, "the playwright package is not installed")
    expect.set_options(timeout=TIMEOUT_MS)
    url, log = server
    outside: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(("http://127.0.0.1", "data:", "blob:", "about:")) else None)

            page.goto(url)
            expect(page.get_by_text("graph edges")).to_be_visible()  # the default model loaded
            expect(page.get_by_text("Data ready")).to_be_visible()  # and the default task
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
            box = page.get_by_label("Exact count")
            box.fill(str(max(8, total // 12)))  # the number box, for an exact size
            box.press("Enter")
            expect(faith).not_to_have_text(re.compile(r"^\s*-?0\.0000\s*$"))
            frame.locator("canvas").first.wait_for(state="visible")
            expect(page.get_by_text("CPR (area under f)").first).to_be_visible()
            page.wait_for_timeout(500)  # let the iframe draw before the picture (the test waited on selectors)
            page.screenshot(path=shots / "4_explore_slider.png")

            page.get_by_role("link", name="Export").first.click()
            expect(page.get_by_role("button", name=".pt (EAP-IG)")).to_be_visible()
            page.screenshot(path=shots / "5_export.png")
        finally:
            browser.close()
    print(f"\nscreenshots in {shots}; Run attribution -> graph canvas {to_graph:.2f} s; "
          f"slider End -> faithfulness {to_faith:.2f} s")
    assert outside == [], f"the app fetched resources from outside: {outside}"
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
