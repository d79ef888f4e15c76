"""Small Streamlit renderers shared by the pages: the pyvis embed, the sidebar status, page guards."""

from __future__ import annotations

import functools
from typing import Any

import streamlit as st

from eapcore import render
from eapcore.circuit import Circuit, Scores

GRAPH_HEIGHT = 640


def show_graph(scores: Scores, circuit: Circuit, height: int = GRAPH_HEIGHT, max_edges: int = 600) -> None:
    """The circuit as an interactive pyvis graph in an iframe (renders offline: no CDN)."""
    note = st.empty()  # always present, so that the elements below keep their places between reruns
    if circuit.n_edges > max_edges:
        note.caption(f"Drawing the {max_edges} edges with the largest |score| of {circuit.n_edges}.")
    page = render.pyvis_html(scores, circuit, height_px=height, max_edges=max_edges)
    st.iframe(page, height=height, alt="circuit graph")
    st.caption(
        "Bottom: `input`; top: `logits`. Nodes: grey input, orange heads, teal MLPs, red logits. "
        "Edges: blue q, green k, purple v, grey other; dark and solid = positive score, light and dashed = "
        "negative; width = |score|. Hover an edge for its score; drag to pan, scroll to zoom."
    )


def sidebar_status() -> None:
    """The session's model, data and scores, in the current container (the app puts it in the sidebar)."""
    s = st.session_state
    st.markdown("**Session**")
    spec = s.get("model_spec")
    st.caption(f"Model: `{spec.name if spec else '-'}`")
    pairs = s.get("pairs")
    st.caption(f"Data: {s.get('data_label', '-')} ({len(pairs) if pairs is not None else 0} pairs), metric `{s.get('metric', '-')}`")
    st.caption(f"Scores: {s.get('scores_label', 'none yet')}")


def need(*keys: str) -> bool:
    """Show an info box and return False when a required session key is missing."""
    s = st.session_state
    messages = {
        "pairs": ("No prompt pairs yet.", "pages/data.py", "Choose data"),
        "scores": ("No scores yet: run an attribution (or import a circuit on the Export page).", "pages/attribute.py", "Attribute"),
    }
    for key in keys:
        if s.get(key) is None:
            text, page, label = messages[key]
            st.info(text)
            st.page_link(page, label=label, icon=":material/arrow_forward:")
            return False
    return True


def metric_row(values: dict[str, Any]) -> None:
    for col, (label, value) in zip(st.columns(len(values)), values.items()):
        col.metric(label, value)


@functools.cache
def favicon_png(size: int = 32) -> bytes:
    """A small node-and-edge favicon drawn in code, so the browser never fetches one from a CDN."""
    import struct
    import zlib

    def inside(x: float, y: float, cx: float, cy: float, r: float) -> bool:
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r

    s = size / 32
    nodes = [(16 * s, 6 * s, "#ef4444"), (7 * s, 17 * s, "#f59e0b"), (25 * s, 17 * s, "#14b8a6"), (16 * s, 27 * s, "#6b7280")]
    rows = []
    for y in range(size):
        row = bytearray([0])
        for x in range(size):
            colour = None
            for cx, cy, c in nodes:
                if inside(x + 0.5, y + 0.5, cx, cy, 4.2 * s):
                    colour = c
            if colour is None:
                for (ax, ay, _), (bx, by, _) in ((nodes[3], nodes[1]), (nodes[3], nodes[2]), (nodes[1], nodes[0]), (nodes[2], nodes[0])):
                    t = max(0.0, min(1.0, ((x - ax) * (bx - ax) + (y - ay) * (by - ay)) / ((bx - ax) ** 2 + (by - ay) ** 2)))
                    if inside(x + 0.5, y + 0.5, ax + t * (bx - ax), ay + t * (by - ay), 1.3 * s):
                        colour = "#1d4ed8"
            if colour is None:
                row += bytes([0, 0, 0, 0])
            else:
                row += bytes(int(colour[i : i + 2], 16) for i in (1, 3, 5)) + b"\xff"
        rows.append(bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", size, size, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b"")
