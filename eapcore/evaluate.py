"""Circuit evaluation and faithfulness (the curve over sizes: eapcore.curve).

:class:`CircuitEvaluator` caches what ablated sources carry, then evaluates each circuit with one of two
engines (:mod:`eapcore.backends`): ``sparse`` (:mod:`eapcore.sparse`, only the nodes the circuit reads)
or ``hooked``, one forward pass per batch of the clean prompt in which every destination input gets
Σ_{u not in circuit} ``patch``_u, with ``patch`` = ablated − actual (actual: u's output in this same
intervened run): each destination then sees its in-circuit parents' actual outputs and its
out-of-circuit parents' ablated ones.

Passes through the model's bridge (preparing the cache, the hooked engine) take the model's turn
(:func:`eapcore.models.model_lock`); the sparse engine computes from hook-free views of the modules
(:func:`eapcore.shared.hook_free`), so it runs beside another thread's hooked pass without waiting.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from eapcore import sparse
from eapcore.backends import evaluation_engine
from eapcore.circuit import Circuit
from eapcore.data import Batch, TokenizedPairs
from eapcore.families import architecture
from eapcore.graph import Graph
from eapcore.interventions import Intervention, make_intervention
from eapcore.memory import out_of_memory
from eapcore.metrics import Metric, MetricFn, get_metric, readout
from eapcore.models import model_device, model_graph, model_lock
from eapcore.recording import Hook, new_buffer, record, record_sources, source_outputs
from eapcore.sites import destinations, from_per_column, output_reader, sources
from eapcore.sparse import SparseCircuitRunner
from eapcore.removals import Removal, removal_logits, stacks
from eapcore.sparse_plan import Held, make_plan
from eapcore.upload import to_device


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
        self._held: Held | None = None  # the circuit whose node outputs the sparse runners hold (eapcore.sparse_plan)
        self._preparing = threading.Lock()  # the cached runs, made once however many threads ask
        self._holding = threading.Lock()  # the runners' held outputs: one sparse evaluation at a time

    # ----- cached runs -----
    def _prepared(self) -> list[_Prepared]:
        """The cached runs, made once: a second session that asks while the first makes them waits for them."""
        if self._prepared_batches is None:
            with self._preparing:
                if self._prepared_batches is None:
                    with self._memory_advice(), model_lock(self.model), torch.inference_mode():
                        intervention = make_intervention(
                            self.intervention_kind, self.model, self.graph, self.reference or self.data, self.batch_size
                        )
                        self._prepared_batches = [
                            self._prepare(b, intervention)
                            for b in self.data.batches(self.batch_size, model_device(self.model))
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
            clean, inputs, clean_logits = self._clean_run(batch)
            runner = SparseCircuitRunner(self.model, self.graph, ablated, clean, inputs, batch.lengths)
        else:
            clean_logits = self.model(batch.clean)
        return _Prepared(batch, ablated, readout(clean_logits, batch.lengths), readout(corrupted_logits, batch.lengths),
                         runner)

    def _clean_run(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The clean run's source outputs ``[n_forward batch pos d_model]``, inputs of every destination group
        ``[2 n_layers + 1, batch pos d_model]`` and logits."""
        clean = new_buffer(self.model, self.graph, batch)
        inputs = torch.empty(2 * self.graph.cfg.n_layers + 1, *clean.shape[1:], dtype=clean.dtype, device=clean.device)
        hooks = record_sources(self.model, self.graph, clean) + sparse.input_recorders(self.graph, inputs)
        return clean, inputs, self.model.run_with_hooks(batch.clean, fwd_hooks=hooks)

    def _metric(self, logits: torch.Tensor, p: _Prepared) -> torch.Tensor:
        """Per-example metric ``[batch]`` in float64, on the model's device (brought back once per call)."""
        return self.metric(logits, p.batch, p.clean_readout).double()

    # ----- public -----
    def example_baseline(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example metric ``[n_examples]`` of the clean and of the corrupted run."""
        prepared = self._prepared()
        clean = torch.cat([self._metric(p.clean_readout, p) for p in prepared]).cpu()
        return clean, torch.cat([self._metric(p.corrupted_readout, p) for p in prepared]).cpu()

    def baseline(self) -> Baseline:
        clean, corrupted = self.example_baseline()
        return Baseline(clean.mean().item(), corrupted.mean().item())

    def evaluate(self, circuit: Circuit, reuse_clean: bool = True) -> torch.Tensor:
        """Per-example metric ``[n_examples]`` of ``circuit``: out-of-circuit edges carry ablated outputs.
        ``reuse_clean``: the full graph's metric is the cached clean run's; False runs it through the engine
        like any other circuit."""
        return torch.cat(self._per_batch(circuit, reuse_clean, lambda p, logits: self._metric(logits, p))).cpu()

    def logits(self, circuit: Circuit, reuse_clean: bool = True) -> torch.Tensor:
        """Read-out logits ``[n_examples d_vocab]`` (each example's last real token) of ``circuit``."""
        return torch.cat(self._per_batch(circuit, reuse_clean, lambda p, logits: logits)).cpu()

    def _per_batch(self, circuit: Circuit, reuse_clean: bool,
                   use: Callable[[_Prepared, torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        """``use(batch, read-out logits)`` for every batch, each batch's logits freed before the next. What
        to compute is decided once, from the CPU masks (the sparse engine's plan, the hooked engine's
        patched destinations), for all batches."""
        if circuit.graph.cfg != self.graph.cfg:
            raise ValueError(f"circuit graph {circuit.graph.cfg} does not match the model's graph {self.graph.cfg}")
        prepared = self._prepared()
        like = prepared[0].ablated
        real = self.graph.real_edge_mask
        kept = real & circuit.edges.cpu()  # the circuit's real edges
        neurons = None if circuit.neurons is None else circuit.neurons.cpu()
        if reuse_clean and neurons is None and bool(kept.eq(real).all()):  # the full graph: the clean run, cached
            return [use(p, p.clean_readout) for p in prepared]
        values = []
        if self.engine == "sparse" and neurons is None:  # no pass through the bridge: no turn at the model
            with self._memory_advice(), self._holding, torch.inference_mode():
                plan = make_plan(self.graph, kept, self._held, like.device, like.dtype)
                self._held = None  # until every batch's runner holds the plan's circuit
                for p in prepared:
                    values.append(use(p, p.runner.readout(plan)))
                self._held = plan.held
            return values
        with self._memory_advice(), model_lock(self.model), torch.inference_mode():
            patches = _Patches(self.model, self.graph, real & ~kept, kept, neurons, like)
            for p in prepared:
                logits = self.model.run_with_hooks(p.batch.clean, fwd_hooks=patches.hooks(p.ablated))
                values.append(use(p, readout(logits, p.batch.lengths)))
        return values

    def without(self, removals: Sequence[Removal], progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Per-example metric ``[len(removals) n_examples]`` (float64) of the full graph with each removal's
        edges removed: an edge ``(row, col)``, or all of a node's outgoing edges ``(row, None)``.

        The sparse engine evaluates the removals that start at the same place stacked along the batch
        (:mod:`eapcore.removals`), from the clean run's outputs and inputs, run once per batch and kept for
        that batch only; the hooked engine evaluates each removal's circuit. ``progress(done, total)`` is
        called as removals are evaluated on each batch (``total``: removals × batches); raise from it to stop."""
        prepared, n_removals = self._prepared(), len(removals)
        total, done = n_removals * len(prepared), 0
        if self.engine != "sparse":
            values = []
            for row, col in removals:
                keep = self.graph.real_edge_mask.clone()
                keep[row, slice(None) if col is None else col] = False
                values.append(self.evaluate(Circuit(self.graph, keep, torch.ones(self.graph.n_forward, dtype=torch.bool))))
                done += len(prepared)
                if progress is not None:
                    progress(done, total)
            return torch.stack(values) if values else torch.zeros(0, len(self.data), dtype=torch.float64)
        like = prepared[0].ablated
        out = torch.zeros(n_removals, len(self.data), dtype=torch.float64, device=like.device)
        with self._memory_advice(), model_lock(self.model), torch.inference_mode():
            tokens = max(p.batch.clean.numel() for p in prepared)
            plan = stacks(self.graph, removals, tokens, like.device, like.dtype)
            first = 0
            for p in prepared:
                clean, inputs, _ = self._clean_run(p.batch)
                examples = slice(first, first + p.batch.size)
                for stack in plan:
                    logits = removal_logits(p.runner, stack, clean, inputs)
                    for place, one in zip(stack.places, logits):
                        out[place, examples] = self._metric(one, p)
                    done += len(stack.places)
                    if progress is not None:
                        progress(done, total)
                first = examples.stop
                del clean, inputs
        return out.cpu()

    def forget(self) -> None:
        """Drop the node outputs kept from the last evaluation (their memory: one more copy of the ablated
        outputs); the next evaluation computes every node its circuit needs."""
        with self._holding:
            self._held = None
            for p in self._prepared_batches or []:
                if p.runner is not None:
                    p.runner.forget()

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


class _Patches:
    """The hooked engine's patches for one circuit, decided once from the CPU masks: which sources are
    recorded and which destination inputs get Σ_{u not in circuit} ``patch``_u (and, for in-circuit edges of
    a neuron circuit, their parent's excluded dimensions); the masks go to ``like``'s device and dtype once."""

    def __init__(self, model: Any, graph: Graph, patched: torch.Tensor, kept: torch.Tensor, neurons: torch.Tensor | None,
                 like: torch.Tensor) -> None:
        self.model, self.graph = model, graph
        used = patched.any(1).nonzero().flatten()
        self.n_used = graph.n_forward if neurons is not None else int(used.max()) + 1 if len(used) else 0
        dropped = None if neurons is None else (~neurons).to(like.dtype)  # [n_forward d_model]
        blocks = []  # (its patch mask [n cols], its kept mask or None) per patched destination
        self.patched = []
        for d in destinations(graph):
            block = patched[:d.n_sources, d.cols]
            if neurons is None and not bool(block.any()):
                continue
            self.patched.append(d)
            blocks.append((block.to(like.dtype), None if neurons is None else kept[:d.n_sources, d.cols].to(like.dtype)))
        self.dropped, self.blocks = to_device((dropped, blocks), like.device)  # one copy per dtype

    def hooks(self, ablated: torch.Tensor) -> list[Hook]:
        """Forward hooks for one batch: ``ablated`` ``[n_forward batch pos d_model]``."""
        patch = ablated.clone()  # becomes ablated − actual as sources fire
        hooks = [record(s.hook, patch, s.rows, output_reader(self.model, s), -1)
                 for s in sources(self.graph) if s.rows.start < self.n_used]
        for d, (block, kept) in zip(self.patched, self.blocks):
            def add(t: torch.Tensor, hook: Any, n: int = d.n_sources, block=block, kept=kept) -> torch.Tensor:
                flat = block.T @ patch[:n].reshape(n, -1)  # [cols, batch*pos*d_model]
                if kept is not None:
                    dropped = patch[:n] * self.dropped[:n, None, None, :]
                    flat = flat + kept.T @ dropped.reshape(n, -1)
                return t + from_per_column(flat.reshape(block.shape[1], *patch.shape[1:]).permute(1, 2, 0, 3), t).to(t.device)

            hooks.append((d.hook, add))
        return hooks
