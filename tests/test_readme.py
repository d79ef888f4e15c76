"""The README's Python example runs as written (from the repository root, where its relative paths
point), importing everything from ``eapcore`` itself, and writes the circuit file it promises."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from eapcore.export import load_circuit
from eapcore.models import DEMO_MODEL_DIR

ROOT = Path(__file__).resolve().parent.parent


def python_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.DOTALL)
    assert blocks, "the README has no Python example"
    return blocks[0]


def test_the_example_imports_from_eapcore_alone() -> None:
    imports = re.findall(r"^(?:from|import) (\S+)", python_example(), re.MULTILINE)
    assert imports == ["eapcore"]


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").exists(), reason="the example runs on the demo model")
def test_the_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    (tmp_path / "assets").symlink_to(ROOT / "assets")  # its paths are relative to the repository root
    monkeypatch.chdir(tmp_path)
    exec(compile(python_example(), "README.md", "exec"), {"__name__": "readme"})
    faithfulness, cpr = map(float, capsys.readouterr().out.split())
    assert 0 < faithfulness <= 1.5 and 0 < cpr <= 1.5
    scores, circuit = load_circuit(tmp_path / "ioi.pt")
    assert scores.provenance["model"] == "demo" and circuit.n_edges <= 100
