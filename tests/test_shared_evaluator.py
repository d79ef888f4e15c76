"""One cached evaluator shared by sessions that move their sliders at once, beside another session's
attribution: the sparse engine's runners keep the last circuit's node outputs between moves, so sessions
take turns at them (the evaluator's own lock), and none waits for the model's turn.

Ground truth: the same circuits evaluated alone, by a separate evaluator in one thread with nothing held
(every node computed afresh) and by the hooked engine; float64, so any mix-up of two sessions' held
outputs shows far above rounding.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from pathlib import Path

import pytest
import torch

from eapcore.attribute import AttributionSpec, attribute
from eapcore.data import tokenize
from eapcore.evaluate import CircuitEvaluator
from eapcore.models import model_lock
from eapcore.select import top_n

from conftest import loaded


@pytest.fixture(scope="module")
def case(tiny_dir: Path, pairs):
    """(model, data, two sessions' walks over circuit sizes, what each walk's circuits give alone)."""
    model = loaded(tiny_dir, "float64", "cpu")
    data = tokenize(pairs, model.tokenizer)
    scores = attribute(model, data, AttributionSpec("EAP-IG-inputs", 3, batch_size=4))
    gen = torch.Generator().manual_seed(0)
    walks = []
    for _ in range(2):
        n, walk = int(scores.edges.numel() // 8), []
        for _ in range(60):
            n = max(0, n + int(torch.randint(-6, 7, (1,), generator=gen)))
            walk.append(top_n(scores, n))
        walks.append(walk)
    alone = CircuitEvaluator(model, data, "logit_diff", batch_size=3)
    hooked = CircuitEvaluator(model, data, "logit_diff", batch_size=3, engine="hooked")
    expected = []
    for walk in walks:
        values = []
        for c in walk:
            alone.forget()  # nothing held: every node the circuit needs is computed
            values.append(alone.evaluate(c, reuse_clean=False))
            torch.testing.assert_close(values[-1], hooked.evaluate(c, reuse_clean=False), rtol=1e-10, atol=1e-10)
        expected.append(values)
    return model, data, walks, expected


def _sessions_at_once(evaluator: CircuitEvaluator, walks: list) -> tuple[list[list[torch.Tensor]], list[BaseException]]:
    """Each walk in its own thread, all at once, with thread switches as often as Python allows; the model's
    turn is held here all along (another session's attribution)."""
    results: list[list[torch.Tensor]] = [[] for _ in walks]
    errors: list[BaseException] = []
    start = threading.Barrier(len(walks))

    def session(i: int) -> None:
        start.wait()
        try:
            for c in walks[i]:
                results[i].append(evaluator.evaluate(c, reuse_clean=False))
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with model_lock(evaluator.model):
            threads = [threading.Thread(target=session, args=(i,)) for i in range(len(walks))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert not any(t.is_alive() for t in threads), "a session waited for the model's turn"
    finally:
        sys.setswitchinterval(interval)
    return results, errors


def test_sessions_moving_at_once_beside_an_attribution_get_what_each_gets_alone(case) -> None:
    model, data, walks, expected = case
    shared = CircuitEvaluator(model, data, "logit_diff", batch_size=3)
    assert shared.engine == "sparse"
    shared.baseline()  # the cached runs, made in the model's turn
    results, errors = _sessions_at_once(shared, walks)
    assert not errors, errors
    for ours, theirs in zip(results, expected, strict=True):
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_the_check_catches_sessions_that_share_the_held_outputs_without_turns(case) -> None:
    """Without the evaluator's lock, the same two sessions mix up each other's held node outputs: some moves
    come out wrong (or fail), so the test above would see it."""
    model, data, walks, expected = case
    shared = CircuitEvaluator(model, data, "logit_diff", batch_size=3)
    shared.baseline()
    shared._holding = contextlib.nullcontext()
    results, errors = _sessions_at_once(shared, walks)
    wrong = sum(not torch.allclose(a, b, rtol=1e-10, atol=1e-10)
                for ours, theirs in zip(results, expected) for a, b in zip(ours, theirs))
    assert errors or wrong, "two sessions without turns at the runners went unnoticed"
