"""The scale section's order of work (pvpn.cli.bench.run.Bench.measure_scale), with the lab's
parts replaced: when is the server's memory after the load read."""

from __future__ import annotations

from typing import Any

import pytest

from pvpn.cli.bench import cli, run
from pvpn.cli.bench.paths import BenchPath


def _bench(monkeypatch: pytest.MonkeyPatch, *argv: str) -> tuple[run.Bench, list[str]]:
    import argparse
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    bench = run.Bench(cli.options_from(parser.parse_args(["bench", *argv])), say=lambda _m: None)
    steps: list[str] = []
    pvpn = BenchPath(name="pvpn", lab="x", topology=None,  # type: ignore[arg-type]
                     target4="10.0.0.1", hops=1)
    pvpn.processes = {"pvpn-server": lambda: [1], "pvpn-client": lambda: [2]}
    bench.paths = [pvpn]
    state = {"workers": 1}

    def memory(path: BenchPath, count: int) -> None:
        bench.results["memory"][path.name] = {"rss_idle": 10}

    def workers(path: BenchPath, number: int) -> None:
        state["workers"] = number
        steps.append(f"restart with {number}")

    def scale_run(path: BenchPath, count: int, repeat: int, number: Any) -> None:
        steps.append(f"load {count} (repeat {repeat}, {state['workers']} worker(s))")

    def rss(pids: list[int]) -> int:
        steps.append(f"rss with {state['workers']} worker(s)")
        return 100 * state["workers"]

    monkeypatch.setattr(bench, "_pvpn_memory", memory)
    monkeypatch.setattr(bench, "_server_workers", workers)
    monkeypatch.setattr(bench, "_scale_run", scale_run)
    monkeypatch.setattr(run.measure, "total_rss", rss)
    return bench, steps


def test_with_server_workers_memory_is_read_before_the_next_setting_restarts_the_server(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: it was read after the last setting's load, of 2 workers and their parent.
    bench, steps = _bench(monkeypatch, "--scale-users", "50", "--server-workers", "1,2",
                          "--repeats", "2")
    bench.measure_scale()
    assert steps[:4] == ["restart with 1", "load 50 (repeat 0, 1 worker(s))",
                         "rss with 1 worker(s)", "rss with 1 worker(s)"]
    assert steps.count("rss with 1 worker(s)") == 2 and "rss with 2 worker(s)" not in steps
    assert bench.results["memory"]["pvpn"]["rss_after_load"] == 100


def test_without_server_workers_memory_is_read_after_the_last_repeat(
        monkeypatch: pytest.MonkeyPatch) -> None:
    bench, steps = _bench(monkeypatch, "--scale-users", "10,50", "--repeats", "2")
    bench.measure_scale()
    assert steps == ["load 10 (repeat 0, 1 worker(s))", "load 50 (repeat 0, 1 worker(s))",
                     "load 10 (repeat 1, 1 worker(s))", "load 50 (repeat 1, 1 worker(s))",
                     "rss with 1 worker(s)", "rss with 1 worker(s)"]


def test_the_plan_counts_every_server_workers_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: a run with --server-workers 1,2 counted its steps as [269/266].
    bench, steps = _bench(monkeypatch, "--scale-users", "1,50", "--server-workers", "1,2",
                          "--repeats", "2", "--sections", "scale")
    monkeypatch.setattr(bench, "_scale_run", lambda *a: steps.append("run"))
    planned = bench._plan()
    bench.measure_scale()
    assert planned == steps.count("run") == 8
