"""How many threads torch uses on the CPU: one policy for the app, every CLI command and batch jobs.

In order: an explicit count (the CLI's ``--threads N``); else ``OMP_NUM_THREADS`` when it is set (torch
already starts with it, so it is left alone; ``torchrun`` sets it to 1 per process); else one thread on a
machine with two or fewer cores; else torch's own default. Why one thread on two cores: the models are
small per operator, and on a machine shared with one other busy process two OpenMP threads keep waiting
for each other (the demo's attribution took 10-25x longer; benchmarks/README.md has the measurements).
"""

from __future__ import annotations

import os
from typing import Mapping

ENV = "OMP_NUM_THREADS"
SMALL_MACHINE_CORES = 2


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the system reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_threads(requested: int | None = None, environ: Mapping[str, str] | None = None,
                   cores: int | None = None) -> int | None:
    """The thread count the policy picks, or ``None`` to keep torch's (``OMP_NUM_THREADS`` or its default)."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"the number of threads (--threads) must be a positive integer, got {requested!r}")
        return requested
    environ = os.environ if environ is None else environ
    wanted = environ.get(ENV, "").strip()
    if wanted.isdigit() and int(wanted) > 0:
        return None
    cores = available_cores() if cores is None else cores
    return 1 if cores <= SMALL_MACHINE_CORES else None


def configure_threads(requested: int | None = None) -> int:
    """Apply the policy to torch's intra-op threads; returns the count torch now uses."""
    import torch

    n = choose_threads(requested)
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()
