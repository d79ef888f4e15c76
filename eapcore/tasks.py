"""The shipped tasks: prompt-pair CSVs in ``assets/tasks`` and the metric each is scored with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from eapcore.models import ASSETS

TASKS_DIR = ASSETS / "tasks"


@dataclass(frozen=True)
class Task:
    name: str
    metric: str
    description: str

    @property
    def csv(self) -> Path:
        return TASKS_DIR / f"{self.name}.csv"


TASKS = {
    t.name: t
    for t in (
        Task("ioi", "logit_diff", "Indirect object identification: 'When Mary and John went to the store, John gave a drink to' -> Mary"),
        Task("greater_than", "prob_diff", "Greater-than: 'The war lasted from the year 1745 to the year 17' -> a year above 45"),
        Task("induction", "logit_diff", "Induction: a random token sequence, then its repetition; predict the next repeated token"),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)} or pass --data FILE.csv")
    return TASKS[name]
