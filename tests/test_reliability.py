"""Failures inside hooked passes leave the model clean; runs are deterministic; the parser survives fuzzing."""

from __future__ import annotations

import csv
import io
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eapcore.attribute import AttributionSpec, Cancelled, attribute
from eapcore.circuit import Circuit
from eapcore.data import DataError, PromptPairs, TokenizedPairs, tokenize
from eapcore.evaluate import CircuitEvaluator
from eapcore.metrics import Metric, logit_diff
from eapcore.models import model_graph

from conftest import attached_hooks


def failing_metric(exc: Exception, after: int = 0) -> Metric:
    calls = {"n": 0}

    def fn(logits, batch, clean_logits=None):
        calls["n"] += 1
        if calls["n"] > after:
            raise exc
        return logit_diff(logits, batch)

    return Metric("failing", fn)


@pytest.mark.devices
@pytest.mark.parametrize("method", ["EAP", "EAP-IG-inputs", "EAP-IG-activations"])
def test_an_exception_in_a_hooked_pass_leaves_no_hooks(method, tiny32, pairs):
    data = tokenize(pairs, tiny32.tokenizer)
    spec = AttributionSpec(method=method, ig_steps=2, batch_size=4)
    before = attribute(tiny32, data, spec).edges
    with pytest.raises(RuntimeError, match="boom"):
        attribute(tiny32, data, spec, metric=failing_metric(RuntimeError("boom"), after=1))
    assert attached_hooks(tiny32) == 0
    assert tiny32.cfg.use_split_qkv_input and tiny32.cfg.use_attn_result  # the fast path switches them off meanwhile
    assert torch.equal(attribute(tiny32, data, spec).edges, before)


def test_nan_metric_names_the_batch_and_step(tiny32, pairs):
    nan = Metric("nan", lambda logits, batch, clean=None: logits[:, 0] * float("nan"))
    with pytest.raises(FloatingPointError, match=r"metric 'nan' returned nan in batch 1 of 2, gradient step 1 of 5"):
        attribute(tiny32, tokenize(pairs, tiny32.tokenizer), AttributionSpec(batch_size=4), metric=nan)
    assert attached_hooks(tiny32) == 0


@pytest.mark.devices
def test_out_of_memory_is_reported_with_the_batch_size(tiny32, pairs):
    with pytest.raises(MemoryError, match=r"out of memory .* batch size 4.*--batch-size 2"):
        attribute(tiny32, tokenize(pairs, tiny32.tokenizer), AttributionSpec(batch_size=4),
                  metric=failing_metric(torch.OutOfMemoryError("CUDA out of memory")))
    assert attached_hooks(tiny32) == 0


def test_a_real_cpu_allocation_failure_is_reported_with_the_batch_size(tiny32, pairs):
    """The CPU allocator fails with a plain RuntimeError (not torch.OutOfMemoryError); a metric that asks
    for 40 TB makes a real one. CPU only (the message names the CPU); on CUDA see tests/test_device_errors.py."""
    greedy = Metric("greedy", lambda logits, batch, clean=None: logits[:, 0] + torch.empty(10**13).sum())
    with pytest.raises(MemoryError, match=r"out of memory on cpu .* batch size 4.*--batch-size 2"):
        attribute(tiny32, tokenize(pairs, tiny32.tokenizer), AttributionSpec(batch_size=4), metric=greedy)
    assert attached_hooks(tiny32) == 0 and tiny32.cfg.use_split_qkv_input


def test_an_allocation_failure_while_evaluating_says_what_to_change(tiny32, pairs):
    """CPU only: the message names the CPU."""
    greedy = Metric("greedy", lambda logits, batch, clean=None: logits[:, 0] + torch.empty(10**13).sum())
    evaluator = CircuitEvaluator(tiny32, tokenize(pairs, tiny32.tokenizer), greedy, batch_size=4)
    with pytest.raises(MemoryError, match=r"out of memory on cpu while evaluating 8 prompts in batches of 4 .*fewer prompts"):
        evaluator.evaluate(Circuit.empty(evaluator.graph))
    assert attached_hooks(tiny32) == 0


def test_attribution_can_be_cancelled_from_the_progress_callback(tiny32, pairs):
    def progress(done, total):
        if done == 3:
            raise Cancelled("stopped by the user")

    with pytest.raises(Cancelled):
        attribute(tiny32, tokenize(pairs, tiny32.tokenizer), AttributionSpec(batch_size=4), progress=progress)
    assert attached_hooks(tiny32) == 0


def test_evaluation_failure_inside_a_hooked_pass_leaves_no_hooks(tiny32, pairs):
    """CPU only: an id past the embedding is an IndexError on the CPU, but on CUDA a device-side assert that
    breaks every later CUDA call of the process (the vocabulary check keeps such ids from every pass:
    tests/test_device_errors.py)."""
    data = tokenize(pairs, tiny32.tokenizer)
    corrupted = data.data.corrupted.clone()
    corrupted[0, 1] = 10_000  # not in the vocabulary: the embedding lookup fails mid-pass
    bad = TokenizedPairs(replace(data.data, corrupted=corrupted), "bad")
    with pytest.raises(IndexError):
        CircuitEvaluator(tiny32, bad).evaluate(Circuit.empty(model_graph(tiny32)))
    assert attached_hooks(tiny32) == 0
    ev = CircuitEvaluator(tiny32, data)
    assert ev.evaluate(Circuit.empty(ev.graph)).mean().item() == pytest.approx(ev.baseline().corrupted, abs=1e-5)


@pytest.mark.devices
@pytest.mark.parametrize("method", ["EAP-IG-inputs", "information-flow-routes"])
def test_scores_are_bitwise_deterministic(method, tiny32, pairs):
    data = tokenize(pairs, tiny32.tokenizer)
    spec = AttributionSpec(method=method, batch_size=3)
    assert torch.equal(attribute(tiny32, data, spec).edges, attribute(tiny32, data, spec).edges)


cells = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=30).filter(
    lambda s: s.strip() != "" and not s.lstrip().startswith("[")
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(cells, cells, cells, cells), min_size=1, max_size=5))
def test_csv_parser_round_trips_arbitrary_text(rows):
    buffer = io.StringIO()
    writer = csv.writer(buffer, quoting=csv.QUOTE_ALL)
    writer.writerows([("clean", "corrupted", "correct", "incorrect"), *rows])
    pairs = PromptPairs.from_csv(buffer.getvalue().encode())
    assert pairs.clean == tuple(r[0] for r in rows) and pairs.incorrect == tuple((r[3],) for r in rows)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200))
def test_csv_parser_never_crashes_on_bytes(blob):
    try:
        PromptPairs.from_csv(blob)
    except DataError:
        pass


def test_too_many_rows_are_refused_with_the_limit():
    csv = "clean,corrupted,correct,incorrect\n" + "a,b,c,d\n" * 50_001
    with pytest.raises(DataError, match="more than the limit of 50000"):
        PromptPairs.from_csv(csv.encode())
