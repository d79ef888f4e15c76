"""The explorer as a shared server: fair turns at the model (eapcore.shared.FairLock), evaluation that runs
beside another thread's hooked pass (hook-free views), what the app may read (eapcore.roots), memory
bounded in bytes (ui.budget) and freed when a model is dropped, and the load benchmark on a real server.

Ground truths: the order in which threads asked; the same evaluation and attribution run alone; hooks
that would corrupt any pass through the bridge from another thread; the Hugging Face modules' own
outputs; the files on disk; weak references to dropped models.
"""

from __future__ import annotations

import gc
import os
import re
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch

from eapcore.attribute import AttributionSpec, attribute
from eapcore.circuit import Circuit
from eapcore.data import tokenize
from eapcore.evaluate import CircuitEvaluator
from eapcore.models import ModelSpec, model_graph, model_lock
from eapcore.roots import ENV_ROOTS, ForbiddenPathError, allowed_roots, check_model_source
from eapcore.select import top_n
from eapcore.shared import FairLock, hook_free, reporting
from ui.budget import memory_in_use

from conftest import FAMILIES, assert_kept, hf_model, loaded, one_error, save_tiny_gpt2, save_with_tiny_tokenizer


# ----- fair turns -----


def _queue_up(lock: FairLock, n: int) -> list[int]:
    """``n`` threads ask for ``lock`` (held by this thread) one after another; the order they got it in."""
    order: list[int] = []
    threads = []
    for i in range(n):
        def take(i: int = i) -> None:
            with lock:
                order.append(i)

        threads.append(threading.Thread(target=take))
        threads[-1].start()
        while lock.state()[1] < i + 1:  # wait until thread i is queued before the next one asks
            time.sleep(0.001)
    return order, threads


def test_fair_lock_serves_waiting_threads_in_arrival_order() -> None:
    lock = FairLock()
    lock.acquire()
    assert lock.acquire()  # reentrant
    lock.release()
    order, threads = _queue_up(lock, 5)
    assert lock.state() == (True, 5)
    lock.release()
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2, 3, 4]
    assert lock.state() == (False, 0)


def test_a_waiting_thread_reports_its_position_and_can_leave_the_queue() -> None:
    lock, seen, left = FairLock(), [], []
    lock.poll = 0.01
    lock.acquire()
    order, first = _queue_up(lock, 1)  # thread 0 waits first

    class Leave(BaseException):
        """What Streamlit raises in a script thread when its user clicks Cancel."""

    def impatient() -> None:
        def report(position: int) -> None:
            seen.append(position)
            if len(seen) == 3:
                raise Leave

        try:
            with reporting(report), lock:
                order.append("impatient")
        except Leave:
            left.append(True)

    t = threading.Thread(target=impatient)
    t.start()
    t.join(10)
    assert left == [True] and seen == [2, 2, 2]  # second in line, behind thread 0
    assert lock.state() == (True, 1)  # it left; thread 0 still waits
    assert not lock.acquire(blocking=False) or lock.release() is None  # this thread holds it: reentrant
    lock.release()
    for t in first:
        t.join(10)
    assert order == [0] and lock.state() == (False, 0)
    other = threading.Thread(target=lambda: seen.append(lock.acquire(timeout=0.05)))
    with lock:
        other.start()
        other.join(10)
    assert seen[-1] is False and lock.state() == (False, 0)  # a timed-out wait leaves the queue too


# ----- evaluation beside a hooked pass -----


def _bridge_free(module: torch.nn.Module) -> bool:
    from transformer_lens.hook_points import HookPoint
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    return not any(isinstance(m, (HookPoint, GeneralizedComponent)) or m._forward_hooks or m._forward_pre_hooks
                   for m in module.modules())


