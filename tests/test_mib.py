"""MIB: graph sizes from config.json alone (MIB's published edge counts; graphs of loaded tiny models), submission
folders written by mib-export and checked by mib-check (good and broken folders), and MIB's task-dataset columns."""

from __future__ import annotations

import json

import pytest
import torch

from eapcore.circuit import Circuit, Scores
from eapcore.cli import main
from eapcore.data import DataError, PromptPairs
from eapcore.export import save_json, save_pt
from eapcore.graph import Graph, GraphConfig
from eapcore.mib import CIRCUIT_PERCENTS, MODELS, check_submission, write_folder
from eapcore.models import load_model, model_graph

from conftest import save_with_tiny_tokenizer, tiny_tokenizer

# The four MIB models' config.json, with their real sizes (the keys that matter, as their hub configs spell them).
MIB_CONFIGS = {
    "gpt2": ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 12, "n_head": 12, "n_embd": 768,
              "n_positions": 1024, "vocab_size": 50257}, 32_491),
    "qwen2.5": ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 24,
                 "num_attention_heads": 14, "num_key_value_heads": 2, "hidden_size": 896, "intermediate_size": 4864,
                 "vocab_size": 151936}, 179_749),
    "gemma2": ({"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"], "num_hidden_layers": 26,
                "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_size": 2304,
                "intermediate_size": 9216, "vocab_size": 256000}, 74_218),
    "llama3": ({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096, "intermediate_size": 14336,
                "vocab_size": 128256}, 1_592_881),
}


def edge_formula(L: int, H: int, parallel: bool) -> int:
    """Edges of the EAP graph, counted by hand: per layer 3H head inputs reading 1 + l(H+1) sources and an MLP
    reading those plus its own layer's H heads (unless parallel); the logits read all 1 + L(H+1) sources."""
    return 1 + L * (H + 1) + sum(3 * H * (1 + l * (H + 1)) + 1 + l * (H + 1) + (0 if parallel else H) for l in range(L))


def graph_command(path, capsys) -> dict:
    assert main(["graph", "--config", str(path)]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


# ----- graph sizes from config.json -----


@pytest.mark.parametrize("name", list(MIB_CONFIGS))
def test_graph_command_gives_mibs_edge_counts(name, tmp_path, capsys):
    config, edges = MIB_CONFIGS[name]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    L = config.get("num_hidden_layers", config.get("n_layer"))
    H = config.get("num_attention_heads", config.get("n_head"))
    assert graph_command(path, capsys) == {"nodes": 2 + L * (H + 1), "edges": edges}
    assert edge_formula(L, H, False) == edges and Graph(MODELS[name].cfg).n_edges == MODELS[name].n_edges == edges


@pytest.mark.parametrize("config, parallel", [
    ({"model_type": "gpt_neox", "num_hidden_layers": 6, "num_attention_heads": 8, "hidden_size": 512,
      "use_parallel_residual": True}, True),
    ({"model_type": "gpt_neox", "num_hidden_layers": 6, "num_attention_heads": 8, "hidden_size": 512}, True),
    ({"model_type": "gpt_neox", "num_hidden_layers": 6, "num_attention_heads": 8, "hidden_size": 512,
      "use_parallel_residual": False}, False),
    ({"model_type": "gptj", "n_layer": 4, "n_head": 16, "n_embd": 4096}, True),
    ({"model_type": "falcon", "num_hidden_layers": 3, "num_attention_heads": 8, "hidden_size": 64,
      "parallel_attn": False, "new_decoder_architecture": False}, False),
    ({"model_type": "gpt_neo", "num_layers": 4, "num_heads": 12, "hidden_size": 768}, False),
    ({"model_type": "mpt", "n_layers": 4, "n_heads": 8, "d_model": 256}, False),
    ({"model_type": "gemma3", "text_config": {"num_hidden_layers": 5, "num_attention_heads": 4,
                                              "num_key_value_heads": 1, "hidden_size": 64}}, False),
])
def test_graph_command_reads_parallel_blocks_and_other_spellings(config, parallel, tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg = GraphConfig.from_hf_config(config)
    assert cfg.parallel_attn_mlp is parallel
    assert graph_command(tmp_path, capsys)["edges"] == edge_formula(cfg.n_layers, cfg.n_heads, parallel)


def test_graph_command_errors_name_the_file_and_the_keys(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 8}))
    assert main(["graph", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "num_attention_heads" in err
    path.write_text("{not json")
    assert main(["graph", "--config", str(path)]) == 2
    assert "is not a JSON file" in capsys.readouterr().err


# name: (config class, model class, config kwargs) of tiny random models; pythia's config.json loses its
# use_parallel_residual key before loading, so that both sides fall back on GPT-NeoX's default.
V = len(tiny_tokenizer()) + 1
TINY = dict(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=2)
TINY_MODELS = {
    "pythia": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(TINY, rotary_pct=0.5)),
    "neox-sequential": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(TINY, use_parallel_residual=False)),
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", dict(TINY, num_key_value_heads=2)),
    "bigcode-mqa": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(vocab_size=V, n_embd=16, n_layer=3, n_head=4,
                                                                       n_positions=32, multi_query=True)),
}


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_config_graph_equals_the_loaded_models_graph(name, tmp_path):
    import transformers

    config_cls, model_cls, kwargs = TINY_MODELS[name]
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()
    path = save_with_tiny_tokenizer(tmp_path, hf)
    config = json.loads((path / "config.json").read_text())
    if name == "pythia":
        config.pop("use_parallel_residual", None)
        (path / "config.json").write_text(json.dumps(config))
    loaded = model_graph(load_model(str(path), device="cpu", dtype="float32"))
    from_config = Graph(GraphConfig.from_hf_config(config))
    assert from_config.cfg == loaded.cfg
    assert (from_config.n_nodes, from_config.n_edges) == (loaded.n_nodes, loaded.n_edges)


