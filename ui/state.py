"""Session state: the canonical values every page reads, first-run defaults, and error display.

Widgets never own the canonical values: Streamlit drops a widget's key when its page is not shown, so
each page copies widget values into the plain keys below (see :func:`widget_value`).

Keys: ``model_spec`` (ModelSpec), ``pairs`` (PromptPairs), ``data_label`` (str), ``metric`` (str),
``attr_spec`` (AttributionSpec), ``open_explore`` (bool), ``runs`` (every run of the session: key ->
``{"label", "scores"}``, in the order they were made), ``scores``/``scores_key``/``scores_label`` (the
selected run, which Explore and Export show), ``n_edges`` (int: edges or nodes), ``absolute`` (bool), ``pinned`` (an
imported circuit shown as saved), ``explore_result`` (the current circuit's evaluation, see
``ui.current``), ``imported`` (dict or absent), ``run_requested`` (Explore asks the Attribute page to
run); ``running`` and ``cancel_requested`` while an attribution runs or was just cancelled
(:func:`interruptible`). Explore's hand edits, picked node and graph style: ``ui.edits``, ``ui.graph_view``;
the page shown (``page``) and the URL: ``ui.url``; saved sessions: ``ui.sessions``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import streamlit as st

from eapcore.attribute import AttributionSpec
from eapcore.data import PromptPairs
from eapcore.models import ModelSpec
from eapcore.tasks import TASKS

ENV_MODEL = "EAPCORE_APP_MODEL"  # default model: "demo", a hub name or a local folder
ENV_DATA = "EAPCORE_APP_DATA"  # default data: a shipped task name or a CSV path
ENV_DEVICE = "EAPCORE_APP_DEVICE"


def default_model_spec() -> ModelSpec:
    return ModelSpec(os.environ.get(ENV_MODEL, "demo"), os.environ.get(ENV_DEVICE) or None, "float32")


def default_data() -> tuple[PromptPairs, str, str]:
    """(pairs, label, metric) for the default data: the IOI task unless ``EAPCORE_APP_DATA`` says otherwise."""
    source = os.environ.get(ENV_DATA, "ioi")
    if source in TASKS:
        task = TASKS[source]
        return PromptPairs.from_csv(task.csv), f"task: {task.name}", task.metric
    path = Path(source)
    return PromptPairs.from_csv(path), f"file: {path.name}", "logit_diff"


def require_entry() -> None:
    """Rerun through ``app.py`` when a page was started without it.

    On a freshly started server Streamlit's legacy "pages/ directory" mode runs the first requested
    page script directly (a folder named ``pages`` sits next to ``app.py``) until some run calls
    ``st.navigation``. Such a run finds no session defaults; switching the legacy mode off and
    rerunning sends it through ``app.py`` and its ``st.navigation`` to the same page.
    """
    if "model_spec" not in st.session_state:
        from streamlit.runtime.pages_manager import PagesManager

        PagesManager.uses_pages_directory = False
        st.rerun()


def init_defaults() -> None:
    """Fill the canonical keys on a session's first run (model spec, default task, specs)."""
    s = st.session_state
    if "model_spec" not in s:
        s.model_spec = default_model_spec()
    if "metric" not in s:
        s.metric = "logit_diff"
    if "pairs" not in s:
        try:
            s.pairs, s.data_label, s.metric = default_data()
        except Exception as e:  # noqa: BLE001 - shown to the user; the app still opens
            s.pairs, s.data_label = None, "none"
            s.default_data_error = f"could not load the default data: {e}"
    if "attr_spec" not in s:
        s.attr_spec = AttributionSpec(metric=s.metric)
    s.setdefault("absolute", True)
    s.setdefault("open_explore", True)


def set_data(pairs: PromptPairs, label: str, metric: str | None = None) -> None:
    s = st.session_state
    s.pairs, s.data_label = pairs, label
    if metric is not None:
        s.metric = metric
        for widget in ("w_data_metric", "w_attr_metric"):  # re-seeded from ``metric`` when next drawn
            s.pop(widget, None)
    s.pop("default_data_error", None)


def distinct_label(label: str, key: str) -> str:
    """``label``, or ``label (2)``, ``(3)``, ... when another run of the session already has it."""
    taken = {run["label"] for k, run in st.session_state.get("runs", {}).items() if k != key}
    n, out = 1, label
    while out in taken:
        n += 1
        out = f"{label} ({n})"
    return out


def add_run(scores: Any, key: str, label: str) -> str:
    """Add ``scores`` to the session's runs without selecting them (a run added again keeps its place and
    its label); returns the run's label, made distinct from the other runs'."""
    runs = st.session_state.setdefault("runs", {})
    label = runs[key]["label"] if key in runs else distinct_label(label, key)
    runs[key] = {"label": label, "scores": scores}
    return label


