"""Prompt-pair parsing and validation: every bad input names the row, the value and the fix."""

from __future__ import annotations

import pandas as pd
import pytest

from eapcore.data import DataError, PromptPairs, tokenize

HEADER = "clean,corrupted,correct,incorrect\n"


def test_csv_with_quoted_commas_and_newlines_parses():
    csv = HEADER + '"a b, c\nd",e b c d,e,"[""a"", ""b""]"\n'
    pairs = PromptPairs.from_csv(csv.encode())
    assert pairs.clean == ("a b, c\nd",) and pairs.incorrect == (("a", "b"),)


def test_frame_and_lists_agree():
    frame = pd.DataFrame({"clean": ["a b"], "corrupted": ["c b"], "correct": ["d"], "incorrect": ["e"]})
    assert PromptPairs.from_frame(frame) == PromptPairs.from_lists(["a b"], ["c b"], ["d"], ["e"])


@pytest.mark.parametrize(
    "csv, message",
    [
        (b"", "CSV is empty"),
        (b"clean,corrupt,correct,incorrect\na,b,c,d\n", "missing column.*corrupted"),
        (HEADER.encode() + b"\xff\xfe,a,b,c\n", "not UTF-8"),
        (HEADER.encode() + b" ,a b,c,d\n", "row 1: the clean prompt is empty"),
        (HEADER.encode() + b"a b,a b,c,\n", "row 1: column 'incorrect' is empty"),
        (HEADER.encode() + b'a b,a b,c,"[1, 2]"\n', "row 1: column 'incorrect' must be a non-empty list"),
        (HEADER.encode() + b'a b,a b,c,"[oops"\n', "row 1: column 'incorrect' starts with"),
    ],
)
def test_bad_csv_is_rejected_with_a_message(csv, message):
    with pytest.raises(DataError, match=message):
        PromptPairs.from_csv(csv)


@pytest.mark.parametrize(
    "pair, message",
    [
        (("a b c", "a b", "d", "e"), r"row 2: the clean prompt is 4 tokens but the corrupted prompt is 3"),
        (("a b", "c b", "d e", "e"), r"row 2: correct answer 'd e' is 2 tokens"),
        (("a b", "c b", "d", "zebra"), r"row 2: incorrect answer 'zebra' is not in the tokenizer's vocabulary"),
        (("a " * 20, "b " * 20, "d", "e"), r"row 2: the prompt is 21 tokens, longer than the model's context of 16"),
    ],
)
def test_tokenization_errors_name_row_value_and_fix(tiny32, pair, message):
    good = ("a b", "c b", "d", "e")
    pairs = PromptPairs.from_lists(*zip(good, pair))
    with pytest.raises(DataError, match=message):
        tokenize(pairs, tiny32.tokenizer, tiny32.cfg.n_ctx)


def test_tokenize_prepends_bos_pads_right_and_records_lengths(tiny32, pairs):
    data = tokenize(pairs, tiny32.tokenizer)
    bos = tiny32.tokenizer.bos_token_id
    assert (data.data.clean[:, 0] == bos).all()
    assert data.data.lengths.tolist() == [len(c.split()) + 1 for c in pairs.clean]
    batch = next(data.batches(3))
    assert batch.n_pos == max(data.data.lengths[:3]).item()
    assert batch.correct_mask[3 - 3 :, :].sum() >= 3


def test_fingerprint_changes_with_content():
    a = PromptPairs.from_lists(["a"], ["b"], ["c"], ["d"])
    b = PromptPairs.from_lists(["a"], ["b"], ["c"], ["e"])
    assert a.fingerprint() != b.fingerprint() and a.fingerprint() == PromptPairs.from_lists(["a"], ["b"], ["c"], ["d"]).fingerprint()
