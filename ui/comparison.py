"""The Compare page's work: runs of the session compared on one evaluator (:func:`eapcore.compare.compare`)
with each run's CPR and CMD both ways (:mod:`ui.areas`), kept per (model, runs, data, metric,
intervention, ranking); the overlap matrix at one size; the edges one run's circuit has that another's
lacks."""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import Any, Sequence

import streamlit as st

from eapcore.circuit import Scores
from eapcore.compare import Comparison, check_comparable, compare
from eapcore.curve import MIB_PERCENTS, MIBCurves, curve_circuits
from eapcore.evaluate import CircuitEvaluator
from ui import areas, cache, current, progress, runs


@dataclass(frozen=True)
class Compared:
    """What the page shows: the comparison (by run label) and each run's curves under both rankings."""

    comparison: Comparison
    mib: dict[str, MIBCurves]


def chosen_runs(keys: Sequence[str]) -> dict[str, Scores]:
    """The runs ``keys`` by label, checked to be comparable (one graph, one data set: the engine's message
    names both runs otherwise)."""
    chosen = {runs.label(k): runs.runs()[k]["scores"] for k in keys}
    check_comparable(chosen)
    return chosen


def evaluator_for(keys: Sequence[str]) -> cache.Remembering:
    """The evaluator every chosen run is compared with: the session's data, with the first run's metric and
    intervention (as Explore evaluates that run)."""
    s = st.session_state
    first = runs.runs()[keys[0]]["scores"]
    return cache.remembering(s.model_spec, s.pairs, current.scores_metric(first, s.metric), cache.intervention_of(first))


def key(evaluator: CircuitEvaluator, keys: Sequence[str], absolute: bool) -> tuple:
    return ("compare", astuple(st.session_state.model_spec), tuple(keys), *cache.evaluator_key(evaluator), absolute)


def compute(evaluator: CircuitEvaluator, keys: Sequence[str], absolute: bool, tick: progress.Progress) -> Compared:
    """``compare`` of the runs ``keys`` (curves at MIB's sizes ranked by ``|score|`` when ``absolute``), then
    each run's curves under both rankings (most of their circuits evaluated already); ``tick`` counts both."""
    chosen = chosen_runs(keys)
    n = len(keys) * len(MIB_PERCENTS)
    total = 3 * n  # compare's points, then 2 rankings x the sizes per run
    ev = cache.Remembering(st.session_state.model_spec, evaluator)
    comparison = compare(ev, chosen, absolute=absolute, progress=lambda done, _: tick(done, total))
    mib = {}
    for i, (run_key, label) in enumerate(zip(keys, chosen)):
        offset = n + 2 * len(MIB_PERCENTS) * i
        found = cache.checks().get(areas.curves_key(evaluator, run_key))
        if found is None:
            found = areas.curves(evaluator, chosen[label], lambda done, _: tick(offset + done, total))
            cache.checks().put(areas.curves_key(evaluator, run_key), found)
        mib[label] = found
    return Compared(comparison, mib)


def area_rows(found: Compared) -> list[dict[str, Any]]:
    """One row per run: CPR and CMD as compared (the page's ranking, linear axis), and the leaderboard's pair
    on both axes (:func:`ui.areas.name`; a number that is both appears once)."""
    c = found.comparison
    rows = []
    for label in c.labels:
        curve = c.curves[label]
        rows.append({"run": label, areas.name("CPR", curve.ranking, "linear"): curve.cpr,
                     areas.name("CMD", curve.ranking, "linear"): curve.cmd,
                     **{name: value for name, value, _ in areas.board(found.mib[label])}})
    return rows


def area_help(found: Compared) -> dict[str, str]:
    """Each column's definition, for :func:`area_rows`."""
    ranking = next(iter(found.comparison.curves.values())).ranking
    helps = {areas.name(n, ranking, "linear"): areas.definition(n, ranking, "linear") for n in ("CPR", "CMD")}
    helps.update({name: text for name, _, text in areas.board(next(iter(found.mib.values())))})
    return helps


def overlap_matrix(c: Comparison, index: int) -> list[list[float]]:
    """``[K][K]`` intersection over union of the runs' circuits at the size ``c.percents[index]`` (1 on the diagonal)."""
    where = {label: i for i, label in enumerate(c.labels)}
    out = [[1.0] * len(c.labels) for _ in c.labels]
    for (a, b), values in c.overlap.items():
        out[where[a]][where[b]] = out[where[b]][where[a]] = values[index]
    return out


def only_in(a: Scores, b: Scores, percent: float, absolute: bool) -> tuple[list[dict], list[dict]]:
    """The edges of ``a``'s circuit at ``percent`` (as compare chooses it: top-k, pruned) that ``b``'s lacks,
    and the other way round; each with its score in both runs, largest |score| first."""
    ca, cb = (curve_circuits(x, [percent], absolute)[0] for x in (a, b))
    graph = a.graph

    def rows(mask: Any, mine: Scores, other: Scores) -> list[dict]:
        r, c = mask.nonzero(as_tuple=True)
        found = [{"edge": graph.edge_name(i, j), "score here": float(mine.edges[i, j]),
                  "score in the other run": float(other.edges[i, j])} for i, j in zip(r.tolist(), c.tolist())]
        return sorted(found, key=lambda row: -abs(row["score here"]))

    return rows(ca.edges & ~cb.edges, a, b), rows(cb.edges & ~ca.edges, b, a)


def disagreement_rows(c: Comparison, a: str, b: str) -> list[dict]:
    """The edges whose ranks differ most between runs ``a`` (A) and ``b`` (B)."""
    pair, flip = ((a, b), False) if (a, b) in c.disagreements else ((b, a), True)
    rows = []
    for d in c.disagreements[pair]:
        (ra, sa), (rb, sb) = ((d.rank_a, d.score_a), (d.rank_b, d.score_b))[::-1 if flip else 1]
        rows.append({"edge": d.edge, "rank in A": ra, "rank in B": rb, "score in A": sa, "score in B": sb})
    return rows


def spearman_of(c: Comparison, a: str, b: str) -> float:
    return c.spearman[(a, b)] if (a, b) in c.spearman else c.spearman[(b, a)]
