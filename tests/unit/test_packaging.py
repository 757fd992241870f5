"""How pvpn is packaged (issue 10 section 3): a PEP 517/621 pyproject.toml whose metadata is
the only copy of it, scapy in a `trace` extra that no node's program imports, and the extras
scripts/run installs for each action."""

from __future__ import annotations

import configparser
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def pyproject() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)


def test_pyproject_holds_the_metadata_and_a_pep_517_build() -> None:
    data = pyproject()
    build = data["build-system"]
    assert build["build-backend"] == "setuptools.build_meta"
    assert any(r.replace(" ", "").startswith("setuptools>=") for r in build["requires"])
    project = data["project"]
    assert project["name"] == "pvpn"
    assert project["dynamic"] == ["version"] and "version" not in project
    assert data["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pvpn.__version__"}
    assert project["scripts"] == {
        "pvpn": "pvpn.cli.main:main",
        "pvpn-client": "pvpn.client.daemon:main",
        "pvpn-server": "pvpn.server.daemon:main",
        "pvpn-gateway": "pvpn.gateway.daemon:main",
    }
    names = [r.split(">")[0].split(";")[0].strip().lower() for r in project["dependencies"]]
    for needed in ("pyopenssl", "cryptography", "netfilterqueue", "msgpack", "supervisor"):
        assert needed in names
    # scapy decodes pvpn trace's captures only: an extra, which the tests pull in.
    assert "scapy" not in names
    extras = project["optional-dependencies"]
    assert [r for r in extras["trace"] if r.startswith("scapy")]
    assert "pvpn[trace]" in extras["test"]
    assert {"pytest", "mypy", "ruff"} <= {r.split(">")[0] for r in extras["test"]}


def test_setup_cfg_keeps_only_tool_settings() -> None:
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(ROOT / "setup.cfg")
    assert set(cfg.sections()) <= {"mypy", "flake8", "tool:pytest"}
    setup_py = (ROOT / "setup.py").read_text()
    assert "package_dir" in setup_py and "data_files" in setup_py
    for duplicate in ("install_requires", "entry_points", "version=", "name="):
        assert duplicate not in setup_py


def test_the_installed_pvpn_needs_scapy_only_for_trace() -> None:
    """The metadata pip installed from (the venv's pvpn): scapy only with the trace extra."""
    requires = metadata.requires("pvpn") or []
    scapy = [r for r in requires if r.lower().startswith("scapy")]
    assert scapy and all('extra == "trace"' in r for r in scapy), requires
    assert metadata.version("pvpn") == __import__("pvpn").__version__


# A finder that refuses scapy, as an environment without the trace extra would.
BLOCK_SCAPY = """
import importlib.abc, sys
class NoScapy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "scapy" or name.startswith("scapy."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NoScapy())
for name in [n for n in sys.modules if n == "scapy" or n.startswith("scapy.")]:
    del sys.modules[name]
"""


def test_no_node_program_needs_scapy(tmp_path: Path) -> None:
    """Every module of pvpn imports without scapy (the nodes, `pvpn connect` and the lab
    among them), and each program still parses its command line; only pvpn trace's packet
    decoding asks for it, with one line that says what to install."""
    probe = BLOCK_SCAPY + """
import pkgutil, importlib, contextlib, io
import pvpn
names = sorted(m.name for m in pkgutil.walk_packages(pvpn.__path__, "pvpn."))
for name in names:
    importlib.import_module(name)
assert "pvpn.client.daemon" in names and "pvpn.server.daemon" in names, names
assert "pvpn.gateway.daemon" in names and "pvpn.cli.trace_packets" in names, names
from pvpn.cli import main as cli
from pvpn.client import daemon as client
from pvpn.server import daemon as server
from pvpn.gateway import daemon as gateway
for main, argv in ((cli.main, ["connect", "--help"]), (cli.main, ["status", "--help"]),
                   (client.main, ["--help"]), (server.main, ["--help"]),
                   (gateway.main, ["--help"])):
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            main(argv)
    except SystemExit as exc:
        assert exc.code in (0, None), (argv, exc.code)
    assert "usage" in out.getvalue().lower(), argv
assert not [n for n in sys.modules if n.startswith("scapy")]
from pvpn.errors import ConfigError
from pvpn.cli.trace_packets import scapy_classes
try:
    scapy_classes()
except ConfigError as exc:
    print(exc)
else:
    raise SystemExit("scapy_classes() worked without scapy")
"""
    # From a directory of its own: the checkout's pvpn/ would shadow the installed package.
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pip install 'pvpn[trace]'" in proc.stdout


