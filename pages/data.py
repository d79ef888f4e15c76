"""Data page: a shipped task, an uploaded CSV or MIB task file (.jsonl/.json), or typed pairs; token preview;
baseline metrics."""

from __future__ import annotations

import html

import pandas as pd
import streamlit as st

from eapcore.data import COLUMNS, PromptPairs
from eapcore.gap import gap_warning
from eapcore.metrics import METRICS
from eapcore.tasks import TASKS
from eapcore.tokens import token_diff
from ui import cache, state, widgets
from ui.figures import token_diff_html

state.require_entry()
s = st.session_state
st.title("Data")
st.caption(
    "Prompt pairs: a `clean` prompt, a `corrupted` prompt with the same number of tokens, and the `correct` "
    'and `incorrect` answer tokens (a cell starting with `[` is a JSON list of tokens, e.g. `["46", "47"]`).'
)

SOURCES = ["Shipped task", "Upload CSV", "Type pairs"]
SHOWN = {"Upload CSV": "Upload a file (CSV, MIB .jsonl/.json)"}
s.setdefault("data_source", SOURCES[0])
state.widget_value("w_data_source", "data_source")
source = st.radio("Source", SOURCES, horizontal=True, key="w_data_source", format_func=lambda o: SHOWN.get(o, o))
s.data_source = source


def use(pairs: PromptPairs, label: str, metric: str | None = None) -> None:
    cache.get_data(s.model_spec, pairs)  # validate against the tokenizer before switching
    state.set_data(pairs, label, metric)
    st.toast(f"Using {label} ({len(pairs)} pairs)", icon=":material/check:")


if source == "Shipped task":
    names = list(TASKS)
    c1, c2 = st.columns([1, 3])
    task = c1.selectbox("Task", names, format_func=lambda n: n.replace("_", "-"), key="w_task")
    c2.caption(f"{TASKS[task].description}. Metric: `{TASKS[task].metric}`.")
    if c1.button("Use this task", type="primary", key="use_task"):
        with state.guard(f"Task {task}"):
            use(PromptPairs.from_csv(TASKS[task].csv), f"task: {task}", TASKS[task].metric)
elif source == "Upload CSV":
    upload = st.file_uploader(
        "A CSV with columns clean, corrupted, correct, incorrect, or a task file of MIB's (.jsonl or .json, as "
        "`datasets` writes it; also as a CSV of flattened columns)", type=["csv", "jsonl", "json"], key="w_csv",
        help="MIB's IOI, MCQA, ARC and arithmetic datasets are read as MIB's loader reads them: clean ← prompt, "
             "corrupted ← the default counterfactual's prompt, correct and incorrect ← the answers (docs/mib.md)")
    if upload is not None and s.get("applied_upload") != upload.file_id:
        s.applied_upload, s.upload_error = upload.file_id, None
        try:
            upload.seek(0)  # read in place: no copy of the file, at most MAX_ROWS + 1 rows parsed (CSV)
            is_json = upload.name.lower().endswith((".jsonl", ".json"))
            use((PromptPairs.from_json if is_json else PromptPairs.from_csv)(upload), f"file: {upload.name}")
        except Exception as e:  # noqa: BLE001 - shown below while this file stays selected
            s.upload_error = f"{upload.name} was not loaded: {e}"
    if upload is not None and s.get("upload_error"):
        st.error(s.upload_error, icon=":material/error:")
else:
    # The editor sits in a form: cell edits stay in the browser until "Use these pairs" sends them all at
    # once, so typing never races the page's reruns. Fixed column widths keep all four columns in view.
    current = s.get("pairs")
    shown = len(current) if current is not None and s.get("data_label") == "typed pairs" else 5
    if current is not None:
        seed = pd.DataFrame({"clean": current.clean[:shown], "corrupted": current.corrupted[:shown],
                             "correct": [a[0] if len(a) == 1 else str(list(a)) for a in current.correct[:shown]],
                             "incorrect": [a[0] if len(a) == 1 else str(list(a)) for a in current.incorrect[:shown]]})
    else:
        seed = pd.DataFrame({c: [""] for c in COLUMNS})
    widths = {"clean": 360, "corrupted": 360, "correct": 110, "incorrect": 110}
    with st.form("typed_pairs_form", border=False):
        table = st.data_editor(seed, num_rows="dynamic", width="stretch", hide_index=True, key="w_typed_pairs",
                               column_config={c: st.column_config.TextColumn(c, width=w) for c, w in widths.items()})
        submitted = st.form_submit_button("Use these pairs", type="primary", key="use_typed")
    st.caption("Select a cell and type (or press Enter to edit it); Enter or Tab keeps the value. "
               "The pairs are checked and used when you press the button.")
    if submitted:
        with state.guard("The typed pairs were not used"):
            use(PromptPairs.from_frame(table.fillna("")), "typed pairs")

if s.get("default_data_error"):
    st.error(s.default_data_error)
if not widgets.need("pairs"):
    st.stop()

st.divider()
metrics = list(METRICS)
state.widget_value("w_data_metric", "metric")
s.metric = st.columns([1, 3])[0].selectbox("Metric", metrics, key="w_data_metric",
                                           help="logit_diff / prob_diff: higher is better; kl_div: lower is better")

with state.guard("Baseline"):
    with st.spinner("Running the clean and corrupted prompts ..."):
        evaluator = cache.get_evaluator(s.model_spec, s.pairs, s.metric)
        base = evaluator.baseline()
    st.subheader(f"{s.data_label}: {len(s.pairs)} pairs")
    widgets.metric_row({f"clean {s.metric}": f"{base.clean:.4f}", f"corrupted {s.metric}": f"{base.corrupted:.4f}",
                        "clean - corrupted": f"{base.clean - base.corrupted:.4f}"},
                       {"clean - corrupted": "The gap that faithfulness divides by: it must be clearly non-zero."})
    warning = gap_warning(base.clean, base.corrupted, s.metric)
    if warning:
        st.warning(warning, icon=":material/warning:")
    unknown = cache.get_unknown_words(s.model_spec, s.pairs)
    if unknown:
        listed = "; ".join(f"row {u.row} {u.column}: {u.word!r}" for u in unknown[:8])
        more = f" (and more: at least {len(unknown)})" if len(unknown) > 8 else ""
        st.warning(f"The tokenizer does not know some words and turns them into its unknown token, so the model "
                   f"never sees them: {listed}{more}. Rephrase them with known words before running an attribution.",
                   icon=":material/warning:")

with state.guard("Preview"):
    st.subheader("Token preview")
    tokenizer = cache.get_model(s.model_spec).tokenizer
    n = len(s.pairs)
    first = st.columns([1, 4])[0].number_input("First pair shown", min_value=1, max_value=n, value=1, step=5)
    unk = getattr(tokenizer, "unk_token", None)
    for row in range(first - 1, min(first + 4, n)):
        diff = token_diff(tokenizer, s.pairs.clean[row], s.pairs.corrupted[row])
        answers = f"correct {', '.join(s.pairs.correct[row])} · incorrect {', '.join(s.pairs.incorrect[row])}"
        st.html(f'<div style="margin-bottom:6px"><b>pair {row + 1}</b> '
                f'<span style="color:#6b7280;font-size:0.85em">{html.escape(answers)}</span>'
                f'{token_diff_html(diff, unk)}</div>')
    st.caption("Yellow/red: tokens that differ between the clean and corrupted prompt; red outline: unknown word.")
st.page_link("pages/attribute.py", label="Next: attribute", icon=":material/arrow_forward:")
