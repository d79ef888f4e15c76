"""Sessions: a saved exploration loads back equal (tensors, specs, pairs, view), and every damaged, hostile,
foreign or newer file is refused with a message that says why, without running anything in it."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from eapcore.attribute import AttributionSpec, attribute
from eapcore.circuit import Scores
from eapcore.data import tokenize
from eapcore.edits import Edits
from eapcore.graph import Graph, GraphConfig
from eapcore.models import ModelSpec, model_graph
from eapcore.session import Run, Session, load_session, save_session


@pytest.fixture(scope="module")
def session(tiny32, pairs) -> Session:
    data = tokenize(pairs, tiny32.tokenizer)
    graph = model_graph(tiny32)
    edge_spec = AttributionSpec("EAP-IG-inputs", 3, batch_size=4)
    node_spec = AttributionSpec("EAP", level="neuron", batch_size=4)
    runs = (
        Run(edge_spec, attribute(tiny32, data, edge_spec), "EAP-IG-inputs (3 steps)", "run:abc"),
        Run(node_spec, attribute(tiny32, data, node_spec), "EAP, neurons", "run:def"),
    )
    return Session(graph, ModelSpec("demo", "cpu", "float32"), pairs, "task: tiny", "logit_diff", runs, selected=1,
                   size=12, absolute=False, edits=Edits(("a1.h0",), ("input->m0",)), node="a1.h1", page="explore")


def _assert_equal(a: Session, b: Session) -> None:
    assert (a.graph, a.model, a.pairs, a.data_label, a.metric) == (b.graph, b.model, b.pairs, b.data_label, b.metric)
    assert (a.selected, a.size, a.absolute, a.edits, a.node, a.page) == (b.selected, b.size, b.absolute, b.edits, b.node, b.page)
    assert len(a.runs) == len(b.runs)
    for x, y in zip(a.runs, b.runs):
        assert (x.spec, x.label, x.key, x.scores.provenance) == (y.spec, y.label, y.key, y.scores.provenance)
        for name in ("edges", "nodes", "neurons"):
            t, u = getattr(x.scores, name), getattr(y.scores, name)
            assert (t is None and u is None) or (t.dtype == u.dtype and torch.equal(t, u)), name


def test_round_trip_through_a_file_and_a_buffer(session, tmp_path):
    save_session(tmp_path / "s.eapcore", session)
    _assert_equal(load_session(tmp_path / "s.eapcore", expected=session.graph), session)
    buffer = io.BytesIO()
    save_session(buffer, session)
    _assert_equal(load_session(io.BytesIO(buffer.getvalue())), session)
    assert session.runs[1].scores.neurons is not None and session.runs[0].scores.nodes is None
    twice = replace(session, runs=session.runs + (replace(session.runs[0], label="again"),))  # shared tensors
    _assert_equal(load_session(_saved(twice)), twice)
    empty = Session(session.graph, session.model, session.pairs, "file: x.csv", "kl_div")
    save_session(tmp_path / "e.eapcore", empty)
    _assert_equal(load_session((tmp_path / "e.eapcore").read_bytes()), empty)


def _saved(session: Session) -> bytes:
    buffer = io.BytesIO()
    save_session(buffer, session)
    return buffer.getvalue()


def _rewrite(blob: bytes, meta_change=None, members: dict | None = None) -> bytes:
    """The archive with session.json changed by ``meta_change(meta)`` and members replaced or added."""
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        contents = {n: z.read(n) for n in z.namelist()}
    if meta_change is not None:
        meta = json.loads(contents["session.json"])
        meta_change(meta)
        contents["session.json"] = json.dumps(meta).encode()
    contents.update(members or {})
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for n, b in contents.items():
            z.writestr(n, b)
    return out.getvalue()


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.7, 0.98])
def test_truncated_file_is_refused(session, keep):
    blob = _saved(session)
    with pytest.raises(ValueError, match="not a valid eapcore session file: .*(truncated|not a zip)"):
        load_session(blob[: int(len(blob) * keep)])


class _Payload:
    """Unpickling this would create the sentinel file."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_hostile_files_are_refused_without_running_them(session, tmp_path):
    sentinel = tmp_path / "ran"
    pickled = pickle.dumps({"format": "eapcore-session", "x": _Payload(sentinel)})
    with pytest.raises(ValueError, match="is a Python pickle, which eapcore never loads"):
        load_session(pickled)
    torch_file = tmp_path / "t.pt"
    torch.save({"session": _Payload(sentinel)}, torch_file)
    with pytest.raises(ValueError, match="is a torch.save file .*it was not unpickled"):
        load_session(torch_file)
    inside = _rewrite(_saved(session), members={"scores.safetensors": pickled})
    with pytest.raises(ValueError, match="scores.safetensors could not be read"):
        load_session(inside)
    with pytest.raises(ValueError, match="must hold exactly"):
        load_session(_rewrite(_saved(session), members={"extra.pkl": pickled}))
    assert not sentinel.exists()


def test_session_for_another_model_is_refused(session):
    other = Graph(GraphConfig(3, 2, False, 8))
    with pytest.raises(ValueError, match=r"is a session for a model with 2 layers x 2 heads, d_model 8, but the loaded "
                                         r"model has 3 layers x 2 heads.*'demo'"):
        load_session(_saved(session), expected=other)


def test_newer_format_is_refused(session):
    newer = _rewrite(_saved(session), lambda m: m.update(version=2))
    with pytest.raises(ValueError, match=r"saved by a newer eapcore \(session format 2; this one reads up to 1\); update"):
        load_session(newer)


def _set_run_field(key, value):
    return lambda m: m["runs"][0].update({key: value})


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(format="other"), "does not say format"),
    (lambda m: m.update(selected=2), "'selected' must be the index of one of its 2 runs"),
    (lambda m: m.update(size=10_000), "'size' must be a circuit size between 0 and"),
    (lambda m: m.update(node="a9.h9"), "'node' must be a node of the graph"),
    (lambda m: m.update(edits={"include": ["a1.h7"], "exclude": []}), r"edits are not valid: unknown .*'a1\.h7'"),
    (lambda m: m["model"].update(dtype="int8"), "'model' must hold a model name and a dtype"),
    (lambda m: m["data"].update(metric="accuracy"), "'data' must hold a label and a metric"),
    (lambda m: m["data"].update(correct=m["data"]["correct"][:-1]), "prompt pairs are not valid: clean, corrupted"),
    (_set_run_field("spec", {"method": "EAP-IG-inputs", "intervention": "zero"}), "run 0 has an invalid attribution spec"),
    (_set_run_field("tensors", ["edges", "nodes"]), r"lacks 'run0\.nodes'"),
    (lambda m: m.update(graph={"n_layers": 2, "n_heads": 3, "d_model": 8}), r"'run0\.edges' must be a float tensor of shape"),
])
def test_malformed_session_is_refused(session, change, message):
    with pytest.raises(ValueError, match=message):
        load_session(_rewrite(_saved(session), change))


def test_invalid_session_is_not_saved_over_a_good_file(session, tmp_path):
    path = tmp_path / "s.eapcore"
    save_session(path, session)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="cannot save the session: 'selected'"):
        save_session(path, replace(session, selected=5))
    other = Scores(Graph(GraphConfig(1, 1)), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="has scores for 1 layers x 1 heads"):
        save_session(path, replace(session, runs=(Run(AttributionSpec(), other),)))
    assert path.read_bytes() == before
