"""Attribute page: method, IG steps, metric, batch size -> scores for every edge (cached by spec)."""

from __future__ import annotations

import time

import streamlit as st

from eapcore.attribute import AttributionSpec
from eapcore.cost import estimate_cost
from eapcore.interventions import INTERVENTIONS
from eapcore.methods import LEVELS, METHODS, get_method
from eapcore.metrics import METRICS
from eapcore.models import model_graph
from ui import cache, figures, state, url, widgets
from ui.provenance import run_label

COST_HELP = ("Time: from the speed of the last run of this model, method and level on this server (measured "
             "speed), else from the model's size and this machine's measured matrix-multiply speed (first guess). Peak "
             "memory: the estimate for these batches; free: what the device has free now.")

state.require_entry()
s = st.session_state
st.title("Attribute")
st.caption(
    "Scores every edge by how much corrupting it changes the metric (positive: corrupting it hurts the "
    "task). EAP-IG-inputs takes the gradient at several points between the corrupted and the clean "
    "input embeddings; EAP at the clean input only."
)
if not widgets.need("pairs"):
    st.stop()

spec0: AttributionSpec = s.attr_spec
for key, value in (("w_method", spec0.method), ("w_steps", spec0.ig_steps), ("w_batch", spec0.batch_size),
                   ("w_intervention", spec0.intervention), ("w_attr_metric", s.metric),
                   ("w_level", spec0.level)):
    s.setdefault(key, value)
c1, c2, c3, c4, c5, c6 = st.columns([2, 0.9, 1.2, 0.9, 1.3, 0.9])
method = c1.selectbox("Method", METHODS, key="w_method", help=get_method(s.w_method).summary)
chosen = get_method(method)
steps = c2.number_input("IG steps", 1, 200, key="w_steps", disabled=not chosen.steps,
                        help="Interpolation steps between the corrupted and the clean run (EAP-IG methods)")
metric = c3.selectbox("Metric", list(METRICS), key="w_attr_metric", disabled=not chosen.uses_metric,
                      help="What the scores explain" if chosen.uses_metric else f"{method} does not use a metric")
batch = c4.number_input("Batch size", 1, 4096, key="w_batch")
intervention = c5.selectbox(
    "Intervention", INTERVENTIONS, key="w_intervention", disabled=not chosen.uses_intervention,
    help="What an out-of-circuit edge carries: the corrupted run's output (patching), zero or a mean"
    if chosen.uses_intervention else f"{method} does not ablate anything")
level = c6.selectbox("Level", LEVELS, key="w_level", help="Score edges, or nodes (circuits are then chosen by node)")
s.metric = metric

spec = None
with state.guard("Invalid settings"):
    spec = AttributionSpec(method, int(steps), metric, intervention if chosen.uses_intervention else "patching",
                           int(batch), level)
    s.attr_spec = spec

if spec is not None:
    with state.guard("Attribution"):
        cached = cache.cached_attribution(s.model_spec, s.pairs, spec) is not None
        n_pairs = len(s.pairs)
        graph = model_graph(cache.get_model(s.model_spec))
        passes = spec.total_passes(graph, n_pairs)  # what the progress bar counts to
        st.caption(f"{n_pairs} pairs ({s.data_label}) · {passes} passes over batches of {spec.batch_size}"
                   + (" · **cached: this run is instant**" if cached else ""))
        if not cached:
            estimate = estimate_cost(cache.get_model(s.model_spec), cache.get_data(s.model_spec, s.pairs), spec)
            st.caption(f"Estimated: {estimate.summary()}", help=COST_HELP)
            if estimate.warning:
                st.warning(f"Memory: {estimate.warning}", icon=":material/memory:")
        busy, queued = cache.model_queue(s.model_spec)
        if busy and not cached:
            st.caption(f"The model is busy with another session's run{f' and {queued} waiting' if queued else ''}: "
                       "a new run waits its turn (first come, first served).")
        if cache.get_unknown_words(s.model_spec, s.pairs):
            st.warning("Some prompt words are unknown to the tokenizer (see the Data page).", icon=":material/warning:")
        b1, b2, b3 = st.columns([1.1, 0.8, 3])
        run = b1.button("Run attribution", type="primary", icon=":material/play_arrow:", key="run_attribution")
        run = run or s.pop("run_requested", False)
        cancel_slot = b2.empty()
        state.widget_value("w_open_explore", "open_explore")
        s.open_explore = open_explore = b3.checkbox("Open Explore when done", key="w_open_explore")
        if run:
            with state.guard("Attribution failed"):
                bar = st.progress(0.0, text="Loading the model and data ...")
                cache.get_data(s.model_spec, s.pairs)
                clock = {"start": time.perf_counter()}

                def progress(done: int, total: int) -> None:
                    # Each update is also where Streamlit stops this run when Cancel (or another widget) is clicked.
                    elapsed = time.perf_counter() - clock["start"]
                    eta = elapsed / done * (total - done) if done else 0.0
                    bar.progress(done / total, text=f"{done}/{total} passes · {elapsed:.1f} s elapsed · about {eta:.1f} s left")

                def waiting(position: int) -> None:  # as often as progress: Cancel stops the wait too
                    clock["start"] = time.perf_counter()
                    bar.progress(0.0, text=f"Waiting for the model: position {position} (other sessions' runs go first)")

                cancel_slot.button("Cancel", icon=":material/stop:", key="cancel_attribution", on_click=state.request_cancel,
                                   help="Stop this attribution; the previous scores are kept")
                with state.interruptible("Attribution", cancel_slot):
                    scores, key, timing = cache.run_attribution(s.model_spec, s.pairs, spec, progress, waiting)
                bar.progress(1.0, text="cached result" if timing.cached else f"done in {timing.seconds:.1f} s")
                label = f"{run_label(scores.provenance)}, {s.data_label}"
                state.set_scores(scores, key, label)
                url.remember(key, label)
                s.last_attribution_seconds = timing.seconds
                if open_explore:
                    st.switch_page("pages/explore.py")

if s.get("scores") is not None:
    scores = s.scores
    level = scores.provenance.get("level", "edge")
    with state.guard("Scores"):
        if level == "edge":
            st.subheader("Scores (sources × destinations)")
            st.caption(f"{s.scores_label} · {scores.graph.n_edges:,} edges · blank cells are not edges")
            st.plotly_chart(figures.heatmap_figure(scores), width="stretch")
        elif scores.nodes is not None:
            scored = int((~scores.nodes.isnan()).sum())
            st.subheader("Node scores")
            st.caption(f"{s.scores_label} · {scored} nodes scored (positive: ablating the node hurts the task)")
            st.plotly_chart(figures.node_bars_figure(scores), width="stretch")
            if scores.neurons is not None:
                st.subheader("Neuron scores: each node's strongest dimensions")
                st.dataframe(figures.neuron_table(scores), hide_index=True, width="stretch")
    st.page_link("pages/explore.py", label="Explore the circuit", icon=":material/arrow_forward:")
