"""The attribution methods as one table: what each takes, what it accepts, and how it is described.

Validation (:class:`~eapcore.attribute.AttributionSpec`), job planning, memory estimates and the app's
pickers read :data:`METHODS` instead of testing method names.
"""

from __future__ import annotations

from dataclasses import dataclass

from eapcore.interventions import INTERVENTIONS

LEVELS = ("edge", "node", "neuron")


@dataclass(frozen=True)
class Method:
    """One attribution method.

    ``steps``: it takes ``ig_steps`` (interpolation steps); ``uses_metric`` / ``uses_intervention``: its
    scores depend on the metric / on what an ablated edge carries (information-flow routes read the clean
    run only); ``interventions`` and ``levels``: what it accepts; ``alphas``: where input interpolation takes
    gradients, as weights of the clean embeddings (``None``: it does not interpolate the input).
    """

    name: str
    summary: str
    steps: bool = False
    uses_metric: bool = True
    uses_intervention: bool = True
    interventions: tuple[str, ...] = INTERVENTIONS
    levels: tuple[str, ...] = LEVELS
    fixed_alphas: tuple[float, ...] | None = None
    input_interpolation: bool = False

    def alphas(self, ig_steps: int) -> list[float]:
        """Weights of the clean embeddings at which an input-interpolation method takes gradients."""
        if self.fixed_alphas is not None:
            return list(self.fixed_alphas)
        return [k / ig_steps for k in range(ig_steps)]

    def label(self, ig_steps: int) -> str:
        """``EAP-IG-inputs (5 steps)``, or the bare name for a method without steps."""
        return f"{self.name} ({ig_steps} steps)" if self.steps else self.name


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("EAP", "gradient at the clean input (one backward pass per batch)",
           input_interpolation=True, fixed_alphas=(1.0,)),
    Method("EAP-IG-inputs", "integrated gradients along the input embeddings from corrupted to clean",
           steps=True, interventions=("patching",), input_interpolation=True),
    Method("clean-corrupted", "the mean of the gradients at the clean and the corrupted input",
           interventions=("patching",), input_interpolation=True, fixed_alphas=(1.0, 0.0)),
    Method("EAP-IG-activations", "integrated gradients along each source group's output, one group at a time",
           steps=True),
    Method("information-flow-routes", "how much each source output makes up each destination input on the clean "
           "run (Ferrando & Voita 2024); no metric, no intervention", uses_metric=False, uses_intervention=False,
           levels=("edge",)),
    Method("exact", "ablate each edge (or node) alone and measure the metric change: the ground truth, one "
           "evaluation per edge", levels=("edge", "node")),
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]
