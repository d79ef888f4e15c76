"""Peak-memory estimates for attribution and evaluation, printed by ``--dry-run`` before a run.

Everything is a count of tensor elements times the bytes of the model's dtype. For the batch with the
most tokens (``B`` prompts padded to ``P`` positions), a model of ``L`` layers, ``H`` heads, width ``d``
(``d_model``), MLP width ``d_mlp`` and vocabulary ``V``, with ``F = 1 + L(H+1)`` graph sources:

==================================  =================================================================
activation-difference buffer Δ      ``B·P·F·d``: every source's ``delta`` (ablated − clean) output
activations kept for backward       ``B·P·[L·(3H·d + 4·d_mlp + 5·d) + 2·d] + B·L·H·P²``
logits gradient / backward peak     ``B·P·max(2·V, 4H·d − 4·d_mlp − V)``
score accumulators                  ``F·n_backward (+ F·d)`` in float32 (float64 for float64 models)
evaluation cache (evaluate, exact)  ``Σ_batches B·P·F·d`` + a one-batch difference buffer; the sparse engine
                                    keeps as much again (the last circuit's node outputs) and the inputs
                                    ``Σ_batches B·P·(2L + 2)·d``; exact adds one batch's clean run
==================================  =================================================================

plus the weights and, on CPU, the Python process itself and the memory glibc keeps after frees.

The activation terms are those of TransformerLens 4.3's bridge with the EAP hook flags on, counted with
``torch.autograd.graph.saved_tensors_hooks``: each head's q, k and v input is its own copy of the residual
stream, kept for that copy's LayerNorm backward (``3H·d``); GPT-2's ``gelu_new`` MLP keeps four
``d_mlp``-wide tensors; the attention pattern is ``H·P`` per position. The peak is either the start of
the backward pass (logits and their gradient alive) or the last layer's attention backward (its per-head
input gradients alive, its MLP's tensors already freed), whichever is larger. Calibrated against measured
peak resident memory on CPU for GPT-2-shaped models (docs/scaling.md); other families (gated MLPs,
RMSNorm) keep similar but not identical sets.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence, TypeVar

import torch

from eapcore.backends import attribution_backend, evaluation_engine
from eapcore.graph import Graph, GraphConfig
from eapcore.methods import Method, get_method
from eapcore.recording import row_windows
from eapcore.removals import STACK_TOKENS

T = TypeVar("T")
DTYPE_BYTES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}
MiB = 2**20
GiB = 2**30

# Calibration (docs/scaling.md): resident memory of a CLI process on CPU after importing torch, transformers,
# TransformerLens and pandas and booting a bridge, less its weights (torch 2.13 CPU, Linux: 521 MiB with the
# 3 MiB demo model loaded).
CPU_RUNTIME_BYTES = 520 * MiB
# Per-token element counts, in units of the named dimension (see the module docstring).
KEPT_PER_HEAD = 3  # q/k/v input copies per head, per layer (× d_model)
KEPT_PER_MLP = 4  # gelu_new MLP tensors (× d_mlp)
KEPT_PER_LAYER = 5  # LayerNorm input, q, k, v, kᵀ (× d_model)
BACKWARD_PER_HEAD = 4  # the last layer's per-head input gradients and their LayerNorm backward (× d_model)
# Unsplit gradient passes (the unsplit backend, eapcore.fastgrad): per layer,
# norm inputs/outputs, q, k, v, z, MLP input copies and residual sums, plus the head-space sums (× d_model),
# and per gradient step after the first the kept x̂ and its share of the final contraction.
KEPT_PER_LAYER_UNSPLIT = 13
KEPT_PER_LAYER_STEP = 5
FORWARD_PER_HEAD = 2  # forward-only passes: a layer's per-head input copies in flight (× d_model)
OTHER_BYTES = 4 * MiB  # small tensors, autograd bookkeeping
# glibc's malloc keeps most freed blocks (it raises its mmap threshold as big blocks are freed), so on CPU a
# run's resident memory is about this many times its live tensors (measured 1.6-2.4x; docs/scaling.md).
# MALLOC_MMAP_THRESHOLD_=131072 in the environment makes it 1x, at ~2.4x the CPU time.
CPU_ALLOCATOR_FACTOR = 2.0
# Unsplit gradient passes reallocate fewer, larger blocks: measured 1.45x (GPT-2-small shape, CLI, docs/scaling.md).
CPU_ALLOCATOR_FACTOR_UNSPLIT = 1.5


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide memory. ``n_params`` counts tied weights once and includes the key/value
    projections that eapcore repeats when it ungroups grouped-query attention."""

    n_layers: int
    n_heads: int
    d_model: int
    d_mlp: int
    d_vocab: int
    n_params: int
    n_ctx: int | None = None
    architecture: str = ""

    @property
    def graph(self) -> Graph:
        """The graph of a model of this shape (without parallel attention/MLP: the sizes are the same)."""
        return Graph(GraphConfig(self.n_layers, self.n_heads, False, self.d_model))

    @property
    def n_forward(self) -> int:
        return self.graph.n_forward


