"""ui.background: a session's long computation in a worker thread at a lower CPU priority.

Ground truths: the kernel's own record of each thread's priority (``os.getpriority``), the identity of the
thread each callback runs in, the order the worker reported in, and the worker's own record that it
stopped before the caller went on. The app's run through it (Cancel releasing the model's hooks and turn,
scores equal to a lone run) is tested in tests/test_browser.py and tests/test_server.py.
"""

from __future__ import annotations

import os
import sys
import threading

import pytest

from eapcore.attribute import Cancelled
from ui import background


def _priority() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's")
def test_the_worker_runs_at_a_lower_priority_and_reports_in_order_in_the_calling_thread() -> None:
    caller, seen = threading.get_ident(), []

    def fn(progress, waiting) -> str:
        seen.append(("worker", threading.get_ident() != caller, _priority()))
        waiting(2)
        waiting(1)
        for i in range(1, 4):
            progress(i, 3)
        return "value"

    def progress(done: int, total: int) -> None:
        seen.append(("progress", threading.get_ident() == caller, done))

    def waiting(position: int) -> None:
        seen.append(("waiting", threading.get_ident() == caller, position))

    before = _priority()
    assert background.run(fn, progress, waiting) == "value"
    assert _priority() == before  # the calling thread keeps its priority
    expected = min(19, before + background.NICE)
    assert seen == [("worker", True, expected), ("waiting", True, 2), ("waiting", True, 1),
                    ("progress", True, 1), ("progress", True, 2), ("progress", True, 3)]


def test_an_exception_in_the_worker_reaches_the_caller() -> None:
    error = ValueError("no such metric 'x'")

    def fn(progress, waiting) -> None:
        progress(1, 2)
        raise error

    with pytest.raises(ValueError) as caught:
        background.run(fn)  # no callbacks: reports are dropped
    assert caught.value is error


def test_a_stop_in_the_calling_thread_stops_the_worker_before_it_returns() -> None:
    """A callback raising (Streamlit stopping the script) cancels the worker at its next report; run raises
    the callback's exception only once the worker has left ``fn`` (its ``finally`` ran)."""
    worker: dict[str, object] = {}
    release = threading.Event()

    class Stop(BaseException):
        """What Streamlit raises in the script thread."""

    def fn(progress, waiting) -> None:
        try:
            progress(1, 100)
            release.wait(10)  # the caller has raised by now; the next report must stop the worker
            for i in range(2, 101):
                progress(i, 100)
            worker["finished"] = True
        except Cancelled:
            worker["cancelled"] = True
            raise
        finally:
            worker["left"] = True

    def progress(done: int, total: int) -> None:
        release.set()
        raise Stop

    with pytest.raises(Stop):
        background.run(fn, progress)
    assert worker == {"cancelled": True, "left": True}
