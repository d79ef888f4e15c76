"""Load a decoder language model as a TransformerLens 4.x ``TransformerBridge`` ready for EAP.

One place (:func:`prepare_model`) sets the EAP hook flags (per-head results, split q/k/v inputs,
MLP-input hook), ungroups grouped-query attention so that every query head has its own k and v input
(:func:`ungroup_kv_heads`, the EAP-IG convention), refuses architectures that do not fit the graph
(:class:`UnsupportedModelError`, :func:`check_model`; the registry :mod:`eapcore.families`), and maps
the model onto a :class:`~eapcore.graph.Graph`. The weights keep ``requires_grad``: eapcore freezes them
only for the duration of its own passes (:func:`frozen`), so TransformerLens's own tools (e.g.
``attribution_patch``) work on a loaded model as it is. Supported and refused families: docs/families.md.
"""

from __future__ import annotations

import os
import socket
import threading
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from eapcore import families
from eapcore.families import architecture
from eapcore.graph import Graph, GraphConfig
from eapcore.shared import FairLock
from eapcore.sites import destinations, output_reader, per_column, sources

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_MODEL_DIR = ASSETS / "models" / "demo"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSpec:
    """What to load: ``name`` is ``demo``, a Hugging Face hub name, or a local ``save_pretrained`` folder.
    ``device_map`` (``auto``, ``balanced``, ``balanced_low_0``, ``sequential``) or ``n_devices`` split a model
    too big for one GPU over several, through TransformerLens's multi-device boot; they exclude ``device``."""

    name: str = "demo"
    device: str | None = None
    dtype: str = "float32"
    device_map: str | None = None
    n_devices: int | None = None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _hub_reachable(timeout: float = 2.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def looks_like_path(name: str) -> bool:
    """Whether a model name is meant as a folder: it starts with ``/``, ``.``, ``~`` or a drive, holds a
    backslash, or has more than one ``/`` (a hub id is ``name`` or ``owner/name``)."""
    return (name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")
            or (len(name) > 1 and name[1] == ":"))


def resolve_source(name: str) -> str:
    """Map ``demo`` and local folders to paths; check that a hub name can be fetched at all."""
    if name == "demo":
        if not (DEMO_MODEL_DIR / "config.json").exists():
            raise FileNotFoundError(f"the embedded demo model is missing from {DEMO_MODEL_DIR}")
        return str(DEMO_MODEL_DIR)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"model folder {str(path)!r} has no config.json; pass a folder written by "
                "`save_pretrained` (config.json, weights and tokenizer files)"
            )
        return str(path)
    if looks_like_path(name):
        raise FileNotFoundError(
            f"model folder {name!r} does not exist (looked for {str(path.resolve())!r}); check the path, or give "
            "'demo' or a Hugging Face model name such as 'gpt2'"
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if offline or not _hub_reachable():
        raise ConnectionError(
            f"cannot load model {name!r}: there is no folder of that name here and the Hugging Face hub cannot be "
            f"reached. Download it on a connected machine (`hf download {name} --local-dir DIR`, with the "
            "huggingface_hub package installed) and load the folder DIR instead, or use the embedded model 'demo'"
        )
    return name


def source_name(source: str) -> str:
    """The name a loaded model goes by: ``demo`` for the embedded model's folder, else ``source`` itself
    (the inverse of :func:`resolve_source`)."""
    return "demo" if source and Path(source) == DEMO_MODEL_DIR else source


def load_model(spec: ModelSpec | str = "demo", device: str | None = None, dtype: str | None = None) -> Any:
    """Load ``spec`` (a :class:`ModelSpec` or a name) as an EAP-ready ``TransformerBridge`` in eval mode."""
    if isinstance(spec, str):
        spec = ModelSpec(spec, device, dtype or "float32")
    source = resolve_source(spec.name)
    torch_dtype = _resolve_dtype(spec.dtype)
    from transformer_lens.model_bridge import TransformerBridge

    placement: dict[str, Any] = {"device": spec.device or default_device()}
    if spec.device_map is not None or (spec.n_devices or 1) > 1:
        if spec.device is not None:
            raise ValueError(f"device {spec.device!r} and a device map/n_devices exclude each other; pass one of them")
        placement = {"device_map": spec.device_map, "n_devices": spec.n_devices}
    try:
        model = TransformerBridge.boot_transformers(source, dtype=torch_dtype, **placement)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"could not load model {spec.name!r}: {e}") from e
    except (AttributeError, NotImplementedError) as e:  # e.g. CodeGen: the bridge cannot wrap the model
        raise UnsupportedModelError(
            f"could not load model {spec.name!r}: TransformerLens could not build a bridge for it ({type(e).__name__}: "
            f"{e}). Supported families: {', '.join(families.verified())} (see docs/families.md)"
        ) from e
    return prepare_model(model)


