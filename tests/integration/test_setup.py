"""Setting pvpn up on a machine (issue 10 section 3): pip builds it through PEP 517 with the
data files in place, and a fresh root shell can run the README's commands as written."""

from __future__ import annotations

import configparser
import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEBIAN_PYTHON = Path("/usr/bin/python3")  # what scripts/run builds the venv from
SHIPPED_DATA = ["share/pvpn/supervisord.d/supervisord.conf",
                "share/pvpn/supervisord.d/pvpn-client.conf",
                "share/pvpn/supervisord.d/pvpn-server.conf",
                "share/pvpn/supervisord.d/pvpn-gateway.conf",
                "share/pvpn/systemd/pvpn.service"]


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
    for module in ("pvpn/cli/main.py", "pvpn/client/daemon.py", "pvpn/server/daemon.py",
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


# ---------------------------------------------------------------- a real node, as the README says

README_SECTION = "### A real node under supervisord"
NODE_ADDRESS = "192.0.2.10"  # the README's server, on the namespace's loopback
VENV = Path("/opt/pvpn/venv")  # where the README and the unit find pvpn
# Private (tmpfs) in the test's mount namespace: the host keeps its own.  /usr/local/bin and
# /usr/local/sbin get the links scripts/run makes, to the venv under test.
NODE_DIRS = ("/etc/pvpn", "/var/log/pvpn", "/run/pvpn", "/var/lib/pvpn")
PATH_DIRS = ("/usr/local/bin", "/usr/local/sbin")
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # a root login's
NODE_TIMEOUT = 240  # the whole run in the namespace, set-up to teardown
START_LINE = "(umask 077; supervisord -c /etc/pvpn/supervisord.conf)"
STATUS_LINE = "supervisorctl -c /etc/pvpn/supervisord.conf status"


def readme_node_commands() -> tuple[str, str, list[str]]:
    """The README's ```sh block under "A real node under supervisord": the set-up (with
    `bash scripts/run install` made a no-op: the venv under test is built), the line that
    starts supervisord, and the lines after it, each as written there."""
    text = (ROOT / "README.md").read_text()
    assert README_SECTION in text, "the README lost its section on a real node"
    block = text.split(README_SECTION + "\n", 1)[1].split("```sh\n", 1)[1].split("\n```", 1)[0]
    lines = block.splitlines()
    install = [i for i, line in enumerate(lines) if line.startswith("bash scripts/run install")]
    assert len(install) == 1, block
    lines[install[0]] = ":  # bash scripts/run install: done (the venv under test)"
    starts = [i for i, line in enumerate(lines) if line.split("#")[0].strip() == START_LINE]
    assert len(starts) == 1, block
    setup, start, after = lines[:starts[0]], lines[starts[0]], lines[starts[0] + 1:]
    commands = [line.split("  #")[0].strip() for line in after]
    assert commands[0] == STATUS_LINE, after
    assert commands[1].startswith("pvpn status --node /etc/pvpn/server.toml"), after
    assert f'listen = ["{NODE_ADDRESS}:4433"]' in block
    return "\n".join(setup) + "\n", start.split("#")[0].strip(), commands


def scripts_run_links() -> str:
    """scripts/run's part that puts the programs on the PATH, to run as it is."""
    run = (ROOT / "scripts/run").read_text()
    part = run[run.index("# On the PATH of root and of every user"):run.index("# --- the action")]
    return 'log() { echo "scripts/run: $*" >&2; }\nvenv=/opt/pvpn/venv\n' + part


NAMESPACE_PRELUDE = """\
set -euo pipefail
for dir in {dirs}; do mount -t tmpfs -o mode=0755 wti-node "$dir"; done
{bind}
{links}
ip link set lo up
ip addr add {address}/24 dev lo
cd {work}
"""

# Until the status line shows pvpn-server RUNNING (STARTING for startsecs, 2 s), bounded.
WAIT_RUNNING = """\
for _ in $(seq 100); do
    if {status} >{work}/status.out 2>&1 && grep -q '^pvpn-server  *RUNNING' {work}/status.out
    then break; fi
    sleep 0.2
done
"""

# supervisord (and its program) gone: it removes its pid file before it exits.
WAIT_GONE = """\
for _ in $(seq 150); do
    ps -e -o stat=,comm= | grep -v '^Z' | grep -q -e supervisord -e pvpn -e python || break
    sleep 0.2
done"""

# What is left once supervisord is gone: the processes of the namespace (its own pid
# namespace: only this script's), the node's files, its rules.
LEFT_OVER = """\
ps -e -o pid=,comm= >{work}/ps.out
ls -A /run/pvpn >{work}/run.out
{{ iptables-save; ip6tables-save; }} >{work}/rules.out
echo done >{work}/done.out
"""


def run_in_namespace(work: Path, script: str) -> subprocess.CompletedProcess[str]:
    """``script`` as root in new mount, network and pid namespaces with private tmpfs over the
    node's directories and the PATH's, from a root login's environment.  Every process in it
    dies with it (pid namespace, --kill-child, also at the time-out), its mounts and its
    network with it; the mount points it needed on the host are removed after it if it made
    them."""
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, mounts)")
    if Path(sys.prefix) != VENV and not (VENV / "bin").is_dir():
        pytest.skip(f"no {VENV} to put the venv under test ({sys.prefix}) in place of")
    for program in ("unshare", "ip", "iptables-save", "ps"):
        if shutil.which(program) is None:
            pytest.skip(f"no {program}")
    bind = "" if Path(sys.prefix) == VENV else f"mount --bind {sys.prefix} {VENV}"
    prelude = NAMESPACE_PRELUDE.format(dirs=" ".join(NODE_DIRS + PATH_DIRS), bind=bind,
                                       links=scripts_run_links(), address=NODE_ADDRESS,
                                       work=work)
    (work / "ns.sh").write_text(prelude + script)
    made = [Path(d) for d in NODE_DIRS if not Path(d).exists()]
    try:
        for directory in made:
            directory.mkdir(mode=0o700)
        return subprocess.run(
            ["unshare", "--mount", "--net", "--pid", "--fork", "--kill-child", "--mount-proc",
             "bash", str(work / "ns.sh")],
            env={"PATH": ROOT_PATH, "HOME": "/root", "LANG": "C.UTF-8", "USER": "root",
                 "LOGNAME": "root", "SHELL": "/bin/bash"},
            cwd=work, capture_output=True, text=True, timeout=NODE_TIMEOUT)
    finally:
        for directory in reversed(made):
            with contextlib.suppress(OSError):
                directory.rmdir()  # empty: the node's files were on the namespace's tmpfs