@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
def test_hook_free_views_compute_the_same_without_the_bridge(family: str, tmp_path: Path) -> None:
    """The MLP (linear bridges inside), Qwen3's q norm and the rotary embedding (bridges themselves): their
    hook-free views hold no bridge component or hook, share the weights, give the modules' own outputs,
    and a hook on the model (which fires in the original) does not fire in them."""
    config_cls, model_cls, kwargs, *_ = FAMILIES[family]
    model = loaded(save_with_tiny_tokenizer(tmp_path / family, hf_model(config_cls, model_cls, kwargs)), "float64", "cpu")
    block, x = model.blocks[1], torch.randn(2, 5, model.cfg.d_model, dtype=torch.float64)
    mlp, view = block.mlp.original_component, hook_free(block.mlp.original_component)
    assert not _bridge_free(mlp) and _bridge_free(view)
    assert {p.data_ptr() for p in view.parameters()} == {p.data_ptr() for p in mlp.parameters()}
    fired = []
    name = next(n for n in model.hook_dict if n.startswith("blocks.1.mlp.") and n.count(".") == 4)  # a linear bridge's
    model.add_hook(name, lambda t, hook: fired.append(hook.name) or t * 0)
    try:
        with torch.no_grad():
            assert torch.equal(view(x), _plain_mlp(mlp, x))
            assert not fired
            mlp(x)
        assert fired  # the hook is live: the original module runs it
    finally:
        model.reset_hooks()
    if family == "qwen3":
        norm = block.attn.original_component.q_norm
        y = torch.randn(3, 4, model.cfg.d_head, dtype=torch.float64)
        assert not _bridge_free(norm) and _bridge_free(hook_free(norm))
        with torch.no_grad():
            assert torch.equal(hook_free(norm)(y), norm.original_component(y))
        from eapcore.sparse import _rotary_embedding

        rotary = _rotary_embedding(model)
        assert not _bridge_free(rotary) and _bridge_free(hook_free(rotary))
        positions = torch.arange(5)[None]
        with torch.no_grad():
            for a, b in zip(hook_free(rotary)(x, positions), rotary.original_component(x, positions)):
                assert torch.equal(a, b)


