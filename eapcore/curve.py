"""The faithfulness curve over circuit sizes and its areas, CPR and CMD, as MIB's circuit track computes them.

For each size ``p`` (a percentage of the graph's edges) the circuit is the top-``⌊p/100 · N⌋`` edges of the
ranking (pruned), and its faithfulness is ``f = (m(C) − m(∅)) / (m(full) − m(∅))``. With ``x = p/100`` (the
**linear** axis) or ``x = ln(p/100)`` (the **log** axis) and the trapezoid rule over consecutive points:

* ``area_under`` = Σ (x₂ − x₁)·(f₁ + f₂)/2, reported as **CPR** (higher is better);
* ``area_from_1`` = Σ (x₂ − x₁)·(|1 − f₁| + |1 − f₂|)/2, reported as **CMD** (lower is better).

These are the names and the arithmetic of MIB's ``evaluate_area_under_curve``, which ranks edges by signed
score or by ``|score|`` (``absolute``) and integrates over a linear axis unless ``log_scale`` is set. The log
axis spans ln(1000) ≈ 6.91 between 0.1 % and 100 % and is not normalised, as in MIB.

Which combination is which number (docs/mib.md): MIB's leaderboard evaluates each submission twice and reports
**CPR from the signed ranking** and **CMD from the absolute ranking** (:data:`LEADERBOARD`), with a log-scaled
axis as reported for the board (:data:`LEADERBOARD_AXIS`); MIB's public ``run_evaluation.py`` defaults to the
signed ranking and the linear axis (:data:`PUBLIC_SCRIPT`). :func:`mib_curves` computes both rankings and
:meth:`MIBCurves.to_dict` reports every area on both axes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from eapcore.circuit import Circuit, Scores
from eapcore.evaluate import CircuitEvaluator, normalized
from eapcore.graph import Graph
from eapcore.select import top_n

MIB_PERCENTS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
AXES = ("linear", "log")
RANKINGS = ("signed", "absolute")
# (ranking, area) behind each number MIB's leaderboard reports.
LEADERBOARD = {"CPR": ("signed", "area_under"), "CMD": ("absolute", "area_from_1")}
LEADERBOARD_AXIS = "log"
# What MIB's public run_evaluation.py computes without options: one curve, signed ranking, linear axis.
PUBLIC_SCRIPT = {"ranking": "signed", "axis": "linear"}


def size_for_percent(total: int, percent: float) -> int:
    """How many of ``total`` edges (or nodes) MIB keeps at ``percent``%: ``int(percent/100 · total)``, as its
    evaluator computes ``int(pct * n)`` (``percent/100`` equals MIB's fractions exactly for its ten sizes)."""
    return int(percent / 100 * total)


def edges_for_percent(graph: Graph, percent: float) -> int:
    return size_for_percent(graph.n_edges, percent)


def fine_percents(n_points: int = 25, lo: float = 0.1, hi: float = 100.0) -> tuple[float, ...]:
    """Log-spaced percentages from ``lo`` to ``hi``."""
    return tuple(round(math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * i / (n_points - 1)), 4) for i in range(n_points))


def _axis(percents: Sequence[float], axis: str) -> list[float]:
    if axis == "linear":
        return [p / 100 for p in percents]
    if axis == "log":
        bad = [p for p in percents if p <= 0]
        if bad:
            raise ValueError(f"the log axis needs sizes above 0%, got {bad[0]}%; integrate this curve on the linear axis")
        return [math.log(p / 100) for p in percents]
    raise ValueError(f"unknown axis {axis!r}; choose one of {', '.join(AXES)}")


def area(percents: Sequence[float], values: Sequence[float], axis: str = "linear") -> float:
    """Trapezoid area of ``values`` over ``x = percent/100`` (linear) or ``ln(percent/100)`` (log), summed in
    order as MIB's evaluator sums it."""
    x = _axis(percents, axis)
    total = 0.0
    for i in range(len(values) - 1):
        total += (x[i + 1] - x[i]) * ((values[i] + values[i + 1]) / 2)
    return total


@dataclass(frozen=True)
class Curve:
    """Faithfulness of the top-k circuits at sizes given as percentages of the graph's edges (or nodes).
    ``absolute``: whether the circuits were chosen by ``|score|`` (else by signed score)."""

    percents: tuple[float, ...]
    n_edges: tuple[int, ...]
    faithfulness: tuple[float, ...]
    absolute: bool = True

    @property
    def ranking(self) -> str:
        return "absolute" if self.absolute else "signed"

    def area_under(self, axis: str = "linear") -> float:
        """MIB's ``area_under``: area under f (CPR when the ranking is signed)."""
        return area(self.percents, self.faithfulness, axis)

    def area_from_1(self, axis: str = "linear") -> float:
        """MIB's ``area_from_1``: area under |1 − f| (CMD when the ranking is absolute)."""
        return area(self.percents, [abs(1.0 - f) for f in self.faithfulness], axis)

    @property
    def average(self) -> float:
        """MIB's ``average``: the mean faithfulness over the sizes."""
        return sum(self.faithfulness) / len(self.faithfulness)

    @property
    def cpr(self) -> float:
        """Area under f on the linear axis (MIB's public script's default)."""
        return self.area_under("linear")

    @property
    def cmd(self) -> float:
        """Area under |1 − f| on the linear axis (MIB's public script's default)."""
        return self.area_from_1("linear")

    def to_dict(self) -> dict[str, Any]:
        """MIB's names: ``faithfulnesses``, ``area_under``/``area_from_1`` on both axes (linear only when a size
        is 0%), ``average``; ``sizes`` are the requested top-k (MIB's ``int(pct * n)``), before pruning."""
        positive = all(p > 0 for p in self.percents)
        axes = AXES if positive else ("linear",)
        return {
            "ranking": self.ranking,
            "percents": list(self.percents),
            "sizes": list(self.n_edges),
            "faithfulnesses": list(self.faithfulness),
            "area_under": {a: self.area_under(a) for a in axes},
            "area_from_1": {a: self.area_from_1(a) for a in axes},
            "average": self.average,
        }

    @classmethod
    def of_metrics(
        cls, percents: Sequence[float], sizes: Sequence[int], metrics: Sequence[float], clean: float, empty: float,
        absolute: bool = True,
    ) -> "Curve":
        """The curve from each circuit's mean metric and the full (``clean``) and empty circuits' means."""
        return cls(tuple(percents), tuple(sizes), tuple(normalized(m, clean, empty) for m in metrics), absolute)


