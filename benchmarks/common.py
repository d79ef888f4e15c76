"""Shared helpers for the benchmarks: models (demo, a folder, random GPT-2 shapes), prompts, timing, memory.

The floor is always the raw Hugging Face model (design §2), loaded from the same folder as the bridge, so
both see the same weights and the same token ids.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from eapcore.rss import reset_peak_rss  # noqa: E402

# name -> (n_layer, n_head, n_embd, vocab_size, n_positions); random weights, built from a GPT2Config.
SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "gpt2-small": (12, 12, 768, 50257, 1024),
    "gpt2-medium": (24, 16, 1024, 50257, 1024),
    "gpt2-tiny": (2, 2, 16, 64, 64),
}
WORDS = [f"w{i}" for i in range(32)]


# ----------------------------------------------------------------------------- models
def save_random_gpt2(shape: str, path: Path, seed: int = 0) -> Path:
    """A random-weight ``GPT2LMHeadModel`` of a named shape plus a small word-level tokenizer (the model's
    vocabulary may be larger than the tokenizer's: benchmarks feed token ids directly)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    n_layer, n_head, n_embd, vocab_size, n_positions = SHAPES[shape]
    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "<unk>", "<pad>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<unk>", pad_token="<pad>"
    )
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size, n_positions=n_positions,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    GPT2LMHeadModel(cfg).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@contextmanager
def model_folder(name: str) -> Iterator[Path]:
    """A ``save_pretrained`` folder for ``name``: a random shape (written to a temporary folder), ``demo``,
    or an existing local folder."""
    if name in SHAPES:
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            yield save_random_gpt2(name, Path(tmp))
        return
    from eapcore.models import DEMO_MODEL_DIR

    path = DEMO_MODEL_DIR if name == "demo" else Path(name).expanduser()
    if not (path / "config.json").exists():
        raise SystemExit(
            f"model {name!r}: no config.json in {path}; pass --model gpt2-small|gpt2-medium|gpt2-tiny, 'demo' "
            "(once assets/models/demo exists) or a save_pretrained folder"
        )
    yield path


def load_pair(folder: Path, device: str, dtype: str) -> tuple[Any, Any]:
    """(raw Hugging Face model, eapcore bridge) on the same weights, in eval mode; the raw model frozen (eapcore
    freezes the bridge inside attribute())."""
    from transformers import AutoModelForCausalLM

    from eapcore.models import DTYPES, ModelSpec, load_model

    bridge = load_model(ModelSpec(str(folder), device, dtype))
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=DTYPES[dtype]).to(device).eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    return hf, bridge


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- data
def random_pairs(n: int, length: int, vocab: int, seed: int = 0) -> Any:
    """``n`` random clean/corrupted token-id pairs of ``length`` tokens with random one-token answers,
    wrapped as :class:`eapcore.data.TokenizedPairs` (no tokenizer involved)."""
    from eapcore.data import Batch, TokenizedPairs

    g = torch.Generator().manual_seed(seed)
    ids = lambda *shape: torch.randint(0, vocab, shape, generator=g)  # noqa: E731
    ones = torch.ones(n, 1, dtype=torch.bool)
    batch = Batch(ids(n, length), ids(n, length), torch.full((n,), length), ids(n, 1), ones, ids(n, 1), ones.clone())
    return TokenizedPairs(batch, f"random-{n}x{length}-v{vocab}-s{seed}")


def csv_pairs(path: str | Path, bridge: Any, n: int | None) -> Any:
    """The first ``n`` pairs of a prompt-pair CSV, tokenized for ``bridge`` as the app does."""
    from eapcore.data import PromptPairs
    from eapcore.vocabulary import tokenize_for

    pairs = PromptPairs.from_csv(path)
    if n is not None and n < len(pairs):
        pairs = PromptPairs(pairs.clean[:n], pairs.corrupted[:n], pairs.correct[:n], pairs.incorrect[:n])
    return tokenize_for(pairs, bridge)


def load_data(spec: str, bridge: Any, n: int, length: int, seed: int = 0) -> tuple[Any, str]:
    """``random`` (token ids), a shipped task name, or a CSV path -> (TokenizedPairs, metric name)."""
    if spec == "random":
        return random_pairs(n, length, int(bridge.cfg.d_vocab), seed), "logit_diff"
    from eapcore.tasks import TASKS

    if spec in TASKS:
        path, metric = TASKS[spec].csv, TASKS[spec].metric
    else:
        path, metric = Path(spec), "logit_diff"
    if not Path(path).exists():
        raise SystemExit(f"data {spec!r}: {path} does not exist; use --data random or a CSV path")
    return csv_pairs(path, bridge, n), metric


def add_app_arguments(p: Any, pairs: int) -> None:
    """The options of a benchmark that drives the app in Chromium: ``--model``, ``--pairs``, ``--chromium``."""
    p.add_argument("--model", default="demo", help="what the app loads: 'demo', a hub name or a local folder")
    p.add_argument("--pairs", type=int, default=pairs, help="the first PAIRS pairs of the IOI task")
    p.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"))


