"""Host data to the device in one copy per dtype, without making the host wait.

The engines decide what to compute on the CPU (index tensors, masks) and hand the result to the model's
device once per call. Copying each small tensor on its own from pageable host memory makes the host wait for
the device every time; :func:`to_device` gathers every tensor of a structure
(dataclasses, tuples, lists, dicts) into one buffer per dtype, pinned on CUDA, copies it asynchronously and puts views of it back in place.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, TypeVar

import torch

T = TypeVar("T")


def _leaves(tree: Any, out: list[torch.Tensor]) -> None:
    if isinstance(tree, torch.Tensor):
        out.append(tree)
    elif dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        for f in dataclasses.fields(tree):
            _leaves(getattr(tree, f.name), out)
    elif isinstance(tree, (tuple, list)):
        for item in tree:
            _leaves(item, out)
    elif isinstance(tree, dict):
        for item in tree.values():
            _leaves(item, out)


def _rebuild(tree: Any, views: Iterator[torch.Tensor]) -> Any:
    if isinstance(tree, torch.Tensor):
        return next(views)
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return dataclasses.replace(tree, **{f.name: _rebuild(getattr(tree, f.name), views) for f in dataclasses.fields(tree)
                                            if f.init})
    if isinstance(tree, (tuple, list)):
        return type(tree)(_rebuild(item, views) for item in tree)
    if isinstance(tree, dict):
        return {key: _rebuild(item, views) for key, item in tree.items()}
    return tree


def to_device(tree: T, device: torch.device) -> T:
    """``tree`` with every (CPU) tensor in it replaced by a copy on ``device``, all tensors of one dtype copied
    together (from pinned memory, asynchronously, on CUDA)."""
    leaves: list[torch.Tensor] = []
    _leaves(tree, leaves)
    views: list[torch.Tensor | None] = [None] * len(leaves)
    for dtype in {t.dtype for t in leaves}:
        places = [i for i, t in enumerate(leaves) if t.dtype == dtype]
        flat = torch.cat([leaves[i].reshape(-1) for i in places])
        if device.type == "cuda":
            flat = flat.pin_memory()
        flat = flat.to(device, non_blocking=True)
        at = 0
        for i in places:
            views[i] = flat[at:at + leaves[i].numel()].view(leaves[i].shape)
            at += leaves[i].numel()
    return _rebuild(tree, iter(views))
