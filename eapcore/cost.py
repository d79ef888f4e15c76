"""What an attribution will cost before it runs: time, peak memory, and the memory free now.

**Work** of a run: Σ over its batches of ``passes_per_batch × B × P`` *token-passes* (one pass of the model
over one token; :meth:`AttributionSpec.passes_per_batch` counts the passes). **Time** = work / rate, the
rate (token-passes per second) being the last one measured in this process for the same model, device,
dtype, method, level and backend (:func:`record_run`, which :func:`timed_attribute` calls). Before any
such run it is a first guess: each pass costs ``k·n_params`` floating-point operations per token
(``k`` = 6 for forward and backward, 2 for forward-only methods) at this machine's matrix-multiply speed
(measured once per process and device), plus a fixed per-layer overhead per pass (hooks, small kernels)
that dominates on small models; see :data:`PASS_OVERHEAD_S`.

**Peak memory**: :func:`eapcore.memory.attribution_estimate` for the loaded model's shape and these
batches. **Needed**: that peak less what is resident already (the process baseline and the weights).
**Free**: ``MemAvailable`` of ``/proc/meminfo`` on CPU; on CUDA ``torch.cuda.mem_get_info`` plus what
torch's caching allocator holds unused. A warning is given when needed exceeds free.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from eapcore.attribute import AttributionSpec, attribute
from eapcore.backends import attribution_backend
from eapcore.data import TokenizedPairs
from eapcore.families import architecture
from eapcore.memory import Estimate, attribution_estimate, batch_shapes, human, shape_of_model
from eapcore.methods import get_method
from eapcore.models import DTYPES, model_device, model_dtype, model_graph

# First guess, calibrated on this project's CPU (benchmarks/README.md): seconds of overhead per
# layer per pass, and the fraction of the matrix-multiply speed that a model pass reaches.
PASS_OVERHEAD_S = 3e-3
FLOP_EFFICIENCY = 0.7
RESIDENT_PARTS = ("Python, torch, transformers", "weights")  # parts of a memory estimate that are already in use

_RATES: dict[tuple, float] = {}
_SPEEDS: dict[str, float] = {}
_LOCK = threading.Lock()


def rate_key(model: Any, spec: AttributionSpec) -> tuple:
    """(model, device, dtype, method, level, backend): runs that share it run at the same speed."""
    backend = attribution_backend(spec.method, architecture(model), spec.backend, model)
    name = str(getattr(model.cfg, "model_name", "") or "")
    shape = (int(model.cfg.n_layers), int(model.cfg.n_heads), int(model.cfg.d_model))
    return (name, shape, str(model_device(model)), str(model_dtype(model)), spec.method, spec.level, backend)


def work(model: Any, data: TokenizedPairs, spec: AttributionSpec) -> int:
    """Token-passes of attributing ``data`` with ``spec`` (see the module docstring)."""
    per_batch = spec.passes_per_batch(model_graph(model))
    return sum(per_batch * b * p for b, p in batch_shapes(data.data.lengths, spec.batch_size))


def record_run(model: Any, data: TokenizedPairs, spec: AttributionSpec, seconds: float) -> float:
    """Record a finished run's speed for later estimates; returns its rate in token-passes per second."""
    rate = work(model, data, spec) / max(seconds, 1e-9)
    with _LOCK:
        _RATES[rate_key(model, spec)] = rate
    return rate


def timed_attribute(model: Any, data: TokenizedPairs, spec: AttributionSpec, **kwargs: Any) -> Any:
    """:func:`eapcore.attribute.attribute`, timed and recorded with :func:`record_run` when it finishes."""
    start = time.perf_counter()
    scores = attribute(model, data, spec, **kwargs)
    record_run(model, data, spec, time.perf_counter() - start)
    return scores


def matmul_speed(device: torch.device | str, dtype: torch.dtype = torch.float32) -> float:
    """This machine's matrix-multiply speed in FLOP/s on ``device`` (measured once per process)."""
    key = f"{device}/{dtype}"
    with _LOCK:
        if key in _SPEEDS:
            return _SPEEDS[key]
    n = 384
    a = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        if str(device).startswith("cuda"):
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(4):
            a = (a @ a) / n
        if str(device).startswith("cuda"):
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    speed = 4 * 2 * n**3 / best
    with _LOCK:
        _SPEEDS[key] = speed
    return speed


def first_guess(model: Any, data: TokenizedPairs, spec: AttributionSpec) -> float:
    """Seconds of a run on this machine, from the model's size alone (see the module docstring)."""
    shape = shape_of_model(model)
    flops_per_token = (6 if get_method(spec.method).takes_gradients else 2) * shape.n_params
    speed = FLOP_EFFICIENCY * matmul_speed(model_device(model), model_dtype(model))
    per_batch = spec.passes_per_batch(model_graph(model))
    batches = batch_shapes(data.data.lengths, spec.batch_size)
    return work(model, data, spec) * flops_per_token / speed + len(batches) * per_batch * shape.n_layers * PASS_OVERHEAD_S


def free_memory(device: torch.device | str) -> tuple[int, str]:
    """(bytes free now, what was read) on ``device``'s kind of memory."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + unused, f"free on {device} (CUDA, counting torch's unused cache)"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "RAM available (/proc/meminfo)"
    raise OSError("MemAvailable not found in /proc/meminfo")


@dataclass(frozen=True)
class Cost:
    """An attribution's estimated ``seconds`` (``measured``: from a real run's rate, else a first guess),
    its ``work`` in token-passes, peak ``memory``, the ``needed`` bytes beyond what is resident now, and the
    ``free`` bytes (``free_what`` says which memory)."""

    seconds: float
    measured: bool
    work: int
    memory: Estimate
    needed: int
    free: int
    free_what: str

    @property
    def warning(self) -> str | None:
        """A sentence to show when the run needs more memory than is free, else ``None``."""
        if self.needed <= self.free:
            return None
        return (f"this run needs about {human(self.needed)} more memory (estimated peak {human(self.memory.total)}) "
                f"but only {human(self.free)} is free ({self.free_what}); it may fail or swap: use a smaller batch, "
                "more chunks, fewer prompt pairs or half precision")

    def summary(self) -> str:
        """``about 2.1 s (measured speed), peak memory 812.0 MiB, 21.9 GiB free``."""
        how = "measured speed" if self.measured else "first guess"
        return (f"about {_duration(self.seconds)} ({how}), peak memory {human(self.memory.total)}, "
                f"{human(self.free)} free")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def estimate_cost(model: Any, data: TokenizedPairs, spec: AttributionSpec) -> Cost:
    """Time, peak memory and free memory of ``attribute(model, data, spec)``, before running it."""
    amount = work(model, data, spec)
    with _LOCK:
        rate = _RATES.get(rate_key(model, spec))
    seconds = amount / rate if rate is not None else first_guess(model, data, spec)
    device = model_device(model)
    dtype = next(name for name, t in DTYPES.items() if t == model_dtype(model))
    memory = attribution_estimate(shape_of_model(model), batch_shapes(data.data.lengths, spec.batch_size), spec.method,
                                  dtype, str(device), spec.level, chunks=spec.chunks, ig_steps=spec.ig_steps)
    needed = memory.total - sum(memory.part(name) for name in RESIDENT_PARTS)
    free, what = free_memory(device)
    return Cost(seconds, rate is not None, amount, memory, needed, free, what)
