"""Node drill-down against Hugging Face's own model, on a tiny GPT-2, Llama (rotary, RMSNorm, GQA), Gemma
(RMSNorm storing weight − 1, one key/value head) and OLMo (LayerNorm without parameters):

* attention: ``output_attentions`` of the eager Hugging Face model for that layer and head;
* direct logits and effect: the node's output captured with plain forward hooks on the Hugging Face modules
  (a head's output is its slice of the output projection's input times its rows of the projection), times
  the final norm with its scale computed by hand from the clean run's norm input (on the corrupted run
  too), times the unembedding; the metrics written out here by hand.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers

from eapcore.circuit import Scores
from eapcore.cli import main
from eapcore.data import tokenize
from eapcore.inspection import inspect_node, node_edges, pair_runs
from eapcore.models import load_model, model_graph
from eapcore.select import top_n

from conftest import FAMILIES, hf_model, save_with_tiny_tokenizer


# relative tolerance of the direct logits: float32 for GPT-2; OLMo's norm computes in float32 even in float64
TOLERANCE = {"gpt2": 1e-4, "llama": 1e-9, "gemma": 1e-9, "olmo": 1e-5}


@pytest.fixture(scope="module", params=list(TOLERANCE))
def case(request, tiny_dir, pairs, tmp_path_factory):
    """(family, bridge, eager Hugging Face model, data) on the same weights."""
    family = request.param
    if family == "gpt2":
        path, dtype = tiny_dir, torch.float32
    else:
        config_cls, model_cls, kwargs, _, _ = FAMILIES[family]
        path, dtype = save_with_tiny_tokenizer(tmp_path_factory.mktemp(family), hf_model(config_cls, model_cls, kwargs)), torch.float64
    bridge = load_model(str(path), device="cpu", dtype=str(dtype).replace("torch.", ""))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
    return family, bridge, hf, tokenize(pairs, bridge.tokenizer)


def _parts(family: str, hf):
    """(embedding, layers, final norm, its epsilon, output projection of a layer)."""
    if family == "gpt2":
        t = hf.transformer
        return t.wte, t.h, t.ln_f, hf.config.layer_norm_epsilon, lambda layer: layer.attn.c_proj
    m = hf.model
    eps = 1e-5 if family == "olmo" else hf.config.rms_norm_eps  # OlmoLayerNorm's fixed epsilon
    return m.embed_tokens, m.layers, m.norm, eps, lambda layer: layer.self_attn.o_proj


def _by_hand(family: str, hf, tokens: torch.Tensor, node: str):
    """(node output, final-norm input, logits) at the last position, from hooks on Hugging Face's modules."""
    embed, layers, norm, _, out_proj = _parts(family, hf)
    seen = {}
    handles = [norm.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0][0, -1]))]
    if node == "input":
        handles.append(embed.register_forward_hook(lambda mod, args, out: seen.__setitem__("c", out[0, -1])))
    elif m := re.fullmatch(r"m(\d+)", node):
        handles.append(layers[int(m[1])].mlp.register_forward_hook(lambda mod, args, out: seen.__setitem__("c", out[0, -1])))
    else:
        layer, head = map(int, re.fullmatch(r"a(\d+)\.h(\d+)", node).groups())
        proj = out_proj(layers[layer])
        d_head = hf.config.hidden_size // hf.config.num_attention_heads
        cols = slice(head * d_head, (head + 1) * d_head)
        # GPT-2's Conv1D weight is [in, out]; Llama's Linear weight [out, in]
        w = proj.weight[cols] if family == "gpt2" else proj.weight[:, cols].T
        handles.append(proj.register_forward_pre_hook(lambda mod, args: seen.__setitem__("c", args[0][0, -1, cols] @ w)))
    with torch.no_grad():
        logits = hf(tokens).logits[0, -1]
    for h in handles:
        h.remove()
    return seen["c"], seen["x"], logits