def set_scores(scores: Any, key: str, label: str, n_edges: int | None = None, pinned: dict | None = None) -> None:
    """Add ``scores`` to the session's runs (:func:`add_run`) and select it: Explore and Export show it.
    ``n_edges`` presets the slider; ``pinned`` (``{"circuit", "name"}``) is an imported circuit that
    Explore shows as saved until the size changes."""
    s = st.session_state
    label = add_run(scores, key, label)
    level_changed = s.get("scores") is not None and s.scores.provenance.get("level") != scores.provenance.get("level")
    s.scores, s.scores_key, s.scores_label = scores, key, label
    s.pop("pinned", None)
    if pinned is not None:
        s.pinned = {**pinned, "key": key}
    if n_edges is not None:
        s.n_edges = n_edges
        for widget in ("w_n_slider", "w_n_box"):  # re-seeded from ``n_edges`` when Explore next draws them
            s.pop(widget, None)
    elif level_changed or s.get("n_edges") is None or s.n_edges > scores.graph.n_edges:
        s.n_edges = None  # Explore picks its default (edges and nodes are counted differently)


def select_run(key: str) -> None:
    """Make the session's run ``key`` the one Explore and Export show (the slider keeps its size if the
    level is the same)."""
    run = st.session_state.runs[key]
    set_scores(run["scores"], key, run["label"])


def remove_run(key: str) -> None:
    """Forget the session's run ``key``; if it was selected, the latest remaining run is selected."""
    s = st.session_state
    s.get("runs", {}).pop(key, None)
    if s.get("scores_key") == key:
        for name in ("scores", "scores_key", "scores_label", "pinned", "explore_result"):
            s.pop(name, None)
        if s.runs:
            select_run(next(reversed(s.runs)))


def clear_scores() -> None:
    """Forget every run, the hand edits and the picked node (e.g. a model with another graph was loaded)."""
    for key in ("runs", "scores", "scores_key", "scores_label", "n_edges", "pinned", "explore_result", "edits", "node",
                "w_edit_include", "w_edit_exclude", "w_node"):
        st.session_state.pop(key, None)


RUNNING = "running"  # what an interrupted run leaves behind (see :func:`interruptible`)
CANCEL = "cancel_requested"


@contextlib.contextmanager
def interruptible(what: str, cancel_slot: Any = None) -> Iterator[None]:
    """Mark a long call (``what``, e.g. "Attribution", "Verify") as running. A click on Cancel (or on any other
    widget) makes Streamlit stop this run by raising at its next ``st.*`` call (from the progress
    callback); the engine's ``finally`` blocks remove the hooks and release the model lock on the way
    out, and the mark stays set, so the next run can say so (:func:`show_interrupted`). The session's
    scores are only replaced after the call returns, so an interrupted run leaves them as they were.
    ``cancel_slot`` (the ``st.empty`` holding the Cancel button) is cleared when the call ends by itself."""
    s = st.session_state
    s[RUNNING] = what
    try:
        yield
    except Exception:  # an ordinary error: the caller reports it; Streamlit's rerun signal is no Exception
        _finished(cancel_slot)
        raise
    _finished(cancel_slot)


def _finished(cancel_slot: Any) -> None:
    st.session_state.pop(RUNNING, None)
    if cancel_slot is not None:
        cancel_slot.empty()


def request_cancel() -> None:
    """``on_click`` of a Cancel button: runs at the start of the rerun that the click forced."""
    st.session_state[CANCEL] = True


def show_interrupted() -> None:
    """Say that the previous run of a long call was cancelled (or interrupted by leaving the page)."""
    s = st.session_state
    what, cancelled = s.pop(RUNNING, None), s.pop(CANCEL, False)
    if what == "Attribution":
        kept = "the previous scores are kept." if s.get("scores") is not None else "no scores were changed."
    else:  # the checks keep every circuit they evaluated (ui.cache.remembering)
        kept = "what it finished is kept, so running it again goes on from there."
    if what and cancelled:
        st.info(f"{what} cancelled; {kept}", icon=":material/cancel:")
    elif what:
        st.warning(f"{what} was interrupted because the page changed while it ran; {kept} Run it again to finish.",
                   icon=":material/warning:")


def widget_value(widget_key: str, canonical: str) -> None:
    """Seed a widget's state from the canonical key when the widget is (re)created."""
    s = st.session_state
    if widget_key not in s and canonical in s:
        s[widget_key] = s[canonical]


@contextlib.contextmanager
def guard(what: str = "") -> Iterator[None]:
    """Show any error raised inside as ``st.error`` with its message; session state is untouched."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - every error is shown, none wipes the session
        prefix = f"{what}: " if what else ""
        st.error(f"{prefix}{e}", icon=":material/error:")
        st.session_state.last_error = f"{type(e).__name__}: {e}"