def node_work_dir(tmp_path: Path) -> Path:
    """The working directory, with alice's public key as the README's `cp alice.pub` wants."""
    work = tmp_path / "wti-node"
    work.mkdir()
    keygen = subprocess.run([str(Path(sys.prefix) / "bin/pvpn"), "keygen", "--bits", "2048",
                             "--key", str(work / "id_rsa")],
                            capture_output=True, text=True, timeout=60)
    assert keygen.returncode == 0, keygen.stderr
    shutil.copy(work / "id_rsa.pub", work / "alice.pub")
    return work


def assert_nothing_left(work: Path, proc: subprocess.CompletedProcess[str]) -> None:
    out = proc.stdout + proc.stderr
    assert (work / "done.out").exists(), out
    processes = (work / "ps.out").read_text().split("\n")
    assert not [p for p in processes if any(name in p for name in
                                            ("supervisord", "pvpn", "python"))], processes
    assert (work / "run.out").read_text() == "", "left in /run/pvpn: " + (work / "run.out"
                                                                           ).read_text()
    rules = (work / "rules.out").read_text()
    assert "pvpn" not in rules.lower(), rules


def test_the_readme_node_commands_work_as_written(tmp_path: Path) -> None:
    """The README's commands for a server host, pasted into a root shell (no PVPN_* exported,
    supervisord and supervisorctl found on the PATH): pvpn-server RUNNING, `pvpn status
    --node` answers; supervisord's shutdown leaves nothing behind."""
    setup, start, after = readme_node_commands()
    work = node_work_dir(tmp_path)
    (work / "readme.sh").write_text(setup + start + "\n")
    script = f"""\
bash -euo pipefail {work}/readme.sh >{work}/readme.out 2>&1
{WAIT_RUNNING.format(status=after[0], work=work)}
stat -c '%a %n' /run/pvpn /var/log/pvpn /var/log/pvpn/*.log >{work}/modes.out
{{ iptables-save; ip6tables-save; }} >{work}/rules-running.out
{after[1]} >{work}/node-status.out 2>&1
{after[0].replace(" status", " shutdown")} >/dev/null
{WAIT_GONE}
{LEFT_OVER.format(work=work)}
"""
    proc = run_in_namespace(work, script)
    out = proc.stdout + proc.stderr
    readme_out = (work / "readme.out").read_text() if (work / "readme.out").exists() else ""
    assert proc.returncode == 0, out + readme_out
    status = (work / "status.out").read_text()
    assert re.search(r"^pvpn-server +RUNNING", status, re.M), status + readme_out
    node_status = (work / "node-status.out").read_text()
    assert "Traceback" not in node_status and "server" in node_status, node_status
    assert re.search(r"pvpn-server +RUNNING", node_status), node_status
    modes = dict(reversed(line.split(" ", 1)) for line in
                 (work / "modes.out").read_text().splitlines())
    assert modes["/run/pvpn"] == "711" and modes["/var/log/pvpn"] == "700", modes
    assert modes["/var/log/pvpn/supervisord.log"] == "600", modes
    assert modes["/var/log/pvpn/pvpn-server.log"] == "600", modes
    running = (work / "rules-running.out").read_text()
    assert "-j PVPNS-IN" in running, running  # the server's rules, which it removes when it stops
    assert_nothing_left(work, proc)