def _config_value(cfg: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return default


def shape_of_config(source: str) -> ModelShape:
    """Read a model's shape from its ``config.json`` (a local folder, or the hub) without loading weights:
    the parameter count comes from building the model on the ``meta`` device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"could not read the configuration of {source!r}: {e}") from e
    text_cfg = getattr(cfg, "text_config", None) or cfg
    d = int(_config_value(text_cfg, "hidden_size", "n_embd", "d_model"))
    n_heads = int(_config_value(text_cfg, "num_attention_heads", "n_head"))
    n_kv = int(_config_value(text_cfg, "num_key_value_heads", default=n_heads) or n_heads)
    d_head = int(_config_value(text_cfg, "head_dim", default=d // n_heads) or d // n_heads)
    n_layers = int(_config_value(text_cfg, "num_hidden_layers", "n_layer"))
    d_mlp = int(_config_value(text_cfg, "intermediate_size", "n_inner", default=4 * d) or 4 * d)
    vocab = int(_config_value(text_cfg, "vocab_size"))
    n_ctx = _config_value(text_cfg, "max_position_embeddings", "n_positions", "n_ctx")
    try:
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(cfg)
        n_params = sum(p.numel() for p in meta.parameters())
    except Exception as e:  # noqa: BLE001 - an architecture transformers cannot build: say so
        raise ValueError(f"could not count the parameters of {source!r} ({type(e).__name__}: {e})") from e
    if n_kv != n_heads:  # ungroup_kv_heads repeats every key/value head once per query head of its group
        n_params += 2 * n_layers * (n_heads - n_kv) * d_head * (d + 1)
    arch = (getattr(cfg, "architectures", None) or [type(meta).__name__])[0]
    return ModelShape(n_layers, n_heads, d, d_mlp, vocab, n_params, int(n_ctx) if n_ctx else None, arch)


def shape_of_model(model: Any) -> ModelShape:
    """The shape of a loaded ``TransformerBridge``."""
    cfg = model.cfg
    d_mlp = getattr(cfg, "d_mlp", None) or 4 * cfg.d_model
    return ModelShape(
        int(cfg.n_layers), int(cfg.n_heads), int(cfg.d_model), int(d_mlp), int(cfg.d_vocab), parameter_count(model),
        getattr(cfg, "n_ctx", None), str(getattr(cfg, "architecture", "") or ""),
    )


def parameter_count(model: Any) -> int:
    """Parameters stored, counting shared storage once: the bridge exposes some weights twice (e.g. GPT-2's
    fused q/k/v projection and its per-head views), and tied embeddings are one tensor."""
    storages: dict[tuple[str, int], int] = {}
    for p in model.parameters():
        storage = p.untyped_storage()
        storages[(str(p.device), storage.data_ptr())] = storage.nbytes() // p.element_size()
    return sum(storages.values())


def batch_shapes(lengths: Sequence[int] | torch.Tensor, batch_size: int) -> list[tuple[int, int]]:
    """``(B, P)`` of every batch that :meth:`TokenizedPairs.batches` makes from these prompt lengths."""
    lengths = [int(x) for x in lengths]
    return [
        (len(lengths[i:i + batch_size]), max(lengths[i:i + batch_size])) for i in range(0, len(lengths), batch_size)
    ]


@dataclass(frozen=True)
class Part:
    """One term of an estimate: what it counts, its size and the formula it comes from."""

    name: str
    bytes: int
    formula: str


@dataclass(frozen=True)
class Estimate:
    """An estimate of peak memory: the parts that are alive together at the peak, and their sum."""

    parts: tuple[Part, ...]
    device: str
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return sum(p.bytes for p in self.parts)

    def part(self, name: str) -> int:
        return sum(p.bytes for p in self.parts if p.name == name)

    def table(self) -> str:
        width = max(len(p.name) for p in self.parts)
        lines = [f"Estimated peak memory on {self.device}:"]
        for p in self.parts:
            lines.append(f"  {p.name:<{width}}  {human(p.bytes):>10}   {p.formula}")
        lines.append(f"  {'total':<{width}}  {human(self.total):>10}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def human(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def _is_cpu(device: str) -> bool:
    return device.split(":")[0] == "cpu"


def _common(shape: ModelShape, dtype: str, device: str, n_devices: int) -> tuple[list[Part], list[str]]:
    parts = []
    if _is_cpu(device):
        parts.append(Part("Python, torch, transformers", CPU_RUNTIME_BYTES, "process baseline, measured (CPU only)"))
    parts.append(Part("weights", shape.n_params * _bytes(dtype), f"{shape.n_params:,} parameters × {_bytes(dtype)} B"))
    notes = []
    if not _is_cpu(device):
        notes.append("the CUDA context (a few hundred MiB per GPU) comes on top; torch's caching allocator may reserve more")
    if n_devices > 1:
        notes.append(
            f"split over {n_devices} devices: weights and per-layer activations divide roughly evenly; the Δ buffer, "
            "logits and score accumulators sit on the device of the embedding (the first)"
        )
    return parts, notes


def _with_slack(parts: list[Part], device: str, allocator_slack: bool | None, churned: Sequence[str],
                factor: float = CPU_ALLOCATOR_FACTOR) -> list[Part]:
    """Add the memory glibc keeps after frees, on CPU, for the ``churned`` parts (allocated and freed per batch or
    per pass): ``factor`` − 1 times them. ``allocator_slack=None``: on CPU unless ``MALLOC_MMAP_THRESHOLD_`` is set."""
    if allocator_slack is None:
        allocator_slack = _is_cpu(device) and "MALLOC_MMAP_THRESHOLD_" not in os.environ
    if not allocator_slack:
        return parts
    extra = int((factor - 1) * sum(p.bytes for p in parts if p.name in churned))
    return parts + [Part("allocator slack (CPU)", extra, f"{factor - 1:g} × what is freed and reallocated: blocks glibc keeps")]


def _window_rows(shape: ModelShape, chunks: int) -> int:
    """Source rows in the largest window that ``AttributionSpec.chunks`` makes."""
    if chunks == 1:
        return shape.n_forward
    windows = row_windows(shape.graph, chunks)
    return max(w.stop - w.start for w in windows)


def _peak_batch(batches: Iterable[tuple[int, int]], shape: ModelShape) -> tuple[int, int]:
    """The batch with the largest activation footprint (tokens, plus the attention pattern's P² term)."""
    return max(batches, key=lambda bp: bp[0] * bp[1] * (1 + shape.n_heads * bp[1] / max(1, 4 * shape.d_model)))


def attribution_estimate(
    shape: ModelShape,
    batches: Sequence[tuple[int, int]],
    method: str = "EAP-IG-inputs",
    dtype: str = "float32",
    device: str = "cpu",
    level: str = "edge",
    n_devices: int = 1,
    allocator_slack: bool | None = None,
    chunks: int = 1,
    ig_steps: int = 5,
    backend: str = "auto",
) -> Estimate:
    """Peak memory of :func:`eapcore.attribute.attribute` over batches of shapes ``batches`` ``[(B, P), ...]``:
    the method's memory profile (:data:`eapcore.methods.MEMORY_PROFILES`) on the backend that
    :func:`eapcore.backends.attribution_backend` picks for ``shape.architecture``.
    ``chunks``: the Δ buffer holds the largest window of source rows (``AttributionSpec.chunks``).
    ``allocator_slack``: add the memory glibc keeps after frees (default: on CPU, unless ``MALLOC_MMAP_THRESHOLD_``
    is set)."""
    if not batches:
        raise ValueError("no batches to estimate: the data set is empty")
    m = get_method(method)
    if m.memory == "evaluation":
        return evaluation_estimate(shape, batches, dtype, device, n_devices, f"{method} scoring", allocator_slack,
                                   removals=True)
    B, P = _peak_batch(batches, shape)
    parts, notes = _common(shape, dtype, device, n_devices)
    unsplit = m.memory == "gradients" and attribution_backend(method, shape.architecture, backend) == "unsplit"
    if m.memory == "clean run":
        parts += _clean_run_parts(shape, B, P, _bytes(dtype))
    else:
        parts += _gradient_parts(shape, B, P, _bytes(dtype), _window_rows(shape, chunks), chunks,
                                 _steps_kept(m, ig_steps, level) if unsplit else None)
    acc_bytes = 8 if dtype == "float64" else 4
    F, d = shape.n_forward, shape.d_model
    scores = F * shape.graph.n_backward * acc_bytes + (F * d * acc_bytes if level != "edge" else 0)
    parts.append(Part("score accumulators", scores, "n_forward·n_backward (+ n_forward·d_model) in float32"))
    notes.append(f"largest batch: {B} prompts × {P} positions; {len(batches)} batch(es)")
    churned = [p.name for p in parts if p.name not in ("Python, torch, transformers", "weights", "score accumulators")]
    factor = CPU_ALLOCATOR_FACTOR_UNSPLIT if unsplit else CPU_ALLOCATOR_FACTOR
    return Estimate(tuple(_with_slack(parts, device, allocator_slack, churned, factor)), device, tuple(notes))


def _steps_kept(m: Method, ig_steps: int, level: str) -> int:
    """Gradient passes whose normalised norm inputs the unsplit backend keeps at once: one scoring unit's
    passes at edge level (all steps of an input interpolation, one group's steps but the shared α = 1 of
    an activation interpolation); none but the pass in flight at node and neuron level."""
    if level != "edge":
        return 1
    if m.runner == "activation-interpolation":
        return max(1, ig_steps - 1)
    return len(m.alphas(ig_steps))


def _clean_run_parts(shape: ModelShape, B: int, P: int, b: int) -> list[Part]:
    """One clean forward pass with every source output kept (information-flow routes)."""
    H, d, F = shape.n_heads, shape.d_model, shape.n_forward
    return [
        Part("source outputs (clean run)", B * P * F * d * b, f"B·P·n_forward·d_model = {B}·{P}·{F}·{d} × {b} B"),
        Part("proximity temporaries", 2 * B * P * F * d * b, "2 · B·P·n_forward·d_model"),
        Part("forward working set", B * P * FORWARD_PER_HEAD * H * d * b, f"B·P·{FORWARD_PER_HEAD}H·d_model"),
        Part("small tensors", OTHER_BYTES, "read-outs, masks"),
    ]


def _gradient_parts(shape: ModelShape, B: int, P: int, b: int, rows: int, chunks: int, unsplit_steps: int | None) -> list[Part]:
    """The Δ buffer and the gradient passes: unsplit (``unsplit_steps`` gradient steps) or split (None)."""
    L, H, d, F, V = shape.n_layers, shape.n_heads, shape.d_model, shape.n_forward, shape.d_vocab
    rows_text = "n_forward" if rows == F else f"rows of the largest of {chunks} windows"
    parts = [Part("Δ buffer", B * P * rows * d * b, f"B·P·{rows_text}·d_model = {B}·{P}·{rows}·{d} × {b} B")]
    if unsplit_steps is not None:
        per_layer = KEPT_PER_LAYER_UNSPLIT + KEPT_PER_LAYER_STEP * (unsplit_steps - 1)
        kept = B * P * (L * (per_layer * d + KEPT_PER_MLP * shape.d_mlp) + 2 * d) + B * L * H * P * P
        parts += [
            Part("activations kept for backward (unsplit)", kept * b,
                 f"B·P·[L·(({KEPT_PER_LAYER_UNSPLIT} + {KEPT_PER_LAYER_STEP}·(steps − 1))·d_model + "
                 f"{KEPT_PER_MLP}d_mlp) + 2d_model] + B·L·H·P², {unsplit_steps} steps"),
            Part("logits gradient or backward working set", B * P * max(2 * V, 2 * H * d) * b,
                 "B·P·max(2·d_vocab, 2H·d_model): the logits' gradient or the final contraction"),
        ]
    else:
        kept = B * P * (L * (KEPT_PER_HEAD * H * d + KEPT_PER_MLP * shape.d_mlp + KEPT_PER_LAYER * d) + 2 * d) + B * L * H * P * P
        parts += [
            Part("activations kept for backward", kept * b,
                 f"B·P·[L·({KEPT_PER_HEAD}H·d_model + {KEPT_PER_MLP}d_mlp + {KEPT_PER_LAYER}d_model) + 2d_model] + B·L·H·P²"),
            Part("logits gradient or backward working set",
                 B * P * max(2 * V, BACKWARD_PER_HEAD * H * d - KEPT_PER_MLP * shape.d_mlp - V) * b,
                 f"B·P·max(2·d_vocab, {BACKWARD_PER_HEAD}H·d_model − {KEPT_PER_MLP}d_mlp − d_vocab)"),
        ]
    return parts + [Part("small tensors", OTHER_BYTES, "autograd bookkeeping, read-outs, masks")]


def evaluation_estimate(
    shape: ModelShape,
    batches: Sequence[tuple[int, int]],
    dtype: str = "float32",
    device: str = "cpu",
    n_devices: int = 1,
    what: str = "evaluation",
    allocator_slack: bool | None = None,
    removals: bool = False,
) -> Estimate:
    """Peak memory of a :class:`~eapcore.evaluate.CircuitEvaluator`: the ablated source outputs of every batch
    are cached once, then each circuit costs one forward pass per batch. The sparse engine also keeps the
    last circuit's node outputs (slider moves reuse them); ``removals`` (exact scores): one batch's clean
    run and a stack of removals (:mod:`eapcore.removals`) on top."""
    if not batches:
        raise ValueError("no batches to estimate: the data set is empty")
    b = _bytes(dtype)
    H, d, F, V = shape.n_heads, shape.d_model, shape.n_forward, shape.d_vocab
    B, P = _peak_batch(batches, shape)
    n = sum(bb for bb, _ in batches)
    cached = sum(bb * pp for bb, pp in batches) * F * d * b
    parts, notes = _common(shape, dtype, device, n_devices)
    parts += [
        Part("cached ablated outputs", cached, "Σ_batches B·P·n_forward·d_model"),
        Part("cached read-outs", 2 * n * V * b, "2·N·d_vocab (clean and corrupted logits at the read-out)"),
    ]
    L = shape.n_layers
    if evaluation_engine(shape.architecture) == "sparse":  # eapcore.sparse: every destination group's ablated input
        parts.append(Part("cached ablated inputs", cached // F * (2 * L + 2), "Σ_batches B·P·(2L + 2)·d_model"))
        parts.append(Part("last circuit's node outputs", cached, "Σ_batches B·P·n_forward·d_model (kept for slider moves)"))
    if removals:
        T = max(STACK_TOKENS, B * P)
        parts += [
            Part("one batch's clean run (removals)", B * P * (F + 2 * L + 1) * d * b, "B·P·(n_forward + 2L + 1)·d_model"),
            Part("stacked removals", T * (10 * d + 2 * shape.d_mlp + H * P) * b,
                 f"T·(10·d_model + 2·d_mlp + H·P), T = {T} stacked tokens"),
        ]
    parts += [
        Part("patch difference buffer", B * P * F * d * b, f"B·P·n_forward·d_model = {B}·{P}·{F}·{d} × {b} B"),
        Part("forward working set", B * P * (FORWARD_PER_HEAD * H * d + V) * b + B * H * P * P * b,
             f"B·P·({FORWARD_PER_HEAD}H·d_model + d_vocab) + B·H·P²"),
        Part("small tensors", OTHER_BYTES, "masks, per-example metrics"),
    ]
    notes.append(f"{what}; largest batch: {B} prompts × {P} positions; {len(batches)} batch(es), {n} prompts cached")
    churned = ("patch difference buffer", "forward working set", "small tensors", "one batch's clean run (removals)",
               "stacked removals")  # the caches are allocated once
    return Estimate(tuple(_with_slack(parts, device, allocator_slack, churned)), device, tuple(notes))


_FAILED_ALLOCATIONS = ("out of memory", "_ALLOC_FAILED", "can't allocate memory")


def out_of_memory(e: BaseException) -> bool:
    """A failed allocation: ``torch.OutOfMemoryError``, or a plain ``RuntimeError`` from the CPU allocator, from
    CUDA ("CUDA error: out of memory") or from a CUDA library's handle or workspace (``CUBLAS_STATUS_ALLOC_FAILED``,
    ``CUDNN_STATUS_ALLOC_FAILED``)."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(text in str(e) for text in _FAILED_ALLOCATIONS))


def reporting_out_of_memory(fn: Callable[[], T], advice: Callable[[str], str]) -> T:
    """``fn()``; a failed allocation becomes ``MemoryError(advice(the error's first line))``, raised after the
    failed call's tensors are freed (the error's traceback held them) and CUDA's cached blocks are released."""
    try:
        return fn()
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        message = advice((str(e).strip().splitlines() or [type(e).__name__])[0][:200])
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    raise MemoryError(message)
