"""The demo-model training script: CLI run on a tiny config, tokenizer, data splits, reproducibility."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, GPT2LMHeadModel

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_demo_model.py"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_demo_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    cmd = [sys.executable, str(SCRIPT), "--out", str(out / "model"), "--tasks-out", str(out / "tasks"),
           "--steps", "5", "--seed", "0", "--n-layer", "1", "--d-model", "16", "--n-head", "2",
           "--batch-size", "8", "--n-pairs", "8", "--eval-every", "1000"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return out


@pytest.mark.slow  # trains a tiny model in a subprocess
def test_saved_folder_loads_offline(trained: Path) -> None:
    model = GPT2LMHeadModel.from_pretrained(trained / "model", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(trained / "model")
    assert (model.config.n_layer, model.config.n_embd, model.config.n_head) == (1, 16, 2)
    assert model.config.vocab_size == len(tokenizer)
    with safe_open(trained / "model" / "model.safetensors", "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
        assert "lm_head.weight" not in f.keys()  # tied to the embedding, stored once
    assert GPT2LMHeadModel.from_pretrained(trained / "model").dtype == torch.float32
    assert tokenizer.bos_token == tokenizer.eos_token == "<|endoftext|>"
    assert (tokenizer.pad_token, tokenizer.unk_token) == ("<pad>", "<unk>")
    names = json.loads((trained / "model" / "word_lists.json").read_text())["names"]
    assert len(names) >= 100 and tokenizer.unk_token_id not in tokenizer.convert_tokens_to_ids(names)


@pytest.mark.slow  # trains a tiny model in a subprocess
def test_tokenizer_splits_years_into_two_digit_tokens(trained: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(trained / "model")
    tokens = tokenizer.tokenize("The war lasted from the year 1745 to the year 17")
    assert tokens == ["The", "war", "lasted", "from", "the", "year", "17", "45", "to", "the", "year", "17"]
    assert tokenizer.tokenize("Mary, John.") == ["Mary", ",", "John", "."]
    assert tokenizer("Mary")["input_ids"] == tokenizer.convert_tokens_to_ids(["Mary"])  # no BOS added
    for i in range(100):
        assert tokenizer.tokenize(f"{i:02d}") == [f"{i:02d}"]


@pytest.mark.slow  # trains a tiny model in a subprocess
def test_task_csvs_written_and_evaluated(trained: Path, script: ModuleType) -> None:
    model = GPT2LMHeadModel.from_pretrained(trained / "model", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(trained / "model")
    for task in ("ioi", "greater_than", "induction"):
        with open(trained / "tasks" / f"{task}.csv", newline="") as f:
            reader = csv.DictReader(f)
            assert reader.fieldnames == ["clean", "corrupted", "correct", "incorrect"]
            assert len(list(reader)) == 8
        metrics = script.task_metrics(model, tokenizer, trained / "tasks" / f"{task}.csv")
        assert all(isinstance(v, float) for v in metrics.values())


def test_held_out_templates_use_trained_words(script: ModuleType) -> None:
    tasks = script.demo_tasks

    def words(templates: list[str]) -> set[str]:
        return {w for t in templates for w in re.sub(r"\{[A-Z]+\}", " ", t).split()}

    def split(templates: list[str], test: frozenset[int]) -> tuple[list[str], list[str]]:
        return [t for i, t in enumerate(templates) if i not in test], [templates[i] for i in sorted(test)]

    ioi_train, ioi_test = split(tasks.IOI_TEMPLATES, tasks.IOI_TEST_TEMPLATES)
    gt_train, gt_test = split(tasks.GT_TEMPLATES, tasks.GT_TEST_TEMPLATES)
    assert ioi_test and gt_test
    assert words(ioi_test + gt_test) <= words(ioi_train + gt_train + tasks.FILLER_TEMPLATES)


def test_training_data_in_vocabulary_and_held_out(script: ModuleType) -> None:
    tasks = script.demo_tasks
    tokenizer = script.build_tokenizer()
    rng, words = random.Random(0), tasks.vocabulary()
    docs = [" ".join(tasks.training_text(rng, words)) for _ in range(2000)]
    assert all(tokenizer.unk_token_id not in e.ids and len(e.ids) < 64 for e in tokenizer.backend_tokenizer.encode_batch(docs))
    held_out_names = set(tasks.split_names("test"))
    starts = set()
    for _ in range(1000):
        assert not held_out_names & set(tasks.ioi_example(rng, "train")["clean"].split())
        gt = tasks.gt_example(rng, "train")
        assert not tasks.gt_held_out(gt["century"], gt["start"])
        starts.add(gt["start"])
    assert starts == set(range(99))  # every two-digit start year, 00 and 01 included, is trained


def test_training_is_reproducible(script: ModuleType) -> None:
    tokenizer = script.build_tokenizer()

    def run() -> dict[str, torch.Tensor]:
        torch.manual_seed(3)
        model = script.build_model(tokenizer, n_layer=1, d_model=16, n_head=2, n_positions=64)
        script.train(model, tokenizer, steps=3, batch_size=8, lr=3e-3, seed=3, log_every=10, eval_every=10)
        return model.state_dict()

    first, second = run(), run()
    assert all(torch.equal(first[k], second[k]) for k in first)
