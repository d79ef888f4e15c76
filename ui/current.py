"""The session's current circuit, which Explore shows and Export writes.

- The evaluator that fits the scores: their own metric (a run's scores are evaluated with the metric
  they were made with, whatever the session's metric is now) and their own intervention.
- The selection: an imported circuit exactly as it was saved (``pinned``) until the size is changed, else
  the unpruned top circuit at the chosen size (``n_edges``: edges or nodes, by the scores' level).
- The circuit: the selection with the hand edits (``edits``, :mod:`eapcore.edits`) applied, then pruned.
- Its evaluation and the unedited selection's, kept in ``explore_result`` so that Export uses what
  Explore evaluated and an edit re-evaluates only the edited circuit.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import streamlit as st

from eapcore.attribute import AttributionSpec
from eapcore.circuit import Circuit, Scores
from eapcore.edits import Edits, apply_edits
from eapcore.evaluate import CircuitEvaluator
from eapcore.metrics import METRICS
from eapcore.select import NODES, selection, top, unit_of
from eapcore.sizes import default_size, unit_count
from ui import cache
from ui.provenance import uses_metric


def scores_metric(scores: Scores, session_metric: str) -> str:
    """The metric to evaluate ``scores`` with: the one they were made with, when they used one that the
    app knows; else the session's (information-flow routes, files from other tools)."""
    made_with = scores.provenance.get("metric")
    if uses_metric(scores.provenance) and made_with in METRICS:
        return str(made_with)
    return session_metric


def spec_of(scores: Scores) -> AttributionSpec | None:
    """The attribution settings recorded in the scores' provenance (``None`` if they are incomplete)."""
    names = {f.name for f in fields(AttributionSpec)}
    values = {k: v for k, v in scores.provenance.items() if k in names}
    try:
        return AttributionSpec(**values) if "method" in values else None
    except (TypeError, ValueError):
        return None


def evaluator() -> cache.Remembering:
    """The evaluator of the selected run (remembering its circuits, which the trust checks reuse)."""
    s = st.session_state
    return cache.remembering(s.model_spec, s.pairs, scores_metric(s.scores, s.metric), cache.intervention_of(s.scores))


def size() -> int:
    """The chosen size (edges or nodes), the default size when none is chosen or it does not fit."""
    s = st.session_state
    n = s.get("n_edges")
    if n is None or not 0 <= n <= unit_count(s.scores):
        s.n_edges = n = default_size(s.scores)
    return int(n)


def pinned() -> Circuit | None:
    """The imported circuit shown as saved, while these are still its scores and no size was chosen."""
    s = st.session_state
    pin = s.get("pinned")
    return pin["circuit"] if pin is not None and pin["key"] == s.get("scores_key") else None


def unpin() -> None:
    st.session_state.pop("pinned", None)


def pinned_size(scores: Scores, circuit: Circuit) -> int:
    return circuit.n_nodes if unit_of(scores) == NODES else circuit.n_edges


def edits() -> Edits:
    """The session's hand edits (none by default)."""
    return st.session_state.get("edits") or Edits()


@dataclass(frozen=True)
class Current:
    """The current circuit and its evaluation; ``unedited``: the selection's without the edits (the same
    as ``evaluation`` when there are none); ``dropped``: included names that pruning removed;
    ``selection``: how it was chosen, before the edits (for exported files)."""

    evaluation: cache.Evaluation
    unedited: cache.Evaluation
    edits: Edits
    dropped: tuple[str, ...]
    selection: dict[str, Any]
    pinned: bool


def evaluation(ev: CircuitEvaluator) -> Current:
    """Evaluate the current circuit with ``ev``, or take the evaluation Explore already made of it. With
    edits, the unedited selection is evaluated once per size and kept, so an edit costs one evaluation."""
    s = st.session_state
    scores, absolute, pin, changes = s.scores, bool(s.get("absolute", True)), pinned(), edits()
    n = pinned_size(scores, pin) if pin is not None else size()
    base = (s.scores_key, "pinned" if pin is not None else n, absolute, *cache.evaluator_key(ev))
    kept = s.get("explore_result")
    if kept is not None and kept.get("key") == (base, changes):
        result, unedited, dropped = kept["evaluation"], kept["unedited"], kept["dropped"]
    else:
        chosen = pin if pin is not None else top(scores, n, absolute, prune=False)
        edited = apply_edits(chosen, changes)
        same_base = kept is not None and kept.get("key", (None,))[0] == base
        unedited = kept["unedited"] if same_base else cache.evaluate_circuit(ev, edited.unedited, n)
        result = cache.evaluate_circuit(ev, edited.circuit, n) if changes else unedited
        dropped = edited.dropped
        s.explore_result = {"key": (base, changes), "evaluation": result, "unedited": unedited, "dropped": dropped,
                            "n": n, "faithfulness": result.faithfulness, "metric": result.metric,
                            "edges": result.circuit.n_edges, "nodes": result.circuit.n_nodes}
    how = ({"method": "imported", "file": s.get("pinned", {}).get("name")} if pin is not None
           else selection(scores, n, absolute))
    return Current(result, unedited, changes, dropped, how, pin is not None)
