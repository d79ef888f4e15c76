"""One loaded model shared by several threads (the app's sessions): fair turns for the passes that hook it,
hook-free views of its Hugging Face modules for the work that runs beside them.

Hooks are global state on a ``TransformerBridge``: a hook that one thread adds fires in every other
thread's pass through the same hook point, and the bridge's components keep per-call flags (a linear
bridge records whether its ``hook_out`` fired). So every pass through the bridge takes the model's turn
(:class:`FairLock`, :func:`eapcore.models.model_lock`), served first come first served; a waiting thread
can report its place in the queue and be interrupted (:func:`reporting`). Work that only needs the
Hugging Face modules and the weight tensors (the sparse evaluation engine) runs on :func:`hook_free`
views instead, which share the weights (no extra memory) and contain no bridge component or hook point,
so it never waits for a turn and nothing another thread hooks can reach it.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from collections import OrderedDict, deque
from contextvars import ContextVar
from typing import Callable, Iterator

import torch

Report = Callable[[int], None]
_REPORT: ContextVar[Report | None] = ContextVar("eapcore_wait_report", default=None)


@contextlib.contextmanager
def reporting(report: Report) -> Iterator[None]:
    """While inside, a thread that waits for a model's turn calls ``report(position)`` about every
    :attr:`FairLock.poll` seconds (1: next in line); an exception raised by ``report`` (e.g. Streamlit
    stopping the script run) leaves the queue and propagates."""
    token = _REPORT.set(report)
    try:
        yield
    finally:
        _REPORT.reset(token)


class FairLock:
    """A reentrant lock served in arrival order (FIFO): a thread that asks while others wait queues behind
    them, so one user's run cannot be overtaken again and again. ``acquire``/``release`` and ``with`` as
    :class:`threading.RLock`; waiting threads report their position (:func:`reporting`)."""

    poll = 0.25  # seconds between reports (and chances to interrupt a wait)

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._queue: deque[object] = deque()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return True
            if self._owner is None and not self._queue:
                self._owner, self._depth = me, 1
                return True
            if not blocking:
                return False
            ticket = object()
            self._queue.append(ticket)
        report, end = _REPORT.get(), None if timeout < 0 else time.monotonic() + timeout
        try:
            while True:
                with self._cond:
                    if self._owner is None and self._queue[0] is ticket:
                        self._queue.popleft()
                        self._owner, self._depth = me, 1
                        return True
                    if end is not None and time.monotonic() >= end:
                        self._leave(ticket)
                        return False
                    position = self._queue.index(ticket) + 1
                    self._cond.wait(self.poll if end is None else max(0.0, min(self.poll, end - time.monotonic())))
                if report is not None:
                    report(position)
        except BaseException:
            with self._cond:
                if ticket in self._queue:
                    self._leave(ticket)
            raise

    def _leave(self, ticket: object) -> None:
        self._queue.remove(ticket)
        self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("release of a model lock that this thread does not hold")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    def __enter__(self) -> "FairLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def state(self) -> tuple[bool, int]:
        """(whether some thread holds the lock, how many wait)."""
        with self._cond:
            return self._owner is not None, len(self._queue)


def hook_free(module: torch.nn.Module | None) -> torch.nn.Module | None:
    """A copy of a Hugging Face module inside a bridge that computes the same function without the bridge:
    every bridge component inside (a ``GeneralizedComponent``: linear layers, rotary embeddings, norms) is
    replaced by the module it wraps, every ``HookPoint`` by the identity, and no module carries a hook. The
    copy shares the parameters and buffers (no memory; weights changed in place are seen). None stays None."""
    if module is None:
        return None
    from transformer_lens.hook_points import HookPoint
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    if isinstance(module, GeneralizedComponent):
        return hook_free(module.original_component)
    if isinstance(module, HookPoint):
        return torch.nn.Identity()
    clone = copy.copy(module)
    for name, value in vars(module).items():
        if name.startswith("_") and "hooks" in name and isinstance(value, dict):
            setattr(clone, name, OrderedDict())
    clone.__dict__["_modules"] = {name: hook_free(child) for name, child in module._modules.items()}
    return clone
