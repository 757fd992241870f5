"""The README's demo command runs the lab demo: it must tell its whole story and clean up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_pvpn_lab_demo_tells_the_story_and_leaves_nothing(lab_usable: None) -> None:
    pvpn = Path(sys.executable).parent / "pvpn"
    proc = subprocess.run([str(pvpn), "lab", "demo"], capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for words in ("alice", "bob", "gw1", "gw2", "server", "session"):
        assert words in out, words
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "pvpndemo-" not in namespaces
    assert not Path("/run/pvpn-lab/pvpndemo").exists()
