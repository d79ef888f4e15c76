"""Words for where scores and circuits came from: a run's label, an imported file's details, and the
titles that PNG downloads carry. Everything is read from the provenance that ``attribute()`` and the
exporters write; unknown or missing fields are left out."""

from __future__ import annotations

from typing import Any

from eapcore.methods import METHODS, get_method

UNDEFINED = "undefined"


def fmt_faithfulness(value: float | None) -> str:
    return UNDEFINED if value is None else f"{value:.4f}"


def uses_metric(provenance: dict[str, Any]) -> bool:
    """Whether the scores depend on the metric (information-flow routes and foreign files: see below)."""
    method = provenance.get("method")
    return method not in METHODS or get_method(method).uses_metric


def run_label(provenance: dict[str, Any]) -> str:
    """``EAP-IG-inputs (5 steps), node level, mean, logit_diff``: the method, then what differs from
    the defaults; the metric and intervention only for methods that use them."""
    method = provenance.get("method")
    if method not in METHODS:
        return str(method or "scores")
    spec = get_method(method)
    parts = [spec.label(int(provenance.get("ig_steps", 5)))]
    if provenance.get("level", "edge") != "edge":
        parts.append(f"{provenance['level']} level")
    if spec.uses_intervention and provenance.get("intervention", "patching") != "patching":
        parts.append(str(provenance["intervention"]))
    if spec.uses_metric and provenance.get("metric"):
        parts.append(str(provenance["metric"]))
    return ", ".join(parts)


def run_details(provenance: dict[str, Any], edges: int | None = None, nodes: int | None = None) -> dict[str, str]:
    """What an imported file says about its run, for a small table: model, method, steps, level,
    intervention, metric, data, pairs, and (when given) the stored circuit's edges and nodes."""
    p = provenance
    method = p.get("method")
    steps = p.get("ig_steps") if method in METHODS and get_method(method).steps else None
    data = p.get("data_label") or p.get("task") or (f"fingerprint {str(p['data'])[:12]}" if p.get("data") else None)
    rows = {
        "model": p.get("model"), "method": method, "IG steps": steps, "level": p.get("level"),
        "intervention": p.get("intervention"), "metric": p.get("metric") if uses_metric(p) else "not used",
        "data": data, "pairs": p.get("n_examples"), "circuit": None if edges is None else f"{edges:,} edges, {nodes} nodes",
    }
    return {k: str(v) for k, v in rows.items() if v not in (None, "")}


def picture_title(provenance: dict[str, Any], data_label: str | None, size: str, faithfulness: float | None) -> str:
    """A PNG's title: model · run · data (pairs) · circuit size · faithfulness."""
    pairs = provenance.get("n_examples")
    data = data_label or provenance.get("data_label") or provenance.get("task") or "data"
    parts = [str(provenance.get("model") or "model"), run_label(provenance),
             f"{data}" + (f" ({pairs} pairs)" if pairs else ""), size, f"faithfulness {fmt_faithfulness(faithfulness)}"]
    return " · ".join(parts)
