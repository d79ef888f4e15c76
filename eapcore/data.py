"""Prompt pairs: from a CSV, JSON Lines, a DataFrame or lists to validated, tokenized, right-padded batches.

A pair is a clean prompt, a corrupted prompt of the same token length, and its answers: ``correct``
and ``incorrect`` token strings. A cell that starts with ``[`` is a JSON list of token strings (a set
of answers, e.g. every year above the start year for greater-than). The read-out position is each
example's last real token. A table may instead be in the columns of one of MIB's task datasets
(:mod:`eapcore.mib_data`), as a CSV of flattened columns or as the JSON Lines ``datasets`` writes.
"""

from __future__ import annotations

import codecs
import contextlib
import difflib
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

import torch

COLUMNS = ("clean", "corrupted", "correct", "incorrect")
MAX_ROWS = 50_000
MAX_CSV_BYTES = 50 * 2**20  # the app's upload limit too (.streamlit/config.toml: maxUploadSize = 50)
_QUOTING = (
    'put cells that hold commas, quotes or newlines in double quotes ("a, b"; a quote inside is written "") '
    "so that every row has the header's columns"
)


class DataError(ValueError):
    """Bad prompt-pair input; the message names the row, the value and the fix."""


def _parse_answers(cell: Any, row: int, column: str) -> tuple[str, ...]:
    if not isinstance(cell, str) or cell.strip() == "":
        raise DataError(f"row {row}: column {column!r} is empty; give the answer token, e.g. 'Mary'")
    if cell.lstrip().startswith("["):
        try:
            items = json.loads(cell)
        except json.JSONDecodeError as e:
            raise DataError(
                f"row {row}: column {column!r} starts with '[' but is not a JSON list ({e.msg}): {cell!r}; "
                'write a list of token strings such as ["46", "47"]'
            ) from None
        if not items or not all(isinstance(x, str) and x != "" for x in items):
            raise DataError(f"row {row}: column {column!r} must be a non-empty list of token strings, got {cell!r}")
        return tuple(items)
    return (cell,)


