"""`pvpn bench --quick` runs end to end (labs built and removed) and writes its JSON.

A smoke test only: it asserts that the run completes and what the JSON holds, never a
timing or a speed (the machine is shared and noisy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_quick_bench_runs_and_writes_json(lab_usable: None, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    pvpn = Path(sys.executable).parent / "pvpn"
    proc = subprocess.run(
        [str(pvpn), "bench", "--quick", "--only", "direct,pvpn", "--scale-users", "1,2",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Targets (issue 5)" in proc.stdout
    results = json.loads(out.read_text())
    for key in ("command", "date", "machine", "settings", "paths", "webstone", "bulk",
                "latency", "scale", "memory", "summary", "warnings"):
        assert key in results, key
    assert results["interrupted"] is False
    assert {name: meta["status"] for name, meta in results["paths"].items()} == {
        "direct": "ok", "pvpn": "ok"}
    for section in ("webstone", "bulk", "latency", "scale"):
        paths = {record["path"] for record in results[section]}
        assert paths == {"direct", "pvpn"}, section
    assert {"0", "1m"} <= {r["file"] for r in results["webstone"]}
    assert not [r for r in results["webstone"] if "error" in r]
    assert results["memory"]["pvpn"]["sessions"] == 2
    summary = results["summary"]
    for key in ("webstone", "bulk", "latency", "scale", "cpu_seconds_per_gb", "targets"):
        assert key in summary, key
    assert "pvpn-server" in summary["cpu_seconds_per_gb"]["pvpn"]
    # Everything the bench built is gone: its labs and its temporary users.
    labs = [meta["lab"] for meta in results["paths"].values()]
    assert labs and not [name for name in labs if (Path("/run/pvpn-lab") / name).exists()]
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                check=True).stdout
    assert not [name for name in labs if f"{name}-" in namespaces]
    created = results["memory"]["pvpn"]["users"]
    assert len(created) == 2
    accounts = {line.split(":")[0] for line in Path("/etc/passwd").read_text().splitlines()}
    assert not set(created) & accounts
