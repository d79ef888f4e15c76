"""The trust checks in a real browser: `streamlit run app.py` (demo model, IOI task) driven by Playwright
through Debian's headless Chromium. Two runs are compared on the Compare page; Explore's Verify, Per prompt
and Robustness panels are opened and run, and a long Verify is cancelled; the Export page writes an MIB
submission, whose downloaded zip passes eapcore.mib.check_submission. Screenshots go to
$EAPCORE_SCREENSHOTS or a temporary folder. With CI=true a missing Chromium or Playwright is a failure.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from eapcore.mib import check_submission
from eapcore.models import DEMO_MODEL_DIR
from eapcore.tasks import TASKS
from ui import server as app_server

from conftest import CHROMIUM, TOY, require

pytestmark = [pytest.mark.browser, pytest.mark.slow]

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # reported by the page fixture (a failure under CI=true)
    expect = sync_playwright = None

TIMEOUT_MS = 180_000


@pytest.fixture
def page(tmp_path: Path):
    """A Chromium page on a fresh server (the tiny model and toy pairs when the demo is missing), with the
    default model and data loaded; afterwards, no request left 127.0.0.1 and the server logged no traceback."""
    require(Path(CHROMIUM).exists(), f"Chromium not found at {CHROMIUM}")
    require(sync_playwright is not None, "the playwright package is not installed")
    env = {}
    if not ((DEMO_MODEL_DIR / "config.json").exists() and TASKS["ioi"].csv.exists()):
        from conftest import save_tiny_gpt2

        env["EAPCORE_APP_MODEL"] = str(save_tiny_gpt2(tmp_path / "tiny"))
        pd.DataFrame(TOY).to_csv(tmp_path / "toy.csv", index=False)
        env["EAPCORE_APP_DATA"] = str(tmp_path / "toy.csv")
    expect.set_options(timeout=TIMEOUT_MS)
    log, outside = tmp_path / "streamlit.log", []
    with app_server.running(env, log) as url, sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"], headless=True)
        try:
            tab = chromium.new_context(viewport={"width": 1440, "height": 1100}, accept_downloads=True).new_page()
            tab.set_default_timeout(TIMEOUT_MS)
            tab.on("request", lambda r: None if r.url.startswith(("http://127.0.0.1", "data:", "blob:", "about:"))
                   else outside.append(r.url))
            tab.goto(url)
            expect(tab.get_by_text("Data ready")).to_be_visible()
            yield tab
        finally:
            chromium.close()
    assert outside == [], f"the app fetched resources from outside: {outside}"
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("EAPCORE_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def go(page: Any, name: str) -> None:
    page.get_by_test_id("stSidebarNav").get_by_role("link", name=name, exact=True).click()


def choose(page: Any, label: str, option: str) -> None:
    page.get_by_test_id("stSelectbox").filter(has_text=label).first.click()
    page.get_by_role("option", name=option, exact=True).click()


def set_number(page: Any, label: str, value: int) -> None:
    box = page.get_by_role("spinbutton", name=label, exact=True)
    box.fill(str(value))
    box.press("Enter")


def metric(page: Any, label: str) -> Any:
    return page.get_by_test_id("stMetric").filter(has_text=label).get_by_test_id("stMetricValue").first


def attribute(page: Any, method: str) -> None:
    """One run of ``method`` on the Attribute page (Open Explore off); its scores' caption shows when done."""
    choose(page, "Method", method)
    page.wait_for_timeout(500)
    page.get_by_role("button", name="Run attribution").click()
    expect(page.get_by_test_id("stSidebar").get_by_text(re.compile(rf"^Scores: {re.escape(method)}[ ,]"))).to_be_visible()


def test_compare_the_explore_panels_and_an_mib_submission(page: Any, shots: Path, tmp_path: Path) -> None:
    go(page, "Attribute")
    page.get_by_text("Open Explore when done").click()
    attribute(page, "EAP")
    attribute(page, "EAP-IG-inputs")

    go(page, "Compare")
    page.get_by_role("button", name="Compare", exact=True).click()
    expect(page.get_by_text("Faithfulness curves", exact=True)).to_be_visible()
    expect(page.get_by_text("Overlap of the circuits at 5%")).to_be_visible()
    expect(metric(page, "Spearman ρ (all edges)")).to_have_text(re.compile(r"^-?[01]\.\d{3}$"))
    expect(page.get_by_text("Top disagreements")).to_be_visible()
    page.screenshot(path=shots / "trust_1_compare.png")

    go(page, "Explore")
    expect(page.get_by_text("CPR (area under f)").first).to_be_visible()
    page.get_by_text("Verify: estimates against exact patching").click()
    set_number(page, "Top-k edges", 20)
    page.get_by_role("button", name="Verify", exact=True).click()
    expect(metric(page, "Pearson r")).to_have_text(re.compile(r"^-?[01]\.\d{3}$"))
    expect(page.get_by_text("The worst-estimated edges")).to_be_visible()
    page.screenshot(path=shots / "trust_2_verify.png")

    set_number(page, "Top-k edges", 100_000)  # every edge: long enough to cancel
    page.get_by_role("button", name="Verify", exact=True).click()
    expect(page.get_by_text(re.compile(r"^Verify: \d+ of \d+ evaluations"))).to_be_visible()
    page.get_by_role("button", name="Cancel").click()
    expect(page.get_by_text("Verify cancelled; what it finished is kept")).to_be_visible()
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0)

    page.get_by_text("Per prompt: each pair's faithfulness").click()
    expect(metric(page, "95% interval")).to_have_text(re.compile(r"^-?\d\.\d{3} – -?\d\.\d{3}$"))
    set_number(page, "Pair to show", 2)
    expect(page.get_by_text("pair 2", exact=True)).to_be_visible()
    expect(metric(page, "pair 2: faithfulness")).to_be_visible()

    page.get_by_text("Robustness: every intervention").click()
    page.get_by_role("button", name="Run every intervention").click()
    expect(page.get_by_text("patching (this run's)")).to_be_attached()  # a cell of the table (drawn on a canvas)
    page.screenshot(path=shots / "trust_3_panels.png")

    go(page, "Export")
    expect(page.get_by_text("Submit to MIB")).to_be_visible()
    choose(page, "MIB task", "ioi")  # suggested for the IOI task; chosen for other data
    page.get_by_role("button", name="Write the submission").click()
    expect(page.get_by_text(re.compile("Passes MIB's format check"))).to_be_visible()
    with page.expect_download() as started:
        page.get_by_role("button", name="MIB submission (.zip)").click()
    target = tmp_path / started.value.suggested_filename
    started.value.save_as(target)
    with zipfile.ZipFile(target) as zf:
        zf.extractall(tmp_path / "unzipped")
    report = check_submission(tmp_path / "unzipped" / "mib_submission")
    assert report.ok and len(report.folders) == 1 and next(iter(report.folders)).startswith("ioi_"), report.lines()
    page.screenshot(path=shots / "trust_4_mib.png")
