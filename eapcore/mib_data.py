"""The columns of MIB's task datasets (``mib-bench/ioi``, ``copycolors_mcqa``, ``arc_easy``, ``arc_challenge``,
``arithmetic_addition``, ``arithmetic_subtraction``) that give a prompt pair, as MIB's own loader reads them.

A row's nested fields are flattened with dots (``s2_io_flip_counterfactual.prompt``), as ``Dataset.flatten()``
and ``pandas.json_normalize`` name them; :func:`pair_columns` maps a table in one of these layouts to clean,
corrupted, correct and incorrect (docs/mib.md lists the mapping).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from typing import Any

from eapcore.data import DataError

_ITEM = r"""('[^']*'|"[^"]*"|[-\w.]+)"""
_PY_LIST = re.compile(rf"\[\s*{_ITEM}(\s*,\s*{_ITEM})*\s*\]")  # not numpy's "['A' 'B']", which would concatenate


@dataclass(frozen=True)
class Field:
    """Where a prompt-pair value sits in a row of an MIB dataset (nested fields flattened as ``a.b``): a
    ``column``, or the entry of the list ``column`` at the position in ``index``; MIB prepends ``prefix``."""

    column: str
    index: str | None = None
    prefix: str = ""

    def __str__(self) -> str:
        text = f"{self.column}[{self.index}]" if self.index else self.column
        return f"{self.prefix!r} + {text}" if self.prefix else text

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column, self.index) if self.index else (self.column,)

    def value(self, row: dict, number: int) -> str:
        def cell(column: str) -> Any:
            v = row.get(column)
            if v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and not v.strip()):
                raise DataError(f"row {number}: column {column!r} is empty; every MIB row needs it")
            return v

        value = cell(self.column)
        if self.index:
            value = _entry(_as_list(value, self.column, number), cell(self.index), self, number)
        return self.prefix + str(value)


def _as_list(value: Any, column: str, number: int) -> list:
    if isinstance(value, str):  # a list written into a CSV cell: JSON, or Python's repr with commas
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            if _PY_LIST.fullmatch(value.strip()):
                try:
                    value = ast.literal_eval(value.strip())
                except (ValueError, SyntaxError):
                    pass
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"row {number}: column {column!r} must be a list of answer labels such as [\"A\", \"B\"], got "
                        f"{value!r:.80}; export the dataset with Dataset.to_json() to keep its lists")
    return list(value)


def _entry(labels: list, key: Any, f: Field, number: int) -> Any:
    if isinstance(key, str) and key in labels:
        return key
    try:
        i = int(key) if float(key) == int(float(key)) else None
    except (TypeError, ValueError):
        i = None
    if i is None or not 0 <= i < len(labels):
        raise DataError(f"row {number}: {f.index!r} is {key!r}, not a position in {f.column!r} {labels} (0 to "
                        f"{len(labels) - 1}); fix the row or drop it")
    return labels[i]


@dataclass(frozen=True)
class Layout:
    """The columns of MIB's datasets for ``tasks`` that give clean, corrupted, correct and incorrect."""

    name: str
    tasks: tuple[str, ...]
    fields: dict[str, Field]

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys(c for f in self.fields.values() for c in f.columns))

    def __str__(self) -> str:
        return f"{self.name} ({', '.join(f'{k} <- {v}' for k, v in self.fields.items())})"


# What MIB's HFEAPDataset reads (its default counterfactual for each task).
LAYOUTS = (
    Layout("IOI", ("ioi",), {
        "clean": Field("prompt"), "corrupted": Field("s2_io_flip_counterfactual.prompt"),
        "correct": Field("metadata.indirect_object", prefix=" "), "incorrect": Field("metadata.subject", prefix=" "),
    }),
    Layout("MCQA/ARC", ("mcqa", "arc-easy", "arc-challenge"), {
        "clean": Field("prompt"), "corrupted": Field("symbol_counterfactual.prompt"),
        "correct": Field("choices.label", "answerKey"),
        "incorrect": Field("symbol_counterfactual.choices.label", "symbol_counterfactual.answerKey"),
    }),
    Layout("arithmetic", ("arithmetic-addition", "arithmetic-subtraction"), {
        "clean": Field("prompt"), "corrupted": Field("random_counterfactual.prompt"),
        "correct": Field("label"), "incorrect": Field("random_counterfactual.label"),
    }),
)


def describe_layouts(columns: list[str] | None = None) -> str:
    """The layouts, led by what the closest one lacks when ``columns`` share more than ``prompt`` with it."""
    text = "; ".join(str(layout) for layout in LAYOUTS)
    found = set(columns or ())
    shared, layout = max(((len(found & set(lay.columns) - {"prompt"}), lay) for lay in LAYOUTS), key=lambda x: x[0])
    if not shared:
        return text
    lacks = [c for c in layout.columns if c not in found]
    return f"the table looks like MIB's {layout.name} layout but lacks {lacks}. MIB layouts: {text}"


def pair_columns(frame: Any) -> tuple[list[str], list[str], list[str], list[str]] | None:
    """(clean, corrupted, correct, incorrect) of a table in one of MIB's :data:`LAYOUTS` (nested cells, as in
    ``Dataset.to_pandas()``, are flattened first), else ``None``. Raises ``DataError`` naming the row."""
    import pandas as pd

    if any(isinstance(v, dict) for c in frame.columns for v in frame[c].head(1)):
        frame = pd.json_normalize(frame.to_dict("records"))
    frame = frame.rename(columns=lambda c: str(c).strip())
    layout = next((lay for lay in LAYOUTS if set(lay.columns) <= set(frame.columns)), None)
    if layout is None:
        return None
    rows = frame[layout.columns].to_dict("records")
    cells = {k: [f.value(row, i) for i, row in enumerate(rows, start=1)] for k, f in layout.fields.items()}
    return cells["clean"], cells["corrupted"], cells["correct"], cells["incorrect"]
