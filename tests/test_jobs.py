"""Batch jobs: expanding a TOML job file, running it headless, resuming, and opening the results in the app."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from eapcore.attribute import AttributionSpec, attribute
from eapcore.cli import main
from eapcore.data import PromptPairs, tokenize
from eapcore.export import load_pt
from eapcore.jobfile import JobError, load_job
from eapcore.models import model_graph

CSV = "clean,corrupted,correct,incorrect\n" + "\n".join(
    ",".join(r) for r in [("a b c d", "e b c d", "e", "a"), ("b c d e f", "a c d e f", "g", "b"), ("c d e", "f d e", "f", "c")]
)


def write_job(folder: Path, model: Path, **extra: str) -> Path:
    (folder / "pairs.csv").write_text(CSV)
    lines = [
        f'models = [{{name = "tiny", path = "{model}"}}]',
        'tasks = [{name = "abc", csv = "pairs.csv"}]',
        'methods = ["EAP", "EAP-IG-inputs"]',
        "ig_steps = [2, 3]",
        'interventions = ["patching", "zero"]',
        "batch_size = 2",
        'device = "cpu"',
        *(f"{k} = {v}" for k, v in extra.items()),
    ]
    path = folder / "job.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


EXPECTED = {
    "tiny__abc__EAP__patching__edge.pt": "pending",
    "tiny__abc__EAP__zero__edge.pt": "pending",
    "tiny__abc__EAP-IG-inputs-2__patching__edge.pt": "pending",
    "tiny__abc__EAP-IG-inputs-3__patching__edge.pt": "pending",
    "tiny__abc__EAP-IG-inputs-2__zero__edge.pt": "invalid",
    "tiny__abc__EAP-IG-inputs-3__zero__edge.pt": "invalid",
}


def test_job_expands_combinations_once(tmp_path, tiny_dir):
    job = load_job(write_job(tmp_path, tiny_dir))
    assert [r.file for r in job.runs] == list(EXPECTED)  # EAP has no steps: one run per intervention
    invalid = {r.file: r.invalid for r in job.runs if r.invalid}
    assert set(invalid) == {f for f, s in EXPECTED.items() if s == "invalid"}
    assert all("patching" in why for why in invalid.values())
    assert job.runs[0].task.csv == str((tmp_path / "pairs.csv").resolve())
    assert job.runs[0].settings.metric == "logit_diff" and job.batch_size == 2


@pytest.mark.parametrize("text,message", [
    ('models = ["demo"]\ntasks = ["ioi"]\nmethod = "EAP"\n', "unknown key"),
    ('models = ["demo"]\ntasks = ["ioi"]\nmethods = ["EAPX"]\n', "unknown method 'EAPX'"),
    ('models = ["demo"]\ntasks = ["nope"]\n', "not a shipped task"),
    ('tasks = ["ioi"]\n', "models is missing"),
    ('models = ["demo"]\ntasks = [{name = "x", csv = "missing.csv"}]\n', "does not exist"),
    ('models = ["demo"]\ntasks = ["ioi"]\nig_steps = [0]\n', "not a positive integer"),
    ('models = ["demo", "demo"]\ntasks = ["ioi"]\n', "both write"),
    ('models = [\n', "not valid TOML"),
])
def test_bad_job_files_say_what_to_fix(tmp_path, text, message):
    path = tmp_path / "job.toml"
    path.write_text(text)
    with pytest.raises(JobError, match=message):
        load_job(path)


def test_run_jobs_writes_results_the_app_opens_and_resumes(tmp_path, tiny_dir, tiny32, capsys):
    from ui.exports import read_circuit

    job = write_job(tmp_path, tiny_dir)
    out = tmp_path / "results"
    assert main(["run-jobs", str(job), "--out-dir", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    status = {r["file"]: r["status"] for r in manifest["runs"]}
    assert status == {f: ("done" if s == "pending" else s) for f, s in EXPECTED.items()}
    assert manifest["counts"]["done"] == 4 and manifest["counts"]["invalid"] == 2
    written = sorted(p.name for p in out.glob("*.pt"))
    assert written == sorted(f for f, s in EXPECTED.items() if s == "pending")
    assert not list(out.glob("*.tmp"))

    # each file is the standard format: the same scores as attribute(), provenance, and the app's import opens it
    data = tokenize(PromptPairs.from_csv(tmp_path / "pairs.csv"), tiny32.tokenizer, tiny32.cfg.n_ctx)
    scores, _ = load_pt(out / "tiny__abc__EAP-IG-inputs-3__patching__edge.pt", expected=model_graph(tiny32))
    direct = attribute(tiny32, data, AttributionSpec("EAP-IG-inputs", 3, "logit_diff", "patching", 2))
    torch.testing.assert_close(scores.edges, direct.edges)
    assert scores.provenance["model"] == str(tiny_dir) and scores.provenance["job"]["run"].startswith("tiny__abc")
    for name in written:
        app_scores, app_circuit, key = read_circuit(name, (out / name).read_bytes(), model_graph(tiny32))
        assert app_circuit.n_edges == app_scores.graph.n_edges and key.startswith("import:")

    # a second run skips everything; a deleted result is recomputed; changed data makes a result stale
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.pt")}
    capsys.readouterr()
    assert main(["run-jobs", str(job), "--out-dir", str(out)]) == 0
    assert "0 to run, 4 already done, 2 invalid" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.pt")} == mtimes
    statuses = {r["file"]: r["status"] for r in json.loads((out / "manifest.json").read_text())["runs"]}
    assert sorted(statuses.values()).count("exists") == 4

    os.remove(out / "tiny__abc__EAP__zero__edge.pt")
    assert main(["run-jobs", str(job), "--out-dir", str(out)]) == 0
    statuses = {r["file"]: r["status"] for r in json.loads((out / "manifest.json").read_text())["runs"]}
    assert statuses["tiny__abc__EAP__zero__edge.pt"] == "done" and list(statuses.values()).count("exists") == 3

    (tmp_path / "pairs.csv").write_text(CSV.replace("c d e,f d e,f,c", "c d e,a d e,f,c"))
    assert main(["run-jobs", str(job), "--out-dir", str(out)]) == 0
    statuses = {r["file"]: r["status"] for r in json.loads((out / "manifest.json").read_text())["runs"]}
    assert list(statuses.values()).count("done") == 4


def test_failed_runs_are_recorded_and_the_job_exits_nonzero(tmp_path, tiny_dir, capsys):
    job = write_job(tmp_path, tiny_dir, metric='"prob_diff"')
    (tmp_path / "pairs.csv").write_text(CSV.replace(",e,a", ",zzz,a"))  # an answer outside the vocabulary
    out = tmp_path / "results"
    assert main(["run-jobs", str(job), "--out-dir", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("eapcore run-jobs: error: 4 run(s) failed") and "zzz" in err[-1]
    runs = json.loads((out / "manifest.json").read_text())["runs"]
    assert {r["status"] for r in runs} == {"failed", "invalid"}
    assert all("zzz" in r["message"] for r in runs if r["status"] == "failed")


def test_dry_run_lists_runs_with_estimates(tmp_path, tiny_dir, capsys):
    job = write_job(tmp_path, tiny_dir)
    assert main(["run-jobs", str(job), "--out-dir", str(tmp_path / "r"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "tiny__abc__EAP__patching__edge.pt" in out and "MiB" in out and "invalid" in out
    assert not (tmp_path / "r").exists()


def test_example_job_file_is_valid():
    job = load_job(Path(__file__).resolve().parent.parent / "examples" / "job.toml")
    assert len(job.runs) == 6 and not any(r.invalid for r in job.runs)
