"""Errors that would break a GPU process, reported like any bad input: through the engine API, the CLI
(one line) and the app (the session keeps its data).

* Token ids past the model's embedding (a tokenizer with an added token, or a pad token, the model was
  never resized for) are refused before any pass: on the CPU such an id is an IndexError, on CUDA a
  device-side assert after which every CUDA call of the process fails (in the app, every session's).
* Out-of-memory errors that arrive as a plain RuntimeError (CUDA's own "out of memory", cuBLAS's or
  cuDNN's failed handle or workspace allocation) are reported like torch.OutOfMemoryError, and the failed
  pass's tensors are freed before the error reaches the caller (then CUDA's cached blocks are released).

The CUDA texts are raised from a metric on the CPU; the cuda-marked tests make the real failures on a GPU.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from eapcore.attribute import AttributionSpec, attribute
from eapcore.circuit import Circuit
from eapcore.data import DataError, PromptPairs, tokenize
from eapcore.evaluate import CircuitEvaluator
from eapcore.metrics import METRICS, Metric, logit_diff
from eapcore.models import load_model
from eapcore.vocabulary import tokenize_for
from ui.state import ENV_DATA, ENV_DEVICE, ENV_MODEL

from conftest import (
    CSV, TOY, app_with_scores, assert_kept, attached_hooks, cli_error, errors, one_error, run_attribution,
    tiny_tokenizer,
)

OUT_OF_RANGE = r"outside the model's vocabulary of 15 ids \(0 to 14\); the tokenizer does not match the model"
CUDA_OOM = [  # the texts CUDA, cuBLAS and cuDNN raise as a plain RuntimeError
    "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API call, so the "
    "stacktrace below might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1",
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
]


def _with_tokenizer(tiny_dir, folder, tokenizer):
    """The tiny model's weights (a vocabulary of 15) saved with ``tokenizer``."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_dir).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def added_token_dir(tiny_dir, tmp_path_factory):
    """The tokenizer knows one word more than the model: 'zz' is id 15."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["zz"])
    return _with_tokenizer(tiny_dir, tmp_path_factory.mktemp("added_token"), tokenizer)


@pytest.fixture(scope="module")
def pad_past_dir(tiny_dir, tmp_path_factory):
    """The tokenizer's pad token is id 15, past the model's embedding."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"pad_token": "<pad2>"})
    return _with_tokenizer(tiny_dir, tmp_path_factory.mktemp("pad_past"), tokenizer)


def _pairs(clean: str = "a b c", correct: str = "e") -> PromptPairs:
    """Row 1 is fine; row 2 has ``clean`` (3 words: it is padded to row 1's length) and ``correct``."""
    return PromptPairs.from_lists(["a b c d", clean], ["e b c d", "f " + " ".join(clean.split()[1:])], ["e", correct],
                                  ["a", "a"])


def _circuit_file(model, folder):
    """A scored graph of ``model``'s shape for ``evaluate --circuit``."""
    from eapcore.export import save_pt

    path = folder / "circuit.pt"
    save_pt(path, attribute(model, tokenize_for(_pairs(clean="b c d e"), model), AttributionSpec(method="EAP")), None)
    return path


# ----- token ids past the model's vocabulary -----

VOCABULARY_CASES = {  # id: (model folder fixture, pairs, the error)
    "prompt token": ("added_token_dir", _pairs(clean="a zz c"), r"row 2: the clean prompt has token id 15 \('zz'\), "),
    "answer token": ("added_token_dir", _pairs(correct="zz"), r"row 2: the correct answer has token id 15 \('zz'\), "),
    "pad id": ("pad_past_dir", _pairs(), r"row 2: the clean prompt is padded with the tokenizer's pad id 15 \('<pad2>'\), "),
}


@pytest.mark.parametrize("case", list(VOCABULARY_CASES))
def test_ids_past_the_embedding_are_refused_before_any_pass(case, request):
    folder, pairs, message = VOCABULARY_CASES[case]
    model = load_model(str(request.getfixturevalue(folder)), device="cpu", dtype="float32")
    with pytest.raises(DataError, match=message + OUT_OF_RANGE):
        tokenize_for(pairs, model)
    data = tokenize(pairs, model.tokenizer)  # tokenized without the model: attribute() checks before its passes
    with pytest.raises(DataError, match=message + OUT_OF_RANGE):
        attribute(model, data, AttributionSpec(method="EAP"))
    assert attached_hooks(model) == 0
    fine = tokenize_for(_pairs(clean="b c d e"), model)  # no padding, no unknown token
    assert attribute(model, fine, AttributionSpec(method="EAP")).edges.isfinite().all()


