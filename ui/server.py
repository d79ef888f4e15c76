"""The explorer as a subprocess for whatever drives it with a browser (the browser tests, the explorer
benchmark, the screenshot script): ``streamlit run app.py`` on a free port of 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator
from contextlib import contextmanager

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(env: dict[str, str], log: Path, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start the app with ``env`` added to this process's environment (offline, CPU unless set) and wait
    until it answers its health check; returns (process, URL). Its output goes to ``log``."""
    port = free_port()
    env = {"HF_HUB_OFFLINE": "1", "EAPCORE_APP_DEVICE": "cpu", **os.environ, **env, "PYTHONPATH": str(ROOT)}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.address",
             "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.3)
    stop(proc)
    raise RuntimeError(f"streamlit did not start (exit status {proc.returncode}):\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


@contextmanager
def running(env: dict[str, str], log: Path) -> Iterator[str]:
    """``with running(env, log) as url:`` the app, stopped on the way out."""
    proc, url = start(env, log)
    try:
        yield url
    finally:
        stop(proc)
