"""MIB submissions on the Export page: runs written in MIB's folder layout into a zip
(:func:`eapcore.mib.write_folder`, then :func:`eapcore.mib.check_submission` on what was written), an
uploaded zip checked the same way, names suggested for each run, and a report shown line by line."""

from __future__ import annotations

import io
import re
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Sequence

import streamlit as st

from eapcore.circuit import Scores
from eapcore.mib import TASKS, Report, check_submission, find_model, folder_name, model_of_graph, task_name, write_folder

FOLDER = "mib_submission"  # the zip's top folder: upload what it holds
MAX_UNPACKED = 2 * 2**30  # a zip that unpacks to more is refused (MIB's largest graph's scores are ~15 MB)


def suggested_task(scores: Scores, data_label: str | None) -> str | None:
    """The task a run records (run-jobs), else the session's shipped task (``task: ioi``), in MIB's spelling."""
    named = scores.provenance.get("task") or (data_label[len("task: "):] if data_label and data_label.startswith("task: ") else None)
    return task_name(str(named)) if named else None


def suggested_model(scores: Scores) -> str:
    """MIB's name for the run's graph or recorded model; else the recorded model's last path part, in the
    letters, digits, '.' and '-' that a folder name allows."""
    recorded = str(scores.provenance.get("model") or "model")
    mib = model_of_graph(scores.graph.cfg) or find_model(recorded)
    return mib.name if mib else re.sub(r"[^A-Za-z0-9.\-]+", "-", Path(recorded).name).strip("-") or "model"


def task_options(suggested: str | None) -> list[str]:
    return list(TASKS) + ([suggested] if suggested and suggested not in TASKS else [])


def write_zip(entries: Sequence[tuple[str, Scores, str, str]], circuits: bool, fmt: str, absolute: bool) -> tuple[bytes, Report]:
    """``entries`` (run label, scores, task, model) written as ``mib_submission/{task}_{model}/`` (importance
    scores, or the 9 binary circuits), zipped; with the check of the folder written. Two runs for one
    folder are refused, naming both."""
    folders: dict[str, str] = {}
    for label, scores, task, model in entries:
        name = folder_name(scores, task, model, circuits)
        if name in folders:
            raise ValueError(f"{folders[name]} and {label} both go to {name}; MIB takes one run per task and model")
        folders[name] = label
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / FOLDER
        for _, scores, task, model in entries:
            write_folder(root, scores, task, model, circuits=circuits, fmt=fmt, absolute=absolute)
        report = _relative(check_submission(root), root, FOLDER)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(root.rglob("*")):
                if path.is_file():
                    zf.write(path, path.relative_to(tmp).as_posix())
    return buf.getvalue(), report


def check_zip(name: str, data: bytes) -> Report:
    """Check an uploaded zip of a submission folder as MIB reads it (files are unpacked into a temporary
    folder, never unpickled). The zip may hold the ``{task}_{model}`` folders or one folder around them."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise ValueError(f"{name} is not a zip file; zip the submission folder (the one holding the {{task}}_{{model}} "
                         "folders) and upload the .zip")
    with zipfile.ZipFile(io.BytesIO(data)) as zf, tempfile.TemporaryDirectory() as tmp:
        members = [m for m in zf.infolist() if not m.is_dir() and not _hidden(m.filename)]
        unpacked = sum(m.file_size for m in members)
        if unpacked > MAX_UNPACKED:
            raise ValueError(f"{name} unpacks to {unpacked / 2**30:.1f} GiB, more than the {MAX_UNPACKED // 2**30} GiB "
                             "limit; check the folders one at a time")
        for m in members:
            parts = PurePosixPath(m.filename.replace("\\", "/")).parts
            if m.filename.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                raise ValueError(f"{name} holds {m.filename!r}, a path outside the folder; zip the folder itself")
            target = Path(tmp).joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(m))
        root = Path(tmp)
        inner = [p for p in root.iterdir()]
        if len(inner) == 1 and inner[0].is_dir() and any(p.is_dir() for p in inner[0].iterdir()):
            root = inner[0]  # one folder around the {task}_{model} folders
        return _relative(check_submission(root), Path(tmp), name)


def _hidden(filename: str) -> bool:
    """What zip tools add beside the files (macOS resource forks, Finder's metadata)."""
    parts = PurePosixPath(filename).parts
    return any(p == "__MACOSX" or p == ".DS_Store" for p in parts)


def _relative(report: Report, tmp: Path, shown: str) -> Report:
    """The report with the temporary folder's path written as ``shown``."""
    fix = lambda text: text.replace(str(tmp), shown)  # noqa: E731
    return Report(Path(shown), [fix(p) for p in report.problems], [fix(w) for w in report.warnings],
                  [fix(n) for n in report.notes], dict(report.folders))


def show_report(report: Report) -> None:
    """Problems (MIB would reject or mis-score the folder), warnings, notes and the folders that pass."""
    if report.ok:
        st.success(f"Passes MIB's format check: {len(report.folders)} folder(s) "
                   f"({'; '.join(f'{k}: {v}' for k, v in report.folders.items())}).", icon=":material/check_circle:")
    else:
        st.error(f"MIB would reject this submission: {len(report.problems)} problem(s).", icon=":material/error:")
    for line in report.problems:
        st.markdown(f"- :red[**problem**] {line}")
    for line in report.warnings:
        st.markdown(f"- :orange[**warning**] {line}")
    for line in report.notes:
        st.markdown(f"- **note** {line}")
