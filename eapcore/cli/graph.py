"""``eapcore graph``: the size of a model's graph from its Hugging Face ``config.json`` alone (no weights)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from eapcore.distributed import Context


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("graph", help="the size of a model's graph from its config.json, without weights; prints one "
                                     "JSON object")
    g.add_argument("--config", required=True, help="a Hugging Face config.json, or a folder that holds one")
    g.set_defaults(run=run, context=lambda args: Context())


def read_config(path: str | Path) -> dict:
    """A ``config.json`` (or the one in a folder) as a dict; errors name the file and the fix."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"{path} does not exist; pass a model's config.json or the folder that holds it")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a JSON file ({e}); pass the model's config.json") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a {type(config).__name__}, not a config object; pass the model's config.json")
    return config


def run(args: argparse.Namespace, ctx: Context) -> None:
    from eapcore.graph import Graph, GraphConfig
    from eapcore.mib import model_of_graph
    from eapcore.schema import describe

    config = read_config(args.config)
    try:
        cfg = GraphConfig.from_hf_config(config)
    except ValueError as e:
        raise ValueError(f"{args.config}: {e}") from None
    graph = Graph(cfg)
    text = config.get("text_config") or config
    n_kv = text.get("num_key_value_heads") or (1 if text.get("multi_query") else cfg.n_heads)
    grouped = f"; {n_kv} key/value heads, ungrouped to one k and one v input per query head" if n_kv != cfg.n_heads else ""
    mib = model_of_graph(cfg)
    print(f"{args.config}: {describe(cfg)}{grouped}: {graph.n_nodes:,} nodes, {graph.n_edges:,} edges"
          + (f" (MIB's {mib.name} graph)" if mib else ""))
    print(json.dumps({"nodes": graph.n_nodes, "edges": graph.n_edges}))
