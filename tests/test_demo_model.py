"""The shipped demo checkpoint solves the shipped held-out task CSVs (plain transformers, fp32)."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "assets" / "models" / "demo"
TASKS_DIR = ROOT / "assets" / "tasks"
TASKS = ("ioi", "greater_than", "induction")


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_demo_model", ROOT / "scripts" / "train_demo_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model() -> GPT2LMHeadModel:
    return GPT2LMHeadModel.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def metrics(script: ModuleType, model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast) -> dict[str, dict]:
    return {task: script.task_metrics(model, tokenizer, TASKS_DIR / f"{task}.csv") for task in TASKS}


def read_rows(task: str) -> list[dict[str, str]]:
    with open(TASKS_DIR / f"{task}.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["clean", "corrupted", "correct", "incorrect"]
        return list(reader)


def test_checkpoint_files_and_size(model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (MODEL_DIR / name).is_file(), name
    assert sum(p.stat().st_size for p in MODEL_DIR.iterdir()) <= 2 * 1024 * 1024
    cfg = model.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size) == (4, 128, 4, len(tokenizer))
    assert tokenizer.bos_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.tokenize("from 1745 to 17") == ["from", "17", "45", "to", "17"]


@pytest.mark.parametrize("task", TASKS)
def test_csv_pairs_are_well_formed(task: str, tokenizer: PreTrainedTokenizerFast) -> None:
    rows = read_rows(task)
    assert len(rows) >= 200
    for row in rows:
        clean, corrupted = tokenizer.tokenize(row["clean"]), tokenizer.tokenize(row["corrupted"])
        assert len(clean) == len(corrupted)
        assert tokenizer.unk_token not in clean + corrupted and tokenizer.bos_token not in clean
        answers = [row["correct"], row["incorrect"]]
        if task == "greater_than":
            good, bad = (json.loads(a) for a in answers)
            assert sorted(bad + good) == [f"{i:02d}" for i in range(100)]
            assert [(a, b) for a, b in zip(clean, corrupted) if a != b] == [(bad[-1], "01")]
        else:
            assert all(len(tokenizer.tokenize(a)) == 1 for a in answers) and answers[0] != answers[1]


def test_csvs_use_held_out_names_and_years() -> None:
    lists = json.loads((MODEL_DIR / "word_lists.json").read_text())
    for row in read_rows("ioi"):
        assert {row["correct"], row["incorrect"]} <= set(lists["held_out_names"])
    for row in read_rows("greater_than"):
        assert re.search(r"\b\d{4}\b", row["clean"]).group() in lists["held_out_start_years"]


def test_ioi_bars(metrics: dict[str, dict]) -> None:
    m = metrics["ioi"]
    assert m["accuracy"] >= 0.95 and m["clean_logit_diff"] >= 3.0 and m["corrupted_logit_diff"] <= 0.5, m


def test_greater_than_bars(metrics: dict[str, dict]) -> None:
    m = metrics["greater_than"]
    assert m["clean_prob_diff"] >= 0.7 and m["corrupted_prob_diff"] <= 0.3, m


def test_induction_bars(metrics: dict[str, dict]) -> None:
    m = metrics["induction"]
    assert m["repeated_half_accuracy"] >= 0.9 and m["top1_accuracy"] >= 0.9, m
    assert m["clean_logit_diff"] > m["corrupted_logit_diff"] + 3.0, m


@pytest.mark.parametrize("n_bos", [0, 2])
def test_ioi_works_without_or_with_two_bos(n_bos: int, model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast) -> None:
    hits = []
    with torch.no_grad():
        for row in read_rows("ioi")[:64]:
            ids = [tokenizer.bos_token_id] * n_bos + tokenizer.encode(row["clean"], add_special_tokens=False)
            last = model(torch.tensor([ids])).logits[0, -1]
            good, bad = tokenizer.convert_tokens_to_ids([row["correct"], row["incorrect"]])
            hits.append(bool(last[good] > last[bad]))
    assert sum(hits) / len(hits) >= 0.9
