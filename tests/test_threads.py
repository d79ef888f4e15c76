"""The thread policy (eapcore.threads) that the app, every CLI command and batch jobs share: --threads N
wins, OMP_NUM_THREADS is honoured, one thread on machines with two or fewer cores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from eapcore import threads
from eapcore.cli import main
from eapcore.threads import choose_threads

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_policy() -> None:
    assert choose_threads(3, {}, 2) == 3  # --threads wins
    assert choose_threads(None, {"OMP_NUM_THREADS": "4"}, 2) is None  # torch already follows OMP_NUM_THREADS
    assert choose_threads(None, {}, 2) == 1 and choose_threads(None, {}, 1) == 1
    assert choose_threads(None, {}, 16) is None  # a big machine keeps torch's default
    assert choose_threads(None, {"OMP_NUM_THREADS": "lots"}, 2) == 1  # not a count: the core rule applies
    for bad in (0, -2, True, 1.5):
        with pytest.raises(ValueError, match=r"--threads\) must be a positive integer"):
            choose_threads(bad, {}, 2)


@pytest.mark.parametrize("env, expected", [({"OMP_NUM_THREADS": "2"}, "2"), ({}, None)])
def test_a_fresh_process_follows_the_policy(env: dict, expected: str | None) -> None:
    """In a new interpreter (torch reads OMP_NUM_THREADS when it starts) the policy keeps the 2 threads
    the environment asks for (on a 2-core machine, where it would otherwise pick 1), else picks 1 on a
    small machine or keeps torch's default on a big one."""
    clean = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", "from eapcore.threads import configure_threads as c; print(c())"],
                         cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, check=True).stdout.split()[-1]
    if expected is None:
        default = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=clean,
                                 capture_output=True, text=True, check=True).stdout.split()[-1]
        expected = "1" if threads.available_cores() <= threads.SMALL_MACHINE_CORES else default
    assert out == expected


@pytest.fixture
def dry_run_args(tiny_dir: Path, tmp_path: Path) -> list[str]:
    """A command that runs quickly (a memory estimate) and takes the shared arguments."""
    from conftest import TOY

    pd.DataFrame(TOY).to_csv(tmp_path / "toy.csv", index=False)
    return ["attribute", "--model", str(tiny_dir), "--data", str(tmp_path / "toy.csv"), "--out", str(tmp_path / "x.pt"),
            "--dry-run", "--device", "cpu"]


def test_every_command_takes_threads(dry_run_args: list[str], capsys) -> None:
    from eapcore.cli import build_parser

    parser = build_parser()
    for name in ("attribute", "evaluate", "run-jobs"):
        assert "--threads" in parser._subparsers._group_actions[0].choices[name].format_help()
    assert main([*dry_run_args, "--threads", "3"]) == 0 and torch.get_num_threads() == 3
    assert main([*dry_run_args, "--threads", "0"]) == 2
    assert "--threads) must be a positive integer, got 0" in capsys.readouterr().err


def test_the_cli_applies_the_policy(dry_run_args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(4)
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    assert main(dry_run_args) == 0 and torch.get_num_threads() == 1
    torch.set_num_threads(4)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert main(dry_run_args) == 0 and torch.get_num_threads() == 4  # left as the environment set it
