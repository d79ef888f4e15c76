"""Recording activations during a forward pass, and the names of the differences the engine forms.

One primitive, :func:`record`, makes a forward hook that keeps what it reads at a hook in a buffer
(written, or added with a sign) or in a dict; every recorder in the engine is built from it. Source
outputs are kept source-major, ``[rows batch pos d_model]`` (:mod:`eapcore.sites`), for the rows of a
*window* of source rows (all of them unless attribution is chunked, :func:`row_windows`).

The differences, one name each (docs/architecture.md, "Sign conventions"):

===========  =====================  ==================================================================
name         difference             where
===========  =====================  ==================================================================
``delta``    ablated − clean        attribution: Δ_u, what ablating source u changes in its output
``patch``    ablated − actual       hooked evaluation: what each out-of-circuit edge adds to its
                                    destination's input (actual: u's output in this same run)
``restore``  actual − ablated       sparse evaluation: what each in-circuit edge adds to the input
                                    its destination has with every edge ablated
===========  =====================  ==================================================================
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from eapcore.data import Batch
from eapcore.graph import Graph
from eapcore.models import model_device, model_dtype
from eapcore.sites import output_reader, source_major, sources

Hook = tuple[str, Callable]
Read = Callable[[torch.Tensor], torch.Tensor]


def record(hook: str, into: torch.Tensor | dict, at: Any, read: Read = source_major, sign: int | None = None) -> Hook:
    """A forward hook on ``hook`` that keeps ``read(t)`` (``t`` detached) in ``into[at]``.

    A tensor ``into`` gets it on its own device, written (``sign`` None) or added ``sign`` (±1) times;
    a dict ``into`` gets a copy."""
    def fn(t: torch.Tensor, hook: Any) -> None:
        value = read(t.detach())
        if isinstance(into, dict):
            into[at] = value.clone()
        elif sign is None:
            into[at] = value.to(into.device)  # a model split over devices writes to one buffer
        else:
            into[at].add_(value.to(into.device), alpha=sign)

    return hook, fn


def record_sources(model: Any, graph: Graph, into: torch.Tensor, window: slice | None = None,
                   sign: int | None = None) -> list[Hook]:
    """Hooks that keep each source output of ``window`` (default all rows) of ``model`` in ``into`` ``[rows
    batch pos d_model]``, which holds that window's rows: written, or added ``sign`` times. Outputs are read
    as :func:`eapcore.sites.output_reader` says (heads after a post-attention norm carry its scale)."""
    window = window or slice(0, graph.n_forward)
    return [record(s.hook, into, slice(s.rows.start - window.start, s.rows.stop - window.start),
                   output_reader(model, s), sign)
            for s in sources(graph) if window.start <= s.rows.start and s.rows.stop <= window.stop]


def row_windows(graph: Graph, chunks: int) -> list[slice]:
    """Split the source rows into at most ``chunks`` contiguous windows of roughly equal size, cut at
    source-group boundaries (input, each attention layer, each MLP)."""
    starts = [s.rows.start for s in sources(graph)]
    if not 1 <= chunks <= len(starts):
        raise ValueError(f"chunks must be between 1 and {len(starts)} (the source groups of this model), got {chunks}")
    cuts = sorted({min(starts, key=lambda a: abs(a - k * graph.n_forward / chunks)) for k in range(chunks)})
    return [slice(a, b) for a, b in zip(cuts, cuts[1:] + [graph.n_forward])]


def new_buffer(model: Any, graph: Graph, batch: Batch, window: slice | None = None) -> torch.Tensor:
    """An uninitialised ``[rows batch pos d_model]`` buffer (rows of ``window``, default all) in the
    model's dtype and device."""
    window = window or slice(0, graph.n_forward)
    B, P = batch.clean.shape
    shape = (window.stop - window.start, B, P, model.cfg.d_model)
    return torch.empty(shape, dtype=model_dtype(model), device=model_device(model))


def source_outputs(
    model: Any, graph: Graph, batch: Batch, tokens: torch.Tensor, window: slice | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sources' outputs on ``tokens`` (no gradient): ``([rows batch pos d_model], logits)``."""
    out = new_buffer(model, graph, batch, window)
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=record_sources(model, graph, out, window))
    return out, logits


def token_embeddings(model: Any, graph: Graph, batch: Batch, tokens: torch.Tensor) -> torch.Tensor:
    """The ``input`` node's output on ``tokens`` (``hook_embed``, after any embedding multiplier)
    ``[batch pos d_model]``; the blocks are not run."""
    out = new_buffer(model, graph, batch, slice(0, 1))
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=record_sources(model, graph, out, slice(0, 1)), stop_at_layer=0)
    return out[0]
