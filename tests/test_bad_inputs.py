"""The bad-input matrix: each bad input goes through the engine API, the CLI (`eapcore.cli.main`
in-process) and the app (AppTest), and must get a message that says what is wrong, where (row, value, file)
and how to fix it; in the app the session must keep its model, prompt pairs and scores.

Runs on the tiny random GPT-2 of conftest.py (vocabulary a-l, context 16). Groups: CSV_CASES (prompt-pair
files, one good one that must parse), SPEC_CASES (attribution settings), a metric returning NaN/inf, top-n
beyond the graph, FILE_CASES (circuit files), MODEL_CASES (model names). Test ids read
``test_<group>_<surface>[<case>]``.
"""

from __future__ import annotations

import json
import re
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
import torch

from eapcore.attribute import AttributionSpec, attribute
from eapcore.circuit import Circuit, Scores
from eapcore.data import MAX_CSV_BYTES, DataError, PromptPairs, tokenize
from eapcore.export import load_circuit, save_json, save_pt
from eapcore.graph import Graph, GraphConfig
from eapcore.metrics import Metric
from eapcore.roots import ENV_ROOTS, is_local
from eapcore.select import top_n
from ui.state import ENV_DATA, ENV_DEVICE, ENV_MODEL

from conftest import (
    TOY, Evil, app_with_scores, assert_kept, attached_hooks, cli, cli_error, edit, errors, json_edit, metric_value, one_error,
)

# ----- the cases -----

HEADER = "clean,corrupted,correct,incorrect\n"
GOOD_ROW = "a b c d,e b c d,e,a\n"  # row 1 of every file below is fine, so the bad row is row 2


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[..., bytes]
    message: str | None  # regex the error must match; None: the input is valid and must load


def rows(*lines: str) -> Callable[[], bytes]:
    return lambda: (HEADER + GOOD_ROW + "".join(lines)).encode()