def _plain_mlp(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The Hugging Face MLP's formula on the weights the bridges wrap."""
    lin = lambda m, t: m.original_component(t)  # noqa: E731
    if hasattr(mlp, "c_fc"):  # GPT-2
        return lin(mlp.c_proj, mlp.act(lin(mlp.c_fc, x)))
    return lin(mlp.down_proj, mlp.act_fn(lin(mlp.gate_proj, x)) * lin(mlp.up_proj, x))


def _corrupt_other_threads(model, owner: int) -> list:
    """Hooks on every hook point of the bridge that change what any thread but ``owner`` computes through it."""
    def corrupt(t: torch.Tensor, hook) -> torch.Tensor:
        return t if threading.get_ident() == owner else t * 3 + 1

    seen, hooks = set(), []
    for name, point in model.hook_dict.items():
        if id(point) not in seen:
            seen.add(id(point))
            try:
                model.check_hooks_to_add(point, name, corrupt)
            except ValueError:  # a hook point the bridge keeps off (e.g. hook_attn_in without use_attn_in)
                continue
            hooks.append((name, corrupt))
    return hooks


def _overlap(model, data, circuits: list[Circuit], evaluator: CircuitEvaluator) -> tuple[list, torch.Tensor, bool]:
    """Run an attribution in another thread and, while it is stopped inside a hooked pass (it holds the
    model's turn, its hooks and hooks that corrupt every other thread's pass through the bridge are on),
    evaluate ``circuits`` here. (evaluations, the attribution's scores, whether every evaluation finished
    while the attribution was inside its pass)."""
    inside, evaluated, out = threading.Event(), threading.Event(), {}

    def attribution() -> None:
        me = threading.get_ident()

        def pause(t: torch.Tensor, hook) -> torch.Tensor:
            if not inside.is_set():
                inside.set()
                evaluated.wait(30)
            return t

        name = "blocks.1.hook_resid_mid"
        with model.hooks(fwd_hooks=[(name, pause), *_corrupt_other_threads(model, me)]):
            out["scores"] = attribute(model, data, AttributionSpec("EAP-IG-inputs", 3, batch_size=4)).edges

    thread = threading.Thread(target=attribution)
    thread.start()
    assert inside.wait(60)
    values = [evaluator.evaluate(c) for c in circuits]
    during = thread.is_alive() and model_lock(model).state()[0]
    evaluated.set()
    thread.join(120)
    return values, out["scores"], during


@pytest.fixture(scope="module")
def overlap_case(tiny_dir: Path, pairs):
    model = loaded(tiny_dir, "float64", "cpu")
    data = tokenize(pairs, model.tokenizer)
    scores = attribute(model, data, AttributionSpec("EAP-IG-inputs", 3, batch_size=4))
    circuits = [top_n(scores, n) for n in (1, 3, 6, 10)] + [Circuit.empty(model_graph(model))]
    return model, data, scores, circuits


def test_evaluation_runs_beside_an_attribution_and_gets_what_it_gets_alone(overlap_case) -> None:
    """The sparse engine neither waits for the attribution's turn nor passes through anything it hooks:
    evaluations made while an attribution is stopped inside a hooked pass equal the same evaluations
    alone, and the attribution's scores equal its scores alone."""
    model, data, scores, circuits = overlap_case
    evaluator = CircuitEvaluator(model, data, "logit_diff", batch_size=3)
    assert evaluator.engine == "sparse"
    alone = [evaluator.evaluate(c) for c in circuits]
    values, beside, during = _overlap(model, data, circuits, evaluator)
    assert during, "the evaluations waited for the attribution"
    for a, b in zip(values, alone):
        assert torch.equal(a, b)
    assert torch.equal(beside, scores.edges)


def test_the_overlap_check_catches_a_pass_through_the_bridge(overlap_case, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above fails for an engine that calls the bridge's modules: with the hook-free views
    switched off, the same evaluations come out different."""
    import eapcore.sparse as sparse

    model, data, _, circuits = overlap_case
    monkeypatch.setattr(sparse, "hook_free", lambda module: module)
    evaluator = CircuitEvaluator(model, data, "logit_diff", batch_size=3)
    alone = [evaluator.evaluate(c) for c in circuits]
    values, _, during = _overlap(model, data, circuits, evaluator)
    assert during
    assert any(not torch.equal(a, b) for a, b in zip(values, alone))


def test_hooked_evaluation_waits_its_turn(overlap_case) -> None:
    """The hooked engine passes through the bridge, so it queues behind the attribution and still gets
    what it gets alone."""
    model, data, _, circuits = overlap_case
    evaluator = CircuitEvaluator(model, data, "logit_diff", batch_size=3, engine="hooked")
    alone = [evaluator.evaluate(c) for c in circuits[:2]]
    results: list = []
    holder = threading.Thread(target=lambda: results.append([evaluator.evaluate(c) for c in circuits[:2]]))
    with model_lock(model):
        holder.start()
        time.sleep(0.3)
        assert holder.is_alive() and model_lock(model).state() == (True, 1)
    holder.join(60)
    assert all(torch.equal(a, b) for a, b in zip(results[0], alone))


def test_an_attribution_waits_its_turn_and_the_wait_can_be_cancelled(setup) -> None:
    """The app's run while another session's run holds the model: it reports "position 1" until its
    Cancel (here: the report raising, as Streamlit does) ends the wait; nothing is left queued or cached,
    and the same run later starts at once and gives the engine's scores."""
    from eapcore.data import PromptPairs
    from ui import cache

    spec, pairs, run = ModelSpec(setup[0], "cpu"), PromptPairs.from_csv(setup[1]), AttributionSpec("EAP", batch_size=7)
    model = cache.get_model(spec)
    cache.results().put(cache.attribution_key(spec, pairs, run), None)
    seen, stopped = [], []

    class Cancelled(BaseException):
        """What Streamlit raises in the script thread when Cancel is clicked."""

    def waiting(position: int) -> None:
        seen.append(position)
        if len(seen) == 3:
            raise Cancelled

    def session() -> None:
        try:
            cache.run_attribution(spec, pairs, run, waiting=waiting)
        except Cancelled:
            stopped.append(True)

    with model_lock(model):  # another session's run
        waiter = threading.Thread(target=session)
        waiter.start()
        waiter.join(30)
    assert stopped == [True] and seen == [1, 1, 1]
    assert model_lock(model).state() == (False, 0) and cache.cached_attribution(spec, pairs, run) is None
    scores, _, timing = cache.run_attribution(spec, pairs, run, waiting=waiting)
    assert len(seen) == 3 and not timing.cached
    assert torch.equal(scores.edges, attribute(model, cache.get_data(spec, pairs), run).edges.cpu())


# ----- what the app may read -----


@pytest.fixture
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(an allowed root holding a tiny model, a folder outside it holding another)."""
    inside, outside = tmp_path / "allowed", tmp_path / "elsewhere"
    save_tiny_gpt2(inside / "tiny")
    save_tiny_gpt2(outside / "tiny")
    monkeypatch.setenv(ENV_ROOTS, str(inside))
    return inside, outside


def test_model_folders_only_under_the_allowed_roots(roots: tuple[Path, Path]) -> None:
    inside, outside = roots
    allowed = allowed_roots()
    assert allowed == [inside.resolve()]
    check_model_source(str(inside / "tiny"), allowed)
    check_model_source("demo", allowed)
    check_model_source("someone/some-model", allowed)  # a hub name: read through the Hugging Face cache
    (inside / "link").symlink_to(outside / "tiny")
    for name, says in [(str(outside / "tiny"), "lies outside them"), (str(inside / ".." / "elsewhere" / "tiny"), "contains '..'"),
                       (str(inside / "link"), "lies outside them"), ("/etc", "lies outside them"),
                       (str(outside / "no-such-folder"), "lies outside them")]:
        with pytest.raises(ForbiddenPathError) as caught:
            check_model_source(name, allowed)
        assert says in str(caught.value) and ENV_ROOTS in str(caught.value) and str(inside.resolve()) in str(caught.value)
    assert allowed_roots()[0] == inside.resolve()
    os.environ.pop(ENV_ROOTS)
    from eapcore.models import ASSETS
    from eapcore.roots import hf_cache

    assert allowed_roots() == [ASSETS.resolve(), hf_cache().resolve()]


@pytest.mark.slow
def test_the_app_refuses_folders_outside_the_roots_and_keeps_its_model(roots: tuple[Path, Path], setup) -> None:
    """A folder outside the roots, a ``..`` path and a symlink pointing out: each refused on the Model page
    with the roots named; the session keeps its model, data and scores."""
    from conftest import app_with_scores

    inside, outside = roots
    (inside / "link").symlink_to(outside / "tiny")
    at, before = app_with_scores()
    at.switch_page("pages/model.py").run()
    for name in (str(outside / "tiny"), str(inside / ".." / "elsewhere" / "tiny"), str(inside / "link")):
        at.text_input[0].set_value(name)
        at.button[0].click().run()
        message = one_error(at, r"^Could not load the model: (this server loads model folders only|model path)")
        assert str(inside.resolve()) in message and ENV_ROOTS in message
        assert_kept(at, before)
    at.text_input[0].set_value(str(inside / "tiny"))  # inside: loads (another graph, so the scores go)
    at.button[0].click().run()
    assert at.session_state["model_spec"].name == str(inside / "tiny")
    assert not [e for e in at.error if "Could not load the model" in e.value]  # (the IOI pairs do not fit it)


# ----- memory bounded in bytes -----


def test_budget_drops_the_least_recently_used_and_what_depends_on_it() -> None:
    from ui.budget import Budget

    mib = 2**20
    budget = Budget({"cpu": 3 * mib})
    budget.put("a", torch.zeros(mib // 4), "model", "a")
    budget.put("a-ev", [torch.zeros(mib // 8)], "evaluator", "a's evaluator", ["a"])
    budget.put("b", torch.zeros(mib // 4), "model", "b")
    assert budget.totals() == {"cpu": int(2.5 * mib)}
    budget.get("a-ev")  # uses a as well: b is now the least recently used
    budget.put("c", torch.zeros(mib // 4), "model", "c")
    assert "b" not in budget and {"a", "a-ev", "c"} <= {k for k, _ in budget.entries()}
    budget.put("d", torch.zeros(mib // 2), "model", "d")  # 2 MiB: a (and its evaluator) must go
    assert [k for k, _ in budget.entries()] == ["d", "c"]
    big = torch.zeros(mib)  # one entry over the whole budget is kept (the app could not work otherwise)
    budget.put("big", big, "model", "big")
    assert [k for k, _ in budget.entries()] == ["big"]
    view = big[: mib // 2]  # a view of a model's weights held by an evaluator is the model's, not counted twice
    budget.put("view", {"w": view}, "evaluator", "view", ["big"])
    assert dict(budget.entries())["view"].sizes == {}


def test_a_dropped_model_is_freed_and_one_copy_serves_auto_and_the_device(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Two tiny models under a budget that holds one: loading the second drops the first with its data and
    evaluator, and the first is then gone from memory (a weak reference dies), even when it sits in a
    reference cycle and automatic collection is off: the budget collects after dropping a model."""
    from eapcore.data import PromptPairs
    from ui import cache

    from conftest import TOY

    first, second = save_tiny_gpt2(tmp_path / "first"), save_tiny_gpt2(tmp_path / "second", seed=1)
    monkeypatch.setenv(ENV_ROOTS, str(tmp_path))
    auto, cpu = ModelSpec(str(first), None), ModelSpec(str(first) + "/", "cpu")
    model = cache.get_model(auto)
    assert cache.get_model(cpu) is model and cache.canonical(auto) == cache.canonical(cpu)
    evaluator = cache.get_evaluator(cpu, PromptPairs.from_lists(*TOY.values()), "logit_diff")
    size = dict(cache.budget().entries())[("model", cache.canonical(auto))].nbytes
    monkeypatch.setenv("EAPCORE_CACHE_RAM", str(size * 3 // 2))  # one of the two models fits
    model.cycle = [model]  # only a collection frees it
    gone = weakref.ref(model)
    del model, evaluator
    gc.disable()
    try:
        cache.get_model(ModelSpec(str(second), "cpu"))
        assert gone() is None, "the dropped model is still alive"
    finally:
        gc.enable()
    kept = [(k, e.kind) for k, e in cache.budget().entries() if e.kind in ("model", "data", "evaluator")]
    assert kept == [(("model", cache.canonical(ModelSpec(str(second), "cpu"))), "model")]  # the first's data and evaluator went too


@pytest.mark.cuda
def test_on_a_gpu_auto_and_cuda_are_one_model_and_a_dropped_model_gives_its_memory_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ui import cache

    path = save_tiny_gpt2(tmp_path / "gpu")
    monkeypatch.setenv(ENV_ROOTS, str(tmp_path))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    model = cache.get_model(ModelSpec(str(path), None))
    for device in ("cuda", f"cuda:{torch.cuda.current_device()}"):
        assert cache.get_model(ModelSpec(str(path), device)) is model
    key = ("model", cache.canonical(ModelSpec(str(path), "cuda")))
    assert key[1].device == f"cuda:{torch.cuda.current_device()}" and key[1] == cache.canonical(ModelSpec(str(path)))
    assert dict(cache.budget().entries())[key].sizes[key[1].device] > 0
    assert "PyTorch allocated" in memory_in_use()[key[1].device]
    assert torch.cuda.memory_allocated() > before
    del model
    cache.budget().discard(key)
    assert torch.cuda.memory_allocated() == before


# ----- the load benchmark -----


@pytest.mark.browser
@pytest.mark.slow
def test_bench_server_drives_sessions_on_a_real_server(capsys: pytest.CaptureFixture[str]) -> None:
    """A short run of benchmarks/bench_server.py (no timing asserted): the JSON record is printed last, every
    phase timed some moves, and nothing went wrong on the server or in the pages."""
    import json
    import sys

    from conftest import CHROMIUM, ROOT, demo_available, require

    require(Path(CHROMIUM).exists(), f"Chromium not found at {CHROMIUM}")
    if not demo_available():
        pytest.skip("the benchmark runs on the demo model")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_server

    record = bench_server.main(["--sessions", "2", "--moves", "6", "--probe", "4", "--pairs", "16",
                                "--busy-steps", "5", "--chromium", CHROMIUM])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(record))
    assert {"sessions", "moves", "p50_idle_ms", "p95_idle_ms", "p95_busy_ms", "errors", "rss_growth_mib"} <= record.keys()
    # Server exceptions, error boxes, JavaScript errors and tracebacks fail the test; one move whose key press got
    # no answer within the harness's 60 s is left to the benchmark's count (seen under the full suite's load, its
    # cause not established: benchmarks/README.md, "Shared server").
    unanswered = [m for m in record["error_messages"] if re.match(r"\w+ move \d+ \(session \d+\): TimeoutError", m)]
    assert record["errors"] == len(unanswered) <= 1, record["error_messages"]
    assert record["sessions"] == 2 and record["moves"] == 6 and record["timed"]["idle"] > 0
