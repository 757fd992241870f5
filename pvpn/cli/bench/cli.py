"""Command line of ``pvpn bench`` (root): the main ``pvpn`` command calls :func:`register`."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from pvpn.cli.bench import report
from pvpn.cli.bench.run import ALL_PATHS, BASE_PATHS, SECTIONS, Options, Timing, run
from pvpn.errors import ConfigError, PvpnError


@dataclass(frozen=True)
class Defaults(Timing):
    """The knobs' values when not given: a full run, or ``--quick``."""

    files: tuple[str, ...]
    bulk_tests: tuple[str, ...]
    scale_users: tuple[int, ...]


FULL = Defaults(duration=2.0, bulk_duration=4.0, scale_duration=4.0, repeats=3,
                round_trips=2000, pings=10, files=report.FILES, bulk_tests=report.BULK_TESTS,
                scale_users=(1, 10, 50))
QUICK = Defaults(duration=1.0, bulk_duration=1.0, scale_duration=1.5, repeats=1,
                 round_trips=300, pings=3, files=("0", "1m"),
                 bulk_tests=("tcp1-up", "tcp1-down", "udp-up"), scale_users=(1, 4))


def _words(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [w.strip() for w in text.split(",") if w.strip()]


def _choose(option: str, given: list[str] | None, allowed: tuple[str, ...],
            default: tuple[str, ...]) -> list[str]:
    if not given:
        return list(default)
    bad = [w for w in given if w not in allowed]
    if bad:
        raise ConfigError(f"{option}: unknown {', '.join(bad)} (choose from "
                          f"{', '.join(allowed)})")
    return given


def _numbers(option: str, given: list[str] | None, default: tuple[int, ...], low: int,
             high: int) -> list[int]:
    if not given:
        return list(default)
    try:
        values = [int(w) for w in given]
    except ValueError:
        raise ConfigError(f"{option} takes numbers separated by commas") from None
    if any(not low <= v <= high for v in values):
        raise ConfigError(f"{option}: each between {low} and {high}")
    return values


def _bounded(option: str, value: float | None, default: float, low: float, high: float
             ) -> float:
    if value is None:
        return default
    if not low <= value <= high:
        raise ConfigError(f"{option} must lie between {low:g} and {high:g}")
    return value


# The bench's servers get a NAT range wide enough for its request rates: a target that closes
# first holds each port in TIME-WAIT for 60 s, so the lab's 4000 ports sustain ~66 new
# connections a second to it and the WebStone cells open several hundred.
BENCH_NAT_PORTS = "10000-32767"


def _nat_ports(text: str | None) -> str:
    if text is None:
        return BENCH_NAT_PORTS
    low, sep, high = text.partition("-")
    if not (sep and low.isdigit() and high.isdigit() and 1024 <= int(low) <= int(high) <= 65535):
        raise ConfigError(f"--nat-ports {text!r}: give a range like 10000-32767")
    return text


def options_from(args: argparse.Namespace) -> Options:
    """The run's options: explicit knobs win over the (quick or full) defaults."""
    d = QUICK if args.quick else FULL
    base = ALL_PATHS if args.peers else BASE_PATHS
    paths = _choose("--only", _words(args.only), ALL_PATHS, base)
    if args.only and not args.peers:
        peers = [p for p in paths if report.is_peer(p)]
        if peers:
            raise ConfigError(f"--only names {', '.join(peers)}: add --peers to measure them")
    return Options(
        paths=paths,
        sections=_choose("--sections", _words(args.sections), SECTIONS, SECTIONS),
        files=_choose("--files", _words(args.files), report.FILES, d.files),
        clients=_numbers("--clients", _words(args.clients), (1, 8), 1, 64),
        bulk_tests=_choose("--bulk-tests", _words(args.bulk_tests), report.BULK_TESTS,
                           d.bulk_tests),
        scale_users=sorted(set(_numbers("--scale-users", _words(args.scale_users),
                                        d.scale_users, 1, 50))),
        duration=_bounded("--duration", args.duration, d.duration, 0.2, 600),
        bulk_duration=_bounded("--bulk-duration", args.bulk_duration, d.bulk_duration, 1, 600),
        scale_duration=_bounded("--scale-duration", args.scale_duration, d.scale_duration,
                                0.2, 600),
        repeats=int(_bounded("--repeats", args.repeats, d.repeats, 1, 20)),
        round_trips=int(_bounded("--round-trips", args.round_trips, d.round_trips, 10,
                                 100_000)),
        pings=int(_bounded("--pings", args.pings, d.pings, 1, 1000)),
        udp_rate=args.udp_rate,
        quick=args.quick,
        nat_ports=_nat_ports(args.nat_ports),
        profile=args.profile,
        server_workers=list(dict.fromkeys(_numbers(
            "--server-workers", _words(args.server_workers), (), 1, 16))),
        command=shlex.join(["pvpn", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"]
        else "pvpn bench (called from Python)",
    )


def cmd_bench(args: argparse.Namespace) -> int:
    options = options_from(args)
    results = run(options)
    text = report.render(results, results.get("summary"))
    print(text, end="")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    if args.text:
        args.text.parent.mkdir(parents=True, exist_ok=True)
        args.text.write_text(text)
    if results.get("interrupted"):
        return 130
    failed = [n for n, m in results["paths"].items() if m.get("status") == "failed"]
    if failed:
        print(f"pvpn bench: these paths could not be set up: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``bench`` to the main ``pvpn`` command line."""
    p = sub.add_parser(
        "bench", help="measure pvpn beside a direct path and other VPNs (root)",
        description="Build labs of network namespaces and measure, side by side: a direct "
                    "routed path, pvpn over one hop, pvpn through two gateways and (with "
                    "--peers) OpenVPN over UDP and TCP, wireguard-go and sshuttle.  "
                    "WebStone-style HTTP cells, iperf3 bulk transfers, round trips, scale "
                    "with many users, CPU per GB.  Everything it builds is removed at the "
                    "end.  Needs root.")
    p.add_argument("--peers", action="store_true",
                   help="also measure OpenVPN (UDP, TCP), wireguard-go (userspace, over "
                        "TUN) and sshuttle, installing them if missing (apt-get / pip); a "
                        "peer that can't be set up is skipped")
    p.add_argument("--quick", action="store_true",
                   help="a short run (about a minute): fewer cells, 1 repeat, short durations")
    p.add_argument("--only", metavar="PATHS",
                   help=f"comma-separated paths to measure, of: {', '.join(ALL_PATHS)}")
    p.add_argument("--sections", metavar="LIST",
                   help=f"comma-separated sections, of: {', '.join(SECTIONS)} (default all)")
    p.add_argument("--files", metavar="LIST",
                   help=f"HTTP file sizes, of: {', '.join(report.FILES)}")
    p.add_argument("--clients", metavar="LIST",
                   help="concurrent HTTP clients per cell (default 1,8)")
    p.add_argument("--bulk-tests", metavar="LIST",
                   help=f"iperf3 runs, of: {', '.join(report.BULK_TESTS)}")
    p.add_argument("--scale-users", metavar="LIST",
                   help="numbers of simultaneous users for the scale test (default 1,10,50)")
    p.add_argument("--duration", type=float, metavar="S",
                   help="seconds per HTTP cell (default 2; quick 1)")
    p.add_argument("--bulk-duration", type=float, metavar="S",
                   help="seconds per iperf3 run (default 4; quick 1)")
    p.add_argument("--scale-duration", type=float, metavar="S",
                   help="seconds per scale run (default 4; quick 1.5)")
    p.add_argument("--repeats", type=int, metavar="N",
                   help="repeats of every measurement; the report gives their median and "
                        "range (default 3; quick 1)")
    p.add_argument("--round-trips", type=int, metavar="N",
                   help="1-byte TCP round trips per latency run (default 2000; quick 300)")
    p.add_argument("--pings", type=int, metavar="N", help="ICMP pings per latency run")
    p.add_argument("--udp-rate", default="100M", metavar="RATE",
                   help="offered rate of the UDP run, iperf3 syntax (default 100M)")
    p.add_argument("--nat-ports", metavar="LOW-HIGH",
                   help=f"the pvpn servers' nat_ports (default {BENCH_NAT_PORTS}; the lab's "
                        "is 61000-64999); it must not overlap the server's local port range "
                        "(32768-60999)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="py-spy profiles of every pvpn process during the first repeat of "
                        "each bulk TCP test and of the round trips, into DIR (profiles.txt "
                        "sums them up; py-spy is installed with pip if missing)")
    p.add_argument("--server-workers", metavar="LIST",
                   help="measure the scale test's pvpn path with pvpn-server running each of "
                   "these numbers of workers ([server] workers), side by side (default: as "
                   "the lab's server.toml says, 1)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the raw results as JSON")
    p.add_argument("--text", type=Path, metavar="FILE", help="write the report to FILE too")
    p.set_defaults(func=_guarded)


def _guarded(args: argparse.Namespace) -> int:
    try:
        return cmd_bench(args)
    except ConfigError:
        raise
    except PvpnError as exc:
        print(f"pvpn bench: error: {exc}", file=sys.stderr)
        return 1
