"""Model families: one entry per Hugging Face architecture, verified or refused, and what it is made of.

An entry says whether eapcore runs the architecture (``refused`` is None) or refuses it and why, and
describes what the engine needs to know about it: the norm before attention and MLP (:data:`NORMS`),
the attention (:data:`ATTENTIONS`, q/k norms: :data:`QK_NORMS`), a config multiplier that scales every
attention and MLP output (``output_scale``), whether attention and MLP run in parallel, the norm
applied to each attention and MLP output before it joins the residual stream (``post_norm``, whose
scale each head's output carries: :class:`eapcore.sites.PostNorm`), and which fast paths run it: ``unsplit`` gradient passes (:mod:`eapcore.fastgrad`) and ``sparse`` circuit evaluation
(:mod:`eapcore.sparse`). :mod:`eapcore.backends` turns the fast paths into the choice of backend;
:mod:`eapcore.models` refuses and warns from it. Adding a family is one entry here plus its tiny
config in ``FAMILIES`` of ``tests/conftest.py`` (docs/architecture.md, "How to add a family").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NORMS = {
    "none": "no norm (OLMo-2 normalizes sub-layer outputs only)",
    "layernorm": "LayerNorm, (x − μ)/σ · γ + β",
    "layernorm-free": "LayerNorm without weight or bias (OLMo), (x − μ)/σ",
    "rmsnorm": "RMSNorm, x/rms(x) · γ",
    "rmsnorm-1p": "Gemma's RMSNorm, x/rms(x) · (1 + γ)",
}
QK_NORMS = {
    "per-head": "an RMSNorm over each head's query and key",
    "across-heads": "an RMSNorm over all heads' queries (keys) together, so a head's q (k) input also reaches the "
                    "other heads' queries (keys) of its layer",
}
ATTENTIONS = {
    "plain": "scaled dot-product attention, positions from a learned embedding",
    "rotary": "rotary position embedding on all of q and k",
    "partial-rotary": "rotary position embedding on the first part of q and k (GPT-NeoX's rotary_pct)",
}


@dataclass(frozen=True)
class Family:
    """One architecture (``model_type``: its config's). ``norm``, ``attention`` and ``qk_norm`` name entries
    of :data:`NORMS`, :data:`ATTENTIONS` and :data:`QK_NORMS`; ``parallel``: None (attention, then MLP), ``"always"``, or the
    config flag that decides (GPT-NeoX); ``output_scale``: the config attribute that multiplies each
    sub-layer output (Granite); ``post_norm``: the norm kind applied to each attention and MLP output
    before it is added (Gemma-2, OLMo-2; a head's output then carries its layer's post-norm scale); ``sparse_config``: config values that sparse evaluation requires (an
    allow-list); ``refused``: why eapcore refuses it (None: verified)."""

    architecture: str
    model_type: str
    label: str
    norm: str | None = None
    attention: str | None = None
    qk_norm: str | None = None
    output_scale: str | None = None
    parallel: str | None = None
    post_norm: str | None = None
    unsplit: bool = False
    sparse: bool = False
    sparse_config: tuple[tuple[str, Any], ...] = ()
    refused: str | None = None

    def __post_init__(self) -> None:
        for kind, table in ((self.norm, NORMS), (self.post_norm, NORMS), (self.attention, ATTENTIONS),
                            (self.qk_norm, QK_NORMS)):
            if kind is not None and kind not in table:
                raise ValueError(f"{self.architecture}: unknown kind {kind!r}; known: {', '.join(table)}")
        if self.refused is None and (self.norm is None or self.attention is None):
            raise ValueError(f"{self.architecture}: a verified family states its norm and attention")

    @property
    def verified(self) -> bool:
        return self.refused is None

    def parallel_attn_mlp(self, config: Any) -> bool:
        """Whether a model with this Hugging Face ``config`` runs attention and MLP in parallel."""
        if self.parallel is None or self.parallel == "always":
            return self.parallel == "always"
        return bool(getattr(config, self.parallel))

    def sparse_mismatch(self, config: Any) -> str | None:
        """The first config value that sparse evaluation does not handle, as text; None if all fit."""
        for name, value in self.sparse_config:
            if getattr(config, name, None) != value:
                return f"{name}={getattr(config, name, None)!r} (sparse evaluation handles {value!r})"
        return None


_SHARED_NORM = (
    "runs attention and MLP in parallel from one shared input norm; TransformerLens 4.3's bridge then "
    "has no separate MLP-input hook (hook_mlp_in never fires), so MLP input edges cannot be patched"
)
_NO_RESULT = (
    "uses an attention bridge without per-head results (use_attn_result) or split q/k/v inputs in "
    "TransformerLens 4.3"
)
_LLAMA = dict(norm="rmsnorm", attention="rotary", unsplit=True)

FAMILIES: dict[str, Family] = {f.architecture: f for f in (
    # Verified: checked against independent computations on tiny random configs (tests/test_families.py)
    Family("GPT2LMHeadModel", "gpt2", "GPT-2", "layernorm", "plain", unsplit=True, sparse=True,
           sparse_config=(("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                          ("reorder_and_upcast_attn", False))),
    Family("GPTNeoXForCausalLM", "gpt_neox", "Pythia / GPT-NeoX", "layernorm", "partial-rotary",
           parallel="use_parallel_residual", unsplit=True, sparse=True),
    Family("LlamaForCausalLM", "llama", "Llama", **_LLAMA, sparse=True),
    Family("MistralForCausalLM", "mistral", "Mistral", **_LLAMA, sparse=True),
    Family("Qwen2ForCausalLM", "qwen2", "Qwen2 / Qwen2.5", **_LLAMA, sparse=True),
    Family("Qwen3ForCausalLM", "qwen3", "Qwen3", **_LLAMA, qk_norm="per-head", sparse=True),
    Family("GemmaForCausalLM", "gemma", "Gemma (1)", "rmsnorm-1p", "rotary"),
    Family("Phi3ForCausalLM", "phi3", "Phi-3", **_LLAMA),
    Family("OlmoForCausalLM", "olmo", "OLMo (1)", "layernorm-free", "rotary", unsplit=True),
    Family("Starcoder2ForCausalLM", "starcoder2", "StarCoder2", "layernorm", "rotary", unsplit=True),
    Family("GPTBigCodeForCausalLM", "gpt_bigcode", "GPT-BigCode / SantaCoder", "layernorm", "plain", unsplit=True),
    Family("GraniteForCausalLM", "granite", "Granite", **_LLAMA, output_scale="residual_multiplier"),
    Family("SmolLM3ForCausalLM", "smollm3", "SmolLM3", **_LLAMA),
    # Post-sublayer norms: each head's output carries its layer's post-norm scale (eapcore.sites.PostNorm)
    Family("Gemma2ForCausalLM", "gemma2", "Gemma-2", "rmsnorm-1p", "rotary", post_norm="rmsnorm-1p"),
    Family("Gemma3ForCausalLM", "gemma3_text", "Gemma-3", "rmsnorm-1p", "rotary", qk_norm="per-head",
           post_norm="rmsnorm-1p"),
    Family("Gemma3ForConditionalGeneration", "gemma3", "Gemma-3 (multimodal, text prompts)", "rmsnorm-1p", "rotary",
           qk_norm="per-head", post_norm="rmsnorm-1p"),
    Family("Olmo2ForCausalLM", "olmo2", "OLMo-2", "none", "rotary", qk_norm="across-heads", post_norm="rmsnorm"),
    Family("Olmo3ForCausalLM", "olmo3", "OLMo-3", "none", "rotary", qk_norm="across-heads", post_norm="rmsnorm"),
    # Refused: checked with tiny random configs (tests/test_refusals.py checks a representative subset)
    Family("PhiForCausalLM", "phi", "Phi (1, 1.5, 2)", parallel="always", refused=_SHARED_NORM),
    Family("FalconForCausalLM", "falcon", "Falcon", parallel="parallel_attn", refused=_SHARED_NORM),
    Family("CohereForCausalLM", "cohere", "Cohere", parallel="always", refused=_SHARED_NORM),
    Family("Cohere2ForCausalLM", "cohere2", "Cohere-2", parallel="always", refused=_SHARED_NORM),
    Family("GPTJForCausalLM", "gptj", "GPT-J", parallel="always", refused=_NO_RESULT),
    Family("OPTForCausalLM", "opt", "OPT", refused=_NO_RESULT),
    Family("GPTNeoForCausalLM", "gpt_neo", "GPT-Neo", refused=_NO_RESULT),
    Family("BloomForCausalLM", "bloom", "BLOOM",
           refused="never fires hook_mlp_in with the EAP flags on in TransformerLens 4.3 (Bloom block bridge)"),
    Family("MptForCausalLM", "mpt", "MPT",
           refused="never fires the split q/k/v input hooks in TransformerLens 4.3 (ALiBi attention bridge)"),
    Family("CodeGenForCausalLM", "codegen", "CodeGen", parallel="always",
           refused="cannot be run by TransformerLens 4.3's bridge (its CodeGen attention bridge fails in the forward pass)"),
    Family("StableLmForCausalLM", "stablelm", "StableLM",
           refused="is computed differently by TransformerLens 4.3's bridge than by Hugging Face (logits differ by "
                   "~0.6 on a tiny random model, even without the EAP hook flags)"),
)}


def get(architecture_name: str) -> Family | None:
    """The entry of an architecture (e.g. ``LlamaForCausalLM``); None for one eapcore has not looked at."""
    return FAMILIES.get(architecture_name)


def parallel_by_default(model_type: str) -> bool:
    """Whether models of this config ``model_type`` run attention and MLP in parallel unless a config flag
    says otherwise (:meth:`Family.parallel_attn_mlp` reads the flag)."""
    return any(f.model_type == model_type and f.parallel is not None for f in FAMILIES.values())


def verified() -> list[str]:
    """Architectures eapcore runs and has verified, sorted."""
    return sorted(name for name, f in FAMILIES.items() if f.verified)


def architecture(model: Any) -> str:
    """The Hugging Face architecture name of a bridge, e.g. ``LlamaForCausalLM``."""
    name = getattr(model.cfg, "architecture", None)
    if not name and getattr(model, "original_model", None) is not None:
        name = type(model.original_model).__name__
    return str(name or "unknown")


def of(model: Any) -> Family | None:
    """The entry of a loaded model's architecture."""
    return get(architecture(model))
