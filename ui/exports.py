"""Bytes for the download buttons and a safe reader for uploaded circuit files (via ``eapcore.export``,
in memory: no temporary files)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

from eapcore.circuit import Circuit, Scores
from eapcore.edits import Edits
from eapcore.export import load_circuit, save_json, save_pt
from eapcore.graph import Graph

MAX_CIRCUIT_BYTES = 50 * 1024 * 1024


def pt_bytes(scores: Scores, circuit: Circuit, provenance: dict[str, Any], edits: Edits | None = None) -> bytes:
    buf = io.BytesIO()
    save_pt(buf, scores, circuit, provenance, edits=edits)
    return buf.getvalue()


def json_bytes(scores: Scores, circuit: Circuit, provenance: dict[str, Any], edits: Edits | None = None) -> bytes:
    buf = io.BytesIO()
    save_json(buf, scores, circuit, provenance, edits=edits)
    return buf.getvalue()


def read_circuit(name: str, data: bytes, expected: Graph | None) -> tuple[Scores, Circuit, str]:
    """Check and load an uploaded ``.pt``/``.json`` circuit (never a full unpickle); returns the scores,
    the stored circuit and a content key. Raises ``ValueError`` saying what is wrong."""
    suffix = Path(name).suffix.lower()
    if suffix not in (".pt", ".json"):
        raise ValueError(f"{name}: unknown file type {suffix!r}; upload a .pt or .json circuit file")
    if len(data) > MAX_CIRCUIT_BYTES:
        raise ValueError(f"{name} is {len(data) / 1e6:.0f} MB, more than the {MAX_CIRCUIT_BYTES // 2**20} MB limit")
    scores, circuit = load_circuit(io.BytesIO(data), expected=expected, name=name)
    return scores, circuit, "import:" + hashlib.sha256(data).hexdigest()[:20]