def test_pvpn_trace_without_scapy_is_one_line_and_a_failure(tmp_path: Path) -> None:
    """The command itself, as a user runs it: exit status 2, a line, no traceback."""
    logs = tmp_path / "server.log"
    logs.write_text("")
    script = BLOCK_SCAPY + f"""
from pvpn.cli.main import main
sys.exit(main(["trace", "{"ab" * 16}", "--logs", {str(logs)!r}, "--packets"]))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "pip install 'pvpn[trace]'" in proc.stderr


def test_scripts_run_installs_the_extra_each_action_needs() -> None:
    run = (ROOT / "scripts/run").read_text()
    assert 'if [[ $action == test ]]; then extra=test; else extra=trace; fi' in run
    assert '"$checkout[$extra]"' in run and '"$checkout[test]"' not in run


def test_scripts_run_puts_supervisord_on_root_s_path() -> None:
    """The README's `supervisord -c ...` and `supervisorctl -c ...` ran into "command not
    found" in a root shell: they lived in the venv alone."""
    run = (ROOT / "scripts/run").read_text()
    assert "for program in supervisord supervisorctl; do" in run
    assert "link=/usr/local/sbin/$program" in run
    assert 'ln -sfn "$venv/bin/$program" "$link"' in run


def read_unit(path: Path) -> configparser.RawConfigParser:
    unit = configparser.RawConfigParser(strict=True, delimiters=("=",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are cased
    unit.read(path)
    return unit


def test_the_systemd_unit_runs_pvpn_s_supervisord_in_the_foreground() -> None:
    """At boot: the node's supervisord, its directories made with their modes, restarted if
    it fails; shipped as data into share/pvpn/systemd."""
    unit = read_unit(ROOT / "systemd/pvpn.service")
    service = unit["Service"]
    assert service["ExecStart"] == "/opt/pvpn/venv/bin/supervisord -n -c /etc/pvpn/supervisord.conf"
    assert service["Type"] == "simple"
    assert service["UMask"] == "0077"
    assert (service["RuntimeDirectory"], service["RuntimeDirectoryMode"]) == ("pvpn", "0711")
    assert (service["LogsDirectory"], service["LogsDirectoryMode"]) == ("pvpn", "0700")
    assert (service["StateDirectory"], service["StateDirectoryMode"]) == ("pvpn", "0700")
    assert service["Restart"] == "on-failure"
    assert service["KillMode"] == "mixed"  # SIGTERM to supervisord, which stops the nodes
    assert int(service["TimeoutStopSec"]) > 15  # the nodes' stopwaitsecs
    environment = dict(word.split("=", 1) for word in service["Environment"].split())
    assert environment["PATH"].startswith("/opt/pvpn/venv/bin:")
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    setup_py = (ROOT / "setup.py").read_text()
    assert '("share/pvpn/systemd", ["systemd/pvpn.service"])' in setup_py
    # The directories it makes are the ones the shipped supervisord files name.
    conf = (ROOT / "supervisord.d/supervisord.conf").read_text()
    assert "=/run/pvpn/" in conf and "=/var/log/pvpn/" in conf


def test_the_installed_pvpn_holds_only_modules_of_this_checkout() -> None:
    """A module the source no longer has (pvpn/protocol.py after its split) was installed
    again from setuptools' build/ directory, left by the previous install."""
    import pvpn

    sources = {"pvpn": ROOT / "pvpn", "pvpn/client": ROOT / "client",
               "pvpn/server": ROOT / "server", "pvpn/gateway": ROOT / "gateway"}
    installed = Path(pvpn.__file__).parent
    stale = []
    for module in installed.rglob("*.py"):
        relative = module.relative_to(installed.parent)
        package = str(relative.parent)
        top = "/".join(package.split("/")[:2]) if package.startswith(
            ("pvpn/client", "pvpn/server", "pvpn/gateway")) else "pvpn"
        source = sources[top] / module.relative_to(installed.parent / top)
        if not source.exists():
            stale.append(str(relative))
    assert not stale, f"installed but not in the checkout: {stale}"
