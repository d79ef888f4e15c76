"""Node drill-down on one prompt pair: where a head attends, what a node writes to the answer, its edges.

A node's *output* is what its graph source hook carries (``input``: ``hook_embed``, the token embeddings;
a head: its slice of ``hook_result``, times its layer's post-norm scale where the family has one
(:func:`eapcore.sites.output_reader`); an MLP: ``hook_mlp_out``). Everything is read at the pair's
read-out position, its last real token, on the clean and on the corrupted prompt.

**Direct logits** of node u on a run: ``d_u = T(c_u) − T(0)`` ``[d_vocab]``, where ``c_u`` ``[d_model]``
is u's output on that run and ``T`` the model's final norm and unembedding with the norm's scale
(``ln_final.hook_scale``) frozen at the *clean* run's value, on both runs: T is then affine, d_u its linear
part (biases excluded), and the clean and corrupted d_u are one linear map of the two outputs, so they
compare directly. The clean run's final logits L are T of the residual stream, a sum of node outputs and
constants (checked per pair: T of the recorded residual stream must give the model's logits), so on the
clean run ``L − d_u`` is exactly the run with u's direct path to the logits removed and the norm's scale
kept; on the corrupted run (whose own scale differs) it is that up to the change of scale.
The tokens u *promotes* (*suppresses*) are the largest (smallest) entries of the clean run's d_u.

**Direct effect** on the metric m, per run: ``m(L) − m(L − d_u)`` with that run's logits L and d_u, the
metric minus the metric without u's direct path. For ``logit_diff`` (linear) it is the mean of d_u at the
correct answers minus the mean at the incorrect ones (masked means, as :mod:`eapcore.metrics`); for
``prob_diff`` and ``kl_div`` (KL of the clean run's distribution to this run's, the clean logits being the
clean run's) it is not linear, and the nodes' effects need not add up to the metric. Positive means u's direct path raises the metric
(harmful for ``kl_div``, where lower is better).

The runs of a pair are computed once and kept per model (:func:`pair_runs`), so another node on the same
pair costs one small unembedding (and, for a head in a layer not seen yet, one forward pass).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from eapcore.circuit import Circuit, Scores
from eapcore.data import Batch, TokenizedPairs
from eapcore.families import architecture
from eapcore.metrics import Metric, get_metric
from eapcore.models import model_device, model_dtype, model_graph, model_lock
from eapcore.names import check_node
from eapcore.recording import record
from eapcore.sites import output_reader, sources

PAIRS_KEPT = 16  # pairs whose runs are kept per model
_TAIL_TOL = {torch.float64: 1e-6, torch.float32: 1e-3}


@dataclass(eq=False)
class PairRuns:
    """The clean and corrupted run of one pair (index 0 clean, 1 corrupted), at the read-out position.

    ``batch``: the pair alone, unpadded (``[1 pos]`` tokens); ``tokens``: each prompt's token labels;
    ``outputs`` ``[2 n_forward d_model]``: every node's output; ``scale`` ``[2 1]``: the final norm's
    scale; ``logits`` ``[2 d_vocab]``: the final logits; ``patterns``: layer -> ``[2 n_heads pos pos]``
    attention (query × key), filled on demand."""

    batch: Batch
    tokens: tuple[list[str], list[str]]
    outputs: torch.Tensor
    scale: torch.Tensor
    logits: torch.Tensor
    patterns: dict[int, torch.Tensor] = field(default_factory=dict)


_RUNS: "weakref.WeakKeyDictionary[Any, OrderedDict]" = weakref.WeakKeyDictionary()
_RUNS_GUARD = threading.Lock()


def _one_pair(data: TokenizedPairs, pair: int) -> Batch:
    """Pair ``pair`` of ``data`` as a batch of one, without padding."""
    if isinstance(pair, bool) or not isinstance(pair, int) or not 0 <= pair < len(data):
        raise ValueError(f"pair {pair!r} is out of range: the data has {len(data)} pairs; choose 0 <= pair < {len(data)}")
    d, n = data.data, int(data.data.lengths[pair])
    sl = slice(pair, pair + 1)
    return Batch(d.clean[sl, :n], d.corrupted[sl, :n], d.lengths[sl], d.correct[sl], d.correct_mask[sl],
                 d.incorrect[sl], d.incorrect_mask[sl])


def pair_runs(model: Any, data: TokenizedPairs, pair: int) -> PairRuns:
    """The runs of pair ``pair`` (computed once per model, data and pair; the last :data:`PAIRS_KEPT` kept)."""
    batch = _one_pair(data, pair)
    key = (data.fingerprint, pair)
    with _RUNS_GUARD:
        kept = _RUNS.setdefault(model, OrderedDict())
        if key in kept:
            kept.move_to_end(key)
            return kept[key]
    runs = _run_pair(model, batch)
    with _RUNS_GUARD:
        kept[key] = runs
        while len(kept) > PAIRS_KEPT:
            kept.popitem(last=False)
    return runs


def _run_pair(model: Any, batch: Batch) -> PairRuns:
    graph = model_graph(model)
    device = model_device(model)
    tokens = torch.cat([batch.clean, batch.corrupted]).to(device)  # [2 pos]: one forward for both prompts
    last = tokens.shape[1] - 1
    outputs = torch.empty(graph.n_forward, 2, model.cfg.d_model, dtype=model_dtype(model))
    store: dict[str, torch.Tensor] = {}
    resid = f"blocks.{graph.cfg.n_layers - 1}.hook_resid_post"
    hooks = [record(s.hook, outputs, s.rows, lambda t, read=output_reader(model, s): read(t[:, last:]).squeeze(2))
             for s in sources(graph)]
    hooks += [record(n, store, n, lambda t: t[:, last].cpu()) for n in (resid, "ln_final.hook_scale")]
    with model_lock(model), torch.inference_mode():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)[:, last].cpu()
        if len(store) < 2:
            raise ValueError(f"{architecture(model)} does not fire {resid} and ln_final.hook_scale, which the drill-down "
                             "reads; it is not supported by the drill-down")
        tail = _tail(model, store[resid], store["ln_final.hook_scale"])
    err = float((tail - logits).abs().max())
    if err > _TAIL_TOL.get(model_dtype(model), 0.25) * max(float(logits.abs().max()), 1.0):
        raise ValueError(
            f"{architecture(model)}'s final norm and unembedding do not reproduce its logits (max difference "
            f"{err:.3g}), so direct effects cannot be read through them; it is not supported by the drill-down"
        )
    tok = model.tokenizer
    labels = tuple([tok.decode([int(i)]) for i in row] for row in (batch.clean[0], batch.corrupted[0]))
    return PairRuns(batch.to("cpu"), labels, outputs.transpose(0, 1).contiguous(), store["ln_final.hook_scale"], logits)


def _tail(model: Any, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The model's final norm with its scale fixed to ``scale`` ``[k 1]``, then its unembedding, of ``x``
    ``[k d_model]`` -> ``[k d_vocab]`` on the CPU. The norm's affine part is applied here, in float32 as the
    bridge does (its own path for an edited scale fails on norms without parameters, e.g. OLMo's)."""
    norm = model.ln_final
    hf = norm.original_component
    device = next(model.unembed.parameters()).device  # the last device when the model is split over several
    y = x.to(device, torch.float32 if x.dtype not in (torch.float32, torch.float64) else x.dtype)
    if not norm.uses_rms_norm:
        y = y - y.mean(-1, keepdim=True)
    y = y / scale.to(y)
    weight, bias = getattr(hf, "weight", None), getattr(hf, "bias", None)
    if weight is not None:
        y = y * ((1.0 + weight) if norm.uses_weight_offset else weight).to(y)
    if bias is not None and not norm.uses_rms_norm:
        y = y + bias.to(y)
    return model.unembed(y.to(x.dtype).unsqueeze(1)).squeeze(1).cpu()


