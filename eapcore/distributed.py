"""Data-parallel attribution and evaluation under ``torchrun`` (one process per GPU, or per CPU slot).

``torchrun --nproc-per-node N -m eapcore attribute ...`` starts N copies of the CLI with ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` set. :func:`setup` reads them and, when ``WORLD_SIZE > 1``, joins
the process group (``nccl`` on CUDA, each process on ``cuda:LOCAL_RANK``; ``gloo`` on CPU). Each rank
scores an interleaved :func:`shard` of the prompt pairs (every ``WORLD_SIZE``-th pair, so that data sorted
by length gives every rank the same work); :func:`reduce_scores` turns each rank's mean into the mean
over all pairs (Σ_rank n_rank · scores_rank / N, in float64), so the result equals the single-process one
to float tolerance with the same per-example weighting. Rank 0 writes the output.

Every collective waits at most ``timeout_s`` (30 minutes) for the other ranks. A rank that fails inside
:func:`collective` tells the others, so that all stop with it; a rank that dies is noticed by torchrun,
which stops the others.

Mean interventions (``mean``, ``mean-positional``) average over *all* pairs on every rank, as a single
process does: the full data set is passed as the reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch

from eapcore.circuit import Scores
from eapcore.data import Batch, TokenizedPairs

T = TypeVar("T")


class DistributedError(RuntimeError):
    """The process group could not be set up, or another rank failed."""


class PeerFailed(DistributedError):
    """Another rank failed; this one stopped with it."""


@dataclass(frozen=True)
class Context:
    """This process's place in the job. ``device``: where this rank's model goes (``None``: the model's
    default); ``backend``: the process group's backend, ``None`` when running alone."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str | None = None
    backend: str | None = None
    comm: str = "cpu"

    @property
    def main(self) -> bool:
        """Rank 0 writes files and prints; the other ranks stay quiet."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def comm_device(self) -> torch.device:
        """Where collective tensors must live (CUDA for nccl, CPU for gloo)."""
        return torch.device(self.comm)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer; launch with torchrun") from None


def world_size() -> int:
    """``WORLD_SIZE`` from torchrun's environment (1 when not launched by torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def setup(device: str | None = None, device_map: str | None = None, timeout_s: float = 1800) -> Context:
    """Join torchrun's process group when ``WORLD_SIZE > 1``; otherwise return a one-process context.

    ``device`` is the user's choice (``--device``): under torchrun, ``cuda`` (or nothing, on a machine
    with GPUs) means ``cuda:LOCAL_RANK`` with the ``nccl`` backend; ``cpu`` means ``gloo``.
    ``device_map`` (a model split over this node's GPUs) allows one process per node only.
    """
    world = world_size()
    if world <= 1:
        return Context(device=device)
    import torch.distributed as dist

    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", 1)
    if device_map is not None and local_world > 1:
        raise ValueError(
            f"--device-map {device_map} splits the model over all of this node's GPUs, so it allows one process per "
            f"node, but torchrun started {local_world}; use --nproc-per-node 1 (and --nnodes for data parallelism)"
        )
    wants_cuda = device is None or device.startswith("cuda")
    if device is not None and device.startswith("cuda:"):
        raise ValueError(f"--device {device} names one GPU, but under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda")
    if wants_cuda and torch.cuda.is_available():
        n_gpus = torch.cuda.device_count()
        if device_map is None and local >= n_gpus:
            raise ValueError(
                f"process LOCAL_RANK={local} has no GPU of its own (this node has {n_gpus}); use --nproc-per-node {n_gpus} "
                "or fewer, or --device cpu"
            )
        backend, rank_device = "nccl", (f"cuda:{local}" if device_map is None else "cuda:0")
        torch.cuda.set_device(torch.device(rank_device))
    elif device is not None and device.startswith("cuda"):
        raise ValueError("--device cuda was given but CUDA is not available; use --device cpu")
    else:
        backend, rank_device = "gloo", (device or "cpu")
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
        if backend == "nccl":
            kwargs["device_id"] = torch.device(rank_device)
        try:
            dist.init_process_group(**kwargs)
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/DistStoreError/ValueError here
            raise DistributedError(
                f"could not join the {backend} process group as rank {rank} of {world} ({type(e).__name__}: {e}); check "
                "MASTER_ADDR/MASTER_PORT or the --rdzv-endpoint given to torchrun"
            ) from e
    return Context(rank=rank, world=world, local_rank=local, device=None if device_map else rank_device, backend=backend,
                   comm=rank_device if backend == "nccl" else "cpu")