UNIT = ROOT / "systemd/pvpn.service"
UNIT_DIRECTORIES = {"RuntimeDirectory": "/run", "LogsDirectory": "/var/log",
                    "StateDirectory": "/var/lib"}


def read_unit() -> dict[str, str]:
    unit = configparser.RawConfigParser(strict=True, delimiters=("=",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are cased
    unit.read(UNIT)
    return dict(unit["Service"])


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("no systemd-analyze")
    unit = tmp_path / "pvpn.service"
    text = UNIT.read_text()
    if not (VENV / "bin/supervisord").exists():  # verify wants the ExecStart program
        text = text.replace(str(VENV), sys.prefix)
    unit.write_text(text)
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    # An unknown or misspelt key is only a warning (exit 0): no output at all is the pass.
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stdout + proc.stderr


def test_the_node_starts_as_the_unit_starts_it(tmp_path: Path) -> None:
    """The unit's ExecStart with its environment, umask and directories, as systemd runs it
    (after the README's set-up of a server host): pvpn-server RUNNING; a SIGTERM to supervisord
    alone (KillMode=mixed) stops everything within TimeoutStopSec, exit status 0."""
    service = read_unit()
    setup, _start, after = readme_node_commands()
    work = node_work_dir(tmp_path)
    (work / "readme.sh").write_text(setup)
    directories = "\n".join(
        f"mkdir -p {base}/{service[key]} && chmod {service[key + 'Mode']} {base}/{service[key]}"
        for key, base in UNIT_DIRECTORIES.items())
    environment = " ".join(shlex.quote(word) for word in shlex.split(service["Environment"]))
    assert service["Type"] == "simple" and service["KillMode"] == "mixed"
    stop = int(service["TimeoutStopSec"])
    script = f"""\
bash -euo pipefail {work}/readme.sh >{work}/readme.out 2>&1
{directories}
(umask {service["UMask"]}; exec env -i {environment} {service["ExecStart"]}) \\
    >{work}/unit.out 2>&1 &
main=$!
{WAIT_RUNNING.format(status=after[0], work=work)}
stat -c '%a %n' /run/pvpn /var/log/pvpn /var/lib/pvpn /var/log/pvpn/*.log >{work}/modes.out
{after[1]} >{work}/node-status.out 2>&1
kill -TERM $main
for _ in $(seq {stop * 5}); do kill -0 $main 2>/dev/null || break; sleep 0.2; done
status=0; wait $main || status=$?
echo $status >{work}/exit.out
{WAIT_GONE}
{LEFT_OVER.format(work=work)}
"""
    proc = run_in_namespace(work, script)
    out = proc.stdout + proc.stderr
    for name in ("readme.out", "unit.out"):
        if (work / name).exists():
            out += f"\n--- {name}\n" + (work / name).read_text()
    assert proc.returncode == 0, out
    status = (work / "status.out").read_text()
    assert re.search(r"^pvpn-server +RUNNING", status, re.M), status + out
    assert re.search(r"pvpn-server +RUNNING", (work / "node-status.out").read_text())
    modes = dict(reversed(line.split(" ", 1)) for line in
                 (work / "modes.out").read_text().splitlines())
    assert modes == {"/run/pvpn": "711", "/var/log/pvpn": "700", "/var/lib/pvpn": "700",
                     "/var/log/pvpn/pvpn-server.log": "600",
                     "/var/log/pvpn/supervisord.log": "600"}, modes
    assert (work / "exit.out").read_text().strip() == "0", out
    assert_nothing_left(work, proc)