class UnsupportedModelError(ValueError):
    """The model's architecture cannot be mapped exactly onto the EAP graph; the message says why."""


def _refuse(model: Any, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{architecture(model)} is not supported for edge attribution: it {why}. Supported families: "
        f"{', '.join(families.verified())} (see docs/families.md)"
    )


def prepare_model(model: Any, check: bool = True) -> Any:
    """Make a ``TransformerBridge`` EAP-ready in place and return it.

    Sets the EAP hook flags (per-head results, split q/k/v inputs, MLP-input hook), ungroups grouped-
    query attention (:func:`ungroup_kv_heads`) and switches to eval mode. Refuses families that
    :mod:`eapcore.families` lists as refused with :class:`UnsupportedModelError`; with ``check`` (the
    default) it then runs :func:`check_model` on a short probe input, which refuses any other
    architecture whose hooks do not fire, whose residual stream is not the sum of the graph's source
    outputs, or whose output the preparation changed. Architectures that pass but are not verified get
    a warning.
    """
    family = families.of(model)
    if family is not None and not family.verified:
        raise _refuse(model, family.refused)
    if family is not None and family.post_norm is not None:
        _check_post_norms(model)
    model.eval()
    tokens = _probe_tokens(model)
    try:
        with torch.no_grad():
            before = model(tokens) if check else None
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as e:  # e.g. OLMo-2 in half precision: TransformerLens 4.3's rotary path mixes dtypes
        dtype = str(model_dtype(model)).replace("torch.", "")
        raise _refuse(model, f"fails in TransformerLens's own forward pass in {dtype} ({e}); a model that fails only "
                             "in half precision may load in float32") from e
    try:
        model.set_use_attn_result(True)
        model.set_use_split_qkv_input(True)
        model.set_use_hook_mlp_in(True)
    except (NotImplementedError, ValueError) as e:
        raise _refuse(model, f"cannot switch on the EAP hooks ({e})") from e
    ungroup_kv_heads(model)
    if check:
        check_model(model, tokens, before)
    if family is None:
        warnings.warn(
            f"{architecture(model)} passed eapcore's hook and additivity checks but is not among the verified "
            f"families ({', '.join(families.verified())}); treat its scores with care (docs/families.md)",
            stacklevel=2,
        )
    return model


