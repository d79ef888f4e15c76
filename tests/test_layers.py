"""The engine is a library: importing every module of ``eapcore`` loads no Streamlit and no app code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_eapcore_never_imports_streamlit_or_the_app() -> None:
    code = (
        "import importlib, pkgutil, sys, eapcore\n"
        "names = [m.name for m in pkgutil.walk_packages(eapcore.__path__, 'eapcore.') if not m.name.endswith('__main__')]\n"
        "for name in names: importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('streamlit', 'ui', 'pages'))\n"
        "print(len(names), bad)\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    n, _ = out.stdout.split(" ", 1)
    assert int(n) > 40  # every module was imported, not none
