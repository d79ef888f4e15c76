"""Headless command line: ``python -m eapcore COMMAND ...``; one module per command in this package.

It is also the ``torchrun`` entry point: ``torchrun --nproc-per-node N -m eapcore attribute ...`` shares
the prompt pairs among N processes and all-reduces the scores; rank 0 writes the file (docs/scaling.md).
Errors print one line (``eapcore COMMAND: error: ...``) and exit with status 2; a command that ran but
failed exits with 1. Every command takes ``--threads N``; without it the thread policy of
:mod:`eapcore.threads` applies.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from eapcore.cli import attribute, compare, evaluate, graph, inspect, jobs, mib, verify
from eapcore.cli.common import ERRORS, CommandFailed, add_threads, one_line
from eapcore.distributed import Context, PeerFailed
from eapcore.threads import configure_threads

COMMANDS = (attribute, evaluate, compare, verify, inspect, jobs, graph, mib)  # each module's register() adds its subcommand


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eapcore", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    for command_parser in sub.choices.values():
        add_threads(command_parser)
    return parser


def _default_context(args: argparse.Namespace) -> Context:
    """One process, or this rank's place under torchrun; none for a ``--dry-run``."""
    from eapcore.distributed import setup

    if getattr(args, "dry_run", False):
        return Context()
    return setup(getattr(args, "device", None), getattr(args, "device_map", None))


def main(argv: Sequence[str] | None = None) -> int:
    from eapcore.distributed import quiet_if_not_main, teardown

    args = build_parser().parse_args(argv)
    ctx = Context()
    try:
        configure_threads(args.threads)
        ctx = getattr(args, "context", _default_context)(args)
        quiet_if_not_main(ctx)
        args.run(args, ctx)
    except CommandFailed as e:
        print(f"eapcore {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 1
    except ERRORS as e:
        if not (isinstance(e, PeerFailed) and not ctx.main):
            where = f"[rank {ctx.rank}] " if ctx.active and not ctx.main else ""
            print(f"eapcore {args.command}: error: {where}{one_line(e)}", file=sys.stderr)
        return 2
    finally:
        teardown(ctx)
    return 0
