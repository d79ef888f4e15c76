"""The app's process-wide memory, bounded in bytes: everything kept for all sessions (models, tokenized data,
evaluators with their cached activations, attribution results, curves, the panels' stores) is an entry
sized by the tensors it holds, per device; when a device's entries pass its budget, the least recently
used ones are dropped. An entry may depend on others (an evaluator on its model and data): using it
uses them, dropping them drops it, and its size leaves out what they hold. After a model is dropped a
collection runs, so that reference cycles in the bridge free its weights at once (and, on CUDA, the
cached blocks go back to the device).

Budgets: ``EAPCORE_CACHE_RAM`` for host memory and ``EAPCORE_CACHE_GPU`` for each GPU, as bytes with a
unit (``12GiB``, ``500MB``) or a share of the device's memory (``40%``); by default half of each.

The app's process has one :func:`budget`; a :class:`Store` is a small map of its entries (the result and
check stores of :mod:`ui.cache`); :func:`kept` and :func:`memory_in_use` are what the Model page shows.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import threading
import time
import types
from collections import OrderedDict
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Callable, Hashable, Iterable

import torch

ENV_RAM, ENV_GPU = "EAPCORE_CACHE_RAM", "EAPCORE_CACHE_GPU"
DEFAULT_SHARE = 0.5
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str, total: int) -> int:
    """``12GiB``, ``500 MB``, ``40%`` (of ``total``) or a number of bytes -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%|[a-zA-Z]*)\s*", text)
    if m is None or (m.group(2) != "%" and m.group(2).lower() not in _UNITS):
        raise ValueError(f"cannot read the memory budget {text!r}: give bytes with a unit (12GiB, 500MB) or a share (40%)")
    number, unit = float(m.group(1)), m.group(2).lower()
    return int(total * number / 100) if unit == "%" else int(number * _UNITS[unit])