def _frozen_unembed(family: str, hf, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """c through the final norm with the scale of x (the norm's input), then the unembedding; no biases."""
    _, _, norm, eps, _ = _parts(family, hf)
    c, x, w_u = c.detach(), x.detach(), hf.lm_head.weight.detach()
    if family in ("llama", "gemma"):  # RMSNorm; Gemma stores its weight as an offset from 1
        gamma = norm.weight.detach() + (1 if family == "gemma" else 0)
        return (c / (x.pow(2).mean() + eps).sqrt() * gamma) @ w_u.T
    gamma = norm.weight.detach() if family == "gpt2" else 1.0  # OLMo's LayerNorm has no parameters
    scale = ((x - x.mean()).pow(2).mean() + eps).sqrt()
    return ((c - c.mean()) / scale * gamma) @ w_u.T


def _metric_by_hand(name: str, logits: torch.Tensor, clean: torch.Tensor, correct: list[int], incorrect: list[int]) -> float:
    if name == "logit_diff":
        return float(logits[correct].mean() - logits[incorrect].mean())
    if name == "prob_diff":
        p = torch.exp(logits - logits.logsumexp(0))
        return float(p[correct].sum() - p[incorrect].sum())
    p = torch.exp(clean - clean.logsumexp(0))
    return float((p * (clean - clean.logsumexp(0) - logits + logits.logsumexp(0))).sum())


def _pair(data, i):
    d, n = data.data, int(data.data.lengths[i])
    answers = lambda ids, mask: ids[i][mask[i]].tolist()  # noqa: E731
    return d.clean[i : i + 1, :n], d.corrupted[i : i + 1, :n], answers(d.correct, d.correct_mask), answers(d.incorrect, d.incorrect_mask)


@pytest.mark.parametrize("node", ["a0.h1", "a1.h0"])
def test_attention_equals_hugging_face(case, node):
    family, bridge, hf, data = case
    layer, head = map(int, re.fullmatch(r"a(\d+)\.h(\d+)", node).groups())
    for i in (0, 3):
        report = inspect_node(bridge, data, i, node)
        clean, corrupted, _, _ = _pair(data, i)
        for side, tokens in enumerate((clean, corrupted)):
            with torch.no_grad():
                expected = hf(tokens, output_attentions=True).attentions[layer][0, head]
            got = report.attention[side].double()
            torch.testing.assert_close(got, expected.double(), rtol=0, atol=1e-5)
            torch.testing.assert_close(got.sum(-1), torch.ones(tokens.shape[1], dtype=torch.float64), rtol=0, atol=1e-5)
        assert torch.equal(report.last_row, report.attention[:, -1])
        assert report.tokens[0] == [bridge.tokenizer.decode([t]) for t in clean[0].tolist()]


@pytest.mark.parametrize("metric", ["logit_diff", "prob_diff", "kl_div"])
@pytest.mark.parametrize("node", ["input", "a0.h0", "a1.h1", "m0", "m1"])
def test_direct_effect_equals_hand_computation(case, node, metric):
    family, bridge, hf, data = case
    tol = TOLERANCE[family]
    i = 1
    report = inspect_node(bridge, data, i, node, metric, k=3)
    clean_tokens, corrupted_tokens, correct, incorrect = _pair(data, i)
    c, x, clean_logits = _by_hand(family, hf, clean_tokens, node)
    d_clean = _frozen_unembed(family, hf, c, x).double()
    scale = float(d_clean.abs().max())
    assert scale > 1e-3  # not vacuous
    torch.testing.assert_close(report.direct_logits[0], d_clean, rtol=0, atol=tol * scale)
    c_k, x_k, corrupted_logits = _by_hand(family, hf, corrupted_tokens, node)
    d_corrupted = _frozen_unembed(family, hf, c_k, x).double()  # the clean run's scale on both runs
    own_scale = _frozen_unembed(family, hf, c_k, x_k).double()
    assert float((own_scale - d_corrupted).abs().max()) > 10 * tol * scale  # the runs' scales differ: not vacuous
    torch.testing.assert_close(report.direct_logits[1], d_corrupted, rtol=0, atol=tol * scale)

    clean, corrupted = clean_logits.double(), corrupted_logits.double()
    expected = []
    for logits, d in ((clean, d_clean), (corrupted, d_corrupted)):
        with_node = _metric_by_hand(metric, logits, clean, correct, incorrect)
        expected.append(with_node - _metric_by_hand(metric, logits - d, clean, correct, incorrect))
    if metric == "logit_diff":  # linear: the node's own logit difference
        assert expected[0] == pytest.approx(float(d_clean[correct].mean() - d_clean[incorrect].mean()), abs=1e-9 * scale)
    assert report.direct_effect == pytest.approx(tuple(expected), abs=tol * max(1.0, scale))
    top = d_clean.topk(3)
    assert [t for t, _ in report.promotes] == [bridge.tokenizer.decode([int(j)]) for j in top.indices]
    assert [v for _, v in report.promotes] == pytest.approx(top.values.tolist(), abs=tol * scale)
    assert [v for _, v in report.suppresses] == pytest.approx(d_clean.topk(3, largest=False).values.tolist(), abs=tol * scale)


def test_pair_runs_are_cached(tiny32, pairs):
    data = tokenize(pairs, tiny32.tokenizer)
    first = pair_runs(tiny32, data, 2)
    assert pair_runs(tiny32, data, 2) is first
    inspect_node(tiny32, data, 2, "a1.h1")
    assert 1 in first.patterns and pair_runs(tiny32, data, 2) is first
    with pytest.raises(ValueError, match="pair 8 is out of range: the data has 8 pairs"):
        inspect_node(tiny32, data, 8, "a1.h1")


def test_unknown_node_names_the_nearest(tiny32, pairs):
    data = tokenize(pairs, tiny32.tokenizer)
    with pytest.raises(ValueError, match=r"unknown node .*'a1\.h7' \(nearest: 'a1\.h1', 'a1\.h0'"):
        inspect_node(tiny32, data, 0, "a1.h7")


def test_node_edges_in_a_circuit(tiny32):
    graph = model_graph(tiny32)
    edges = torch.randn(graph.n_forward, graph.n_backward, generator=torch.Generator().manual_seed(0)) * graph.real_edge_mask
    scores = Scores(graph, edges)
    circuit = top_n(scores, 12)
    found = node_edges(scores, circuit, "a1.h0")
    for name, score in found.incoming + found.outgoing:
        row, col = graph.parse_edge_name(name)
        assert circuit.edges[row, col] and score == pytest.approx(float(edges[row, col]))
    assert all(n.split("->")[1].split("<")[0] == "a1.h0" for n, _ in found.incoming)
    assert all(n.startswith("a1.h0->") for n, _ in found.outgoing)
    expected = {graph.edge_name(r, c) for r, c in circuit.edges.nonzero().tolist()
                if graph.src_nodes[r] == "a1.h0" or graph.dst_node_of_column[c] == "a1.h0"}
    assert {n for n, _ in found.incoming + found.outgoing} == expected
    assert found.score_from == "sum of outgoing edge scores"
    assert found.score == pytest.approx(float(edges[graph.src_index["a1.h0"]].sum()), rel=1e-6)
    nodes = torch.arange(graph.n_forward, dtype=torch.float32)
    with_nodes = node_edges(Scores(graph, edges, nodes), circuit, "a1.h0")
    assert (with_nodes.score, with_nodes.score_from) == (float(graph.src_index["a1.h0"]), "node score")
    assert node_edges(scores, circuit, "logits").score is None


def test_cli_inspect_prints_the_drill_down(tiny_dir, tmp_path, capsys):
    csv = tmp_path / "pairs.csv"
    csv.write_text("clean,corrupted,correct,incorrect\na b c d,e b c d,e,a\nb c d e f,a c d e f,g,b\n")
    assert main(["inspect", "--model", str(tiny_dir), "--data", str(csv), "--node", "a1.h0", "--pair", "1", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"node", "tokens", "attention", "promotes", "suppresses", "direct_effect"} <= set(out)
    model = load_model(str(tiny_dir), device="cpu")
    from eapcore.data import PromptPairs

    report = inspect_node(model, tokenize(PromptPairs.from_csv(csv), model.tokenizer), 1, "a1.h0")
    torch.testing.assert_close(torch.tensor(out["attention"]["clean"]), report.attention[0])
    assert out["direct_effect"]["corrupted"] == pytest.approx(report.direct_effect[1], rel=1e-6)
    assert out["tokens"]["clean"] == ["<|endoftext|>", "b", "c", "d", "e", "f"]
    assert main(["inspect", "--model", str(tiny_dir), "--data", str(csv), "--node", "m0", "--device", "cpu"]) == 0
    assert "attention" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
