"""Host-device synchronisations on the hot paths, counted on CPU.

On a GPU the host waits for the device whenever it reads a device tensor (``.item()``, ``.tolist()``,
``bool()``, ``.cpu()``, ``nonzero``, boolean-mask indexing, which needs the count of True) and whenever it
copies host data to the device (a Python list or CPU tensor used as an index, ``torch.tensor(...,
device=...)``, ``.to(device)``). Here every tensor that would live on the model's device is tagged (the
weights, the evaluator's caches and everything computed from them, and tensors made with a ``device=``
argument), and a ``TorchFunctionMode`` counts those operations when eapcore's own code performs them (the
bridge's internals are not ours to change). The evaluation hot paths must read back only their result,
once per call, and copy host data once per dtype per call (:mod:`eapcore.upload`), however many batches
there are.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from eapcore.circuit import Circuit
from eapcore.data import PromptPairs, tokenize
from eapcore.evaluate import CircuitEvaluator
from eapcore.models import load_model, model_graph
from eapcore.select import top_n
from eapcore.tasks import get_task

ENGINE = str(Path(__file__).resolve().parent.parent / "eapcore")
READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero", "equal", "allclose",
         "argwhere", "unique", "masked_select"}
FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "full", "empty", "arange", "rand", "randn", "eye", "linspace"}


def _on_device(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, "_on_device", False)


def _tag(values) -> None:
    for t in tree_flatten(values)[0]:
        if isinstance(t, torch.Tensor):
            try:
                t._on_device = True
            except (AttributeError, RuntimeError):  # some tensor kinds take no attributes
                pass


class Syncs(TorchFunctionMode):
    """Counts ``read`` (device -> host), ``mask`` (boolean-mask indexing) and ``upload`` (host -> device) in eapcore."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()
        self.where: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        flat = tree_flatten((args, kwargs))[0]
        device_in = any(_on_device(a) for a in flat)
        frame = sys._getframe(1)
        ours = frame.f_code.co_filename.startswith(ENGINE)
        kind = None
        if device_in and name in READS:
            kind = "read"
        elif name in ("__getitem__", "__setitem__", "index_put_", "index_put") and _on_device(args[0]):
            index = args[1] if len(args) > 1 else ()
            index = index if isinstance(index, tuple) else (index,)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                kind = "mask"
            elif any(isinstance(i, list) or (isinstance(i, torch.Tensor) and not _on_device(i)) for i in index):
                kind = "upload"
        elif name in FACTORIES and kwargs.get("device") is not None and name in ("tensor", "as_tensor"):
            kind = "upload"
        elif name == "to" and not device_in and (kwargs.get("device") is not None or any(
                isinstance(a, (torch.device, str)) or _on_device(a) for a in args[1:])):
            kind = "upload"
        if ours and kind is not None:
            self.counts[kind] += 1
            self.where.append(f"{kind} {name} {Path(frame.f_code.co_filename).name}:{frame.f_lineno}")
        out = func(*args, **kwargs)
        if device_in or kind == "upload" or (name in FACTORIES and kwargs.get("device") is not None):
            if name not in READS:
                _tag(out)
        return out


def _evaluator(model, data, engine, batch_size):
    ev = CircuitEvaluator(model, data, batch_size=batch_size, engine=engine)
    ev.baseline()  # the caches are made outside the counted calls
    _tag([list(model.parameters()), list(model.buffers())])
    for p in ev._prepared():
        _tag([vars(p.batch), p.ablated, p.clean_readout, p.corrupted_readout])
        if p.runner is not None:
            _tag([v for v in vars(p.runner).values() if isinstance(v, (torch.Tensor, list, tuple))])
    return ev