def first_ioi_pairs(n: int, folder: Path) -> Path:
    """A CSV in ``folder`` of the IOI task's first ``n`` pairs (for the app, which reads its data from a file)."""
    from eapcore.tasks import get_task

    lines = get_task("ioi").csv.read_text().splitlines(keepends=True)  # one pair per line (no quoted newlines)
    csv = Path(folder) / "ioi_first.csv"
    csv.write_text("".join(lines[: n + 1]))
    return csv


# ----------------------------------------------------------------------------- timing
def parser(doc: str, model: str, data: str, n: int, batch_size: int) -> Any:
    """An argument parser with the model and data arguments every benchmark takes, with these defaults."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=model,
                   help=f"'demo', a save_pretrained folder, or {', '.join(SHAPES)} (random weights)")
    p.add_argument("--data", default=data, help="a shipped task (ioi, ...), a CSV path, or 'random' token ids")
    p.add_argument("--n", type=int, default=n, help="number of prompt pairs")
    p.add_argument("--length", type=int, default=16, help="tokens per prompt (random data)")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--metric", help="default: the task's metric, else logit_diff")
    return p


def add_run_arguments(p: Any, repeats: int, warmup: int) -> None:
    """The arguments every benchmark shares: repeats, warm-up runs, device, dtype, threads, seed."""
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)


def setup(args: Any) -> tuple[Any, Any, Any, str]:
    """Threads, then the model pair and the data a benchmark's arguments name: (hf, bridge, data, task metric)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    with model_folder(args.model) as folder:
        hf, bridge = load_pair(folder, args.device, args.dtype)
    data, task_metric = load_data(args.data, bridge, args.n, args.length, args.seed)
    return hf, bridge, data, task_metric


def sync(device: Any) -> None:
    """Wait for ``device`` (a CUDA device; nothing to wait for on the CPU)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


@dataclass
class Timings:
    """Seconds per repeat for each named function, measured interleaved in one process."""

    runs: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)  # process CPU seconds, all threads

    def median(self, name: str) -> float:
        return statistics.median(self.runs[name])

    def cpu_median(self, name: str) -> float:
        return statistics.median(self.cpu[name])

    def spread(self, name: str) -> str:
        r = self.runs[name]
        return f"median {self.median(name):.4g}s (min {min(r):.4g}, max {max(r):.4g}, n={len(r)})"


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, device: Any = "cpu"
) -> Timings:
    """Warm each function up, then run them round-robin ``repeats`` times (rotating the order each round,
    so that neither always runs first on a shared machine); each run is timed on its own, by the wall
    clock and by the process's CPU time (with one thread the latter barely depends on other load)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    out = Timings({name: [] for name in fns}, {name: [] for name in fns})
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            sync(device)
            out.runs[name].append(time.perf_counter() - t0)
            out.cpu[name].append(time.process_time() - c0)
    return out


# ----------------------------------------------------------------------------- memory
@contextmanager
def frozen_gc() -> Iterator[None]:
    """Move every object alive now out of the garbage collector's reach while benchmarking, so that the
    full collections before each memory measurement scan only what the measured code made (a full
    collection over a loaded transformers stack takes about a second)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


_LIBC = None


def _malloc_trim() -> None:
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class _Sampler(threading.Thread):
    """Fallback peak-RSS sampler (every 1 ms) where the kernel's high-water mark cannot be reset."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.stop = 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, _status_kib("VmRSS"))
            time.sleep(0.001)


def peak_memory_mib(fn: Callable[[], Any], device: Any) -> tuple[float, str]:
    """Extra peak memory of one call of ``fn`` over what was live just before it, in MiB, and how it was
    measured: CUDA ``max_memory_allocated`` on a GPU; on CPU the process's peak RSS (VmHWM, reset
    through ``/proc/self/clear_refs`` before the call, after freeing and trimming the heap) minus the RSS
    before the call. The same method measures the floor and ours."""
    gc.collect()
    if str(device).startswith("cuda"):
        gpu = torch.device(device)  # every call names it: with --device cuda:1 the defaults would read cuda:0
        torch.cuda.synchronize(gpu)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(gpu)
        before = torch.cuda.memory_allocated(gpu)
        fn()
        torch.cuda.synchronize(gpu)
        return (torch.cuda.max_memory_allocated(gpu) - before) / 2**20, "cuda max_memory_allocated - allocated before"
    if sys.platform.startswith("linux") and os.path.exists("/proc/self/status"):
        _malloc_trim()
        if reset_peak_rss():
            before = _status_kib("VmRSS")
            fn()
            return (_status_kib("VmHWM") - before) / 1024, "peak RSS (VmHWM reset) - RSS before"
        sampler = _Sampler()
        before = _status_kib("VmRSS")
        sampler.start()
        fn()
        sampler.stop.set()
        sampler.join()
        return (max(sampler.peak, _status_kib("VmRSS")) - before) / 1024, "peak RSS (1 ms sampling) - RSS before"
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, "ru_maxrss growth (lower bound)"


# ----------------------------------------------------------------------------- reporting
def machine(device: Any) -> str:
    if str(device).startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))} ({torch.cuda.device_count()} visible)"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def emit(record: dict[str, Any]) -> None:
    """The machine-readable result: one JSON line, printed last."""
    print(json.dumps(record, sort_keys=False), flush=True)