def patterns(model: Any, runs: PairRuns, layer: int) -> torch.Tensor:
    """``[2 n_heads pos pos]`` attention patterns of ``layer`` on the pair (clean, corrupted); one forward
    pass the first time a layer is asked for."""
    if layer not in runs.patterns:
        store: dict[str, torch.Tensor] = {}
        tokens = torch.cat([runs.batch.clean, runs.batch.corrupted]).to(model_device(model))
        with model_lock(model), torch.inference_mode():
            hook = record(f"blocks.{layer}.attn.hook_pattern", store, "p", torch.Tensor.cpu)
            model.run_with_hooks(tokens, fwd_hooks=[hook])
        runs.patterns[layer] = store["p"]
    return runs.patterns[layer]


def direct_logits(model: Any, runs: PairRuns, row: int) -> torch.Tensor:
    """``[2 d_vocab]``: source row ``row``'s direct logits on the clean and the corrupted run, both read
    through the final norm with the clean run's scale."""
    c = runs.outputs[:, row]
    with model_lock(model), torch.inference_mode():
        out = _tail(model, torch.cat([c, torch.zeros_like(c)]), runs.scale[:1].expand(4, 1))
    return (out[:2] - out[2:]).double()


def direct_effect(metric: Metric, runs: PairRuns, d: torch.Tensor) -> tuple[float, float]:
    """``m(L) − m(L − d)`` on the clean and the corrupted run, ``d`` ``[2 d_vocab]`` (see the module doc)."""
    logits = runs.logits.double()
    clean = logits[:1]
    values = []
    for i in range(2):
        with_node = metric(logits[i : i + 1], runs.batch, clean)
        without = metric(logits[i : i + 1] - d[i : i + 1], runs.batch, clean)
        values.append(float(with_node - without))
    return values[0], values[1]


@dataclass(frozen=True)
class NodeEdges:
    """A node's in-circuit edges, ``(name, score)`` sorted by |score|, and its node score: from
    ``Scores.nodes`` (``score_from="node score"``), else the sum of its outgoing edge scores over the whole
    graph (``"sum of outgoing edge scores"``); ``None`` (``""``) for ``logits``."""

    incoming: list[tuple[str, float]]
    outgoing: list[tuple[str, float]]
    score: float | None
    score_from: str


