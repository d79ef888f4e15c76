"""The unsplit backend (eapcore.fastgrad) at every level and for activation interpolation, per family that
has it, against the split backend (eapcore.gradients), which reads each gradient where the bridge's split
q/k/v inputs and per-head results put it (itself checked against hook-free autograd and exact patching in
tests/test_attribute.py, tests/test_methods.py and tests/test_families.py)."""

from __future__ import annotations

import pytest
import torch

from eapcore import families
from eapcore.attribute import AttributionSpec, attribute
from eapcore.data import tokenize
from eapcore.models import load_model

from conftest import FAMILIES, hf_model, save_with_tiny_tokenizer

UNSPLIT = [name for name, spec in FAMILIES.items() if families.get(spec[1]).unsplit]


@pytest.fixture(scope="module", params=UNSPLIT)
def family(request, tmp_path_factory, pairs):
    config_cls, model_cls, kwargs, _, _ = FAMILIES[request.param]
    path = save_with_tiny_tokenizer(tmp_path_factory.mktemp(request.param), hf_model(config_cls, model_cls, kwargs))
    model = load_model(str(path), device="cpu", dtype="float64")
    return model, tokenize(pairs, model.tokenizer)


def test_every_unsplit_family_is_covered():
    assert {spec[1] for name, spec in FAMILIES.items() if name in UNSPLIT} == {
        name for name, f in families.FAMILIES.items() if f.verified and f.unsplit}


@pytest.mark.parametrize("method,level,metric", [  # EAP under KL is 0: the clean run is KL's minimum
    ("EAP-IG-activations", "edge", "kl_div"), ("EAP-IG-activations", "neuron", "logit_diff"), ("EAP", "node", "logit_diff"),
    ("EAP-IG-inputs", "neuron", "kl_div"),
])
def test_unsplit_scores_equal_the_split_scores(family, method, level, metric):
    model, data = family
    spec = dict(method=method, level=level, ig_steps=2, batch_size=4, metric=metric)
    fast = attribute(model, data, AttributionSpec(**spec))
    plain = attribute(model, data, AttributionSpec(**spec, backend="split"))
    assert fast.provenance["backend"] == "unsplit"
    # float64 throughout where the family's norm is torch's LayerNorm; Hugging Face's RMSNorms and OLMo's
    # weightless LayerNorm compute in float32 even in a float64 model, so both backends carry float32 noise
    tol = 1e-10 if families.of(model).norm == "layernorm" else 1e-5
    for part in ("edges",) if level == "edge" else ("nodes", "neurons") if level == "neuron" else ("nodes",):
        ours, expected = getattr(fast, part), getattr(plain, part)
        scale = float(expected.abs().max())
        assert scale > 1e-6
        torch.testing.assert_close(ours, expected, rtol=tol, atol=tol * scale)