def teardown(ctx: Context) -> None:
    """Leave the process group (a no-op when running alone)."""
    if ctx.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def quiet_if_not_main(ctx: Context) -> None:
    """Silence Hugging Face progress bars and warnings on ranks other than 0."""
    if ctx.main:
        return
    import warnings

    warnings.simplefilter("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a core dependency
        pass


def shard(data: TokenizedPairs, rank: int, world: int) -> TokenizedPairs:
    """Rank ``rank``'s share of ``data``: pairs ``rank``, ``rank + world``, ... (sizes differ by at most one; a
    new :class:`TokenizedPairs`, whose padded width :meth:`TokenizedPairs.batches` trims per batch). Interleaved
    rather than contiguous: with data sorted by length, contiguous shards would give the last rank the longest
    prompts while the others wait for it in the next collective."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world} processes")
    d = data.data
    part = Batch(*(getattr(d, f)[rank::world] for f in d.__dataclass_fields__))
    return TokenizedPairs(part, f"{data.fingerprint}[{rank}::{world}]")


def check_size(n: int, ctx: Context) -> None:
    if ctx.active and n < ctx.world:
        raise ValueError(
            f"{n} prompt pair(s) cannot be shared by {ctx.world} processes; give at least {ctx.world} pairs or start "
            f"fewer processes (--nproc-per-node)"
        )


def all_ok(ok: bool, ctx: Context) -> bool:
    """True when every rank reports ``ok`` (a collective: every rank must call it)."""
    if not ctx.active:
        return ok
    import torch.distributed as dist

    flag = torch.tensor([0.0 if ok else 1.0], device=ctx.comm_device)
    dist.all_reduce(flag)
    return float(flag.item()) == 0.0


def collective(fn: Callable[[], T], ctx: Context) -> T:
    """Run ``fn`` on every rank; if it fails on any rank, raise on all of them (so that no rank waits
    forever in the next collective). The failing rank re-raises its own error, also when it cannot reach the
    others any more (e.g. a CUDA error broke its device: it exits, and torchrun stops the others)."""
    error: BaseException | None = None
    result: Any = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
        error = e
    try:
        ok = all_ok(error is None, ctx)
    except Exception:
        if error is None:
            raise
        raise error from None
    if not ok:
        if error is not None:
            raise error
        raise PeerFailed("stopped because another process failed (that process printed the error)")
    return result


def _sum(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    import torch.distributed as dist

    buf = t.detach().to(ctx.comm_device, torch.float64).contiguous()
    dist.all_reduce(buf)
    return buf


def reduce_scores(local: Scores, n_local: int, n_total: int, ctx: Context, fingerprint: str | None = None) -> Scores:
    """The mean over all ranks' examples: Σ_rank n_rank · scores_rank / n_total (summed in float64, returned
    on the CPU in the local scores' dtype). ``fingerprint`` (the whole data set's) goes into the provenance."""
    if not ctx.active:
        return local

    def reduce(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        return (_sum(t.double() * n_local, ctx) / n_total).to("cpu", t.dtype)

    provenance = {**local.provenance, "n_examples": n_total, "data_parallel": {"world_size": ctx.world, "shard": "interleaved"}}
    if fingerprint is not None:
        provenance["data"] = fingerprint
    return replace(local.cpu(), edges=reduce(local.edges), nodes=reduce(local.nodes), neurons=reduce(local.neurons),
                   provenance=provenance)


def reduce_means(values: dict[str, float], n_local: int, n_total: int, ctx: Context) -> dict[str, float]:
    """Per-rank means of ``n_local`` examples -> means over all ``n_total`` examples (same keys on every rank)."""
    if not ctx.active:
        return dict(values)
    keys = sorted(values)
    summed = _sum(torch.tensor([values[k] * n_local for k in keys], dtype=torch.float64), ctx) / n_total
    return dict(zip(keys, summed.cpu().tolist()))


def broadcast(obj: T, ctx: Context) -> T:
    """Rank 0's ``obj`` on every rank (any picklable value)."""
    if not ctx.active:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, device=ctx.comm_device if ctx.backend == "nccl" else None)
    return box[0]


def attribute_parallel(
    model: Any, data: TokenizedPairs, spec: Any, ctx: Context, progress: Callable[[int, int], None] | None = None,
) -> Scores:
    """:func:`eapcore.attribute.attribute` on this rank's shard, reduced over all ranks (every rank gets the
    result). Alone, it is exactly ``attribute(model, data, spec, progress=progress)``."""
    from eapcore.attribute import attribute

    if not ctx.active:
        return attribute(model, data, spec, progress=progress)
    check_size(len(data), ctx)
    part = shard(data, ctx.rank, ctx.world)
    local = collective(lambda: attribute(model, part, spec, progress=progress, reference=data), ctx)
    return reduce_scores(local, len(part), len(data), ctx, data.fingerprint)
