"""Load a decoder language model as a TransformerLens 4.x ``TransformerBridge`` ready for EAP.

One place sets the EAP hook flags (per-head results, split q/k/v inputs, MLP-input hook), freezes
the weights, and maps the model onto a :class:`~eapcore.graph.Graph`.
"""

from __future__ import annotations

import os
import socket
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eapcore.graph import Graph, GraphConfig

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_MODEL_DIR = ASSETS / "models" / "demo"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSpec:
    """What to load: ``name`` is ``demo``, a Hugging Face hub name, or a local ``save_pretrained`` folder."""

    name: str = "demo"
    device: str | None = None
    dtype: str = "float32"


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


def _resolve_source(name: str) -> str:
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
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if offline or not _hub_reachable():
        raise ConnectionError(
            f"cannot load model {name!r}: it is not a local folder and the Hugging Face hub cannot be "
            "reached. Download it on a connected machine (`huggingface-cli download "
            f"{name} --local-dir DIR`) and load the folder DIR instead, or use the embedded model 'demo'"
        )
    return name


def load_model(spec: ModelSpec | str = "demo", device: str | None = None, dtype: str | None = None) -> Any:
    """Load ``spec`` (a :class:`ModelSpec` or a name) as a frozen, EAP-ready ``TransformerBridge``."""
    if isinstance(spec, str):
        spec = ModelSpec(spec, device, dtype or "float32")
    source = _resolve_source(spec.name)
    torch_dtype = _resolve_dtype(spec.dtype)
    from transformer_lens.model_bridge import TransformerBridge

    try:
        model = TransformerBridge.boot_transformers(source, device=spec.device or default_device(), dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"could not load model {spec.name!r}: {e}") from e
    return prepare_model(model)


def prepare_model(model: Any) -> Any:
    """Set the EAP hook flags, freeze the weights and switch to eval mode; returns ``model``."""
    if getattr(model.cfg, "n_key_value_heads", None) and model.cfg.n_key_value_heads != model.cfg.n_heads:
        model.cfg.ungroup_grouped_query_attention = True
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model


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


_LOCKS: "weakref.WeakKeyDictionary[Any, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: Any) -> threading.RLock:
    """The lock that serializes hooked passes on ``model`` (hooks are global state on the model)."""
    with _LOCKS_GUARD:
        if model not in _LOCKS:
            _LOCKS[model] = threading.RLock()
        return _LOCKS[model]