def test_ids_past_the_embedding_are_one_line_on_the_cli(added_token_dir, tiny32, tmp_path, capsys):
    data, out = tmp_path / "pairs.csv", tmp_path / "scores.pt"
    data.write_text(CSV + "\nc zz e,f zz e,f,c\n")
    circuit = _circuit_file(tiny32, tmp_path)
    for command in (["attribute", "--method", "EAP", "--out", str(out)], ["evaluate", "--circuit", str(circuit)]):
        cli_error(capsys, "row 4: the clean prompt has token id 15 \\('zz'\\), " + OUT_OF_RANGE, command[0],
                  "--model", str(added_token_dir), "--data", str(data), *command[1:])
    assert not out.exists()


@pytest.fixture()
def app_on(monkeypatch, tmp_path):
    """Open the app on a model folder and the eight toy pairs."""
    import pandas as pd

    csv = tmp_path / "toy.csv"
    pd.DataFrame(TOY).to_csv(csv, index=False)

    def use(folder):
        for key, value in {ENV_MODEL: str(folder), ENV_DATA: str(csv), ENV_DEVICE: "cpu"}.items():
            monkeypatch.setenv(key, value)
    return use


def test_ids_past_the_embedding_are_refused_by_the_app(added_token_dir, app_on):
    app_on(added_token_dir)
    at, before = app_with_scores()
    at.switch_page("pages/data.py").run()
    at.radio(key="w_data_source").set_value("Upload CSV").run()
    at.file_uploader(key="w_csv").set_value(("zz.csv", (CSV + "\nc zz e,f zz e,f,c\n").encode(), "text/csv")).run()
    assert one_error(at, "row 4: the clean prompt has token id 15 \\('zz'\\), " + OUT_OF_RANGE).startswith(
        "zz.csv was not loaded: ")
    assert_kept(at, before)


# ----- out-of-memory errors that arrive as a plain RuntimeError -----


def _failing(text: str, seen: dict | None = None, after: int = 0) -> Metric:
    """A metric that raises ``RuntimeError(text)`` after ``after`` calls (a new error each time, as a failed
    allocation makes), keeping a weak reference to the logits it got in ``seen``."""
    calls = []

    def fn(logits, batch, clean_logits=None):
        calls.append(1)
        if len(calls) <= after:
            return logit_diff(logits, batch)
        if seen is not None:
            seen["logits"] = weakref.ref(logits)
        raise RuntimeError(text)
    return Metric("logit_diff", fn)


@pytest.mark.parametrize("text", CUDA_OOM, ids=["cuda", "cublas", "cudnn"])
def test_plain_runtime_errors_of_cuda_allocations_are_out_of_memory(text, tiny32, pairs):
    data = tokenize(pairs, tiny32.tokenizer)
    first = text.splitlines()[0]
    with pytest.raises(MemoryError) as info:
        attribute(tiny32, data, AttributionSpec(batch_size=4), metric=_failing(text))
    assert str(info.value) == (f"out of memory on cpu while attributing with batch size 4 ({first}); try a smaller batch "
                               "(--batch-size 2) or half precision (--dtype bfloat16)")
    assert attached_hooks(tiny32) == 0 and tiny32.cfg.use_split_qkv_input
    evaluator = CircuitEvaluator(tiny32, data, _failing(text), batch_size=4)
    with pytest.raises(MemoryError, match="out of memory on cpu while evaluating 8 prompts in batches of 4 .*fewer prompts"):
        evaluator.evaluate(Circuit.empty(evaluator.graph))
    assert attached_hooks(tiny32) == 0


def test_other_cuda_errors_are_not_taken_for_out_of_memory(tiny32, pairs):
    with pytest.raises(RuntimeError, match="device-side assert triggered"):
        attribute(tiny32, tokenize(pairs, tiny32.tokenizer), AttributionSpec(batch_size=4),
                  metric=_failing("CUDA error: device-side assert triggered"))


def test_the_failed_pass_is_freed_before_the_error_is_reported(tiny32, pairs):
    """The MemoryError does not hold the failed pass's traceback, whose frames hold its activations: they are
    gone when the caller (the CLI, an app session) gets the error, so the memory can be used again at once."""
    seen: dict = {}
    with pytest.raises(MemoryError) as info:
        attribute(tiny32, tokenize(pairs, tiny32.tokenizer), AttributionSpec(batch_size=4),
                  metric=_failing(CUDA_OOM[0], seen))
    assert info.value.__cause__ is None and info.value.__traceback__ is not None
    assert seen["logits"]() is None