def test_graph_of_the_tiny_gpt2_checkpoint(tiny_dir, tiny32, capsys):
    graph = model_graph(tiny32)
    assert graph_command(tiny_dir, capsys) == {"nodes": graph.n_nodes, "edges": graph.n_edges}


# ----- submissions -----


def random_scores(cfg: GraphConfig, seed: int = 0) -> Scores:
    graph = Graph(cfg)
    g = torch.Generator().manual_seed(seed)
    edges = torch.randn(graph.n_forward, graph.n_backward, generator=g) * graph.real_edge_mask
    return Scores(graph, edges, provenance={"method": "random"})


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """An EAP-IG run of the demo model on 8 IOI pairs, as `attribute` writes it."""
    from eapcore.attribute import AttributionSpec, attribute
    from eapcore.data import tokenize
    from eapcore.tasks import get_task

    model = load_model("demo", device="cpu")
    pairs = PromptPairs.from_csv(get_task("ioi").csv)
    pairs = PromptPairs.from_lists(pairs.clean[:8], pairs.corrupted[:8], pairs.correct[:8], pairs.incorrect[:8])
    scores = attribute(model, tokenize(pairs, model.tokenizer), AttributionSpec("EAP-IG-inputs", 2, "logit_diff",
                                                                               "patching", 8))
    path = tmp_path_factory.mktemp("run") / "demo_ioi.pt"
    save_pt(path, scores, None, {**scores.provenance, "model": "demo"})
    return path, scores


