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


# ---------------------------------------------------------------- scripts/venv


def venv_script(venv: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(ROOT / "scripts/venv"), str(venv)],
                          capture_output=True, text=True, timeout=300)


def pip_major(venv: Path) -> int:
    out = subprocess.run([str(venv / "bin/python"), "-c", "import pip; print(pip.__version__)"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return int(out.split(".")[0])


def test_scripts_run_makes_its_venv_with_scripts_venv() -> None:
    run = (ROOT / "scripts/run").read_text()
    assert 'bash "$checkout/scripts/venv" "$venv"' in run
    assert "-m venv" not in run  # no second way of making it


def test_an_interrupted_venv_is_built_again(tmp_path: Path) -> None:
    """A first run stopped before pip could upgrade itself left a venv that the next run
    took as it was; a venv without the marker is now removed and made anew."""
    if not DEBIAN_PYTHON.exists():
        pytest.skip(f"no {DEBIAN_PYTHON}")
    venv = tmp_path / "wti-venv"
    subprocess.run([str(DEBIAN_PYTHON), "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=60)
    leftover = venv / "left-by-the-interrupted-run"
    leftover.write_text("")
    proc = venv_script(venv)
    assert proc.returncode == 0, proc.stderr
    assert "incomplete virtual environment" in proc.stderr
    assert (venv / ".pvpn-complete").is_file() and not leftover.exists()
    assert pip_major(venv) >= 24
    # Complete: the next run keeps it as it is.
    leftover.write_text("")
    proc = venv_script(venv)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert leftover.exists()


def test_scripts_venv_removes_nothing_but_a_venv(tmp_path: Path) -> None:
    """A directory without pyvenv.cfg (someone's data), a file, a link: never removed."""
    data = tmp_path / "wti-data"
    data.mkdir()
    (data / "precious").write_text("keep me")
    (data / "bin").mkdir()  # looks a little like a venv, but has no pyvenv.cfg
    proc = venv_script(data)
    assert proc.returncode == 1
    assert "is not a virtual environment (no pyvenv.cfg): not removing it" in proc.stderr
    assert (data / "precious").read_text() == "keep me" and (data / "bin").is_dir()
    assert not (data / ".pvpn-complete").exists()

    plain = tmp_path / "wti-file"
    plain.write_text("keep me")
    proc = venv_script(plain)
    assert proc.returncode == 1 and "is not a directory" in proc.stderr
    assert plain.read_text() == "keep me"

    real = tmp_path / "wti-real-venv"
    real.mkdir()
    (real / "pyvenv.cfg").write_text("home = /usr/bin\n")
    link = tmp_path / "wti-link"
    link.symlink_to(real)
    proc = venv_script(link)
    assert proc.returncode == 1 and "symbolic link" in proc.stderr
    assert link.is_symlink() and (real / "pyvenv.cfg").exists()

    proc = venv_script(Path("relative/wti-venv"))
    assert proc.returncode == 1 and "absolute path" in proc.stderr
