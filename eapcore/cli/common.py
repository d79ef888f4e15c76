"""What the CLI's commands share: the model, data and placement arguments, loading, progress bars, errors."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from eapcore.data import PromptPairs, TokenizedPairs, tokenize
from eapcore.distributed import Context, DistributedError
from eapcore.interventions import INTERVENTIONS
from eapcore.metrics import METRICS
from eapcore.models import DTYPES, ModelSpec
from eapcore.tasks import TASKS, get_task
from eapcore.vocabulary import tokenize_for

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
# Errors reported as one line with exit status 2 (anything else is a bug and keeps its traceback).
ERRORS = (ValueError, TypeError, OSError, FloatingPointError, MemoryError, DistributedError)


class CommandFailed(Exception):
    """A command that ran but did not succeed (exit status 1), e.g. a batch job with failed runs."""


def add_threads(p: argparse.ArgumentParser) -> None:
    """``--threads``, which every command takes (applied by :func:`eapcore.cli.main`)."""
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (default: $OMP_NUM_THREADS when set, else 1 on a machine with two or fewer "
                        "cores, else torch's default)")


def add_placement(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when available; under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device-map", choices=DEVICE_MAPS,
                   help="split a model too big for one GPU over this machine's GPUs (excludes --device)")
    p.add_argument("--n-devices", type=int, help="split the model over this many GPUs (excludes --device)")


def add_model_and_pairs(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--data``/``--task``, ``--metric`` and placement."""
    p.add_argument("--model", default="demo", help="'demo', a Hugging Face name, or a local save_pretrained folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="CSV or JSON Lines with columns clean,corrupted,correct,incorrect, or those of an "
                                    "MIB task dataset (docs/mib.md)")
    src.add_argument("--task", choices=sorted(TASKS), help="a shipped task (default: ioi when --data is absent)")
    p.add_argument("--metric", choices=sorted(METRICS), help="default: the task's metric, else logit_diff")
    add_placement(p)


def add_model_and_data(p: argparse.ArgumentParser) -> None:
    """:func:`add_model_and_pairs`, ``--batch-size``, ``--intervention``, ``--dry-run``."""
    add_model_and_pairs(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--intervention", default="patching", choices=INTERVENTIONS,
                   help="what an ablated edge carries; mean/mean-positional average over the data's clean prompts")
    p.add_argument("--dry-run", action="store_true",
                   help="print the estimated peak memory of this run and exit without loading the model")


def model_spec(args: argparse.Namespace, ctx: Context) -> ModelSpec:
    return ModelSpec(args.model, ctx.device or args.device, args.dtype, device_map=args.device_map, n_devices=args.n_devices)


def read_pairs(args: argparse.Namespace) -> tuple[PromptPairs, str]:
    """(pairs, metric) from ``--data`` or ``--task`` (default ioi); ``--metric`` overrides the task's."""
    if args.data:
        return PromptPairs.from_file(args.data), args.metric or "logit_diff"
    task = get_task(args.task or "ioi")
    return PromptPairs.from_csv(task.csv), args.metric or task.metric


def load_data(args: argparse.Namespace, ctx: Context) -> tuple[Any, TokenizedPairs, str]:
    """(model, tokenized pairs, metric). The CSV is read and checked before the model is loaded, so a bad
    file fails in a moment even when the model is large."""
    from eapcore.distributed import collective
    from eapcore.models import load_model

    pairs, metric = collective(lambda: read_pairs(args), ctx)
    model = collective(lambda: load_model(model_spec(args, ctx)), ctx)
    data = collective(lambda: tokenize_for(pairs, model), ctx)
    return model, data, metric


def progress_bar(desc: str, enabled: bool, **kwargs: Any):
    from tqdm import tqdm

    return tqdm(total=0, desc=desc, unit="pass", disable=not enabled, **kwargs)


def bar_callback(bar: Any):
    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return progress


def one_line(error: BaseException) -> str:
    return " ".join(part.strip() for part in str(error).splitlines() if part.strip())


def estimate_device(args: argparse.Namespace) -> tuple[str, int]:
    """(device, number of devices) that a ``--dry-run`` estimates for."""
    import torch

    if args.device_map is not None or (args.n_devices or 1) > 1:
        n = args.n_devices or (torch.cuda.device_count() or 1)
        return ("cuda" if torch.cuda.is_available() else "cpu"), n
    from eapcore.models import default_device

    return args.device or default_device(), 1


def token_lengths(source: str, pairs: PromptPairs, n_ctx: int | None) -> list[int]:
    """Each pair's token length under the tokenizer of ``source`` (no weights loaded)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load the tokenizer of {source!r}: {e}") from e
    return tokenize(pairs, tokenizer, n_ctx).data.lengths.tolist()


def dry_run_inputs(args: argparse.Namespace) -> tuple[Any, PromptPairs, str, list[tuple[int, int]], str, int]:
    """What a ``--dry-run`` estimate needs, without loading weights: (model shape from config.json, pairs,
    metric, batch shapes from the tokenizer, device, number of devices)."""
    from eapcore.memory import batch_shapes, shape_of_config
    from eapcore.models import resolve_source

    source = resolve_source(args.model)
    shape = shape_of_config(source)
    pairs, metric = read_pairs(args)
    batches = batch_shapes(token_lengths(source, pairs, shape.n_ctx), args.batch_size)
    device, n_devices = estimate_device(args)
    return shape, pairs, metric, batches, device, n_devices


def print_estimate(args: argparse.Namespace, shape: Any, n_pairs: int, what: str, estimate: Any) -> None:
    print(f"{args.model}: {shape.architecture}, {shape.n_layers} layers x {shape.n_heads} heads x d_model {shape.d_model}, "
          f"{shape.n_params:,} parameters; {n_pairs} pairs; {what}")
    print(estimate.table())


def one_process(args: argparse.Namespace) -> Context:
    """The context of a command that runs in one process only: refused under torchrun."""
    from eapcore.distributed import world_size

    if world_size() > 1:
        raise ValueError(f"{args.command} runs in one process; start it with `python -m eapcore {args.command}`, not torchrun")
    return Context(device=args.device)


def print_evaluation_estimate(args: argparse.Namespace, what: str) -> None:
    """``--dry-run`` of a command whose memory is the circuit evaluator's cache."""
    from eapcore.memory import evaluation_estimate

    shape, pairs, _, batches, device, n_devices = dry_run_inputs(args)
    est = evaluation_estimate(shape, batches, args.dtype, device, n_devices)
    print_estimate(args, shape, len(pairs), f"{what}, {args.intervention}", est)


def json_value(obj: Any) -> Any:
    """``obj`` with NaN and infinite floats as ``None`` (JSON's null), through lists, tuples and dicts."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (list, tuple)):
        return [json_value(v) for v in obj]
    if isinstance(obj, dict):
        return {k: json_value(v) for k, v in obj.items()}
    return obj


def print_json(record: dict) -> None:
    """The command's result: one JSON object on the last line of stdout (undefined numbers as null)."""
    print(json.dumps(json_value(record), allow_nan=False))