def node_edges(scores: Scores, circuit: Circuit | None, node: str) -> NodeEdges:
    """``node``'s incoming and outgoing edges in ``circuit`` (default: every edge of the graph)."""
    graph = scores.graph
    check_node(graph, node)
    edges = (circuit.edges if circuit is not None else graph.real_edge_mask).cpu() & graph.real_edge_mask
    values = scores.edges.detach().cpu().double()
    cols = [c for c, name in enumerate(graph.dst_node_of_column) if name == node]
    incoming = [(r, c) for c in cols for r in edges[:, c].nonzero().flatten().tolist()]
    row = graph.src_index.get(node)
    outgoing = [] if row is None else [(row, c) for c in edges[row].nonzero().flatten().tolist()]

    def named(cells: list[tuple[int, int]]) -> list[tuple[str, float]]:
        out = [(graph.edge_name(r, c), float(values[r, c])) for r, c in cells]
        return sorted(out, key=lambda e: -abs(e[1]))

    score, score_from = None, ""
    if row is not None and scores.nodes is not None and not bool(scores.nodes[row].isnan()):
        score, score_from = float(scores.nodes[row]), "node score"
    elif row is not None:
        score, score_from = float(values[row].sum()), "sum of outgoing edge scores"
    return NodeEdges(named(incoming), named(outgoing), score, score_from)


@dataclass(frozen=True)
class NodeReport:
    """What :func:`inspect_node` finds. ``attention``: ``[2 pos pos]`` (clean, corrupted; query × key) for
    heads, else ``None``; ``direct_logits`` ``[2 d_vocab]``, ``promotes``/``suppresses`` (clean run, ``(token,
    logit)``) and ``direct_effect`` (clean, corrupted) are ``None``/empty for ``logits``; ``edges`` when
    scores were given."""

    node: str
    pair: int
    metric: str
    tokens: tuple[list[str], list[str]]
    attention: torch.Tensor | None
    direct_logits: torch.Tensor | None
    promotes: list[tuple[str, float]]
    suppresses: list[tuple[str, float]]
    direct_effect: tuple[float, float] | None
    edges: NodeEdges | None

    @property
    def last_row(self) -> torch.Tensor | None:
        """``[2 pos]``: where the read-out position attends (clean, corrupted)."""
        return None if self.attention is None else self.attention[:, -1]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``eapcore inspect`` prints."""
        out: dict[str, Any] = {"node": self.node, "pair": self.pair, "metric": self.metric,
                               "tokens": {"clean": self.tokens[0], "corrupted": self.tokens[1]}}
        if self.attention is not None:
            out["attention"] = {"clean": self.attention[0].tolist(), "corrupted": self.attention[1].tolist()}
        out["promotes"] = [list(p) for p in self.promotes]
        out["suppresses"] = [list(p) for p in self.suppresses]
        if self.direct_effect is not None:
            out["direct_effect"] = {"clean": self.direct_effect[0], "corrupted": self.direct_effect[1]}
        if self.edges is not None:
            out["edges"] = {"incoming": [list(e) for e in self.edges.incoming],
                            "outgoing": [list(e) for e in self.edges.outgoing]}
            out["node_score"] = self.edges.score
            out["node_score_from"] = self.edges.score_from
        return out


def inspect_node(
    model: Any, data: TokenizedPairs, pair: int, node: str, metric: str | Metric = "logit_diff",
    scores: Scores | None = None, circuit: Circuit | None = None, k: int = 10,
) -> NodeReport:
    """Drill down into ``node`` (``input``, ``a1.h2``, ``m0`` or ``logits``) on pair ``pair`` of ``data``:
    attention (heads), direct logits and effect on ``metric``, the ``k`` tokens promoted and suppressed
    most, and, with ``scores``, its edges in ``circuit`` (default: the whole graph) and its node score."""
    graph = model_graph(model)
    check_node(graph, node)
    metric = get_metric(metric)
    runs = pair_runs(model, data, pair)
    attention = d = effect = None
    promotes: list[tuple[str, float]] = []
    suppresses: list[tuple[str, float]] = []
    row = graph.src_index.get(node)
    if row is not None:
        layer = graph.src_layer[row]
        if node.startswith("a"):
            attention = patterns(model, runs, layer)[:, row - graph.head_index(layer, 0)].float()
        d = direct_logits(model, runs, row)
        effect = direct_effect(metric, runs, d)
        k = min(k, d.shape[1])
        top, bottom = d[0].topk(k), d[0].topk(k, largest=False)
        label = lambda ids: model.tokenizer.decode([int(ids)])  # noqa: E731
        promotes = [(label(i), float(v)) for v, i in zip(top.values, top.indices)]
        suppresses = [(label(i), float(v)) for v, i in zip(bottom.values, bottom.indices)]
    edges = node_edges(scores, circuit, node) if scores is not None else None
    return NodeReport(node, pair, metric.name, runs.tokens, attention, d, promotes, suppresses, effect, edges)
