"""`pvpn bench --profile DIR`: py-spy recordings of a path's processes, read as self time."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pvpn.cli.bench import cli
from pvpn.cli.bench.paths import BenchPath
from pvpn.cli.bench.profile import Profiles, libraries, self_time, top_lines

RAW = """\
<module> (pvpn/server/daemon.py:10);serve (pvpn/io/node.py:20);drain (pvpn/io/nfqueue.py:274) 30
<module> (pvpn/server/daemon.py:10);serve (pvpn/io/node.py:20);send (pvpn/io/rawsock.py:40) 10
<module> (pvpn/server/daemon.py:10);select (selectors.py:468) 60
not a line
"""


def test_self_time_counts_each_sample_on_its_innermost_frame() -> None:
    total, frames = self_time(RAW)
    assert total == 100
    assert frames["select (selectors.py:468)"] == 60
    assert frames["drain (pvpn/io/nfqueue.py:274)"] == 30
    assert top_lines(RAW, 2) == [" 60.0%  select (selectors.py:468)",
                                 " 30.0%  drain (pvpn/io/nfqueue.py:274)"]
    assert top_lines("") == []


def test_the_option_reaches_the_run(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["bench", "--quick", "--profile", str(tmp_path)])
    assert cli.options_from(args).profile == tmp_path
    assert cli.options_from(parser.parse_args(["bench"])).profile is None


@pytest.mark.skipif(shutil.which("py-spy", path=str(Path(sys.executable).parent)) is None,
                    reason="py-spy is not installed here (the bench installs it on demand)")
def test_a_real_process_is_recorded_and_summed_up(tmp_path: Path) -> None:
    busy = subprocess.Popen([sys.executable, "-c", "while True:\n    sum(range(999))"])
    try:
        path = BenchPath(name="pvpn", lab="x", topology=None,  # type: ignore[arg-type]
                         target4="10.0.0.1", hops=1)
        path.processes = {"pvpn-server": lambda: [busy.pid]}
        profiles = Profiles(tmp_path, say=lambda _m: None)
        recordings = profiles.start(path, "tcp1-up", 1.0)
        profiles.finish(path, "tcp1-up", recordings)
        written = profiles.write(["header"]).read_text()
    finally:
        busy.kill()
        busy.wait()
    assert "== pvpn tcp1-up" in written
    samples = int(written.split("-- pvpn-server (pid ")[1].split(": ")[1].split()[0])
    assert samples > 10, written
    assert "<module> (<string>:2)" in written
    if shutil.which("perf"):  # perf is optional (Debian's linux-perf)
        assert "perf, by library: " in written, written


def test_perf_s_report_by_library_is_read() -> None:
    shown = ("    45.12%  libcrypto.so.3        \n     30.00%  [kernel.kallsyms]\n"
             "\n# a comment\n     2.00%  \n")
    assert libraries(shown) == ["45.12%  libcrypto.so.3", "30.00%  [kernel.kallsyms]"]
