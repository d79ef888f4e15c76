"""Cost before a run: the time estimate against real timed runs on this machine (a sanity factor only, no
timing asserted beyond it), the work count by hand, free memory against /proc/meminfo, and the warning."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from eapcore import cost
from eapcore.attribute import AttributionSpec, attribute
from eapcore.data import PromptPairs, tokenize
from eapcore.memory import attribution_estimate, human, shape_of_model
from eapcore.models import model_graph


def _more(pairs: PromptPairs, times: int) -> PromptPairs:
    return PromptPairs(pairs.clean * times, pairs.corrupted * times, pairs.correct * times, pairs.incorrect * times)


def test_work_counts_token_passes(tiny32, pairs):
    data = tokenize(pairs, tiny32.tokenizer)
    spec = AttributionSpec("EAP-IG-inputs", 3, batch_size=3)
    lengths = data.data.lengths.tolist()
    by_hand = sum(len(lengths[i:i + 3]) * max(lengths[i:i + 3]) for i in range(0, len(lengths), 3))
    assert cost.work(tiny32, data, spec) == spec.passes_per_batch(model_graph(tiny32)) * by_hand


def test_time_estimate_is_refreshed_by_real_runs(tiny32, pairs):
    spec = AttributionSpec("EAP-IG-inputs", 3, batch_size=4)
    small, large = tokenize(pairs, tiny32.tokenizer), tokenize(_more(pairs, 6), tiny32.tokenizer)
    cost._RATES.pop(cost.rate_key(tiny32, spec), None)
    guess = cost.estimate_cost(tiny32, large, spec)
    assert not guess.measured and 0 < guess.seconds < 60
    cost.timed_attribute(tiny32, small, spec)
    attribute(tiny32, small, spec)  # warm
    estimate = cost.estimate_cost(tiny32, large, spec)
    assert estimate.measured and "measured speed" in estimate.summary()
    start = time.perf_counter()
    attribute(tiny32, large, spec)
    real = time.perf_counter() - start
    assert real / 5 < estimate.seconds < real * 5, (estimate.seconds, real)
    assert real / 50 < guess.seconds < real * 50, (guess.seconds, real)  # a first guess: the right order only
    other = AttributionSpec("EAP", batch_size=4)
    assert cost.rate_key(tiny32, other) != cost.rate_key(tiny32, spec)


def test_memory_parts_and_free_memory(tiny32, pairs):
    data = tokenize(pairs, tiny32.tokenizer)
    spec = AttributionSpec("EAP-IG-inputs", 5, batch_size=4)
    found = cost.estimate_cost(tiny32, data, spec)
    expected = attribution_estimate(shape_of_model(tiny32), [(4, 7), (4, 7)], spec.method, "float32", "cpu", "edge",
                                    chunks=1, ig_steps=5)
    assert [int(x) for x in data.data.lengths] == [5, 6, 4, 7, 5, 5, 6, 4]  # the batches above: 4 x 7 twice
    assert found.memory.total == expected.total
    assert found.needed == expected.total - expected.part("Python, torch, transformers") - expected.part("weights")
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert found.free == pytest.approx(available, rel=0.1) and "RAM available" in found.free_what


def test_warning_when_the_estimate_exceeds_free_memory(tiny32, pairs):
    found = cost.estimate_cost(tiny32, tokenize(pairs, tiny32.tokenizer), AttributionSpec(batch_size=4))
    assert found.warning is None
    tight = replace(found, free=found.needed - 1)
    assert f"needs about {human(found.needed)} more memory" in tight.warning
    assert f"only {human(tight.free)} is free" in tight.warning
    assert "use a smaller batch" in tight.warning and tight.free_what in tight.warning
    assert replace(found, free=found.needed).warning is None