@pytest.mark.parametrize("extra", [[], ["--circuits"], ["--format", "json"], ["--circuits", "--signed", "--format", "json"]])
def test_mib_export_then_check_passes_on_a_demo_run(demo_run, extra, tmp_path, capsys):
    path, scores = demo_run
    out = tmp_path / "submission"
    assert main(["mib-export", "--runs", str(path), "--task", "ioi", "--out", str(out), *extra]) == 0
    exported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert exported["check"]["ok"] and list(exported["written"]) == ["ioi_demo"]  # the model the run records
    assert main(["mib-check", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    circuits = "--circuits" in extra
    assert report["folders"] == {"ioi_demo": "9 binary circuits" if circuits else "importance scores"}
    assert any("'demo' is not one of MIB's models" in n and "everything but the edge count" in n for n in report["notes"])
    assert any("at least 2 of MIB's models and 2 of its tasks" in w for w in report["warnings"])
    files = sorted((out / "ioi_demo").iterdir())
    assert len(files) == (9 if circuits else 1) and all(f.suffix == (".json" if "json" in extra else ".pt") for f in files)
    if circuits:  # each circuit is the pruned top-k at MIB's size, ranked as asked
        from eapcore.export import load_circuit
        from eapcore.select import top_n

        n = scores.graph.n_edges
        for p in CIRCUIT_PERCENTS:
            _, circuit = load_circuit(out / "ioi_demo" / f"edges_{p:g}pct{files[0].suffix}")
            expected = top_n(scores, int(p / 100 * n), absolute="--signed" not in extra)
            assert torch.equal(circuit.edges, expected.edges) and torch.equal(circuit.nodes, expected.nodes)


def test_a_complete_submission_has_no_warnings(tmp_path):
    write_folder(tmp_path, random_scores(MODELS["gpt2"].cfg), "ioi", "gpt2")
    write_folder(tmp_path, random_scores(MODELS["qwen2.5"].cfg, 1), "ioi", "Qwen/Qwen2.5-0.5B")
    write_folder(tmp_path, random_scores(MODELS["qwen2.5"].cfg, 2), "mcqa", "qwen2.5", circuits=True)
    report = check_submission(tmp_path)
    assert report.ok and not report.warnings and not report.notes
    assert report.folders == {"ioi_gpt2": "importance scores", "ioi_qwen2.5": "importance scores",
                              "mcqa_qwen2.5": "9 binary circuits"}


def test_mib_export_reads_task_and_model_from_the_runs(tmp_path, capsys):
    runs = []
    for i, (model, task) in enumerate((("gpt2", "ioi"), ("Qwen/Qwen2.5-0.5B", "mcqa"), ("/data/my-model", "ioi"))):
        name = "qwen2.5" if "Qwen" in model else "gpt2"
        runs.append(tmp_path / f"run{i}.pt")
        save_pt(runs[-1], random_scores(MODELS[name].cfg, i), None, {"model": model, "task": task})
    out = tmp_path / "sub"
    assert main(["mib-export", "--runs", str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["written"] == {"ioi_gpt2": ["importances.pt"], "mcqa_qwen2.5": ["importances.pt"]}
    assert result["check"]["ok"] and not result["check"]["warnings"]
    assert main(["mib-export", "--runs", str(runs[0]), str(runs[0]), "--out", str(tmp_path / "x")]) == 2
    assert "both go to ioi_gpt2" in capsys.readouterr().err
    assert main(["mib-export", "--runs", str(runs[2]), "--out", str(tmp_path / "y")]) == 2
    assert "records the model '/data/my-model'" in capsys.readouterr().err and not (tmp_path / "y").exists()
    assert main(["mib-export", "--runs", str(runs[2]), "--model-name", "gpt2", "--task", "ioi", "mcqa",
                 "--out", str(tmp_path / "y")]) == 2
    assert "--task has 2 values for 1 runs" in capsys.readouterr().err


def test_mib_export_refuses_scores_of_another_graph_for_an_mib_model(demo_run, tmp_path, capsys):
    assert main(["mib-export", "--runs", str(demo_run[0]), "--task", "ioi", "--model-name", "gpt2",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "479 edges" in err and "MIB's gpt2" in err and "32,491" in err


def check_fails(root, capsys, *expected: str) -> str:
    """mib-check exits 1 and names the problem; returns its output."""
    assert main(["mib-check", str(root)]) == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert not report["ok"]
    text = " ".join(report["problems"])
    for e in expected:
        assert e in text, text
    assert "problem(s)" in captured.err
    return text


def test_missing_key_fails_naming_file_and_key(tmp_path, capsys):
    folder = tmp_path / "ioi_gpt2"
    folder.mkdir()
    save_pt(folder / "importances.pt", random_scores(MODELS["gpt2"].cfg), None)
    data = torch.load(folder / "importances.pt", weights_only=True)
    del data["nodes_in_graph"]
    torch.save(data, folder / "importances.pt")
    check_fails(tmp_path, capsys, "ioi_gpt2/importances.pt", "'nodes_in_graph'", "missing")


def test_json_missing_key_and_cfg_key_fail(tmp_path, capsys):
    folder = tmp_path / "ioi_gpt2"
    folder.mkdir()
    save_json(folder / "importances.json", random_scores(MODELS["gpt2"].cfg), None)
    data = json.loads((folder / "importances.json").read_text())
    del data["cfg"]["parallel_attn_mlp"]
    (folder / "importances.json").write_text(json.dumps(data))
    check_fails(tmp_path, capsys, "ioi_gpt2/importances.json", "cfg lacks ['parallel_attn_mlp']")
    del data["edges"]
    (folder / "importances.json").write_text(json.dumps(data))
    check_fails(tmp_path, capsys, "ioi_gpt2/importances.json", "'edges' is missing")


def test_wrong_edge_count_fails(demo_run, tmp_path, capsys):
    folder = tmp_path / "ioi_gpt2"
    folder.mkdir()
    save_pt(folder / "importances.pt", demo_run[1], None)
    check_fails(tmp_path, capsys, "ioi_gpt2/importances.pt", "479 edges", "MIB's gpt2 graph has 32,491")


def test_truncated_file_fails(tmp_path, capsys):
    write_folder(tmp_path, random_scores(MODELS["gpt2"].cfg), "ioi", "gpt2")
    path = tmp_path / "ioi_gpt2" / "importances.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    check_fails(tmp_path, capsys, "ioi_gpt2/importances.pt", "truncated")


def test_folder_layout_problems(tmp_path, capsys):
    scores = random_scores(MODELS["gpt2"].cfg)
    write_folder(tmp_path, scores, "ioi", "gpt2", circuits=True)
    save_pt(tmp_path / "ioi_gpt2" / "edges_50pct.pt", None, Circuit.full(scores.graph))
    check_fails(tmp_path, capsys, "ioi_gpt2/edges_50pct.pt", "at most 50% of the graph's 32,491 edges (16,245)")
    (tmp_path / "ioi_gpt2" / "more.pt").write_bytes((tmp_path / "ioi_gpt2" / "edges_1pct.pt").read_bytes())
    check_fails(tmp_path, capsys, "ioi_gpt2: 10 circuit files", "exactly 9 binary circuits")
    gemma = Graph(MODELS["gemma2"].cfg)
    bad = tmp_path / "other"
    write_folder(bad, Scores(gemma, torch.zeros(gemma.n_forward, gemma.n_backward)), "arc_easy", "gemma2")
    (bad / "arc-easy_gemma2").rename(bad / "arc_easy_gemma2")
    text = check_fails(bad, capsys, "write the task as 'arc-easy'", "every score is 0")
    assert "edge count" not in text
    empty = tmp_path / "empty"
    (empty / "ioi").mkdir(parents=True)
    check_fails(empty, capsys, "ioi: the folder name must be {task}_{model}")


# ----- MIB's task datasets -----


IOI_ROW = {"prompt": "Then, Mary and John went to the store. John gave a drink to",
           "metadata": {"indirect_object": "Mary", "subject": "John", "random_c": "Bob"},
           "s2_io_flip_counterfactual": {"prompt": "Then, Mary and John went to the store. Mary gave a drink to"}}
MCQA_ROW = {"prompt": "The sky is blue. What color is the sky?\nA. red\nB. blue\nAnswer:",
            "choices": {"label": ["A", "B"], "text": ["red", "blue"]}, "answerKey": 1,
            "symbol_counterfactual": {"prompt": "The sky is blue. What color is the sky?\nC. red\nD. blue\nAnswer:",
                                      "choices": {"label": ["C", "D"], "text": ["red", "blue"]}, "answerKey": 1}}
ARITHMETIC_ROW = {"prompt": "Q: How much is 12 plus 30? A:", "label": 42, "operator": "+",
                  "random_counterfactual": {"prompt": "Q: How much is 15 plus 30? A:", "label": 45}}


def jsonl(rows) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


def test_mib_layouts_map_to_clean_corrupted_correct_incorrect():
    ioi = PromptPairs.from_json(jsonl([IOI_ROW]))
    assert (ioi.clean[0], ioi.corrupted[0]) == (IOI_ROW["prompt"], IOI_ROW["s2_io_flip_counterfactual"]["prompt"])
    assert (ioi.correct, ioi.incorrect) == (((" Mary",),), ((" John",),))  # MIB prepends the space
    mcqa = PromptPairs.from_json(json.dumps([MCQA_ROW]).encode())  # a JSON array works too
    assert (mcqa.clean[0], mcqa.corrupted[0]) == (MCQA_ROW["prompt"], MCQA_ROW["symbol_counterfactual"]["prompt"])
    assert (mcqa.correct, mcqa.incorrect) == ((("B",),), (("D",),))
    arithmetic = PromptPairs.from_json(jsonl([ARITHMETIC_ROW]))
    assert (arithmetic.correct, arithmetic.incorrect) == ((("42",),), (("45",),))
    assert arithmetic.corrupted == ("Q: How much is 15 plus 30? A:",)


def test_mib_layouts_from_flattened_csv_and_nested_frames(tmp_path):
    import pandas as pd

    flat = pd.json_normalize([IOI_ROW, IOI_ROW])
    path = tmp_path / "ioi.csv"
    flat.to_csv(path, index=False)
    assert PromptPairs.from_csv(path) == PromptPairs.from_json(jsonl([IOI_ROW, IOI_ROW]))
    nested = pd.DataFrame([MCQA_ROW])  # Dataset.to_pandas() keeps nested objects as dict cells
    assert PromptPairs.from_frame(nested).correct == (("B",),)
    pd.json_normalize([MCQA_ROW]).to_csv(path, index=False)  # lists written by pandas as Python reprs
    assert PromptPairs.from_file(path).incorrect == (("D",),)
    jl = tmp_path / "arith.jsonl"
    jl.write_bytes(jsonl([ARITHMETIC_ROW]))
    assert PromptPairs.from_file(jl).correct == (("42",),)


def test_mib_layout_errors_name_row_value_and_fix():
    bad = dict(MCQA_ROW, answerKey=5)
    with pytest.raises(DataError, match=r"row 2: 'answerKey' is 5, not a position in 'choices.label' \['A', 'B'\]"):
        PromptPairs.from_json(jsonl([MCQA_ROW, bad]))
    no_subject = {**IOI_ROW, "metadata": {"indirect_object": "Mary", "subject": None}}
    with pytest.raises(DataError, match=r"row 2: column 'metadata.subject' is empty"):
        PromptPairs.from_json(jsonl([IOI_ROW, no_subject]))
    partial = {"prompt": "x", "s2_io_flip_counterfactual": {"prompt": "y"}, "metadata": {"subject": "John"}}
    with pytest.raises(DataError) as e:
        PromptPairs.from_json(jsonl([partial]))
    message = str(e.value)
    assert "missing column(s) clean, corrupted, correct, incorrect" in message
    assert "looks like MIB's IOI layout but lacks ['metadata.indirect_object']" in message
    assert "correct <- ' ' + metadata.indirect_object" in message and "incorrect <- random_counterfactual.label" in message
    with pytest.raises(DataError, match=r"line 2 is not valid JSON"):
        PromptPairs.from_json(b'{"prompt": "a"}\n{"prompt": ')
    with pytest.raises(DataError, match="row 1 is 3, not an object"):
        PromptPairs.from_json(b"[3]")
