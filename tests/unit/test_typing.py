"""The code stays mypy --strict clean (setup.cfg [mypy]) and ruff clean (ruff.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_mypy_strict() -> None:
    pytest.importorskip("mypy")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "pvpn", "client", "server", "gateway",
         "tests/unit/net.py"],  # the tests' shared network is typed like the code it drives
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_finds_no_mistakes() -> None:
    """Undefined names, unused imports and the like (ruff.toml), over the whole tree."""
    pytest.importorskip("ruff")
    ruff = Path(sys.executable).parent / "ruff"
    proc = subprocess.run([str(ruff), "check", "--no-cache", "--output-format", "concise", "."],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
