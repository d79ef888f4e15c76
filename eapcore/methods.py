"""The attribution methods as one table: what each takes, accepts, runs and costs, and how it is described.

Validation (:class:`~eapcore.attribute.AttributionSpec`), the choice of backend (:mod:`eapcore.backends`),
progress counts, job planning, memory estimates (:mod:`eapcore.memory`) and the app's pickers read
:data:`METHODS` instead of testing method names. Adding a method: docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from eapcore.graph import Graph
from eapcore.interventions import INTERVENTIONS

LEVELS = ("edge", "node", "neuron")
# How each kind of method is computed (the function in eapcore.attribute that runs it per batch or per dataset).
RUNNERS = ("input-interpolation", "activation-interpolation", "information-flow", "removal")
# Memory profiles of eapcore.memory.attribution_estimate: Δ buffer and gradient passes; one clean run; the evaluator.
MEMORY_PROFILES = ("gradients", "clean run", "evaluation")


@dataclass(frozen=True)
class Method:
    """One attribution method.

    ``steps``: it takes ``ig_steps`` (interpolation steps); ``uses_metric`` / ``uses_intervention``: its
    scores depend on the metric / on what an ablated edge carries (information-flow routes read the clean
    run only); ``interventions`` and ``levels``: what it accepts; ``fixed_alphas``: where an
    input-interpolation method takes gradients, as weights of the clean embeddings (None: ``k/ig_steps``);
    ``runner``: how it is computed (:data:`RUNNERS`); ``backends``: the attribution backends that implement
    it, fastest first (:mod:`eapcore.backends`; none: it runs circuit evaluations, whose engine the
    evaluator picks); ``memory``: its memory profile (:data:`MEMORY_PROFILES`); ``passes``: forward (or
    forward/backward) passes per batch, from (method, graph, windows of source rows, ig_steps, level).
    """

    name: str
    summary: str
    runner: str
    passes: Callable[["Method", Graph, int, int, str], int]
    steps: bool = False
    uses_metric: bool = True
    uses_intervention: bool = True
    interventions: tuple[str, ...] = INTERVENTIONS
    levels: tuple[str, ...] = LEVELS
    fixed_alphas: tuple[float, ...] | None = None
    backends: tuple[str, ...] = ("split",)
    memory: str = "gradients"

    def __post_init__(self) -> None:
        if self.runner not in RUNNERS or self.memory not in MEMORY_PROFILES:
            raise ValueError(f"{self.name}: runner {self.runner!r} or memory profile {self.memory!r} is unknown")

    @property
    def takes_gradients(self) -> bool:
        """Its passes run backward (the gradient methods), not forward only."""
        return self.runner in ("input-interpolation", "activation-interpolation")

    def alphas(self, ig_steps: int) -> list[float]:
        """Weights of the clean embeddings at which an input-interpolation method takes gradients."""
        if self.fixed_alphas is not None:
            return list(self.fixed_alphas)
        return [k / ig_steps for k in range(ig_steps)]

    def label(self, ig_steps: int) -> str:
        """``EAP-IG-inputs (5 steps)``, or the bare name for a method without steps."""
        return f"{self.name} ({ig_steps} steps)" if self.steps else self.name

    def passes_per_batch(self, graph: Graph, windows: int, ig_steps: int, level: str) -> int:
        return self.passes(self, graph, windows, ig_steps, level)


def _input_passes(m: Method, graph: Graph, windows: int, ig_steps: int, level: str) -> int:
    """Per window: the ablated and the clean run, then one gradient pass per alpha."""
    return windows * (2 + len(m.alphas(ig_steps)))


def _activation_passes(m: Method, graph: Graph, windows: int, ig_steps: int, level: str) -> int:
    """Per window the ablated and the clean run; per source group (input, each attention, each MLP) its steps."""
    return 2 * windows + (2 * graph.cfg.n_layers + 1) * ig_steps


def _one_pass(m: Method, graph: Graph, windows: int, ig_steps: int, level: str) -> int:
    return 1


def _removal_passes(m: Method, graph: Graph, windows: int, ig_steps: int, level: str) -> int:
    """One evaluation per edge (or per node)."""
    return graph.n_edges if level == "edge" else graph.n_forward


_INPUT = dict(runner="input-interpolation", passes=_input_passes, backends=("unsplit", "split"))

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("EAP", "gradient at the clean input (one backward pass per batch)", **_INPUT, fixed_alphas=(1.0,)),
    Method("EAP-IG-inputs", "integrated gradients along the input embeddings from corrupted to clean", **_INPUT,
           steps=True, interventions=("patching",)),
    Method("clean-corrupted", "the mean of the gradients at the clean and the corrupted input", **_INPUT,
           interventions=("patching",), fixed_alphas=(1.0, 0.0)),
    Method("EAP-IG-activations", "integrated gradients along each source group's output, one group at a time",
           "activation-interpolation", _activation_passes, steps=True, backends=("unsplit", "split")),
    Method("information-flow-routes", "how much each source output makes up each destination input on the clean "
           "run (Ferrando & Voita 2024); no metric, no intervention", "information-flow", _one_pass,
           uses_metric=False, uses_intervention=False, levels=("edge",), memory="clean run"),
    Method("exact", "ablate each edge (or node) alone and measure the metric change: the ground truth, one "
           "evaluation per edge", "removal", _removal_passes, levels=("edge", "node"), backends=(),
           memory="evaluation"),
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]