@dataclass(frozen=True)
class PromptPairs:
    """Validated (but not yet tokenized) prompt pairs."""

    clean: tuple[str, ...]
    corrupted: tuple[str, ...]
    correct: tuple[tuple[str, ...], ...]
    incorrect: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return len(self.clean)

    @classmethod
    def from_lists(
        cls,
        clean: Sequence[str],
        corrupted: Sequence[str],
        correct: Sequence[str | Sequence[str]],
        incorrect: Sequence[str | Sequence[str]],
    ) -> "PromptPairs":
        n = len(clean)
        if not (len(corrupted) == len(correct) == len(incorrect) == n):
            raise DataError(
                f"clean, corrupted, correct and incorrect must have the same length, got "
                f"{n}, {len(corrupted)}, {len(correct)}, {len(incorrect)}"
            )
        if n == 0:
            raise DataError("no prompt pairs given; provide at least one row with clean, corrupted, correct, incorrect")
        if n > MAX_ROWS:
            raise DataError(f"{n} prompt pairs is more than the limit of {MAX_ROWS}; use a sample of the data")

        def answers(cell: Any, row: int, column: str) -> tuple[str, ...]:
            if isinstance(cell, (list, tuple)):
                return _parse_answers(json.dumps(list(cell)), row, column)
            return _parse_answers(cell, row, column)

        for row, (c, k) in enumerate(zip(clean, corrupted), start=1):
            for column, text in (("clean", c), ("corrupted", k)):
                if not isinstance(text, str) or text.strip() == "":
                    raise DataError(f"row {row}: the {column} prompt is empty (or only whitespace); write the prompt text")
        return cls(
            clean=tuple(clean),
            corrupted=tuple(corrupted),
            correct=tuple(answers(a, r, "correct") for r, a in enumerate(correct, start=1)),
            incorrect=tuple(answers(a, r, "incorrect") for r, a in enumerate(incorrect, start=1)),
        )

    @classmethod
    def from_frame(cls, frame: Any) -> "PromptPairs":
        columns = [str(c).strip() for c in frame.columns]
        missing = [c for c in COLUMNS if c not in columns]
        if missing:
            from eapcore.mib_data import describe_layouts, pair_columns

            cells = pair_columns(frame)
            if cells is not None:
                return cls.from_lists(*cells)
            raise DataError(
                f"missing column(s) {', '.join(missing)}; found {columns}{_rename_hint(missing, columns)}. "
                f"The table needs the columns {', '.join(COLUMNS)}, or those of an MIB task dataset: {describe_layouts(columns)}"
            )
        frame = frame.rename(columns=lambda c: str(c).strip())
        cells = {c: [None if _is_missing(v) else v for v in frame[c].tolist()] for c in COLUMNS}
        return cls.from_lists(*(cells[c] for c in COLUMNS))

    @classmethod
    def from_csv(cls, source: str | Path | bytes | IO, max_bytes: int = MAX_CSV_BYTES) -> "PromptPairs":
        """Read a CSV path, bytes or file object (UTF-8; quoted cells may hold commas and newlines).

        Memory stays bounded by the limits, not by the file: a file over ``max_bytes`` is refused before
        it is read, the bytes are decoded as they are parsed (no decoded copy of the whole file), and
        parsing stops after ``MAX_ROWS + 1`` rows."""
        import pandas as pd

        with _csv_handle(source, max_bytes) as (handle, encoding):
            try:
                frame = pd.read_csv(handle, dtype=str, keep_default_na=False, nrows=MAX_ROWS + 1, encoding=encoding)
            except pd.errors.EmptyDataError:
                raise DataError(
                    "the CSV is empty; it needs a header row clean,corrupted,correct,incorrect and data rows"
                ) from None
            except UnicodeDecodeError:
                raise DataError(_utf8_problem(handle)) from None
            except pd.errors.ParserError as e:
                detail = str(e).replace("Error tokenizing data. C error: ", "").strip()
                raise DataError(f"the CSV could not be parsed ({detail}); {_QUOTING}") from None
        if not isinstance(frame.index, pd.RangeIndex):  # pandas made the extra leading cells an index
            raise DataError(
                f"row 1 has more cells than the header's {len(frame.columns)} columns {list(frame.columns)}; {_QUOTING}"
            )
        if len(frame) > MAX_ROWS:
            raise DataError(
                f"the CSV has more than the limit of {MAX_ROWS} prompt pairs (reading stopped at row {MAX_ROWS + 1}); "
                f"keep at most {MAX_ROWS} rows, e.g. a random sample, and load it again"
            )
        if len(frame) == 0 and set(COLUMNS) <= {str(c).strip() for c in frame.columns}:
            raise DataError("the CSV has a header row but no prompt pairs; add one row per pair below the header")
        return cls.from_frame(frame)

    @classmethod
    def from_json(cls, source: str | Path | bytes | IO, max_bytes: int = MAX_CSV_BYTES) -> "PromptPairs":
        """Read JSON Lines (one object per line, as ``datasets``' ``to_json`` writes) or a JSON array of
        objects, with the columns of a CSV or of an MIB task dataset (nested objects allowed)."""
        import pandas as pd

        with _csv_handle(source, max_bytes) as (handle, _):
            raw = handle.read()
        try:
            text = raw if isinstance(raw, str) else bytes(raw).decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"the file is not UTF-8 text (byte {e.start} is 0x{raw[e.start]:02x}); save it as UTF-8") from None
        return cls.from_frame(pd.json_normalize(_json_records(text)))

    @classmethod
    def from_file(cls, path: str | Path) -> "PromptPairs":
        """:meth:`from_json` for ``.json``/``.jsonl`` files, else :meth:`from_csv`."""
        return cls.from_json(path) if Path(path).suffix.lower() in (".json", ".jsonl") else cls.from_csv(path)

    def fingerprint(self) -> str:
        """A short content hash, used for caching and provenance."""
        blob = json.dumps([self.clean, self.corrupted, self.correct, self.incorrect]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _json_records(text: str) -> list[dict]:
    """The objects of a JSON array or of JSON Lines; errors name the line."""
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"the JSON could not be parsed ({e.msg} at line {e.lineno}, column {e.colno}); the file "
                            "may be truncated: export it again") from None
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"line {number} is not valid JSON ({e.msg}): {line[:60]!r}; write one JSON object per "
                                "line (JSON Lines), or one JSON array of objects") from None
            if len(records) > MAX_ROWS:
                break
    bad = next((i for i, r in enumerate(records, start=1) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"row {bad} is {records[bad - 1]!r:.60}, not an object with named fields such as "
                        '{"clean": ..., "corrupted": ..., "correct": ..., "incorrect": ...}')
    if not records:
        raise DataError("the file holds no rows; write one JSON object per prompt pair")
    if len(records) > MAX_ROWS:
        raise DataError(f"the file has more than the limit of {MAX_ROWS} prompt pairs; keep at most {MAX_ROWS} rows, "
                        "e.g. a random sample, and load it again")
    return records


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _rename_hint(missing: list[str], found: list[str]) -> str:
    """``; rename 'Clean' to 'clean'`` for found columns that look like a missing one (case, typos)."""
    spare = [c for c in found if c not in COLUMNS]
    hints = []
    for name in missing:
        close = difflib.get_close_matches(name, [c.lower() for c in spare], n=1, cutoff=0.7)
        if close:
            match = next(c for c in spare if c.lower() == close[0])
            spare.remove(match)
            hints.append(f"rename {match!r} to {name!r}")
    return f"; {', '.join(hints)}" if hints else ""


@contextlib.contextmanager
def _csv_handle(source: Any, max_bytes: int) -> Iterator[tuple[Any, str | None]]:
    """(handle, encoding) for ``pd.read_csv``: a binary handle decoded as UTF-8 while parsing, or a text
    handle as given. Refuses a file of more than ``max_bytes`` before reading it."""
    if isinstance(source, (str, os.PathLike)):
        _check_size(os.path.getsize(source), max_bytes)
        with open(source, "rb") as f:
            yield f, "utf-8-sig"
        return
    if isinstance(source, io.TextIOBase):
        yield source, None
        return
    handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    if handle.seekable():
        start = handle.tell()
        _check_size(handle.seek(0, io.SEEK_END) - start, max_bytes)
        handle.seek(start)
    yield handle, "utf-8-sig"


def _check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise DataError(
            f"the CSV is {size / 2**20:.1f} MB, more than the limit of {max_bytes / 2**20:.0f} MB; split it into "
            f"smaller files (at most {MAX_ROWS} pairs are used from one file)"
        )


def _utf8_problem(handle: Any) -> str:
    """Where a binary CSV stops being UTF-8: byte offset, line and the text before it, read in 1 MiB chunks."""
    handle.seek(0)
    offset, line, pending = 0, 1, b""
    while True:
        chunk = handle.read(1 << 20)
        data = pending + chunk
        try:
            _, used = codecs.utf_8_decode(data, "strict", not chunk)
        except UnicodeDecodeError as e:
            before = data[max(0, e.start - 30) : e.start].decode("utf-8", "replace").splitlines()
            line += data.count(b"\n", 0, e.start)
            after = f", after {before[-1]!r}" if before and before[-1] else ""
            return (
                f"the CSV is not UTF-8 text: byte {offset + e.start} (line {line}{after}) is 0x{data[e.start]:02x}; "
                "save the file as UTF-8 (e.g. Excel: Save As "
                "'CSV UTF-8'; or iconv -f latin1 -t utf-8) and load it again"
            )
        if not chunk:
            return "the CSV is not UTF-8 text; save the file as UTF-8 and load it again"
        line += data.count(b"\n", 0, used)
        offset, pending = offset + used, data[used:]


@dataclass(frozen=True, eq=False)
class Batch:
    """One right-padded batch. ``clean``/``corrupted``: ``[batch pos]`` token ids; ``lengths``: ``[batch]``;
    ``correct``/``incorrect``: ``[batch k]`` answer ids with boolean masks of the same shape."""

    clean: torch.Tensor
    corrupted: torch.Tensor
    lengths: torch.Tensor
    correct: torch.Tensor
    correct_mask: torch.Tensor
    incorrect: torch.Tensor
    incorrect_mask: torch.Tensor

    @property
    def size(self) -> int:
        return self.clean.shape[0]

    @property
    def n_pos(self) -> int:
        return self.clean.shape[1]

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


@dataclass(frozen=True, eq=False)
class TokenizedPairs:
    """All pairs tokenized once; :meth:`batches` slices and trims them."""

    data: Batch
    fingerprint: str

    def __len__(self) -> int:
        return self.data.size

    def batches(self, batch_size: int, device: torch.device | str = "cpu") -> Iterator[Batch]:
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        d = self.data
        for start in range(0, d.size, batch_size):
            sl = slice(start, start + batch_size)
            n_pos = int(d.lengths[sl].max())
            yield Batch(
                d.clean[sl, :n_pos], d.corrupted[sl, :n_pos], d.lengths[sl],
                d.correct[sl], d.correct_mask[sl], d.incorrect[sl], d.incorrect_mask[sl],
            ).to(device)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _answer_ids(tokenizer: Any, answers: tuple[str, ...], row: int, column: str) -> list[int]:
    ids = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for answer in answers:
        tokens = _encode(tokenizer, answer)
        if len(tokens) != 1:
            pieces = tokenizer.convert_ids_to_tokens(tokens)
            raise DataError(
                f"row {row}: {column} answer {answer!r} is {len(tokens)} tokens {pieces}, not one; use a "
                "single-token answer (GPT-2-style tokenizers usually need the leading space, e.g. ' Mary')"
            )
        if unk is not None and tokens[0] == unk:
            raise DataError(f"row {row}: {column} answer {answer!r} is not in the tokenizer's vocabulary; pick a known word")
        ids.append(tokens[0])
    return ids


def _pad(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return ids, mask


def tokenize(pairs: PromptPairs, tokenizer: Any, n_ctx: int | None = None) -> TokenizedPairs:
    """Tokenize every pair once (BOS prepended when the tokenizer has one) and validate lengths."""
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    clean, corrupted, correct, incorrect = [], [], [], []
    for row in range(1, len(pairs) + 1):
        c = bos + _encode(tokenizer, pairs.clean[row - 1])
        k = bos + _encode(tokenizer, pairs.corrupted[row - 1])
        if len(c) != len(k):
            raise DataError(
                f"row {row}: the clean prompt is {len(c)} tokens but the corrupted prompt is {len(k)} "
                f"(clean {pairs.clean[row - 1]!r}, corrupted {pairs.corrupted[row - 1]!r}); edit the corrupted "
                "prompt so both have the same number of tokens"
            )
        if n_ctx is not None and len(c) > n_ctx:
            start = pairs.clean[row - 1][:40] + ("..." if len(pairs.clean[row - 1]) > 40 else "")
            raise DataError(
                f"row {row}: the prompt is {len(c)} tokens, longer than the model's context of {n_ctx} (clean "
                f"{start!r}); shorten it to at most {n_ctx - len(bos)} tokens or use a model with a longer context"
            )
        clean.append(c)
        corrupted.append(k)
        correct.append(_answer_ids(tokenizer, pairs.correct[row - 1], row, "correct"))
        incorrect.append(_answer_ids(tokenizer, pairs.incorrect[row - 1], row, "incorrect"))
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    clean_ids, _ = _pad(clean, pad)
    corrupted_ids, _ = _pad(corrupted, pad)
    correct_ids, correct_mask = _pad(correct, 0)
    incorrect_ids, incorrect_mask = _pad(incorrect, 0)
    lengths = torch.tensor([len(c) for c in clean], dtype=torch.long)
    batch = Batch(clean_ids, corrupted_ids, lengths, correct_ids, correct_mask, incorrect_ids, incorrect_mask)
    return TokenizedPairs(batch, pairs.fingerprint())
