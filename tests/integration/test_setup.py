"""Setting pvpn up on a machine (issue 10 section 3): pip builds it through PEP 517 with the
data files in place, and a fresh root shell can run the README's commands as written."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEBIAN_PYTHON = Path("/usr/bin/python3")  # what scripts/run builds the venv from
SHIPPED_DATA = ["share/pvpn/supervisord.d/supervisord.conf",
                "share/pvpn/supervisord.d/pvpn-client.conf",
                "share/pvpn/supervisord.d/pvpn-server.conf",
                "share/pvpn/supervisord.d/pvpn-gateway.conf"]


def checkout_copy(into: Path) -> Path:
    """The checkout's sources without build leftovers, so a build sees only what git has."""
    junk = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                  ".mypy_cache", ".hypothesis", ".venv")
    return Path(shutil.copytree(ROOT, into, ignore=junk))


def test_debian_pip_builds_pvpn_through_pep_517(tmp_path: Path) -> None:
    """The pip a fresh venv of Debian 12's python3 comes with (23.0) built pvpn with the
    deprecated `setup.py install` while there was no pyproject.toml; now it builds a wheel
    through the PEP 517 backend, and the data files still land in VENV/share/pvpn."""
    if not DEBIAN_PYTHON.exists():
        pytest.skip(f"no {DEBIAN_PYTHON}")
    source = checkout_copy(tmp_path / "wti-src")
    venv = tmp_path / "wti-venv"
    subprocess.run([str(DEBIAN_PYTHON), "-m", "venv", str(venv)], check=True, timeout=120)
    proc = subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "--no-deps",
                           "--disable-pip-version-check", str(source)],
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "setup.py install" not in out and "DEPRECATION" not in out, out
    assert "Building wheel for pvpn (pyproject.toml)" in out, out
    for name in SHIPPED_DATA:
        assert (venv / name).is_file(), name
    # pvpn.client is client/ of the checkout, installed inside the pvpn package.
    site = next((venv / "lib").glob("python3*/site-packages"))
    for module in ("pvpn/cli.py", "pvpn/client/daemon.py", "pvpn/server/daemon.py",
                   "pvpn/gateway/daemon.py", "pvpn/io/__init__.py", "pvpn/py.typed"):
        assert (site / module).is_file(), module
    assert not (site / "client").exists()
    requires = subprocess.run([str(venv / "bin/python"), "-c",
                               "from importlib.metadata import requires; "
                               "print('\\n'.join(requires('pvpn')))"],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path).stdout
    assert 'scapy>=2.5; extra == "trace"' in requires, requires
    assert (venv / "bin/pvpn-server").exists() and (venv / "bin/pvpn").exists()
