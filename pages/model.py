"""Model page: load the demo model, a Hugging Face name or a local folder; show its size and graph."""

from __future__ import annotations

import pandas as pd
import streamlit as st
import torch

from eapcore.models import DTYPES, ModelSpec, model_graph
from ui import budget, cache, state, widgets

state.require_entry()
s = st.session_state
st.title("Model")
st.caption(
    "`demo` is the small GPT-2 shipped in `assets/models/demo` (trained on IOI, greater-than and induction). "
    "Any Hugging Face causal LM name (needs the network) or a local `save_pretrained` folder works too."
)

DEVICES = ["auto", "cpu", "cuda", "mps"]
spec: ModelSpec = s.model_spec
with st.form("model_form"):
    c1, c2, c3 = st.columns([3, 1, 1])
    name = c1.text_input("Model", value=spec.name, help="`demo`, a hub name such as `gpt2`, or a folder path")
    device = c2.selectbox("Device", DEVICES, index=DEVICES.index(spec.device) if spec.device in DEVICES else 0)
    dtypes = list(DTYPES)
    dtype = c3.selectbox("Dtype", dtypes, index=dtypes.index(spec.dtype) if spec.dtype in dtypes else 0)
    submitted = st.form_submit_button("Load model", type="primary")

if submitted:
    new = ModelSpec(name.strip() or "demo", None if device == "auto" else device, dtype)
    with state.guard("Could not load the model"), st.spinner(f"Loading {new.name} ..."):
        model = cache.get_model(new)
        old = s.model_spec
        s.model_spec = new
        if old != new:
            old_graph = s.scores.graph if s.get("scores") is not None else None
            if old_graph is not None and old_graph.cfg != model_graph(model).cfg:
                state.clear_scores()
        st.toast(f"Loaded {new.name}", icon=":material/check:")

with state.guard("Could not load the model"):
    with st.spinner(f"Loading {s.model_spec.name} ..."):
        facts = cache.model_facts(s.model_spec)
    st.subheader(f"`{s.model_spec.name}`")
    widgets.metric_row({k: f"{facts[k]:,}" for k in ("layers", "heads", "d_model", "parameters")},
                       {"parameters": "Stored weights, each counted once (tied and shared tensors once)."})
    n_sources = facts["graph nodes"] - 1
    widgets.metric_row({"graph nodes (incl. logits)": facts["graph nodes"], "graph edges": f"{facts['graph edges']:,}",
                        "context": facts["context"], "device / dtype": f"{facts['device']} / {facts['dtype']}"},
                       {"graph nodes (incl. logits)": f"{n_sources} source nodes (input, heads, MLPs) plus logits. "
                        f"Circuits count source nodes only: Explore shows n / {n_sources}."})
    st.caption(
        "Graph: `input`, every attention head, every MLP and `logits` are nodes; an edge runs from each "
        "earlier writer to each later reader (heads read through separate q, k and v inputs)."
    )
    if s.get("pairs") is not None:
        with state.guard("The current data does not fit this model"):
            data = cache.get_data(s.model_spec, s.pairs)
            base = cache.get_evaluator(s.model_spec, s.pairs, s.metric).baseline()  # also warms the evaluator
            st.success(f"Data ready: {s.data_label}, {len(data)} pairs; {s.metric} clean {base.clean:.3f}, "
                       f"corrupted {base.corrupted:.3f}.", icon=":material/check_circle:")
    st.page_link("pages/data.py", label="Next: data", icon=":material/arrow_forward:")

with st.expander("Server memory: what is kept for all sessions", icon=":material/storage:"):
    with state.guard("Memory"):
        for device, line in budget.memory_in_use().items():
            st.caption(f"**{device}**: {line}")
        if not torch.cuda.is_available():
            st.caption("No GPU on this server: models and caches are in host memory (no GPU memory in use).")
        rows = budget.kept()
        st.dataframe(pd.DataFrame(rows, columns=["kind", "what", "size", "last used"]), hide_index=True, width="stretch")
        st.caption("Models, tokenized data, evaluators (their cached activations) and results are shared by every "
                   "session and dropped least recently used when a device passes its budget (a model's data and "
                   "evaluators with it); an administrator sets the budgets with EAPCORE_CACHE_RAM and "
                   "EAPCORE_CACHE_GPU (docs/server.md).")
