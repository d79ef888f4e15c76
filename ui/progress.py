"""Long work on a page: a progress bar with the time so far, a Cancel button, and the session's running
mark (:func:`ui.state.interruptible`), as the Attribute page runs an attribution."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

import streamlit as st

from ui import cache, state

Progress = Callable[[int, int], None]


@contextlib.contextmanager
def cancellable(what: str, key: str, counts: str = "circuits", cancel_slot: Any = None) -> Iterator[Progress]:
    """``with cancellable("Verify", "verify") as progress:`` run ``what`` with ``progress(done, total)`` as
    its callback (``counts`` names what ``total`` counts). Cancel goes in ``cancel_slot`` (an ``st.empty``,
    e.g. beside the button that started the work), else below the bar; a click stops the work at its next
    progress update and the next run says so. The bar is removed when the work ends by itself."""
    bar = st.progress(0.0, text=f"{what}: starting ...")
    slot = cancel_slot if cancel_slot is not None else st.empty()
    slot.button("Cancel", icon=":material/stop:", key=f"cancel_{key}", on_click=state.request_cancel,
                help=f"Stop {what}; every circuit it evaluated is kept for the next run")
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        elapsed = time.perf_counter() - start
        bar.progress(min(done / total, 1.0) if total else 1.0,
                     text=f"{what}: {done} of {total} {counts} · {elapsed:.1f} s elapsed")

    with state.interruptible(what, slot):
        yield progress
    bar.empty()


def kept(key: Any, what: str, compute: Callable[[Progress], Any], counts: str = "circuits", cancel_slot: Any = None) -> Any:
    """The result kept in :func:`ui.cache.checks` under ``key``, else ``compute(progress)`` run
    :func:`cancellable` (and kept): a result seen before shows at once, without a bar."""
    found = cache.checks().get(key)
    if found is None:
        with cancellable(what, what.lower().replace(" ", "_"), counts, cancel_slot) as tick:
            found = compute(tick)
        cache.checks().put(key, found)
    return found


def button(label: str, widget_key: str, icon: str, key: Any, what: str, compute: Callable[[Progress], Any],
           counts: str = "circuits", at: tuple[Any, Any] | None = None) -> Any:
    """The result kept under ``key``; else a button ``label`` that runs ``compute`` (:func:`kept`) and goes
    once it has, or ``None`` while it is not clicked. ``at``: the containers for the button and for Cancel
    (default: two new columns)."""
    found = cache.checks().get(key)
    if found is not None:
        return found
    left, right = at or st.columns([1.6, 4], vertical_alignment="bottom")
    slot = left.empty()
    if not slot.button(label, key=widget_key, type="primary", icon=icon):
        return None
    found = kept(key, what, compute, counts, right.empty())
    slot.empty()
    return found
