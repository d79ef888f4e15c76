"""Which local folders a server may load models from: the app's policy (the CLI loads any path it is given).

A model name that :func:`eapcore.models.resolve_source` would read as a local folder must lie, after
``~`` is expanded and symbolic links are followed, inside one of the allowed roots, and may not contain
``..``. The roots are the folders in ``EAPCORE_MODEL_ROOTS`` (separated by ``os.pathsep``), else the
project's ``assets/`` and the Hugging Face cache. ``demo`` and hub names (read through the cache) pass.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from eapcore.models import ASSETS, looks_like_path

ENV_ROOTS = "EAPCORE_MODEL_ROOTS"


class ForbiddenPathError(PermissionError):
    """A model folder outside the allowed roots; the message names the roots and how to add one."""


def hf_cache() -> Path:
    """The Hugging Face hub cache (``HF_HUB_CACHE``, ``HF_HOME``/hub, or ``~/.cache/huggingface/hub``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def allowed_roots(extra: Iterable[str | Path] = ()) -> list[Path]:
    """The allowed roots (``EAPCORE_MODEL_ROOTS``, else ``assets/`` and the Hugging Face cache) and ``extra``,
    each with ``~`` expanded and symbolic links followed."""
    configured = [p for p in os.environ.get(ENV_ROOTS, "").split(os.pathsep) if p.strip()]
    roots = [Path(p) for p in configured] if configured else [ASSETS, hf_cache()]
    return list(dict.fromkeys(Path(r).expanduser().resolve() for r in [*roots, *extra]))


def is_local(name: str) -> bool:
    """Whether :func:`eapcore.models.resolve_source` reads ``name`` as a local folder."""
    return name != "demo" and (looks_like_path(name) or Path(name).expanduser().exists())


def check_model_source(name: str, roots: Sequence[Path]) -> None:
    """Raise :class:`ForbiddenPathError` if ``name`` is a local folder outside ``roots`` (or holds ``..``),
    whether or not it exists, so that the answer says nothing about folders elsewhere."""
    if not is_local(name):
        return
    listed = ", ".join(repr(str(r)) for r in roots) or "none"
    how = (f"An administrator adds a folder by starting the app with {ENV_ROOTS} set to the folders allowed, "
           f"separated by {os.pathsep!r} (docs/server.md). Allowed now: {listed}.")
    path = Path(name).expanduser()
    if ".." in path.parts:
        raise ForbiddenPathError(f"model path {name!r} contains '..'; give the folder's path without it. {how}")
    real = path.resolve()
    if not any(real == root or real.is_relative_to(root) for root in roots):
        raise ForbiddenPathError(
            f"this server loads model folders only from its allowed roots, and {name!r} (symbolic links followed) "
            f"lies outside them. {how}")