def ungroup_kv_heads(model: Any) -> None:
    """Give every query head its own key/value projection, so that k/v inputs are per query head.

    The graph has one ``<k>`` and one ``<v>`` edge per *query* head, as EAP-IG has
    with TransformerLens 3's ``ungroup_grouped_query_attention``; graphs and exported files of grouped-
    query (GQA) and multi-query models are then the same as the reference's. TransformerLens 4's
    bridge has no such flag (its ``hook_k_input``/``hook_v_input`` carry one slice per key/value head),
    so this repeats each key/value head's projection rows (and biases) once per query head of its group,
    as the ungrouping did: the model computes exactly the same function, with ``n_key_value_heads ==
    n_heads``, at the cost of ``n_heads / n_key_value_heads`` times the k/v projection weights and
    compute. A key norm over all key/value heads together (OLMo-2's, ``qk_norm="across-heads"``) gets its
    weight repeated the same way: the mean square over the repeated keys is the original one, so it too
    computes the same function. A no-op for models without grouped heads (and on a second call).
    """
    cfg = model.cfg
    n_heads = int(cfg.n_heads)
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
    if n_kv == n_heads:
        return
    if n_heads % n_kv:
        raise _refuse(model, f"has {n_heads} query heads, not a multiple of its {n_kv} key/value heads")
    rep = n_heads // n_kv
    family = families.of(model)
    across = family is not None and family.qk_norm == "across-heads"

    def repeat(p: torch.nn.Parameter) -> torch.nn.Parameter:  # [n_kv·d_head, ...] -> [n_heads·d_head, ...]
        return torch.nn.Parameter(p.detach().reshape(n_kv, -1, *p.shape[1:]).repeat_interleave(rep, 0).flatten(0, 1),
                                  requires_grad=p.requires_grad)

    configs = {id(cfg): cfg}
    for block in model.blocks:
        attn = block.attn
        hf_attn = getattr(attn, "original_component", None)
        shared = False
        for which in ("k", "v"):
            linear = getattr(getattr(attn, which, None), "original_component", None)
            weight = getattr(linear, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] % n_kv:
                raise _refuse(model, f"has grouped key/value heads whose {which} projection eapcore cannot ungroup")
            linear.weight = repeat(weight)
            if getattr(linear, "bias", None) is not None:
                linear.bias = repeat(linear.bias)
            if hasattr(linear, "out_features"):
                linear.out_features = n_heads * (weight.shape[0] // n_kv)
            norm = getattr(hf_attn, f"{which}_norm", None)
            if across and norm is not None:
                norm.weight = repeat(norm.weight)
            shared = shared or (hf_attn is not None and any(m is linear for m in hf_attn.modules()))
        if shared:  # separate k/v projections that the Hugging Face module uses too: it is now MHA as well
            if hasattr(hf_attn, "num_key_value_groups"):
                hf_attn.num_key_value_groups = 1
            if hasattr(hf_attn, "num_key_value_heads"):
                hf_attn.num_key_value_heads = n_heads
            hf_cfg = getattr(hf_attn, "config", None)
            if hf_cfg is not None and getattr(hf_cfg, "num_key_value_heads", None) == n_kv:
                hf_cfg.num_key_value_heads = n_heads
        for module in (block, attn):
            sub = getattr(module, "config", None)
            if sub is not None and hasattr(sub, "n_key_value_heads"):
                configs[id(sub)] = sub
    for sub in configs.values():
        sub.n_key_value_heads = n_heads
    cfg.ungroup_grouped_query_attention = True  # marks the model as ungrouped, as EAP-IG expects


def _check_post_norms(model: Any) -> None:
    """Refuse a model of a post-norm family whose blocks lack the post-attention norm, or whose attention
    output has a bias: the norm would scale the bias by each run's own scale, which belongs to no head."""
    for layer, block in enumerate(model.blocks):
        if getattr(getattr(block, "ln1_post", None), "original_component", None) is None:
            raise _refuse(model, f"has no post-attention norm (ln1_post) in layer {layer}, which its family's entry in "
                                 "eapcore/families.py promises")
        if getattr(block.attn.o.original_component, "bias", None) is not None:
            raise _refuse(model, "has a bias on its attention output, which the post-attention norm scales by each run's "
                                 "own scale, so it belongs to no head; eapcore supports post-norm models without it "
                                 "(attention_bias=False, as released)")


def _probe_tokens(model: Any) -> torch.Tensor:
    """Two different 6-token sequences (the same positions), on the embedding's device."""
    d_vocab = int(model.cfg.d_vocab)
    tokens = (torch.arange(12).reshape(2, 6) * 7 + 3) % d_vocab
    try:
        device = model.embed.W_E.device
    except AttributeError:
        device = model_device(model)
    return tokens.to(device)


# Relative tolerances of check_model: for sums of the same run's activations, and for logits computed
# along the plain and the hooked path (which may round differently, e.g. float32 softmaxes). A post-norm
# computes in float32 even in a float64 model, so its heads add up to its output to float32's precision.
_SUM_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
_LOGIT_TOL = {torch.float64: 1e-6, torch.float32: 1e-3}


def check_model(model: Any, tokens: torch.Tensor | None = None, reference_logits: torch.Tensor | None = None) -> None:
    """Check on a probe input that ``model`` (EAP flags on) fits its graph; raise :class:`UnsupportedModelError`.

    Every source and destination hook must fire with the graph's shape (k/v inputs one slice per query
    head), and every destination input, minus the sum of the source outputs it reads in the graph, must
    not depend on the input (only on the position: positional embeddings, biases). That is exactly what
    edge attribution and circuit evaluation assume; it fails for post-sublayer norms that the model's
    family does not declare (heads read without the norm's scale, :func:`eapcore.sites.output_reader`),
    scaled residual streams, or a wrong parallel attention/MLP flag. With ``reference_logits`` (the same
    ``tokens`` before preparation), the output must not have changed.
    """
    graph = model_graph(model)
    tokens = _probe_tokens(model) if tokens is None else tokens
    dtype = model_dtype(model)
    tol = _SUM_TOL.get(dtype, 1e-1)
    family = families.of(model)
    if family is not None and family.post_norm is not None:
        tol = max(tol, _SUM_TOL[torch.float32])
    from eapcore.recording import record  # eapcore.recording reads this module's dtype and device helpers

    store: dict[str, torch.Tensor] = {}
    as_float = lambda t: t.to("cpu", torch.float64 if dtype == torch.float64 else torch.float32)  # noqa: E731
    srcs, dsts = sources(graph), destinations(graph)
    names = list(dict.fromkeys([s.hook for s in srcs] + [d.hook for d in dsts]))
    try:
        with torch.no_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=[record(n, store, n, as_float) for n in names])
    except KeyError as e:
        raise _refuse(model, f"lacks a hook that EAP needs ({e})") from e
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as e:  # e.g. an unlisted family whose ungrouped key/value heads its attention cannot take
        raise _refuse(model, f"fails in its forward pass with the EAP hooks on ({e})") from e
    missing = [n for n in names if n not in store]
    if missing:
        raise _refuse(model, f"never fires the hooks {', '.join(missing)} with the EAP flags on")
    B, P = tokens.shape
    outs = []
    for s in srcs:
        t = store[s.hook]
        n = s.rows.stop - s.rows.start
        expected = (B, P, graph.cfg.d_model) if n == 1 and t.dim() == 3 else (B, P, n, graph.cfg.d_model)
        if tuple(t.shape) != expected:
            raise _refuse(model, f"fires {s.hook} with shape {tuple(t.shape)}, not {expected}")
        outs.append(output_reader(model, s)(t))
    prefix = torch.cat(outs).cumsum(0)  # prefix[k - 1] = sum of the first k source outputs
    bad = []
    for d in dsts:
        x = per_column(store[d.hook])
        n = d.cols.stop - d.cols.start
        if tuple(x.shape) != (B, P, n, graph.cfg.d_model):
            raise _refuse(
                model,
                f"fires {d.hook} with shape {tuple(store[d.hook].shape)}, not {n} slice(s) of d_model (was it prepared "
                "with eapcore.models.prepare_model, which ungroups key/value heads?)",
            )
        rest = x - prefix[d.n_sources - 1].unsqueeze(2)
        if float((rest[0] - rest[1]).abs().max()) > tol * max(float(x.abs().max()), 1e-30):
            bad.append(d.hook)
    if bad:
        raise _refuse(
            model,
            "does not write a residual stream that is the sum of its embeddings, per-head attention results "
            f"and MLP outputs (checked at {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}); e.g. it normalizes "
            "or rescales sub-layer outputs before adding them",
        )
    if reference_logits is not None:
        err = float((logits.detach().cpu().double() - reference_logits.detach().cpu().double()).abs().max())
        if err > _LOGIT_TOL.get(dtype, 0.25) * max(float(reference_logits.abs().max()), 1.0):
            raise _refuse(model, f"computes different logits with the EAP hooks on (max difference {err:.3g})")


def model_graph(model: Any) -> Graph:
    """The EAP graph of a loaded model."""
    cfg = model.cfg
    return Graph(
        GraphConfig(
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            parallel_attn_mlp=bool(getattr(cfg, "parallel_attn_mlp", False)),
            d_model=cfg.d_model,
        )
    )


def model_dtype(model: Any) -> torch.dtype:
    return next(model.parameters()).dtype


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def frozen(model: Any) -> Iterator[None]:
    """The weights do not require gradients for the duration (so backward passes compute only the
    activation gradients eapcore reads); each weight's own ``requires_grad`` comes back after."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


_LOCKS: "weakref.WeakKeyDictionary[Any, FairLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: Any) -> FairLock:
    """The lock that serializes passes through ``model``'s bridge (hooks are global state on the model),
    served in arrival order (:mod:`eapcore.shared`)."""
    with _LOCKS_GUARD:
        if model not in _LOCKS:
            _LOCKS[model] = FairLock()
        return _LOCKS[model]
