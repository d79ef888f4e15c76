"""What the tokenizer makes of prompt pairs: a position-by-position diff of a pair, and the words it
cannot represent (mapped to its unknown token, so the model never sees them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eapcore.data import PromptPairs


def token_diff(tokenizer: Any, clean: str, corrupted: str) -> list[tuple[str, str, bool]]:
    """``[(clean_token, corrupted_token, differs)]`` position by position (no BOS); the shorter prompt
    is padded with ``''`` so a length mismatch shows."""
    def pieces(text: str) -> list[str]:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return [tokenizer.decode([i]) for i in ids]

    a, b = pieces(clean), pieces(corrupted)
    n = max(len(a), len(b))
    a += [""] * (n - len(a))
    b += [""] * (n - len(b))
    return [(x, y, x != y) for x, y in zip(a, b)]


@dataclass(frozen=True)
class UnknownWord:
    """A piece of a prompt that the tokenizer maps to its unknown token. ``row`` counts from 1."""

    row: int
    column: str  # clean or corrupted
    word: str


def unknown_words(tokenizer: Any, pairs: PromptPairs, limit: int = 20) -> list[UnknownWord]:
    """Up to ``limit`` words of the prompts that become the unknown token (none for byte-level
    tokenizers such as GPT-2's, which have no unknown token)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    found: list[UnknownWord] = []
    for row, texts in enumerate(zip(pairs.clean, pairs.corrupted), start=1):
        for column, text in zip(("clean", "corrupted"), texts):
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            for token, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
                if token == unk:
                    found.append(UnknownWord(row, column, text[start:end]))
                    if len(found) >= limit:
                        return found
    return found