def test_out_of_memory_is_one_line_on_the_cli(tiny_dir, tiny32, tmp_path, capsys, monkeypatch):
    data, out = tmp_path / "pairs.csv", tmp_path / "scores.pt"
    data.write_text(CSV)
    circuit = _circuit_file(tiny32, tmp_path)
    monkeypatch.setitem(METRICS, "logit_diff", _failing(CUDA_OOM[1]))
    cli_error(capsys, r"out of memory on cpu while attributing with batch size 2 \(CUDA error: CUBLAS_STATUS_ALLOC_FAILED "
              r".*\); try a smaller batch \(--batch-size 1\)", "attribute", "--model", str(tiny_dir), "--data", str(data),
              "--batch-size", "2", "--out", str(out))
    assert not out.exists()
    monkeypatch.setitem(METRICS, "logit_diff", _failing(CUDA_OOM[1], after=2))  # the baseline's 2 read-outs pass
    cli_error(capsys, "out of memory on cpu while evaluating 3 prompts", "evaluate", "--model", str(tiny_dir),
              "--data", str(data), "--circuit", str(circuit), "--top-n", "5")


def test_out_of_memory_in_the_app_keeps_the_session(tiny_dir, app_on, monkeypatch):
    app_on(tiny_dir)
    at, before = app_with_scores()
    monkeypatch.setitem(METRICS, "logit_diff", _failing(CUDA_OOM[0]))
    at.switch_page("pages/attribute.py").run()
    at.number_input(key="w_batch").set_value(3).run()  # a new spec: not in the cache of finished runs
    at.button(key="run_attribution").click().run()
    one_error(at, r"^Attribution failed: out of memory on cpu while attributing with batch size 3 \(CUDA error: out of "
                  r"memory\); try a smaller batch")
    assert_kept(at, before)
    monkeypatch.setitem(METRICS, "logit_diff", Metric("logit_diff", logit_diff))
    run_attribution(at, open_explore=False, switch=False)  # the app goes on working
    assert errors(at) == []


# ----- on a GPU -----


@pytest.mark.cuda
def test_a_real_cuda_out_of_memory_frees_everything_it_allocated(tiny_dir, pairs):
    """A metric asking for 40 TB on the GPU: the error says what to change, and the GPU memory in use is back
    where it was (the failed pass freed, CUDA's cached blocks released)."""
    model = load_model(str(tiny_dir), device="cuda", dtype="float32")
    data = tokenize_for(pairs, model)
    spec = AttributionSpec(batch_size=4)
    attribute(model, data, spec)  # one-time allocations (cuBLAS workspaces) before the baseline
    gpu = next(model.parameters()).device
    torch.cuda.synchronize(gpu)
    gc.collect()
    torch.cuda.empty_cache()
    allocated, reserved = torch.cuda.memory_allocated(gpu), torch.cuda.memory_reserved(gpu)
    greedy = Metric("greedy", lambda logits, batch, clean=None: logits[:, 0] + torch.empty(10**13, device=logits.device).sum())
    with pytest.raises(MemoryError, match=r"out of memory on cuda:\d+ while attributing with batch size 4 \(CUDA out of memory"):
        attribute(model, data, spec, metric=greedy)
    torch.cuda.synchronize(gpu)
    assert torch.cuda.memory_allocated(gpu) == allocated
    assert torch.cuda.memory_reserved(gpu) <= reserved
    assert attribute(model, data, spec).edges.isfinite().all()


@pytest.mark.cuda
def test_an_id_past_the_embedding_never_reaches_the_gpu(added_token_dir):
    """Refused before the pass, so no device-side assert: CUDA still works in this process afterwards."""
    model = load_model(str(added_token_dir), device="cuda", dtype="float32")
    bad = tokenize(_pairs(clean="a zz c"), model.tokenizer)
    with pytest.raises(DataError, match=OUT_OF_RANGE):
        attribute(model, bad, AttributionSpec(method="EAP"))
    assert attribute(model, tokenize_for(_pairs(), model), AttributionSpec(method="EAP")).edges.isfinite().all()
    assert float(torch.ones(4, device="cuda").sum()) == 4.0
