"""Which implementation runs: the attribution backend and the evaluation engine, each chosen by one function.

Attribution backends compute the same scores two ways:

- ``unsplit`` (:mod:`eapcore.fastgrad`): gradient passes without per-head copies of the residual stream,
  the per-head q/k/v input gradients rebuilt through the attention's input norm; every level, input and
  activation interpolation, families whose norm it rebuilds;
- ``split`` (:mod:`eapcore.gradients`): every head's q/k/v input its own copy, gradients read there; every
  method that takes gradients, every level, every family.

Evaluation engines compute the same circuit metrics two ways:

- ``sparse`` (:mod:`eapcore.sparse`): only the nodes a circuit reads, from cached ablated inputs;
- ``hooked`` (:mod:`eapcore.evaluate`): one forward pass per batch with every out-of-circuit edge patched.

``auto`` picks the fastest that the method, the level and the model's family (:mod:`eapcore.families`)
allow. :func:`attribution_backend` and :func:`evaluation_engine` are the only places that decide; the
memory estimate calls them with an architecture name only (no model).
"""

from __future__ import annotations

from typing import Any

from eapcore import families, sparse
from eapcore.methods import Method, get_method

BACKENDS = ("unsplit", "split")  # both score every level
ENGINES = ("sparse", "hooked")


def check_backend(method: Method, requested: str) -> None:
    """Refuse a backend that no model could run ``method`` on (the model-independent part)."""
    if requested == "auto":
        return
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; choose auto, {' or '.join(BACKENDS)}")
    if requested not in method.backends:
        if not method.backends:
            raise ValueError(f"{method.name} runs circuit evaluations, whose engine the evaluator picks; "
                             f"use backend='auto', not {requested!r}")
        only = " only" if len(method.backends) == 1 else ""
        raise ValueError(f"{method.name} runs on the {' or '.join(method.backends)} backend{only}, not {requested!r}; "
                         f"use backend={' or '.join(map(repr, ['auto', *method.backends]))}")


def attribution_backend(method: str, architecture: str, requested: str = "auto", model: Any = None, n_pos: int = 0) -> str:
    """The backend that attributes with ``method`` (at any level) on a model of ``architecture``.

    ``requested``: ``auto`` (the first of the method's backends that runs here), ``unsplit`` or ``split``;
    one that cannot run here is a ``ValueError`` naming the model and the alternatives. A method that
    runs circuit evaluations (exact) gets the evaluator's engine (``model``, ``n_pos``: as for
    :func:`evaluation_engine`)."""
    m = get_method(method)
    check_backend(m, requested)
    if not m.backends:
        return evaluation_engine(architecture, "auto", model, n_pos)
    family = families.get(architecture)
    fits = {b: _runs(b, family) for b in m.backends}
    if requested == "auto":
        return next(b for b, ok in fits.items() if ok)
    if not fits[requested]:
        why = ("it is not a verified family (docs/families.md)" if family is None else
               f"its entry in eapcore/families.py has no unsplit backend (its norm: {families.NORMS[family.norm]})")
        others = [b for b, ok in fits.items() if ok]
        raise ValueError(f"the {requested} backend cannot run {method} on {architecture}: {why}; use "
                         f"backend={' or '.join(map(repr, ['auto', *others]))}")
    return requested


def _runs(backend: str, family: families.Family | None) -> bool:
    return backend == "split" or (family is not None and family.verified and family.unsplit)


def evaluation_engine(architecture: str, requested: str = "auto", model: Any = None, n_pos: int = 0) -> str:
    """The engine that evaluates circuits of a model of ``architecture`` on prompts of up to ``n_pos``
    tokens: ``sparse`` where the family has it and (given ``model``) the loaded model fits it, else
    ``hooked``. An explicit ``requested`` engine that cannot run is a ``ValueError`` saying why."""
    if requested not in ("auto", *ENGINES):
        raise ValueError(f"unknown engine {requested!r}; choose auto, {' or '.join(ENGINES)}")
    why = _why_not_sparse(architecture, model, n_pos)
    if requested == "auto":
        return "hooked" if why else "sparse"
    if requested == "sparse" and why:
        raise ValueError(f"the sparse engine cannot evaluate circuits of {architecture}: {why}; use "
                         "engine='hooked' (or 'auto', which picks it)")
    return requested


def _why_not_sparse(architecture: str, model: Any, n_pos: int) -> str | None:
    family = families.get(architecture)
    if family is None or not family.verified or not family.sparse:
        covered = [name for name, f in families.FAMILIES.items() if f.verified and f.sparse]
        return f"sparse evaluation covers {', '.join(covered)}"
    if model is None:
        return None
    return family.sparse_mismatch(model.original_model.config) or sparse.unfit(model, n_pos)

