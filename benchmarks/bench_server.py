"""The explorer as a shared server under load: a real `streamlit run app.py` with several browser sessions.

    python benchmarks/bench_server.py --sessions 6 --moves 500

Starts the app (``ui/server.py``) on the demo model and the first ``--pairs`` IOI pairs and opens
``--sessions`` headless Chromium sessions; each runs the default attribution (the first computes it,
the others find it cached) and lands on Explore. Then, one move at a time, round robin over the
sessions, each a slider move (one arrow key) timed to the updated faithfulness:

1. **idle**: ``--probe`` moves while nothing else runs;
2. **busy**: session 1 starts an attribution of ``--busy-steps`` IG steps (not cached) and the other
   sessions move their sliders until it is done (at most ``--probe`` moves);
3. **soak**: ``--moves`` moves over all sessions, the server's resident memory (RSS) read before and after.

A move that leaves the faithfulness unchanged (two sizes that prune to the same circuit) is not timed.
Errors are exceptions or error boxes on any page, JavaScript errors, moves whose page did not answer,
and tracebacks in the server's log. The last line printed is one JSON object: ``sessions``, ``moves``,
``p50_idle_ms``, ``p95_idle_ms``, ``p95_busy_ms``, ``errors``, ``rss_growth_mib`` (after the soak minus
before it), with the counts behind them. Needs Playwright and a Chromium (``--chromium``).
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
FLIP = 12  # moves in one direction before the slider turns back
IDLE = """() => document.querySelector('[data-testid="stApp"]').getAttribute('data-test-script-state') === 'notRunning'"""
# True once the faithfulness on the page shows a number other than ``before``.
CHANGED = """(before) => {
  const metric = [...document.querySelectorAll('[data-testid="stMetric"]')].find(m => m.innerText.includes('Faithfulness'));
  const value = metric && metric.querySelector('[data-testid="stMetricValue"]');
  const text = value ? value.innerText.trim() : null;
  return Boolean(text && text !== before && /^-?\\d+\\.\\d{4}$/.test(text));
}"""
TIMEOUT_MS = 180_000
ANSWER_S = 60  # a move not answered within this is an error
# What a page shows when a move went unanswered: its script state, the slider's value and focus,
# Streamlit's connection status (if shown) and the page's path.
STATE = """() => {
  const app = document.querySelector('[data-testid="stApp"]');
  const slider = document.querySelector('[data-testid="stSlider"] input[type="range"]');
  const status = document.querySelector('[data-testid="stStatusWidget"]');
  return {script: app && app.getAttribute('data-test-script-state'), slider: slider && slider.value,
          focused: document.activeElement === slider,
          status: status ? status.innerText.trim().slice(0, 80) : null, path: location.pathname};
}"""


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise OSError(f"no VmRSS for process {pid}")


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-quantile (0..1) of ``values``, linear between ranks; None when there are none."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


class Session:
    """One browser session on the app and the slider moves made on it.

    A move is answered when the page shows a new faithfulness, or when the server says the script run
    that the move asked for has finished (``script_finished`` on the page's websocket after the page sent
    ``rerun_script``): the page's own script state can go from one finished run to the next without a
    change that the page would show, when the browser draws both messages at once."""

    def __init__(self, browser: Any, url: str, errors: list[str], number: int) -> None:
        from playwright.sync_api import expect

        self.number = number
        self.page = browser.new_context(viewport={"width": 1440, "height": 1000}).new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.errors, self.moves, self.pressed = errors, 0, {}
        self.reruns = self.finished = self.finished_at_rerun = 0  # messages on the page's websocket
        self.page.on("pageerror", lambda e: errors.append(f"javascript: {e}"))
        self.page.on("websocket", self._watch)
        self.page.goto(url)
        expect(self.page.get_by_text("Data ready")).to_be_visible()

    def _watch(self, ws: Any) -> None:
        """Count the reruns the page asks for and the script runs the server finishes."""
        from streamlit.proto.BackMsg_pb2 import BackMsg
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        def sent(payload: bytes | str) -> None:
            if isinstance(payload, bytes) and BackMsg.FromString(payload).WhichOneof("type") == "rerun_script":
                self.reruns += 1
                self.finished_at_rerun = self.finished

        def received(payload: bytes | str) -> None:
            if isinstance(payload, bytes):
                msg = ForwardMsg.FromString(payload)
                if msg.WhichOneof("type") == "script_finished" and msg.script_finished == ForwardMsg.FINISHED_SUCCESSFULLY:
                    self.finished += 1

        if ws.url.endswith("/_stcore/stream"):
            ws.on("framesent", sent)
            ws.on("framereceived", received)

    @property
    def faithfulness(self) -> Any:
        return self.page.get_by_test_id("stMetric").filter(has_text="Faithfulness").get_by_test_id("stMetricValue").first

    def attribute(self, steps: int | None = None) -> None:
        """Start an attribution on the Attribute page (``steps``: IG steps, else the default); it stays there."""
        from playwright.sync_api import expect

        page = self.page
        page.get_by_role("link", name="Attribute").first.click()
        run = page.get_by_role("button", name="Run attribution")
        expect(run).to_be_enabled()
        if steps is not None:
            box = page.get_by_role("spinbutton", name="IG steps")
            box.fill(str(steps))
            box.press("Enter")
            expect(box).to_have_value(str(steps))
            page.wait_for_timeout(500)  # the rerun that takes the new value
        explore = page.get_by_text("Open Explore when done")
        if page.get_by_role("checkbox", name="Open Explore when done").is_checked():
            explore.click()
            page.wait_for_timeout(300)
        run.click()

    def done(self) -> bool:
        """Whether the attribution started here has finished."""
        return self.page.get_by_text(re.compile(r"done in [0-9.]+ s|cached result")).count() > 0

    def explore(self) -> None:
        """Open Explore and wait for its faithfulness and curve."""
        from playwright.sync_api import expect

        expect(self.page.get_by_text(re.compile(r"done in [0-9.]+ s|cached result")).first).to_be_visible()
        self.page.get_by_role("link", name="Explore").first.click()
        expect(self.page.get_by_text("CPR (area under f)").first).to_be_visible()
        expect(self.faithfulness).to_have_text(NUMBER)

    def move(self, settle_ms: int) -> float | None:
        """One arrow key on the slider (turning back at either end): seconds to the updated faithfulness;
        None when the script run ended with the faithfulness unchanged (the same circuit after pruning)."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        page = self.page
        page.wait_for_function(IDLE, timeout=60_000)  # the page's previous run (graph, curve) has ended
        slider = page.get_by_role("slider").first
        slider.focus()  # after that run: a run that redraws the slider takes the focus away from it
        before, reruns = self.faithfulness.inner_text().strip(), self.reruns
        position = slider.input_value()
        for _ in range(2):
            key = "ArrowRight" if (self.moves // FLIP) % 2 == 0 else "ArrowLeft"
            start = time.perf_counter()
            page.keyboard.press(key)
            self.moves += 1
            if slider.input_value() != position:
                break
            self.moves = (self.moves // FLIP + 1) * FLIP  # at an end: turn back
        self.pressed = {"key": key, "slider": [position, slider.input_value()]}
        outcome = None
        while outcome is None:
            try:  # in slices, so that the websocket's messages are taken in between
                page.wait_for_function(CHANGED, arg=before, timeout=100, polling=5)
                outcome = "changed"
            except PlaywrightTimeout:
                if self.reruns > reruns and self.finished > self.finished_at_rerun:
                    outcome = "done"  # the run ended; the page may still be drawing the new number
                elif time.perf_counter() - start > ANSWER_S:
                    sent = "sent" if self.reruns > reruns else "never sent"
                    raise TimeoutError(f"no answer within {ANSWER_S} s (the page's rerun request: {sent})") from None
        if outcome == "done":
            try:
                page.wait_for_function(CHANGED, arg=before, timeout=1_500, polling=5)
                outcome = "changed"
            except PlaywrightTimeout:
                pass
        seconds = time.perf_counter() - start if outcome == "changed" else None
        page.wait_for_timeout(settle_ms)
        return seconds

    def check(self) -> None:
        """Record error boxes and exceptions now on the page."""
        for test_id in ("stException", "stAlertContentError"):
            for text in self.page.get_by_test_id(test_id).all_inner_texts():
                self.errors.append(f"{test_id}: {text.strip()[:300]}")

    def state(self) -> dict[str, Any]:
        """What the page shows now (:data:`STATE`) and the last key press (its key, the slider before and
        after it), for an error message."""
        try:
            return {**self.page.evaluate(STATE), "pressed": self.pressed}
        except Exception as e:  # noqa: BLE001 - a page that cannot say is itself the finding
            return {"unreadable": f"{type(e).__name__}: {str(e)[:100]}"}


def say(message: str) -> None:
    """Progress on stderr (stdout ends with the JSON record)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def moves_over(phase: str, sessions: list[Session], n: int, args: argparse.Namespace, errors: list[str],
               until: Any = None) -> list[float]:
    """``n`` moves round robin over ``sessions`` (stopping early when ``until()`` is true, or once the run
    has ``args.max_errors`` errors); the timed ones."""
    times, start = [], time.perf_counter()
    for i in range(n):
        if (until is not None and until()) or len(errors) >= args.max_errors:
            break
        session = sessions[i % len(sessions)]
        try:
            t = session.move(args.settle_ms)
        except Exception as e:  # noqa: BLE001 - a page that does not answer is an error, and the run goes on
            errors.append(f"{phase} move {i} (session {session.number}): {type(e).__name__}: {str(e)[:160]} "
                          f"page: {session.state()}")
            say(errors[-1])
            continue
        if t is not None:
            times.append(t)
    say(f"{phase}: {i + 1} moves, {len(times)} timed, in {time.perf_counter() - start:.0f} s; {len(errors)} errors so far")
    return times


def drive(url: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox", "--disable-gpu"])
        sessions = [Session(browser, url, errors, i + 1) for i in range(args.sessions)]
        for s in sessions:
            s.attribute()  # the first computes the default run, the others find it cached
            s.explore()
        say(f"{len(sessions)} sessions on Explore")
        idle = moves_over("idle", sessions, args.probe, args, errors)
        worker, others = sessions[0], sessions[1:]
        start = time.perf_counter()
        worker.attribute(args.busy_steps)
        busy = moves_over("busy", others, args.probe, args, errors, until=worker.done)
        worker.explore()
        attribution_s = time.perf_counter() - start
        say(f"session 1's attribution done in {attribution_s:.0f} s")
        for s in sessions:
            s.check()
        rss_before = rss_mib(pid)
        soak = moves_over("soak", sessions, args.moves, args, errors)
        rss_after = rss_mib(pid)
        for s in sessions:
            s.check()
        browser.close()
    return {"idle": idle, "busy": busy, "soak": soak, "attribution_s": attribution_s, "errors": errors,
            "rss_before": rss_before, "rss_after": rss_after}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=6, help="browser sessions (at least 2)")
    p.add_argument("--moves", type=int, default=500, help="slider moves of the soak")
    p.add_argument("--probe", type=int, default=60, help="timed moves while idle, and at most as many while busy")
    p.add_argument("--busy-steps", type=int, default=40, help="IG steps of the attribution that runs during the busy moves")
    p.add_argument("--settle-ms", type=int, default=150, help="pause after each move before the next key press")
    p.add_argument("--max-errors", type=int, default=10, help="stop moving once the run has this many errors")
    common.add_app_arguments(p, pairs=256)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.sessions < 2:
        raise SystemExit("--sessions must be at least 2: one attributes while the others move")
    with tempfile.TemporaryDirectory() as tmp:
        csv = common.first_ioi_pairs(args.pairs, Path(tmp))
        log = Path(tmp) / "streamlit.log"
        proc, url = server.start({"EAPCORE_APP_MODEL": args.model, "EAPCORE_APP_DATA": str(csv)}, log)
        try:
            run = drive(url, proc.pid, args)
        finally:
            server.stop(proc)
        tracebacks = log.read_text().count("Traceback")
    errors = run["errors"] + [f"{tracebacks} traceback(s) in the server log"] * bool(tracebacks)
    ms = lambda v: None if v is None else round(1000 * v, 1)  # noqa: E731
    record = {
        "sessions": args.sessions, "moves": args.moves,
        "p50_idle_ms": ms(percentile(run["idle"], 0.5)), "p95_idle_ms": ms(percentile(run["idle"], 0.95)),
        "p95_busy_ms": ms(percentile(run["busy"], 0.95)), "errors": len(errors),
        "rss_growth_mib": round(run["rss_after"] - run["rss_before"], 1),
        "p50_busy_ms": ms(percentile(run["busy"], 0.5)), "p95_soak_ms": ms(percentile(run["soak"], 0.95)),
        "timed": {"idle": len(run["idle"]), "busy": len(run["busy"]), "soak": len(run["soak"])},
        "idle_ms": [ms(t) for t in run["idle"]], "busy_ms": [ms(t) for t in run["busy"]],
        "busy_attribution_s": round(run["attribution_s"], 1), "rss_mib": [round(run["rss_before"]), round(run["rss_after"])],
        "model": args.model, "pairs": args.pairs, "machine": common.machine("cpu"), "error_messages": errors[:10],
    }
    print(f"{args.sessions} sessions: slider move p50/p95 idle {record['p50_idle_ms']}/{record['p95_idle_ms']} ms, "
          f"p95 while another session attributes {record['p95_busy_ms']} ms; {args.moves} moves of soak: "
          f"RSS {record['rss_growth_mib']:+} MiB; {len(errors)} errors")
    common.emit(record)
    return record


if __name__ == "__main__":
    main()