def repeated(n_bytes: int) -> bytes:
    """A CSV of good rows of about ``n_bytes`` bytes."""
    return HEADER.encode() + GOOD_ROW.encode() * (n_bytes // len(GOOD_ROW))


LIMIT_ROWS = r"more than the limit of 50000 prompt pairs \(reading stopped at row 50001\); keep at most 50000 rows"
CSV_CASES = [
    Case("missing column", lambda: b"clean,corrupt,correct,incorrect\na b,c b,d,e\n",
         r"missing column\(s\) corrupted; found \[.*\]; rename 'corrupt' to 'corrupted'"),
    Case("renamed columns", lambda: b"Clean,Corrupted,Correct,Incorrect\na b,c b,d,e\n",
         r"missing column\(s\) clean, corrupted, correct, incorrect; .*rename 'Clean' to 'clean', .*'Incorrect' to 'incorrect'"),
    Case("other columns", lambda: b"prompt,answer\nx,y\n",
         r"missing column\(s\) clean, corrupted, correct, incorrect; found \['prompt', 'answer'\]\. The table needs"),
    Case("empty file", lambda: b"", r"the CSV is empty; it needs a header row clean,corrupted,correct,incorrect"),
    Case("header only", lambda: HEADER.encode(), r"a header row but no prompt pairs; add one row per pair"),
    Case("non-UTF-8 bytes", lambda: HEADER.encode() + GOOD_ROW.encode() + "a caf\xe9,e b,e,a\n".encode("latin-1"),
         r"not UTF-8 text: byte 59 \(line 3, after 'a caf'\) is 0xe9; save the file as UTF-8"),
    Case("quoted commas and newlines", rows('"a b, c\nd",e b c d e,e,"[""a"", ""b""]"\n'), None),
    Case("unquoted comma", rows("a b, c d,e b c d,e,a\n"), r"Expected 4 fields in line 3, saw 5\); put cells that hold commas"),
    Case("unquoted comma in row 1", lambda: (HEADER + "a b, c d,e b c d,e,a\n").encode(),  # pandas made it an index
         r"row 1 has more cells than the header's 4 columns \['clean', 'corrupted', 'correct', 'incorrect'\]; put cells"),
    Case("empty prompt", rows(",e b c d,e,a\n"), r"row 2: the clean prompt is empty \(or only whitespace\); write the"),
    Case("whitespace prompt", rows("a b c d,   ,e,a\n"), r"row 2: the corrupted prompt is empty \(or only whitespace\)"),
    Case("token lengths differ", rows("a b c d,e b c,e,a\n"),
         r"row 2: the clean prompt is 5 tokens but the corrupted prompt is 4 \(clean 'a b c d', corrupted 'e b c'\); "
         "edit the corrupted prompt"),
    Case("multi-token answer", rows("a b c d,e b c d,e f,a\n"),
         r"row 2: correct answer 'e f' is 2 tokens \['e', 'f'\], not one; use a single-token answer"),
    Case("unknown answer", rows("a b c d,e b c d,e,zebra\n"),
         r"row 2: incorrect answer 'zebra' is not in the tokenizer's vocabulary; pick a known word"),
    Case("bad answer list", rows('a b c d,e b c d,e,"[oops"\n'),
         r"row 2: column 'incorrect' starts with '\[' but is not a JSON list .*; write a list of token strings"),
    Case("longer than the context", rows(f"{'a ' * 20},{'b ' * 20},e,a\n"),
         r"row 2: the prompt is 21 tokens, longer than the model's context of 16 \(clean 'a a .*'\); shorten it to "
         "at most 15 tokens"),
    Case("100k rows", lambda: HEADER.encode() + GOOD_ROW.encode() * 100_000, LIMIT_ROWS),
    Case("50 MB", lambda: repeated(MAX_CSV_BYTES - 64), LIMIT_ROWS),
    Case("over 50 MB", lambda: repeated(MAX_CSV_BYTES + 2**20), r"the CSV is 51\.0 MB, more than the limit of 50 MB; split"),
]
SPEC_CASES = [
    ("ig_steps", 0, r"ig_steps \(--ig-steps\) must be a positive integer, got 0; 5 is the usual choice"),
    ("ig_steps", -3, r"ig_steps \(--ig-steps\) must be a positive integer, got -3; 5 is the usual choice"),
    ("batch_size", 0, r"batch_size \(--batch-size\) must be a positive integer, got 0; try 32"),
]
OTHER_SHAPE = "is for a model with {}, but the loaded model has 2 layers x 2 heads, d_model 8; load the model the circuit"
DAMAGED = r"the file may be truncated or corrupted: export or download it again"
FILE_CASES = [  # make(scores, folder) -> the file's bytes; the case id's last word is its suffix
    Case("other model .pt", lambda s, d: saved(Circuit.full(Graph(GraphConfig(3, 2, False, 8))), d / "c.pt"),
         OTHER_SHAPE.format("3 layers x 2 heads, d_model 8")),
    Case("other model .json", lambda s, d: saved(Circuit.full(Graph(GraphConfig(2, 2, False, 16))), d / "c.json"),
         OTHER_SHAPE.format("2 layers x 2 heads, d_model 16")),
    Case("node names .pt", lambda s, d: saved(s, d / "c.pt", lambda p: edit(p, "names")),
         r"'src_nodes' does not list this graph's node names in order: entry 1 is 'a0.h9' where the graph has "
         "'a0.h0'; the file is for another model"),
    Case("node names .json", lambda s, d: saved(s, d / "c.json", lambda p: p["nodes"].update({"a0.h9": p["nodes"].pop("a0.h1")})),
         r"1 unknown node name\(s\), e\.g\. 'a0\.h9'; nodes are \['input', 'a0\.h0', 'a0\.h1'\] \.\.\. 'logits'\. "
         r"Is the file for another model, or edited\? Load the model it was made for"),
    Case("truncated .pt", lambda s, d: saved(s, d / "c.pt")[:600], r"it could not be read \(.*\); " + DAMAGED),
    Case("corrupted .pt", lambda s, d: b"\x80\x02garbage" * 40, r"it could not be read \(.*\); " + DAMAGED),
    Case("truncated .json", lambda s, d: saved(s, d / "c.json")[:300], r"it is not valid JSON \(.*\); " + DAMAGED),
    Case("corrupted .json", lambda s, d: saved(s, d / "c.json", lambda p: json_edit(p, "score type")),
         r"edge 'input->m0'\['score'\] must be a number, got '0\.5'"),
    Case("pickle payload .pt", lambda s, d: saved(s, d / "c.pt", lambda p: p.update(eapcore={"x": Evil("system", d / "pwned")})),
         r"it contains non-tensor objects and was refused for safety \(it was not unpickled\)"),
]


_NO_FOLDER = r"model folder {!r} does not exist \(looked for '.*'\); check the path, or give 'demo' or a Hugging Face"
MODEL_CASES = [  # (name, message); the hub is offline in tests (HF_HUB_OFFLINE=1)
    ("./no_such_folder", _NO_FOLDER.format("./no_such_folder")),
    ("~/no_such_folder", _NO_FOLDER.format("~/no_such_folder")),
    ("/no/such/folder", _NO_FOLDER.format("/no/such/folder")),
    ("models/no/such", _NO_FOLDER.format("models/no/such")),
    ("someone/no-such-model", r"cannot load model 'someone/no-such-model': there is no folder of that name here and the "
                              r"Hugging Face hub cannot be reached\. Download it on a connected machine \(`hf download "
                              r"someone/no-such-model --local-dir DIR`"),
]


def saved(what: Scores | Circuit, path: Path, change: Callable[[dict], None] | None = None) -> bytes:
    """The bytes of ``what`` saved at ``path`` (by suffix), after ``change`` edited the stored dict."""
    scores, circuit = (what, None) if isinstance(what, Scores) else (None, what)
    pt = path.suffix == ".pt"
    (save_pt if pt else save_json)(path, scores, circuit)
    if change is not None:
        data = torch.load(path, weights_only=True) if pt else json.loads(path.read_text())
        change(data)
        torch.save(data, path) if pt else path.write_text(json.dumps(data))
    return path.read_bytes()


def ids(cases: list[Case]) -> list[str]:
    return [c.id for c in cases]


# ----- fixtures and surfaces -----


@pytest.fixture(scope="module")
def toy_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bad_inputs") / "toy.csv"
    pd.DataFrame(TOY).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def app_env(tiny_dir: Path, toy_csv: Path, tmp_path_factory: pytest.TempPathFactory):
    """The app opens on the tiny model and the eight toy pairs, and may load models from the tests' folders."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {ENV_MODEL: str(tiny_dir), ENV_DATA: str(toy_csv), ENV_DEVICE: "cpu",
                           ENV_ROOTS: str(tmp_path_factory.getbasetemp())}.items():
            mp.setenv(key, value)
        yield


@pytest.fixture(scope="module")
def scores(tiny32, toy_csv: Path) -> Scores:
    return attribute(tiny32, tokenize(PromptPairs.from_csv(toy_csv), tiny32.tokenizer), AttributionSpec("EAP"))


@pytest.fixture(scope="module")
def nan_model_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a NaN final LayerNorm: every logit, hence the metric, is NaN (like an fp16 overflow)."""
    from transformers import AutoModelForCausalLM

    from conftest import save_with_tiny_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(float("nan"))
    return save_with_tiny_tokenizer(tmp_path_factory.mktemp("nan_model"), model)


# ----- prompt-pair CSVs -----


@pytest.mark.parametrize("case", CSV_CASES, ids=ids(CSV_CASES))
def test_csv_api(case: Case, tiny32) -> None:
    if case.message is None:
        data = tokenize(PromptPairs.from_csv(case.make()), tiny32.tokenizer, tiny32.cfg.n_ctx)
        assert len(data) == 2
        return
    with pytest.raises(DataError, match=case.message):
        tokenize(PromptPairs.from_csv(case.make()), tiny32.tokenizer, tiny32.cfg.n_ctx)


def test_quoted_csv_keeps_commas_newlines_and_answer_lists() -> None:
    pairs = PromptPairs.from_csv(CSV_CASES[ids(CSV_CASES).index("quoted commas and newlines")].make())
    assert pairs.clean[1] == "a b, c\nd" and pairs.corrupted[1] == "e b c d e" and pairs.incorrect[1] == ("a", "b")


@pytest.mark.parametrize("case", CSV_CASES, ids=ids(CSV_CASES))
def test_csv_cli(case: Case, tiny_dir: Path, tmp_path: Path, capsys) -> None:
    data, out = tmp_path / "pairs.csv", tmp_path / "scores.pt"
    data.write_bytes(case.make())
    args = ("attribute", "--model", str(tiny_dir), "--data", str(data), "--method", "EAP", "--out", str(out))
    if case.message is None:
        assert cli(capsys, *args)[0] == 0 and out.exists()
    else:
        cli_error(capsys, case.message, *args)
        assert not out.exists()


@pytest.mark.parametrize("case", CSV_CASES, ids=ids(CSV_CASES))
def test_csv_app(case: Case, app_env) -> None:
    at, before = app_with_scores()
    at.switch_page("pages/data.py").run()
    at.radio(key="w_data_source").set_value("Upload CSV").run()
    at.file_uploader(key="w_csv").set_value(("upload.csv", case.make(), "text/csv")).run()
    if case.message is None:
        assert errors(at) == [] and at.session_state["data_label"] == "file: upload.csv"
        assert at.session_state["pairs"].clean[1] == "a b, c\nd"
        assert_kept(at, before, "pairs", "data_label")
    else:
        assert one_error(at, case.message).startswith("upload.csv was not loaded: ")
        assert_kept(at, before)


def test_50_mb_csv_is_parsed_in_bounded_memory(tmp_path: Path) -> None:
    """Reading stops at the row limit and decodes as it parses: the peak is far below the file's size
    (before, the whole file was decoded into a string: ~5x its size)."""
    blob = repeated(MAX_CSV_BYTES - 64)
    path = tmp_path / "big.csv"
    path.write_bytes(blob)
    for source in (blob, path):
        tracemalloc.start()
        try:
            with pytest.raises(DataError, match=LIMIT_ROWS):
                PromptPairs.from_csv(source)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < len(blob) / 4, f"parsing a {len(blob) / 2**20:.0f} MB CSV peaked at {peak / 2**20:.0f} MB"


# ----- attribution settings -----


@pytest.mark.parametrize("field, value, message", SPEC_CASES)
def test_spec_api(field: str, value: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AttributionSpec(**{field: value})


@pytest.mark.parametrize("field, value, message", SPEC_CASES)
def test_spec_cli(field: str, value: int, message: str, tiny_dir: Path, toy_csv: Path, tmp_path: Path, capsys) -> None:
    flag = "--" + field.replace("_", "-")
    cli_error(capsys, message, "attribute", "--model", str(tiny_dir), "--data", str(toy_csv), flag, str(value),
              "--out", str(tmp_path / "x.pt"))


@pytest.mark.parametrize("field, value, message", SPEC_CASES)
def test_spec_app(field: str, value: int, message: str, app_env) -> None:
    """The app cannot take the value at all: its number inputs have a minimum of 1, which Streamlit enforces
    in the browser and again on the server, so the spec (and the caption) show 1 and nothing fails."""
    at, before = app_with_scores()
    widget = {"ig_steps": "w_steps", "batch_size": "w_batch"}[field]
    at.number_input(key=widget).set_value(value).run()
    assert at.number_input(key=widget).value == 1 and getattr(at.session_state["attr_spec"], field) == 1
    assert errors(at) == [] and any(f"passes over batches of {at.session_state['attr_spec'].batch_size}" in c.value
                                    for c in at.caption)
    assert_kept(at, before)


# ----- a metric that returns NaN or inf during attribution -----


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_metric_api(value: float, tiny32, toy_csv: Path) -> None:
    data = tokenize(PromptPairs.from_csv(toy_csv), tiny32.tokenizer)
    bad = Metric("bad", lambda logits, batch, clean=None: logits[:, 0] * 0 + value)
    message = rf"metric 'bad' returned -?{value} in batch 1 of 2, gradient step 1 of 3; check the metric for divisions"
    with pytest.raises(FloatingPointError, match=message):
        attribute(tiny32, data, AttributionSpec(ig_steps=3, batch_size=4), metric=bad)
    assert attached_hooks(tiny32) == 0
    assert attribute(tiny32, data, AttributionSpec(ig_steps=3, batch_size=4)).edges.isfinite().all()


def test_non_finite_metric_cli(nan_model_dir: Path, toy_csv: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.pt"
    cli_error(capsys, r"metric 'logit_diff' returned nan in batch 1 of 2, gradient step 1 of 2; check the metric",
              "attribute", "--model", str(nan_model_dir), "--data", str(toy_csv), "--ig-steps", "2", "--batch-size", "4",
              "--out", str(out))
    assert not out.exists()


def test_non_finite_metric_app(nan_model_dir: Path, app_env) -> None:
    at, before = app_with_scores()
    at.switch_page("pages/model.py").run()
    at.text_input[0].set_value(str(nan_model_dir))
    at.button[0].click().run()  # same graph shape: the scores stay
    assert at.session_state["model_spec"].name == str(nan_model_dir)
    run = at.switch_page("pages/attribute.py").run().button(key="run_attribution")
    run.click().run()
    one_error(at, r"^Attribution failed: metric 'logit_diff' returned nan in batch 1 of 1, gradient step 1 of 5")
    assert_kept(at, before, "model_spec")


# ----- top-n beyond the graph -----


def test_top_n_beyond_the_graph_api(scores: Scores) -> None:
    with pytest.raises(ValueError, match=r"n=47 is out of range: there are 46 edges in the graph \(2 layers x 2 heads, "
                                         r"d_model 8\); choose an integer 0 <= n <= 46"):
        top_n(scores, scores.graph.n_edges + 1)


def test_top_n_beyond_the_graph_cli(scores: Scores, tiny_dir: Path, toy_csv: Path, tmp_path: Path, capsys) -> None:
    save_pt(tmp_path / "c.pt", scores, None)
    cli_error(capsys, r"n=1000 is out of range: there are 46 edges .*0 <= n <= 46", "evaluate", "--model", str(tiny_dir),
              "--data", str(toy_csv), "--circuit", str(tmp_path / "c.pt"), "--top-n", "1000")


def test_top_n_beyond_the_graph_app(app_env) -> None:
    at, before = app_with_scores()
    at.switch_page("pages/explore.py").run()
    at.number_input(key="w_n_box").set_value(1000).run()
    assert [i.value for i in at.info] == ["1,000 is more than the 46 edges in the graph; showing the whole graph (46)."]
    assert at.session_state["n_edges"] == 46 and at.number_input(key="w_n_box").value == 46
    assert float(metric_value(at, "Faithfulness")) == pytest.approx(1.0, abs=1e-4)
    assert_kept(at, before)


# ----- circuit files -----


def circuit_file(case: Case, scores: Scores, folder: Path) -> Path:
    """The case's file under ``folder``, named like the case (``other model .pt`` -> ``other-model.pt``)."""
    words = case.id.split()
    path = folder / f"{'-'.join(words[:-1])}{words[-1]}"
    path.write_bytes(case.make(scores, folder))
    return path


def not_run(folder: Path) -> None:
    assert not (folder / "pwned").exists(), "the pickle payload ran"


@pytest.mark.parametrize("case", FILE_CASES, ids=ids(FILE_CASES))
def test_circuit_file_api(case: Case, scores: Scores, tmp_path: Path) -> None:
    path = circuit_file(case, scores, tmp_path)
    with pytest.raises(ValueError, match=case.message):
        load_circuit(path, expected=scores.graph)
    not_run(tmp_path)


@pytest.mark.parametrize("case", FILE_CASES, ids=ids(FILE_CASES))
def test_circuit_file_cli(case: Case, scores: Scores, tiny_dir: Path, toy_csv: Path, tmp_path: Path, capsys) -> None:
    path = circuit_file(case, scores, tmp_path)
    cli_error(capsys, re.escape(path.name) + ".*" + case.message, "evaluate", "--model", str(tiny_dir), "--data",
              str(toy_csv), "--circuit", str(path))
    not_run(tmp_path)


@pytest.mark.parametrize("case", FILE_CASES, ids=ids(FILE_CASES))
def test_circuit_file_app(case: Case, scores: Scores, app_env, tmp_path: Path) -> None:
    path = circuit_file(case, scores, tmp_path)
    at, before = app_with_scores()
    at.switch_page("pages/export.py").run()
    at.file_uploader(key="w_circuit_file").set_value((path.name, path.read_bytes(), "application/octet-stream")).run()
    assert one_error(at, case.message).startswith(f"{path.name} was not imported: ")
    assert at.session_state["imported"] is None and not [b for b in at.button if b.key == "explore_imported"]
    assert_kept(at, before)
    not_run(tmp_path)


def test_a_good_circuit_file_still_loads_everywhere(scores: Scores, tiny_dir: Path, toy_csv: Path, tmp_path: Path,
                                                    capsys) -> None:
    """The control for FILE_CASES: the unedited file loads through the API and the CLI."""
    for name in ("c.pt", "c.json"):
        saved(scores, tmp_path / name)
        assert torch.equal(load_circuit(tmp_path / name, expected=scores.graph)[0].edges, scores.edges)
        code, _ = cli(capsys, "evaluate", "--model", str(tiny_dir), "--data", str(toy_csv), "--circuit", str(tmp_path / name))
        assert code == 0


# ----- model names -----


@pytest.mark.parametrize("name, message", MODEL_CASES, ids=[n for n, _ in MODEL_CASES])
def test_model_name_api(name: str, message: str) -> None:
    from eapcore.models import resolve_source

    with pytest.raises(OSError, match=message) as caught:
        resolve_source(name)
    assert "huggingface-cli" not in str(caught.value)


@pytest.mark.parametrize("name, message", MODEL_CASES, ids=[n for n, _ in MODEL_CASES])
def test_model_name_cli(name: str, message: str, toy_csv: Path, tmp_path: Path, capsys) -> None:
    cli_error(capsys, message, "attribute", "--model", name, "--data", str(toy_csv), "--out", str(tmp_path / "x.pt"))


@pytest.mark.parametrize("name, message", MODEL_CASES, ids=[n for n, _ in MODEL_CASES])
def test_model_name_app(name: str, message: str, app_env) -> None:
    """As on the command line, except that the app refuses any folder outside its allowed roots (tests/test_server.py)."""
    at, before = app_with_scores()
    at.switch_page("pages/model.py").run()
    at.text_input[0].set_value(name)
    at.button[0].click().run()
    if is_local(name):
        message = r"this server loads model folders only from its allowed roots, and " + re.escape(repr(name))
    assert one_error(at, message).startswith("Could not load the model: ")
    assert_kept(at, before)