def device_total(device: str) -> int:
    """The memory of ``device`` in bytes (a GPU's total, or the machine's RAM)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def device_budget(device: str) -> int:
    """The budget in bytes of ``device`` ("cpu" for host memory, "cuda:N"); other devices count as host."""
    gpu = device.startswith("cuda")
    text = os.environ.get(ENV_GPU if gpu else ENV_RAM)
    total = device_total(device if gpu else "cpu")
    return parse_size(text, total) if text else int(total * DEFAULT_SHARE)


def _device_of(t: torch.Tensor) -> str:
    d = t.device
    if d.type == "cuda":
        return f"cuda:{d.index if d.index is not None else torch.cuda.current_device()}"
    return "cpu" if d.type in ("cpu", "meta") else str(d)


_SKIP = (str, bytes, int, float, bool, complex, type(None), type, types.ModuleType, types.FunctionType,
         types.BuiltinFunctionType, types.MethodType, torch.dtype, torch.device)


def storages(obj: Any, exclude: frozenset[int] = frozenset()) -> dict[int, tuple[str, int]]:
    """The tensor storages reachable from ``obj``: data pointer -> (device, bytes), leaving out ``exclude``.
    A module's parameters and buffers count only when ``obj`` is the module itself; modules reached from
    elsewhere belong to another entry (an evaluator's model)."""
    found: dict[int, tuple[str, int]] = {}
    seen: set[int] = set()
    todo: list[Any] = [obj]
    if isinstance(obj, torch.nn.Module):
        todo = [*obj.parameters(), *obj.buffers()]
    while todo:
        x = todo.pop()
        if id(x) in seen or isinstance(x, _SKIP) or isinstance(x, torch.nn.Module):
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            s = x.untyped_storage()
            if s.data_ptr() and s.data_ptr() not in exclude:
                found[s.data_ptr()] = (_device_of(x), s.nbytes())
        elif isinstance(x, dict):
            todo.extend(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            todo.extend(x)
        elif is_dataclass(x):
            todo.extend(getattr(x, f.name, None) for f in fields(x))
        elif hasattr(x, "__dict__"):
            todo.extend(vars(x).values())
    return found


def by_device(found: dict[int, tuple[str, int]]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for device, n in found.values():
        sizes[device] = sizes.get(device, 0) + n
    return sizes


@dataclass
class Entry:
    """One kept object: its ``kind`` (model, data, evaluator, result, ...), a label for people, the storages
    it holds itself and their bytes per device, the entries it depends on, when it was last used."""

    kind: str
    label: str
    value: Any
    parents: tuple[Hashable, ...]
    own: frozenset[int] = frozenset()
    sizes: dict[str, int] | None = None
    used: float = 0.0
    measured: float = 0.0

    @property
    def nbytes(self) -> int:
        return sum((self.sizes or {}).values())


class Budget:
    """Entries by key, least recently used first out when a device passes its budget (:func:`device_budget`,
    or ``limits``). Thread-safe; an entry is made once even when several threads ask for it at once."""

    remeasure_after = 1.0  # seconds: an entry that grows (an evaluator's caches) is measured again when used

    def __init__(self, limits: dict[str, int] | None = None) -> None:
        self.limits = limits
        self._entries: dict[Hashable, Entry] = {}
        self._lock = threading.RLock()
        self._making: dict[Hashable, threading.Lock] = {}

    def limit(self, device: str) -> int:
        if self.limits is not None and device in self.limits:
            return self.limits[device]
        return device_budget(device)

    def get(self, key: Hashable) -> Any:
        """The value of ``key`` (None if absent), marked used with the entries it depends on."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._touch(key)
            stale = time.monotonic() - entry.measured > self.remeasure_after
        if stale:
            self._measure(key)
            _collect(self._fit(key))
        return entry.value

    def get_or_make(self, key: Hashable, make: Callable[[], Any], kind: str, label: str,
                    parents: Iterable[Hashable] = ()) -> Any:
        """The value of ``key``, made by ``make()`` (once, however many threads ask) if absent."""
        value = self.get(key)
        if value is not None:
            return value
        with self._lock:
            lock = self._making.setdefault(key, threading.Lock())
        try:
            with lock:
                value = self.get(key)
                if value is None:
                    value = make()
                    self.put(key, value, kind, label, parents)
        finally:
            with self._lock:
                self._making.pop(key, None)
        return value

    def put(self, key: Hashable, value: Any, kind: str, label: str, parents: Iterable[Hashable] = ()) -> None:
        """Keep ``value`` under ``key``, measure it, and drop least recently used entries while over budget."""
        with self._lock:
            self._drop(key)
            self._entries[key] = Entry(kind, label, value, tuple(p for p in parents if p in self._entries))
            self._touch(key)
        self._measure(key)
        _collect(self._fit(key))

    def discard(self, key: Hashable) -> None:
        with self._lock:
            dropped = self._drop(key)
        _collect(dropped)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def entries(self) -> list[tuple[Hashable, Entry]]:
        """Every entry, most recently used first."""
        with self._lock:
            return sorted(self._entries.items(), key=lambda kv: -kv[1].used)

    def totals(self) -> dict[str, int]:
        """Bytes kept per device."""
        sizes: dict[str, int] = {}
        for _, entry in self.entries():
            for device, n in (entry.sizes or {}).items():
                sizes[device] = sizes.get(device, 0) + n
        return sizes

    # ----- inside -----
    def _touch(self, key: Hashable) -> None:
        now = time.monotonic()
        for k in self._lineage(key):
            self._entries[k].used = now

    def _lineage(self, key: Hashable) -> list[Hashable]:
        """``key`` and every entry it depends on, directly or not."""
        out, todo = [], [key]
        while todo:
            k = todo.pop()
            if k in self._entries and k not in out:
                out.append(k)
                todo.extend(self._entries[k].parents)
        return out

    def _measure(self, key: Hashable) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            exclude = frozenset().union(*(self._entries[p].own for p in self._lineage(key)[1:]))
        found = storages(entry.value, exclude)  # outside the lock: walks the value
        with self._lock:
            entry.own, entry.sizes, entry.measured = frozenset(found), by_device(found), time.monotonic()

    def _fit(self, keep: Hashable) -> list[Entry]:
        """Drop least recently used entries (never ``keep`` or what it depends on) while a device is over
        its budget; the dropped entries (for :func:`_collect`, once nothing else refers to them)."""
        dropped: list[Entry] = []
        with self._lock:
            protected = set(self._lineage(keep))
            totals = self.totals()
            for device, total in totals.items():
                limit = self.limit(device)
                for key, entry in sorted(self._entries.items(), key=lambda kv: kv[1].used):
                    if total <= limit:
                        break
                    if key in protected or key not in self._entries or not (entry.sizes or {}).get(device):
                        continue
                    dropped.extend(self._drop(key))
                    total = sum((e.sizes or {}).get(device, 0) for e in self._entries.values())
        return dropped

    def _drop(self, key: Hashable) -> list[Entry]:
        """Remove ``key`` and every entry that depends on it; the removed entries."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return []
        gone = [entry]
        for k in [k for k, e in self._entries.items() if key in e.parents]:
            gone.extend(self._drop(k))
        return gone


def _collect(dropped: list[Entry]) -> None:
    """After models or GPU tensors were dropped: collect the reference cycles that hold them (a bridge's
    components refer to each other) and give CUDA's cached blocks back."""
    if not any(e.kind == "model" or any(d.startswith("cuda") for d in (e.sizes or {})) for e in dropped):
        return
    dropped.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----- the app's process -----

_PROCESS = Budget()


def budget() -> Budget:
    """Everything the app keeps for all sessions (one per process)."""
    return _PROCESS


class Store:
    """A small thread-safe LRU dict shared by all sessions: at most ``size`` items, each an entry of the
    budget (so it also goes when memory is short), labelled ``kind``."""

    def __init__(self, size: int, kind: str = "store") -> None:
        self.size, self.kind, self._keys, self._lock = size, kind, OrderedDict(), threading.Lock()

    def get(self, key: Any) -> Any:
        value = _PROCESS.get((id(self), key))
        with self._lock:
            if value is None:
                self._keys.pop(key, None)
            elif key in self._keys:
                self._keys.move_to_end(key)
        return value

    def put(self, key: Any, value: Any) -> None:
        _PROCESS.put((id(self), key), value, self.kind, f"{self.kind} {str(key)[:40]}")
        with self._lock:
            self._keys[key] = None
            self._keys.move_to_end(key)
            old = [self._keys.popitem(last=False)[0] for _ in range(len(self._keys) - self.size)]
        for k in old:
            _PROCESS.discard((id(self), k))

    def __contains__(self, key: Any) -> bool:
        return (id(self), key) in _PROCESS

    def clear(self) -> None:
        with self._lock:
            old, self._keys = list(self._keys), OrderedDict()
        for k in old:
            _PROCESS.discard((id(self), k))


def kept() -> list[dict[str, Any]]:
    """What the server keeps for all sessions, most recently used first: kind, what, size per device, the
    seconds since it was last used."""
    from eapcore.memory import human

    now = time.monotonic()
    return [{"kind": e.kind, "what": e.label,
             "size": ", ".join(f"{human(n)} on {d}" for d, n in sorted((e.sizes or {}).items())) or "0 B",
             "bytes": e.nbytes, "last used": f"{now - e.used:.0f} s ago"} for _, e in _PROCESS.entries()]


def memory_in_use() -> dict[str, str]:
    """Per device: what the cache keeps against its budget; on CUDA also what PyTorch has allocated and
    reserved there; on the CPU the process's resident memory."""
    from eapcore.memory import human
    from eapcore.rss import rss_bytes

    totals = _PROCESS.totals()
    devices = sorted({"cpu", *totals, *(f"cuda:{i}" for i in range(torch.cuda.device_count()))})
    out = {}
    for d in devices:
        line = f"cache {human(totals.get(d, 0))} of {human(_PROCESS.limit(d))}"
        if d.startswith("cuda"):
            line += (f"; PyTorch allocated {human(torch.cuda.memory_allocated(d))}, reserved "
                     f"{human(torch.cuda.memory_reserved(d))} of {human(torch.cuda.get_device_properties(d).total_memory)}")
        else:
            with contextlib.suppress(OSError):
                line += f"; the server process uses {human(rss_bytes())}"
        out[d] = line
    return out
