"""A session's long computation in a worker thread at a lower CPU priority.

Streamlit runs each session's script in its own thread, so an attribution run there competes for the CPU
on equal terms with every other session's slider moves: on a busy CPU a move then takes several times
longer. :func:`run` computes in a fresh thread whose priority is lowered (Linux: ``nice`` +10, or
``EAPCORE_BACKGROUND_NICE``; a thread cannot raise its priority back without privileges, hence one thread
per run), so the interactive work goes first and the computation takes what is left. The calling thread
relays every progress and waiting report in order: the Streamlit calls in those callbacks are where
Streamlit stops a run (Cancel, another widget). When the calling thread is stopped, the worker is told
to stop at its next report and is waited for, so the model's turn and hooks are released on return.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from typing import Any, Callable, TypeVar

from eapcore.attribute import Cancelled

ENV_NICE = "EAPCORE_BACKGROUND_NICE"
NICE = 10
T = TypeVar("T")
Progress = Callable[[int, int], None]
Waiting = Callable[[int], None]


def lower_priority() -> None:
    """Lower this thread's CPU priority (Linux: per thread); elsewhere, or when not allowed, nothing."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), int(os.environ.get(ENV_NICE, NICE)))
        except (OSError, ValueError):
            pass


def run(fn: Callable[[Progress, Waiting], T], progress: Progress | None = None, waiting: Waiting | None = None) -> T:
    """``fn(progress, waiting)`` in a worker thread at a lower priority; ``progress(done, total)`` and
    ``waiting(position)`` are called in this thread, in the order the worker reported. An exception of
    ``fn`` is raised here; one raised here (by a callback, or Streamlit stopping the run) stops the worker
    at its next report (:class:`~eapcore.attribute.Cancelled`) and is raised once it has stopped."""
    reports: queue.SimpleQueue = queue.SimpleQueue()
    cancel = threading.Event()
    out: dict[str, Any] = {}

    def report(kind: str) -> Callable[..., None]:
        def put(*values: int) -> None:
            if cancel.is_set():
                raise Cancelled("stopped by the session")
            reports.put((kind, values))
        return put

    def work() -> None:
        lower_priority()
        try:
            out["value"] = fn(report("progress"), report("waiting"))
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread
            out["error"] = e
        finally:
            reports.put(None)

    worker = threading.Thread(target=work, name="eapcore-background", daemon=True)
    worker.start()
    relay = {"progress": progress, "waiting": waiting}
    try:
        while (item := reports.get()) is not None:
            kind, values = item
            if relay[kind] is not None:
                relay[kind](*values)
    except BaseException:
        cancel.set()
        worker.join()
        raise
    worker.join()
    if "error" in out:
        raise out["error"]
    return out["value"]
