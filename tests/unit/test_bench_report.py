"""The bench's report: medians and spreads, ratios to direct and to the best peer, Jain's
index, issue 5's targets, and the text and Markdown tables (pure: made-up results in)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from pvpn.cli.bench import report


def test_spread_takes_median_and_range_of_numbers_only() -> None:
    s = report.spread([3.0, None, 1.0, math.nan, 2.0, True])
    assert s == report.Spread(median=2.0, low=1.0, high=3.0, n=3)
    assert s is not None and s.as_dict() == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert report.spread([None, math.inf]) is None
    assert report.spread([]) is None


def test_ratio_is_value_over_reference_or_none() -> None:
    assert report.ratio(3.0, 2.0) == 1.5
    assert report.ratio(None, 2.0) is None
    assert report.ratio(3.0, None) is None
    assert report.ratio(3.0, 0.0) is None


def test_jain_index() -> None:
    assert report.jain([5.0, 5.0, 5.0, 5.0]) == pytest.approx(1.0)
    assert report.jain([8.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)
    assert report.jain([1.0, 3.0]) == pytest.approx(16 / (2 * 10))
    assert report.jain([]) is None
    assert report.jain([0.0, 0.0]) is None


def test_formatting() -> None:
    assert report.si(812_345.0) == "812k"
    assert report.si(3_100_000.0, "b") == "3.1Mb"
    assert report.si(12.0) == "12"
    assert report.si(None) == "-"
    assert report.seconds(0.0000842) == "84.2us"
    assert report.seconds(0.001906) == "1.91ms"
    assert report.seconds(1.651) == "1.65s"
    assert report.seconds(math.nan) == "-"


PATHS = {
    "direct": {"status": "ok", "hops": 0},
    "pvpn": {"status": "ok", "hops": 1},
    "pvpn-2gw": {"status": "ok", "hops": 3},
    "openvpn-udp": {"status": "ok", "hops": 1},
    "openvpn-tcp": {"status": "skipped", "note": "openvpn could not be installed"},
    "sshuttle": {"status": "ok", "hops": 1},
}

# throughput (bytes/s) and average response (s) of the 0 B cell with 1 client, per path
WEB = {
    "direct": [(400.0, 0.001), (420.0, 0.001), (380.0, 0.002)],
    "pvpn": [(200.0, 0.004), (210.0, 0.004), (190.0, 0.005)],
    "pvpn-2gw": [(150.0, 0.006)],
    "openvpn-udp": [(100.0, 0.008)],
    "sshuttle": [(150.0, 0.005)],
}


def results(**overrides: Any) -> dict[str, Any]:
    webstone = [
        {"path": path, "file": "0", "clients": 1, "repeat": i, "throughput": t,
         "avg_response": r, "p99_response": r * 2, "requests": 100, "errors": 0,
         "retransmits": 1}
        for path, runs in WEB.items() for i, (t, r) in enumerate(runs)
    ]
    webstone.append({"path": "pvpn", "file": "0", "clients": 1, "repeat": 3,
                     "error": "exit 1: boom"})
    bulk = [
        {"path": "direct", "test": "tcp1-up", "repeat": 0, "bits_per_second": 10e9,
         "bytes": 6_000_000_000, "retransmits": 0},
        {"path": "pvpn", "test": "tcp1-up", "repeat": 0, "bits_per_second": 200e6,
         "bytes": 125_000_000, "retransmits": 0, "wall": 5.0,
         "cpu": {"pvpn-client": 2.5, "pvpn-server": 5.0}},
        {"path": "pvpn-2gw", "test": "tcp1-up", "repeat": 0, "bits_per_second": 150e6,
         "bytes": 93_750_000, "retransmits": 0, "wall": 5.0, "cpu": {"pvpn-server": 4.0}},
        {"path": "openvpn-udp", "test": "tcp1-up", "repeat": 0, "bits_per_second": 250e6,
         "bytes": 156_250_000, "retransmits": 3, "wall": 5.0, "cpu": {}},
        {"path": "pvpn", "test": "udp-up", "repeat": 0, "bits_per_second": 99e6,
         "lost_percent": 1.5},
    ]
    latency = [
        {"path": "direct", "repeat": 0, "rr": {"median": 40e-6, "p99": 90e-6},
         "ping": {"median": 60e-6}},
        {"path": "pvpn", "repeat": 0, "rr": {"median": 190e-6, "p99": 400e-6},
         "ping": {"median": 300e-6}},
        {"path": "pvpn-2gw", "repeat": 0, "rr": {"median": 900e-6, "p99": 2e-3}},
        {"path": "sshuttle", "repeat": 0, "rr": {"median": 500e-6, "p99": 1e-3}},
    ]
    scale = [
        {"path": "pvpn", "users": 10, "repeat": 0, "aggregate": 20e6, "jain": 0.98,
         "errors": 0},
        {"path": "direct", "users": 10, "repeat": 0, "aggregate": 1e9, "jain": 0.99,
         "errors": 0},
    ]
    memory = {"pvpn": {"rss_before": 40e6, "rss_idle": 45e6, "sessions": 50,
                       "per_session": 100e3, "rss_after_load": 46e6}}
    out: dict[str, Any] = {"command": "pvpn bench --peers", "date": "2026-01-01T00:00:00+00:00",
                           "machine": {"summary": "2 cores"},
                           "settings": {"repeats": 3, "duration": 3, "bulk_duration": 5,
                                        "round_trips": 2000},
                           "paths": PATHS, "webstone": webstone, "bulk": bulk,
                           "latency": latency, "scale": scale, "memory": memory,
                           "warnings": []}
    out.update(overrides)
    return out


def test_summarize_webstone_medians_errors_and_retransmissions() -> None:
    summary = report.summarize(results())
    web = summary["webstone"]
    assert web["throughput"]["direct"]["0/1"] == {"median": 400.0, "min": 380.0,
                                                 "max": 420.0, "n": 3}
    assert web["throughput"]["pvpn"]["0/1"]["n"] == 3  # the failed repeat is left out
    assert web["errors"]["pvpn"]["0/1"] == 1  # ... and counted
    assert web["avg_response"]["pvpn"]["0/1"]["median"] == 0.004
    assert web["retransmits_per_request"]["pvpn"]["0/1"]["median"] == pytest.approx(0.01)


def test_summarize_bulk_cpu_per_gb_and_utilization() -> None:
    summary = report.summarize(results())
    assert summary["bulk"]["pvpn"]["tcp1-up"]["median"] == 200e6
    # 2.5 CPU seconds over 0.125 GB = 20 s/GB; 5 s over 5 s wall = one core
    assert summary["cpu_seconds_per_gb"]["pvpn"]["pvpn-client"]["tcp1-up"]["median"] == \
        pytest.approx(20.0)
    assert summary["cpu_utilization"]["pvpn"]["pvpn-server"]["tcp1-up"]["median"] == \
        pytest.approx(1.0)
    assert summary["cpu_seconds_per_gb_total"]["pvpn"]["tcp1-up"]["median"] == \
        pytest.approx(60.0)
    assert summary["udp_loss_percent"]["pvpn"]["median"] == 1.5
    assert summary["hop_cost"]["bulk_tcp1-up_ratio"] == pytest.approx(0.75)
    assert summary["hop_cost"]["added_round_trip_per_gateway"] == pytest.approx(355e-6)


def test_targets_met_and_not_met() -> None:
    summary = report.summarize(results())
    by = {t["target"]: t for t in summary["targets"]}
    rtt = next(t for name, t in by.items() if name.startswith("added round trip"))
    # pvpn: +150 us over direct on 1 hop (met); pvpn-2gw: +860 us over 3 hops (not met)
    assert rtt["met"] is False
    assert "+0.150 ms per hop" in rtt["detail"]
    sshuttle = next(t for name, t in by.items() if "sshuttle" in name)
    assert sshuttle["met"] is True  # 200 > 150 bytes/s and 4 ms < 5 ms
    bulk = next(t for name, t in by.items() if "bulk TCP" in name)
    assert bulk["met"] is False and "tcp1-up 0.80x" in bulk["detail"]
    small = next(t for name, t in by.items() if "0 B-10 KB cells" in name)
    assert small["met"] is True and "0/1 2.00x" in small["detail"]
    gateways = next(t for name, t in by.items() if "2 gateways" in name)
    assert gateways["met"] is False  # bulk 0.75x
    memory = next(t for name, t in by.items() if "per idle session" in name)
    assert memory["met"] is True and "100 kB" in memory["detail"]
    flat = next(t for name, t in by.items() if "flat under load" in name)
    assert flat["met"] is True
    storms = next(t for name, t in by.items() if "retransmission storms" in name)
    assert storms["met"] is True


def test_targets_not_measured_are_neither_met_nor_failed() -> None:
    bare = results(paths={"direct": {"status": "ok"}, "pvpn": {"status": "ok", "hops": 1}},
                   latency=[], memory={}, bulk=[], scale=[])
    bare["webstone"] = [r for r in bare["webstone"] if r["path"] in ("direct", "pvpn")]
    summary = report.summarize(bare)
    assert {t["met"] for t in summary["targets"]} == {None, True}
    assert all(t["detail"] for t in summary["targets"])


def test_render_shows_values_spreads_and_ratios_to_direct_and_best_peer() -> None:
    text = report.render(results())
    assert "pvpn bench, 2026-01-01T00:00:00+00:00" in text
    assert "command: pvpn bench --peers" in text
    assert "openvpn-tcp  skipped  openvpn could not be installed" in text
    # direct's 0 B cell: median 400 with its range
    assert "400 (380-420)" in text
    # pvpn: 200 / direct 400 = 0.50; / best peer (sshuttle 150 > openvpn-udp 100) = 1.33
    assert "0.50 / 1.33" in text
    # times, lower is better: pvpn 4 ms / direct 1 ms = 4.00; / best peer 5 ms = 0.80
    assert "4.00 / 0.80" in text
    assert "Targets (issue 5)" in text and "[NOT MET]" in text and "[met]" in text
    assert "Jain" in text and "0.980" in text
    assert "100kB per session" in text
    # CPU per GB of all of a path's processes: pvpn 60 s/GB, best peer has none measured
    assert "CPU seconds per GB, all the VPN's processes together" in text
    # skipped paths get no rows in the tables
    assert not any(line.startswith("openvpn-tcp ") for line in text.splitlines())


def test_render_survives_an_empty_run() -> None:
    text = report.render({"paths": {"direct": {"status": "failed", "note": "no lab"}}})
    assert "direct" in text and "no lab" in text


def test_markdown_webstone_is_a_thesis_style_table() -> None:
    md = report.markdown_webstone(results())
    lines = md.splitlines()
    assert "| path | 0 B | 1 KB | 10 KB | 100 KB | 1 MB |" in lines
    assert "| pvpn | 200 | - | - | - | - |" in lines
    assert "| pvpn | 0.004000 | - | - | - | - |" in lines


WIREGUARD_SETTINGS = {"version": "wireguard-go v0.0.20220316",
                      "mtu": "1420 (wireguard-go's default; none set)",
                      "cipher": "ChaCha20-Poly1305 (fixed by WireGuard)"}


def with_wireguard() -> dict[str, Any]:
    """The made-up run, plus wireguard-go: 400 Mbit/s one stream up (pvpn 200)."""
    base = results()
    paths = {**PATHS, "wireguard-go": {"status": "ok", "hops": 1,
                                       "settings": WIREGUARD_SETTINGS}}
    bulk = [*base["bulk"],
            {"path": "wireguard-go", "test": "tcp1-up", "repeat": 0,
             "bits_per_second": 400e6, "bytes": 250_000_000, "retransmits": 0, "wall": 5.0,
             "cpu": {"wireguard-go client": 1.0, "wireguard-go server": 1.5}}]
    return results(paths=paths, bulk=bulk)


def test_wireguard_go_is_a_peer() -> None:
    assert report.is_peer("wireguard-go")
    assert "wireguard-go" in report.PEERS


def test_pvpn_bulk_against_openvpn_udp_and_wireguard_go() -> None:
    summary = report.summarize(with_wireguard())
    against = summary["bulk_against_peers"]
    # pvpn 200 Mbit/s: against OpenVPN/UDP's 250 0.80, against wireguard-go's 400 0.50
    assert against["pvpn"]["openvpn-udp"] == {"tcp1-up": pytest.approx(0.8)}
    assert against["pvpn"]["wireguard-go"] == {"tcp1-up": pytest.approx(0.5)}
    assert against["pvpn-2gw"]["wireguard-go"]["tcp1-up"] == pytest.approx(0.375)
    # 2.5 CPU seconds over 0.25 GB
    assert summary["cpu_seconds_per_gb_total"]["wireguard-go"]["tcp1-up"]["median"] == \
        pytest.approx(10.0)
    wireguard = next(t for t in summary["targets"] if "wireguard-go" in t["target"])
    assert wireguard["met"] is False and "tcp1-up 0.50x" in wireguard["detail"]


def test_without_wireguard_go_its_target_is_not_measured() -> None:
    summary = report.summarize(results())
    assert "wireguard-go" not in summary["bulk_against_peers"]["pvpn"]
    wireguard = next(t for t in summary["targets"] if "wireguard-go" in t["target"])
    assert wireguard["met"] is None
    assert wireguard["detail"] == "pvpn or wireguard-go not measured"


def test_render_shows_wireguard_go_its_settings_and_pvpn_against_each_peer() -> None:
    text = report.render(with_wireguard())
    lines = text.splitlines()
    assert "  wireguard-go ok" in lines
    assert "      mtu: 1420 (wireguard-go's default; none set)" in lines
    assert "      cipher: ChaCha20-Poly1305 (fixed by WireGuard)" in lines
    assert any(line.startswith("wireguard-go ") and "400Mb" in line for line in lines)
    assert "pvpn's bulk TCP against OpenVPN/UDP and wireguard-go (above 1: pvpn is faster)" \
        in lines
    rows = [line.split() for line in lines if line.startswith("pvpn ")]
    assert ["pvpn", "openvpn-udp", "0.80"] in rows
    assert ["pvpn", "wireguard-go", "0.50"] in rows
    # pvpn's bulk ratio to the best peer is now wireguard-go's: 200 / 400
    assert any(line.split()[:4] == ["pvpn", "0.02", "/", "0.50"] for line in lines)


def test_issue_12_s_round_trip_and_cpu_targets() -> None:
    latency = [
        {"path": "direct", "repeat": 0, "rr": {"median": 40e-6}},
        {"path": "pvpn", "repeat": 0, "rr": {"median": 240e-6}},
        {"path": "pvpn-2gw", "repeat": 0, "rr": {"median": 400e-6}},
        {"path": "openvpn-udp", "repeat": 0, "rr": {"median": 125e-6}},
    ]
    bulk = [
        {"path": "pvpn", "test": "tcp1-up", "repeat": 0, "bits_per_second": 200e6,
         "bytes": 1_000_000_000, "cpu": {"pvpn-client": 2.0, "pvpn-server": 3.0}},
        {"path": "openvpn-udp", "test": "tcp1-up", "repeat": 0, "bits_per_second": 250e6,
         "bytes": 1_000_000_000, "cpu": {"openvpn client": 2.5, "openvpn server": 2.5}},
        {"path": "pvpn", "test": "tcp1-down", "repeat": 0, "bits_per_second": 200e6,
         "bytes": 1_000_000_000, "cpu": {"pvpn-client": 4.0, "pvpn-server": 3.0}},
        {"path": "openvpn-udp", "test": "tcp1-down", "repeat": 0, "bits_per_second": 250e6,
         "bytes": 1_000_000_000, "cpu": {"openvpn client": 2.5, "openvpn server": 2.5}},
    ]
    by = {t["target"]: t for t in report.summarize(results(latency=latency, bulk=bulk))[
        "targets"]}
    rtt = by["1-byte round trip <= 2x OpenVPN/UDP's (median)"]
    assert rtt["met"] is True and "1.92x" in rtt["detail"]  # 240 us against 125 us
    gateway = by["each gateway adds <= half the round trip the one hop adds"]
    # one hop adds 200 us over direct; each of the two gateways (400 - 240) / 2 = 80 us
    assert gateway["met"] is True and "(0.40x)" in gateway["detail"]
    cpu = by["CPU seconds per GB, all of pvpn's processes <= OpenVPN/UDP's"]
    assert cpu["met"] is False  # up 5 s/GB = OpenVPN's 5 (met), down 7 > 5 (not)
    assert "tcp1-up 1.00x" in cpu["detail"] and "tcp1-down 1.40x" in cpu["detail"]

    slow = [dict(r, rr={"median": 600e-6}) if r["path"] == "pvpn-2gw" else r for r in latency]
    by = {t["target"]: t for t in report.summarize(results(latency=slow))["targets"]}
    assert by["each gateway adds <= half the round trip the one hop adds"]["met"] is False


def test_scale_by_server_workers_side_by_side_with_ratios() -> None:
    scale = [
        {"path": "pvpn", "users": 50, "repeat": 0, "aggregate": 20e6, "jain": 0.9,
         "errors": 0, "workers": 1},
        {"path": "pvpn", "users": 50, "repeat": 0, "aggregate": 36e6, "jain": 0.9,
         "errors": 0, "workers": 2},
        {"path": "pvpn", "users": 50, "repeat": 1, "aggregate": 22e6, "jain": 0.9,
         "errors": 0, "workers": 1},
        {"path": "direct", "users": 50, "repeat": 0, "aggregate": 1e9, "jain": 0.99,
         "errors": 0},
    ]
    summary = report.summarize(results(scale=scale))
    by = summary["scale_workers"]
    assert list(by) == ["1", "2"]
    assert by["1"]["50"]["aggregate"]["median"] == 21e6
    assert by["2"]["50"]["ratio"] == pytest.approx(36 / 21)
    assert by["1"]["50"]["ratio"] == 1.0
    # The main table's pvpn figures are the first workers value's.
    assert summary["scale"]["pvpn"]["50"]["aggregate"]["median"] == 21e6
    text = report.render(results(scale=scale), summary)
    assert "Scale by pvpn-server workers" in text and "(x1.71)" in text
    assert report.scale_by_workers([]) == {} and report.scale_workers_lines({}) == []


def test_server_workers_option_is_parsed_in_order_without_repeats() -> None:
    import argparse

    from pvpn.cli.bench.cli import options_from, register
    from pvpn.errors import ConfigError

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    options = options_from(parser.parse_args(["bench", "--server-workers", "2,1,2"]))
    assert options.server_workers == [2, 1]
    assert options.as_dict()["server_workers"] == [2, 1]
    assert options_from(parser.parse_args(["bench"])).server_workers == []
    with pytest.raises(ConfigError):
        options_from(parser.parse_args(["bench", "--server-workers", "0"]))
