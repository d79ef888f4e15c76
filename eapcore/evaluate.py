"""Circuit evaluation and faithfulness (the curve over sizes: eapcore.curve).

:class:`CircuitEvaluator` caches what ablated sources carry, then evaluates each circuit with one of two
engines (:mod:`eapcore.backends`): ``sparse`` (:mod:`eapcore.sparse`, only the nodes the circuit reads)
or ``hooked``, one forward pass per batch of the clean prompt in which every destination input gets
Σ_{u not in circuit} ``patch``_u, with ``patch`` = ablated − actual (actual: u's output in this same
intervened run): each destination then sees its in-circuit parents' actual outputs and its
out-of-circuit parents' ablated ones.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from eapcore import sparse
from eapcore.backends import evaluation_engine
from eapcore.circuit import Circuit
from eapcore.data import Batch, TokenizedPairs
from eapcore.families import architecture
from eapcore.interventions import Intervention, make_intervention
from eapcore.memory import out_of_memory
from eapcore.metrics import Metric, MetricFn, get_metric, readout
from eapcore.models import model_device, model_graph, model_lock
from eapcore.recording import Hook, new_buffer, record, record_sources, source_outputs
from eapcore.sites import destinations, from_per_column, output_reader, sources
from eapcore.sparse import SparseCircuitRunner


@dataclass(frozen=True, eq=False)
class _Prepared:
    batch: Batch
    ablated: torch.Tensor  # [n_forward batch pos d_model]: what each source carries when ablated
    clean_readout: torch.Tensor  # [batch d_vocab]
    corrupted_readout: torch.Tensor
    runner: SparseCircuitRunner | None  # the sparse engine's, which evaluates edge circuits node by node


@dataclass(frozen=True)
class Baseline:
    """Mean metric of the clean and the corrupted run."""

    clean: float
    corrupted: float


class CircuitEvaluator:
    """Evaluates circuits of ``model`` on ``data`` under an intervention (``patching``, ``zero``, ``mean``,
    ``mean-positional``; means over ``reference``, default ``data``). What ablated sources carry is
    computed once, on first use. ``engine``: ``auto``, ``sparse`` or ``hooked``
    (:func:`eapcore.backends.evaluation_engine`); :attr:`engine` is the one that runs. Circuits with neuron
    masks always take the hooked pass."""

    def __init__(
        self, model: Any, data: TokenizedPairs, metric: str | Metric | MetricFn = "logit_diff", batch_size: int = 64,
        intervention: str = "patching", reference: TokenizedPairs | None = None, engine: str = "auto",
    ) -> None:
        self.model, self.data, self.metric = model, data, get_metric(metric)
        self.graph = model_graph(model)
        self.engine = evaluation_engine(architecture(model), engine, model, int(data.data.lengths.max()))
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

    def _prepare(self, batch: Batch, intervention: Intervention) -> _Prepared:
        corrupted, corrupted_logits = source_outputs(self.model, self.graph, batch, batch.corrupted)
        ablated = corrupted if intervention.corrupted_run else intervention.ablated(self.model, self.graph, batch)
        runner = None
        if self.engine == "sparse":
            clean = new_buffer(self.model, self.graph, batch)
            inputs = torch.empty(2 * self.graph.cfg.n_layers + 1, *clean.shape[1:], dtype=clean.dtype, device=clean.device)
            hooks = record_sources(self.model, self.graph, clean) + sparse.input_recorders(self.graph, inputs)
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

    def evaluate(self, circuit: Circuit, reuse_clean: bool = True) -> torch.Tensor:
        """Per-example metric ``[n_examples]`` of ``circuit``: out-of-circuit edges carry ablated outputs.
        ``reuse_clean``: the full graph's metric is the cached clean run's; False runs it through the engine
        like any other circuit."""
        return torch.cat(self._per_batch(circuit, reuse_clean, lambda p, logits: self._metric(logits, p)))

    def logits(self, circuit: Circuit, reuse_clean: bool = True) -> torch.Tensor:
        """Read-out logits ``[n_examples d_vocab]`` (each example's last real token) of ``circuit``."""
        return torch.cat(self._per_batch(circuit, reuse_clean, lambda p, logits: logits))

    def _per_batch(self, circuit: Circuit, reuse_clean: bool,
                   use: Callable[[_Prepared, torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        """``use(batch, read-out logits)`` for every batch, each batch's logits freed before the next."""
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
        if reuse_clean and partial is None and not bool(patch_mask.any()):  # the full graph: the clean run, cached
            return [use(p, p.clean_readout) for p in prepared]
        values = []
        with self._memory_advice(), model_lock(self.model), torch.inference_mode():
            for p in prepared:
                if p.runner is not None and partial is None:
                    values.append(use(p, p.runner.readout(kept)))
                    continue
                logits = self.model.run_with_hooks(p.batch.clean, fwd_hooks=self._hooks(p.ablated, patch_mask, partial))
                values.append(use(p, readout(logits, p.batch.lengths)))
        return values

    def _hooks(self, ablated: torch.Tensor, patch_mask: torch.Tensor, partial: tuple | None) -> list[Hook]:
        """Forward hooks that patch every out-of-circuit edge (and excluded neurons of in-circuit ones);
        none where nothing is patched."""
        patch = ablated.clone()  # becomes ablated − actual as sources fire
        used_rows = patch_mask.any(1).nonzero().flatten().tolist()
        n_used = self.graph.n_forward if partial is not None else max(used_rows) + 1 if used_rows else 0
        hooks = [record(s.hook, patch, s.rows, output_reader(self.model, s), -1) for s in sources(self.graph) if s.rows.start < n_used]
        for d in destinations(self.graph):
            n = d.n_sources
            block = patch_mask[:n, d.cols]
            kept = None if partial is None else partial[0][:n, d.cols]
            if kept is None and not bool(block.any()):
                continue

            def add(t: torch.Tensor, hook: Any, n: int = n, block=block, kept=kept) -> torch.Tensor:
                flat = block.T @ patch[:n].reshape(n, -1)  # [cols, batch*pos*d_model]
                if kept is not None:
                    dropped = patch[:n] * partial[1][:n, None, None, :]
                    flat = flat + kept.T @ dropped.reshape(n, -1)
                return t + from_per_column(flat.reshape(block.shape[1], *patch.shape[1:]).permute(1, 2, 0, 3), t).to(t.device)

            hooks.append((d.hook, add))
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

