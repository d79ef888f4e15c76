"""Circuit evaluation in one forward pass per batch, and faithfulness (the curve over sizes: eapcore.curve).

During the clean run every destination input gets Σ_{u not in circuit} (a_u^corrupted − a_u^actual),
where a_u^actual is u's output in this same intervened run: each destination then sees its in-circuit
parents' actual outputs and its out-of-circuit parents' corrupted ones (design §5).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from eapcore.circuit import Circuit, Scores
from eapcore.data import Batch, TokenizedPairs
from eapcore import sparse
from eapcore.memory import out_of_memory
from eapcore.interventions import make_intervention, new_buffer, recorders, source_outputs
from eapcore.metrics import Metric, MetricFn, get_metric, readout
from eapcore.models import model_device, model_graph, model_lock
from eapcore.sites import destinations, from_per_column, source_major, sources
from eapcore.sparse import SparseCircuitRunner


@dataclass(frozen=True, eq=False)
class _Prepared:
    batch: Batch
    ablated: torch.Tensor  # [n_forward batch pos d_model]: what each source carries when ablated
    clean_readout: torch.Tensor  # [batch d_vocab]
    corrupted_readout: torch.Tensor
    runner: SparseCircuitRunner | None  # evaluates edge circuits node by node, where the model allows


@dataclass(frozen=True)
class Baseline:
    """Mean metric of the clean and the corrupted run."""

    clean: float
    corrupted: float


class CircuitEvaluator:
    """Evaluates circuits of ``model`` on ``data`` under an intervention (``patching``, ``zero``, ``mean``,
    ``mean-positional``; means over ``reference``, default ``data``). What ablated sources carry is
    computed once, on first use."""

    def __init__(
        self, model: Any, data: TokenizedPairs, metric: str | Metric | MetricFn = "logit_diff", batch_size: int = 64,
        intervention: str = "patching", reference: TokenizedPairs | None = None,
    ) -> None:
        self.model, self.data, self.metric = model, data, get_metric(metric)
        self.graph = model_graph(model)
        self.batch_size = batch_size
        self.intervention_kind = intervention
        self.reference = reference
        self._prepared_batches: list[_Prepared] | None = None
        self._empty: float | None = None

    # ----- cached runs -----
    def _prepared(self) -> list[_Prepared]:
        if self._prepared_batches is None:
            with self._memory_advice(), model_lock(self.model), torch.inference_mode():
                intervention = make_intervention(
                    self.intervention_kind, self.model, self.graph, self.reference or self.data, self.batch_size
                )
                self._prepared_batches = [
                    self._prepare(b, intervention) for b in self.data.batches(self.batch_size, model_device(self.model))
                ]
        return self._prepared_batches

    @contextmanager
    def _memory_advice(self) -> Iterator[None]:
        """A failed allocation becomes a MemoryError that says what to change."""
        try:
            yield
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not out_of_memory(e):
                raise
            raise MemoryError(
                f"out of memory on {model_device(self.model)} while evaluating {len(self.data)} prompts in batches of "
                f"{self.batch_size} (every source's ablated output is cached); use fewer prompts, a smaller batch or "
                "half precision (--dtype bfloat16); --dry-run estimates the memory"
            ) from e

    def _prepare(self, batch: Batch, intervention: Any) -> _Prepared:
        corrupted, corrupted_logits = source_outputs(self.model, self.graph, batch, batch.corrupted)
        ablated = corrupted if intervention.kind == "patching" else intervention.ablated(self.model, self.graph, batch)
        runner = None
        if sparse.supports(self.model, batch.n_pos):
            inputs: list = []
            clean = new_buffer(self.model, self.graph, batch)
            hooks = recorders(self.graph, clean) + sparse.input_recorders(self.graph, inputs)
            clean_logits = self.model.run_with_hooks(batch.clean, fwd_hooks=hooks)
            runner = SparseCircuitRunner(self.model, self.graph, ablated, clean, inputs, batch.lengths)
        else:
            clean_logits = self.model(batch.clean)
        return _Prepared(batch, ablated, readout(clean_logits, batch.lengths), readout(corrupted_logits, batch.lengths),
                         runner)

    def _metric(self, logits: torch.Tensor, p: _Prepared) -> torch.Tensor:
        return self.metric(logits, p.batch, p.clean_readout).double().cpu()

    # ----- public -----
    def example_baseline(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example metric ``[n_examples]`` of the clean and of the corrupted run."""
        prepared = self._prepared()
        clean = torch.cat([self._metric(p.clean_readout, p) for p in prepared])
        return clean, torch.cat([self._metric(p.corrupted_readout, p) for p in prepared])

    def baseline(self) -> Baseline:
        clean, corrupted = self.example_baseline()
        return Baseline(clean.mean().item(), corrupted.mean().item())

    def evaluate(self, circuit: Circuit) -> torch.Tensor:
        """Per-example metric ``[n_examples]`` of ``circuit``: out-of-circuit edges carry corrupted outputs."""
        if circuit.graph.cfg != self.graph.cfg:
            raise ValueError(f"circuit graph {circuit.graph.cfg} does not match the model's graph {self.graph.cfg}")
        prepared = self._prepared()
        like = prepared[0].ablated
        real = self.graph.real_edge_mask
        kept = real & circuit.edges.cpu()  # the circuit's real edges
        patch_mask = (real & ~kept).to(device=like.device, dtype=like.dtype)
        partial = None
        if circuit.neurons is not None:  # in-circuit edges still ablate their parent's excluded dimensions
            partial = (kept.to(like), (~circuit.neurons.cpu()).to(like))
        if partial is None and not bool(patch_mask.any()):  # the full graph: the clean run, cached
            return torch.cat([self._metric(p.clean_readout, p) for p in prepared])
        values = []
        with self._memory_advice(), model_lock(self.model), torch.inference_mode():
            for p in prepared:
                if p.runner is not None and partial is None:
                    values.append(self._metric(p.runner.readout(kept), p))
                    continue
                logits = self.model.run_with_hooks(p.batch.clean, fwd_hooks=self._hooks(p.ablated, patch_mask, partial))
                values.append(self._metric(readout(logits, p.batch.lengths), p))
        return torch.cat(values)

    def _hooks(self, ablated: torch.Tensor, patch_mask: torch.Tensor, partial: tuple | None) -> list:
        """Forward hooks that patch every out-of-circuit edge (and excluded neurons of in-circuit ones);
        none where nothing is patched."""
        diff = ablated.clone()  # becomes a_ablated - a_actual as sources fire
        hooks = []
        used_rows = patch_mask.any(1).nonzero().flatten().tolist()
        n_used = max(used_rows) + 1 if used_rows else 0
        if partial is not None:
            n_used = self.graph.n_forward

        def subtract(rows: slice) -> Callable:
            def hook(t: torch.Tensor, hook: Any) -> None:
                diff[rows] -= source_major(t).to(diff.device)
            return hook

        for s in sources(self.graph):
            if s.rows.start < n_used:
                hooks.append((s.hook, subtract(s.rows)))
        for d in destinations(self.graph):
            block = patch_mask[: d.prev, d.cols]
            kept = None if partial is None else partial[0][: d.prev, d.cols]
            if kept is None and not bool(block.any()):
                continue

            def patch(t: torch.Tensor, hook: Any, prev: int = d.prev, block=block, kept=kept) -> torch.Tensor:
                flat = block.T @ diff[:prev].reshape(prev, -1)  # [cols, batch*pos*d_model]
                if kept is not None:
                    dropped = diff[:prev] * partial[1][:prev, None, None, :]
                    flat = flat + kept.T @ dropped.reshape(prev, -1)
                add = flat.reshape(block.shape[1], *diff.shape[1:]).permute(1, 2, 0, 3)
                return t + from_per_column(add, t).to(t.device)

            hooks.append((d.hook, patch))
        return hooks

    def empty_metric(self) -> float:
        """Mean metric of the empty circuit, m(∅)."""
        if self._empty is None:
            self._empty = self.evaluate(Circuit.empty(self.graph)).mean().item()
        return self._empty

    def faithfulness(self, circuit: Circuit) -> float:
        """(m(C) − m(∅)) / (m(full) − m(∅)); 1 means the circuit alone recovers the model's behaviour."""
        m_c = self.evaluate(circuit).mean().item()
        return normalized(m_c, self.baseline().clean, self.empty_metric())


def normalized(value: float, full: float, empty: float) -> float:
    if full == empty:
        raise ValueError(
            f"the clean and empty-circuit metrics are equal ({full}); faithfulness is undefined: the corruption "
            "does not change the model's behaviour on this data"
        )
    return (value - empty) / (full - empty)

