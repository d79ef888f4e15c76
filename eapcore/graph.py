"""The computational graph of a decoder transformer, as EAP-IG sees it.

Sources (rows, ``n_forward = 1 + L(H+1)``): ``input``, then per layer its heads ``a{l}.h{h}`` and its
MLP ``m{l}``. Destinations (columns, ``n_backward = L(3H+1) + 1``): per layer the q-, k- and v-inputs of
its heads (``a{l}.h{h}<q>`` ...), then its MLP input ``m{l}``; ``logits`` last. A cell ``[u, v]`` is a
real edge when source ``u`` writes to the residual stream before destination ``v`` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from eapcore import families

QKV = ("q", "k", "v")


@dataclass(frozen=True)
class GraphConfig:
    """The four numbers that fix a graph (the reference's ``cfg``)."""

    n_layers: int
    n_heads: int
    parallel_attn_mlp: bool = False
    d_model: int = 0

    def to_dict(self) -> dict:
        return {
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "parallel_attn_mlp": self.parallel_attn_mlp,
            "d_model": self.d_model,
        }

    @classmethod
    def from_hf_config(cls, config: dict) -> "GraphConfig":
        """The graph of a model from its Hugging Face ``config.json`` (no weights). Grouped-query attention is
        ungrouped: the graph has one k and one v input per *query* head, so key/value heads do not count.
        Attention and MLP are parallel when the config says so (``use_parallel_residual``, ``parallel_attn``)
        or the family is by default (its ``parallel`` in :mod:`eapcore.families`)."""
        cfg = config.get("text_config") or config  # multimodal configs nest the language model's

        def value(what: str, keys: tuple[str, ...]) -> int:
            found = next((k for k in keys if cfg.get(k) is not None), None)
            if found is None or isinstance(cfg[found], bool) or not isinstance(cfg[found], int) or cfg[found] < 1:
                got = f"{found} = {cfg[found]!r}" if found else f"none of {', '.join(keys)}"
                raise ValueError(
                    f"the config does not give the number of {what} as a positive integer ({got}); is it a Hugging "
                    "Face config.json of a decoder language model?"
                )
            return cfg[found]

        model_type = str(cfg.get("model_type", ""))
        parallel = families.parallel_by_default(model_type)
        for key in ("use_parallel_residual", "parallel_attn", "parallel_attn_mlp"):
            if isinstance(cfg.get(key), bool):
                parallel = cfg[key]
        parallel = parallel or cfg.get("new_decoder_architecture") is True  # Falcon-40B's layout is parallel too
        return cls(
            n_layers=value("layers", ("num_hidden_layers", "n_layer", "num_layers", "n_layers")),
            n_heads=value("attention heads", ("num_attention_heads", "n_head", "num_heads", "n_heads")),
            parallel_attn_mlp=parallel,
            d_model=value("hidden units", ("hidden_size", "n_embd", "d_model")),
        )

    @classmethod
    def from_dict(cls, cfg: dict) -> "GraphConfig":
        try:
            return cls(
                n_layers=int(cfg["n_layers"]),
                n_heads=int(cfg["n_heads"]),
                parallel_attn_mlp=bool(cfg.get("parallel_attn_mlp", False)),
                d_model=int(cfg.get("d_model", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"graph cfg {cfg!r} is not valid ({e}); it needs integer n_layers and n_heads, "
                "and may have parallel_attn_mlp and d_model"
            ) from None


@dataclass(frozen=True)
class Graph:
    """Node names, index maps and the real-edge mask for one :class:`GraphConfig`."""

    cfg: GraphConfig

    # ----- sizes -----
    @property
    def n_forward(self) -> int:
        return 1 + self.cfg.n_layers * (self.cfg.n_heads + 1)

    @property
    def n_backward(self) -> int:
        return self.cfg.n_layers * (3 * self.cfg.n_heads + 1) + 1

    @property
    def n_nodes(self) -> int:
        """All nodes, ``logits`` included."""
        return self.n_forward + 1

    @cached_property
    def n_edges(self) -> int:
        return int(self.real_edge_mask.sum())

    # ----- indices -----
    def head_index(self, layer: int, head: int) -> int:
        """Source row of head ``a{layer}.h{head}``."""
        return 1 + layer * (self.cfg.n_heads + 1) + head

    def mlp_index(self, layer: int) -> int:
        """Source row of MLP ``m{layer}``."""
        return 1 + layer * (self.cfg.n_heads + 1) + self.cfg.n_heads

    def qkv_column(self, layer: int, which: str, head: int = 0) -> int:
        """Destination column of head ``head``'s ``which`` (q, k or v) input at ``layer``."""
        H = self.cfg.n_heads
        return layer * (3 * H + 1) + QKV.index(which) * H + head

    def mlp_column(self, layer: int) -> int:
        return layer * (3 * self.cfg.n_heads + 1) + 3 * self.cfg.n_heads

    @property
    def logits_column(self) -> int:
        return self.n_backward - 1

    def n_attn_sources(self, layer: int) -> int:
        """How many sources (a prefix of the rows) a head at ``layer`` reads."""
        return 1 + layer * (self.cfg.n_heads + 1)

    def n_mlp_sources(self, layer: int) -> int:
        """How many sources the MLP at ``layer`` reads (its own layer's heads unless parallel)."""
        return self.n_attn_sources(layer) + (0 if self.cfg.parallel_attn_mlp else self.cfg.n_heads)

    @cached_property
    def n_sources(self) -> torch.Tensor:
        """``[n_backward]`` long: how many sources (a prefix of the rows) each destination reads."""
        n = torch.empty(self.n_backward, dtype=torch.long)
        for layer in range(self.cfg.n_layers):
            start = self.qkv_column(layer, "q")
            n[start : start + 3 * self.cfg.n_heads] = self.n_attn_sources(layer)
            n[self.mlp_column(layer)] = self.n_mlp_sources(layer)
        n[self.logits_column] = self.n_forward
        return n

    # ----- names -----
    @cached_property
    def src_nodes(self) -> list[str]:
        names = ["input"]
        for layer in range(self.cfg.n_layers):
            names += [f"a{layer}.h{h}" for h in range(self.cfg.n_heads)] + [f"m{layer}"]
        return names

    @cached_property
    def dst_nodes(self) -> list[str]:
        names = []
        for layer in range(self.cfg.n_layers):
            for which in QKV:
                names += [f"a{layer}.h{h}<{which}>" for h in range(self.cfg.n_heads)]
            names.append(f"m{layer}")
        return names + ["logits"]

    @cached_property
    def node_names(self) -> list[str]:
        """All node names in forward order, ``logits`` last."""
        return self.src_nodes + ["logits"]

    @cached_property
    def src_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.src_nodes)}

    @cached_property
    def dst_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.dst_nodes)}

    @cached_property
    def dst_node_of_column(self) -> list[str]:
        """The node (``a0.h1``, ``m0``, ``logits``) that each destination column feeds."""
        return [name.split("<")[0] for name in self.dst_nodes]

    def edge_name(self, row: int, col: int) -> str:
        """``parent->child`` or ``parent->child<q|k|v>``."""
        return f"{self.src_nodes[row]}->{self.dst_nodes[col]}"

    def parse_edge_name(self, name: str) -> tuple[int, int]:
        """Inverse of :meth:`edge_name`; raises ``ValueError`` for an unknown edge."""
        parent, sep, child = name.partition("->")
        if not sep or parent not in self.src_index or child not in self.dst_index:
            raise ValueError(
                f"edge {name!r} is not in a graph with {self.cfg.n_layers} layers and "
                f"{self.cfg.n_heads} heads; expected 'parent->child' such as 'input->a0.h0<q>'"
            )
        row, col = self.src_index[parent], self.dst_index[child]
        if not self.real_edge_mask[row, col]:
            raise ValueError(f"edge {name!r} runs backwards in time and is not an edge of this graph")
        return row, col

    # ----- masks -----
    @cached_property
    def real_edge_mask(self) -> torch.Tensor:
        """``[n_forward, n_backward]`` bool: which cells are edges."""
        rows = torch.arange(self.n_forward).unsqueeze(1)
        return rows < self.n_sources.unsqueeze(0)

    @cached_property
    def forward_to_backward(self) -> torch.Tensor:
        """``[n_forward, n_backward]`` bool: each source node's own input column(s)."""
        m = torch.zeros(self.n_forward, self.n_backward, dtype=torch.bool)
        for layer in range(self.cfg.n_layers):
            for h in range(self.cfg.n_heads):
                for which in QKV:
                    m[self.head_index(layer, h), self.qkv_column(layer, which, h)] = True
            m[self.mlp_index(layer), self.mlp_column(layer)] = True
        return m

    @cached_property
    def src_layer(self) -> list[int]:
        """Layer of each source (``input`` is -1)."""
        return [-1] + [l for l in range(self.cfg.n_layers) for _ in range(self.cfg.n_heads + 1)]