@dataclass(frozen=True)
class MIBCurves:
    """The curve under both rankings and the numbers MIB's leaderboard reports from them."""

    signed: Curve
    absolute: Curve

    def leaderboard(self, axis: str = LEADERBOARD_AXIS) -> dict[str, float]:
        """``{"CPR": signed area_under, "CMD": absolute area_from_1}`` on ``axis``."""
        curves = {"signed": self.signed, "absolute": self.absolute}
        return {name: getattr(curves[ranking], kind)(axis) for name, (ranking, kind) in LEADERBOARD.items()}

    def to_dict(self) -> dict[str, Any]:
        public = self.signed if PUBLIC_SCRIPT["ranking"] == "signed" else self.absolute
        return {
            "leaderboard": {"axis": LEADERBOARD_AXIS, **self.leaderboard()},
            "leaderboard_linear_axis": self.leaderboard("linear"),
            "public_script_default": {**PUBLIC_SCRIPT, "CPR": public.area_under(PUBLIC_SCRIPT["axis"]),
                                      "CMD": public.area_from_1(PUBLIC_SCRIPT["axis"])},
            "signed": self.signed.to_dict(),
            "absolute": self.absolute.to_dict(),
        }


def curve_circuits(scores: Scores, percents: Sequence[float], absolute: bool) -> list[Circuit]:
    """The pruned top-k circuit (edges) at each size of ``percents``."""
    return [top_n(scores, edges_for_percent(scores.graph, p), absolute=absolute) for p in percents]


def curve_metrics(
    evaluator: CircuitEvaluator, circuits: Sequence[Circuit], progress: Callable[[int, int], None] | None = None
) -> list[float]:
    """Mean metric of each circuit; circuits with the same edges are evaluated once. ``progress(done, total)``
    is called after each circuit; raise from it to stop."""
    done: dict[bytes, float] = {}
    out = []
    for circuit in circuits:
        key = circuit.edges.cpu().numpy().tobytes()
        if key not in done:
            done[key] = evaluator.evaluate(circuit).mean().item()
        out.append(done[key])
        if progress is not None:
            progress(len(out), len(circuits))
    return out


def faithfulness_curve(
    evaluator: CircuitEvaluator, scores: Scores, percents: Sequence[float] = MIB_PERCENTS, absolute: bool = True
) -> Curve:
    """Faithfulness of the top-k% circuits (pruned) for each k in ``percents``, ranked by ``|score|`` when
    ``absolute`` (else by signed score)."""
    circuits = curve_circuits(scores, percents, absolute)
    base = evaluator.baseline()
    sizes = [edges_for_percent(scores.graph, p) for p in percents]
    return Curve.of_metrics(percents, sizes, curve_metrics(evaluator, circuits), base.clean, evaluator.empty_metric(),
                            absolute)


def mib_circuits(scores: Scores, percents: Sequence[float] = MIB_PERCENTS) -> list[Circuit]:
    """The curve's circuits under the signed ranking, then under the absolute ranking."""
    return curve_circuits(scores, percents, False) + curve_circuits(scores, percents, True)


def mib_curves_of_metrics(
    graph: Graph, metrics: Sequence[float], clean: float, empty: float, percents: Sequence[float] = MIB_PERCENTS
) -> MIBCurves:
    """Both curves from the mean metrics of :func:`mib_circuits` and the full and empty circuits' means."""
    sizes, n = [edges_for_percent(graph, p) for p in percents], len(percents)
    return MIBCurves(*(Curve.of_metrics(percents, sizes, metrics[k * n:(k + 1) * n], clean, empty, absolute=bool(k))
                       for k in (0, 1)))


def mib_curves(evaluator: CircuitEvaluator, scores: Scores, percents: Sequence[float] = MIB_PERCENTS) -> MIBCurves:
    """The curve under the signed and the absolute ranking (circuits common to both evaluated once)."""
    metrics = curve_metrics(evaluator, mib_circuits(scores, percents))
    return mib_curves_of_metrics(scores.graph, metrics, evaluator.baseline().clean, evaluator.empty_metric(), percents)
