"""Tiny random GPT-2-style models and prompt pairs, built locally (no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # the test models are tiny: threads only add contention

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` skip themselves where there is no CUDA device."""
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


def tiny_tokenizer():
    """The word-level tokenizer of the tiny models: ``<|endoftext|>`` (BOS/EOS, id 0), ``<unk>``, ``<pad>``, a-l."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "<unk>", "<pad>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<unk>", pad_token="<pad>"
    )


def save_with_tiny_tokenizer(path: Path, hf_model) -> Path:
    """``save_pretrained`` any Hugging Face causal LM (vocabulary of at least 15) with :func:`tiny_tokenizer`."""
    hf_model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def save_tiny_gpt2(path: Path, n_layer: int = 2, n_head: int = 2, n_embd: int = 8, seed: int = 0) -> Path:
    """A random ``GPT2LMHeadModel`` and a word-level tokenizer, written with ``save_pretrained``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=len(tiny_tokenizer()), n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # larger weights than the default init, so that scores are not all tiny
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    return save_with_tiny_tokenizer(path, model)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny64(tiny_dir: Path):
    from eapcore.models import load_model

    return load_model(str(tiny_dir), device="cpu", dtype="float64")


@pytest.fixture(scope="session")
def tiny32(tiny_dir: Path):
    from eapcore.models import load_model

    return load_model(str(tiny_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def pairs():
    """Eight pairs of mixed lengths (so batches are padded)."""
    from eapcore.data import PromptPairs

    clean = ["a b c d", "b c d e f", "c d e", "d e f g h i", "e f g h", "a c e g", "b d f h j", "c a b"]
    corrupted = ["e b c d", "a c d e f", "f d e", "a e f g h i", "b f g h", "i c e g", "k d f h j", "l a b"]
    correct = ["e", "g", "f", "j", "i", "i", "l", "c"]
    incorrect = ["a", "b", "c", ["d", "e"], "f", "g", "h", "i"]
    return PromptPairs.from_lists(clean, corrupted, correct, incorrect)
