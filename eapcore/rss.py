"""Resident memory of this process (Linux), as the CPU memory estimates are calibrated and the benchmarks
measure it."""

from __future__ import annotations


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not found in /proc/self/status")


def rss_bytes() -> int:
    """Resident memory of this process now (Linux)."""
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since it started or since :func:`reset_peak_rss` (Linux)."""
    return _status_bytes("VmHWM")


def reset_peak_rss() -> bool:
    """Reset this process's peak resident memory to its current value (Linux ≥ 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