@pytest.fixture(scope="module")
def demo():
    """The demo model; 16 IOI pairs, and the same pairs four times over (four batches of the same shapes)."""
    model = load_model("demo", device="cpu", dtype="float32")
    p = PromptPairs.from_csv(get_task("ioi").csv.read_bytes())
    data = {k: tokenize(PromptPairs(*(getattr(p, f)[:16] * k for f in ("clean", "corrupted", "correct", "incorrect"))),
                        model.tokenizer) for k in (1, 4)}
    from eapcore.attribute import AttributionSpec, attribute

    return model, data, attribute(model, data[1], AttributionSpec("EAP", batch_size=16))


def _count(fn) -> Syncs:
    with Syncs() as syncs:
        fn()
    return syncs


@pytest.mark.parametrize("engine", ["sparse", "hooked"])
def test_evaluation_reads_back_once_and_uploads_once_per_call(engine, demo):
    model, data, scores = demo
    counts = {}
    for batches in (1, 4):
        ev = _evaluator(model, data[batches], engine, 16)
        for n in (5, 24, 100):  # a first evaluation, then slider moves
            syncs = _count(lambda: ev.evaluate(top_n(scores, n)))
            assert syncs.counts["read"] == 1 and syncs.counts["mask"] == 0, syncs.where
            assert syncs.counts["upload"] <= 2, syncs.where  # one copy per dtype: indices, masks
            counts[batches, n] = syncs.counts["upload"]
    assert all(counts[4, n] == counts[1, n] for n in (5, 24, 100)), counts


def test_removals_read_back_once_and_upload_once_per_call(demo):
    model, data, _ = demo
    graph = model_graph(model)
    removals = [tuple(e) for e in graph.real_edge_mask.nonzero().tolist()[::9]] + [(3, None), (7, None)]
    uploads = []
    for batches in (1, 4):
        ev = _evaluator(model, data[batches], "sparse", 16)
        syncs = _count(lambda: ev.without(removals))
        assert syncs.counts["read"] == 1 and syncs.counts["mask"] == 0 and syncs.counts["upload"] <= 2, syncs.where
        uploads.append(syncs.counts["upload"])
    assert uploads[0] == uploads[1]


def test_the_counter_sees_what_it_counts(demo):
    """Not vacuous: the operations the engine avoids are counted when they happen."""
    model, data, _ = demo
    ev = _evaluator(model, data[1], "sparse", 16)
    ablated = ev._prepared()[0].ablated
    with Syncs() as syncs:
        exec(compile("ablated.sum().item(); ablated[ablated > 0]; ablated[[0, 1]]; torch.tensor([1], device='cpu')",
                     f"{ENGINE}/probe.py", "exec"), {"ablated": ablated, "torch": torch})
    assert syncs.counts == Counter(read=1, mask=1, upload=2), syncs.where
    assert _count(lambda: ev.evaluate(Circuit.full(ev.graph), reuse_clean=False)).counts["read"] == 1


def test_to_device_copies_once_per_dtype_and_keeps_the_structure():
    from dataclasses import dataclass

    from eapcore.upload import to_device

    @dataclass(frozen=True)
    class Node:
        index: torch.Tensor
        mask: torch.Tensor | None
        rows: slice

    tree = ([Node(torch.tensor([3, 1]), torch.eye(2).T, slice(0, 2)), Node(torch.tensor([[5]]), None, slice(1, 3))],
            {"k": torch.tensor([0.5, 1.5])}, None)
    with Syncs() as syncs:
        exec(compile("out = to_device(tree, torch.device('cpu'))", f"{ENGINE}/probe.py", "exec"),
             namespace := {"to_device": to_device, "tree": tree, "torch": torch})
    out = namespace["out"]
    assert syncs.counts == Counter(upload=2), syncs.where  # int64 and float32
    assert out[2] is None and out[0][0].rows == slice(0, 2) and out[0][1].mask is None
    for ours, theirs in [(out[0][0].index, tree[0][0].index), (out[0][0].mask, tree[0][0].mask),
                         (out[0][1].index, tree[0][1].index), (out[1]["k"], tree[1]["k"])]:
        assert torch.equal(ours, theirs) and ours.shape == theirs.shape
