"""Which models load: refused families fail with a clear UnsupportedModelError that says why; the generic probe
(eapcore.models.check_model) alone refuses a model whose residual stream is not the sum of its graph's sources
(a refused family, or a post-norm family whose registry entry is missing or wrong); models that cannot be
treated exactly or that TransformerLens cannot run are refused by name; unverified architectures that pass the
probe load with a warning. Verified families: tests/test_families.py."""

from __future__ import annotations

import pytest
import torch

from eapcore import families
from eapcore.models import UnsupportedModelError, check_model, load_model, prepare_model, ungroup_kv_heads

from conftest import BASE, FAMILIES, GQA, TOKENS, V, hf_model, save_with_tiny_tokenizer

# name: (config class, model class, config kwargs, words expected in the refusal)
REFUSED = {
    "phi": ("PhiConfig", "PhiForCausalLM", BASE, "hook_mlp_in never fires"),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(BASE, ffn_dim=32, word_embed_proj_dim=16), "per-head results"),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", GQA, "differ"),
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM",
                dict(vocab_size=V, n_embd=16, n_layer=2, n_head=4, n_positions=32, rotary_dim=4, **TOKENS), "bridge"),
}


def test_verified_list_is_what_is_tested():
    assert families.verified() == sorted({spec[1] for spec in FAMILIES.values()})
    assert all(not families.get(spec[1]).verified for spec in REFUSED.values())


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsupported_families_are_refused(name, tmp_path):
    config_cls, model_cls, kwargs, words = REFUSED[name]
    path = save_with_tiny_tokenizer(tmp_path, hf_model(config_cls, model_cls, kwargs))
    with pytest.raises(UnsupportedModelError, match=f"{model_cls} is not supported") as info:
        load_model(str(path), device="cpu", dtype="float64")
    assert words in str(info.value) and "docs/families.md" in str(info.value)


@pytest.mark.parametrize("name, entry, words", [
    ("phi", "refused", "never fires"),
    ("gemma2", None, "residual stream"),
    ("olmo3", None, "residual stream"),
    ("gemma2", dict(post_norm=None), "residual stream"),
    ("gemma2", dict(post_norm="rmsnorm"), "residual stream"),
    ("olmo2", None, "forward pass"),  # GQA: without its entry, its key norm over all heads is not ungrouped
])
def test_the_generic_check_finds_what_the_list_refuses(name, entry, words, tmp_path, monkeypatch):
    """:func:`check_model` alone refuses, on a probe input, a family that the list refuses (Phi), and a post-norm
    family whose registry entry is missing (its heads then read without the norm's scale), says it has no
    post-norm, or names the wrong one (OLMo's weight w for Gemma's 1 + w)."""
    from dataclasses import replace

    from transformer_lens.model_bridge import TransformerBridge

    config_cls, model_cls, kwargs = (REFUSED[name] if entry == "refused" else FAMILIES[name])[:3]
    if entry is None:
        monkeypatch.delitem(families.FAMILIES, model_cls)
    elif entry != "refused":
        monkeypatch.setitem(families.FAMILIES, model_cls, replace(families.FAMILIES[model_cls], **entry))
    path = save_with_tiny_tokenizer(tmp_path, hf_model(config_cls, model_cls, kwargs))
    model = TransformerBridge.boot_transformers(str(path), device="cpu", dtype=torch.float64)
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    ungroup_kv_heads(model)
    with pytest.raises(UnsupportedModelError, match=words):
        check_model(model)


def test_post_norm_models_with_an_attention_output_bias_are_refused(tmp_path):
    """The post-attention norm would scale the bias by each run's own scale, which belongs to no head."""
    config_cls, model_cls, kwargs = FAMILIES["gemma2"][:3]
    path = save_with_tiny_tokenizer(tmp_path, hf_model(config_cls, model_cls, dict(kwargs, attention_bias=True)))
    with pytest.raises(UnsupportedModelError, match="Gemma2ForCausalLM is not supported.*bias on its attention output"):
        load_model(str(path), device="cpu", dtype="float64")


def test_olmo2_in_half_precision_is_refused_clearly(tmp_path):
    """TransformerLens 4.3's bridge fails on OLMo-2/3 in half precision (its rotary path returns float32 queries
    and keys, which meet bfloat16 values), even without the EAP hooks: a clear refusal, not a crash."""
    config_cls, model_cls, kwargs = FAMILIES["olmo2"][:3]
    path = save_with_tiny_tokenizer(tmp_path, hf_model(config_cls, model_cls, kwargs))
    with pytest.raises(UnsupportedModelError, match="Olmo2ForCausalLM is not supported.*forward pass in bfloat16.*float32"):
        load_model(str(path), device="cpu", dtype="bfloat16")


def test_unverified_families_that_pass_the_check_load_with_a_warning(tmp_path, monkeypatch):
    config_cls, model_cls, kwargs, _, _ = FAMILIES["llama"]
    path = save_with_tiny_tokenizer(tmp_path, hf_model(config_cls, model_cls, kwargs))
    monkeypatch.delitem(families.FAMILIES, model_cls)
    with pytest.warns(UserWarning, match="not among the verified families"):
        model = load_model(str(path), device="cpu", dtype="float32")
        prepare_model(model)  # a second preparation is harmless: already ungrouped
    assert model.cfg.n_key_value_heads == 4
