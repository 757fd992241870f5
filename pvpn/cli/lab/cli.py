"""Command line of the lab: ``pvpn lab up|down|exec|info|demo``.

The main ``pvpn`` command calls :func:`register`; each sub-command stores its handler as
``func`` (``args.func(args)`` returns the exit status).  ``python -m pvpn.cli.lab.cli`` runs the
lab's commands on their own.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from pvpn.errors import PvpnError
from pvpn.cli.lab import demo, lab
from pvpn.cli.lab.topology import DEFAULT_NAME, MAX_GATEWAYS

Handler = Callable[[argparse.Namespace], int]


def _guarded(handler: Handler) -> Handler:
    """Turn pvpn's own errors into a one-line message and exit status 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except PvpnError as exc:
            print(f"pvpn lab: error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("pvpn lab: interrupted", file=sys.stderr)
            return 130

    return run


def _up(args: argparse.Namespace) -> int:
    lab.up(args.name, args.gateways, nodes=not args.no_nodes)
    return 0


def _down(args: argparse.Namespace) -> int:
    warnings = lab.down(args.name)
    for warning in warnings:
        print(f"pvpn lab: warning: {warning}", file=sys.stderr)
    return 1 if warnings else 0


def _command_after_dashes(parsed: list[str]) -> list[str]:
    """The command as typed after ``--``.

    Python 3.11's argparse also drops a later ``--`` inside the command
    (``-- sh -c x -- y``); take the words from sys.argv when they are the same command.
    """
    argv = sys.argv[1:]
    if "--" in argv:
        typed = argv[argv.index("--") + 1:]
        if [w for w in typed if w != "--"] == [w for w in parsed if w != "--"]:
            return typed
    return parsed


def _exec(args: argparse.Namespace) -> int:
    return lab.exec_in(args.name, args.host, args.user, _command_after_dashes(args.command))


def _info(args: argparse.Namespace) -> int:
    print(json.dumps(lab.info(args.name), indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    return demo.demo(args.name)


def _name_option(parser: argparse.ArgumentParser, default: str = DEFAULT_NAME) -> None:
    parser.add_argument("--name", default=default,
                        help=f"lab name: prefixes its namespaces (default {default})")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``lab`` and its sub-commands to the main ``pvpn`` command line."""
    parser = subparsers.add_parser(
        "lab", help="build a test bed of network namespaces (root)",
        description="pvpn on one machine: a client host with users alice, bob and carol, "
                    "optional gateways, a pvpn server and a target host behind it, built "
                    "from network namespaces.  Needs root.")
    commands = parser.add_subparsers(dest="lab_command", metavar="COMMAND", required=True)

    up = commands.add_parser("up", help="build a lab and start its services")
    _name_option(up)
    up.add_argument("--gateways", type=int, default=0, metavar="N",
                    help=f"gateway hosts gw1..gwN between client and server, each running "
                         f"pvpn-gateway (0..{MAX_GATEWAYS})")
    up.add_argument("--no-nodes", action="store_true",
                    help="do not start pvpn-client, pvpn-gateway and pvpn-server (configs "
                         "are still written)")
    up.set_defaults(func=_guarded(_up))

    down = commands.add_parser("down", help="remove everything a lab made (idempotent)")
    _name_option(down)
    down.set_defaults(func=_guarded(_down))

    run = commands.add_parser(
        "exec", help="run a command on a lab host as a user",
        description="Run COMMAND in the host's namespace as USER, with the user's "
                    "environment; exits with the command's status.",
        usage="%(prog)s [--name NAME] HOST [--user USER] -- COMMAND...")
    _name_option(run)
    run.add_argument("host", metavar="HOST", help="client, gw1.., server or target")
    run.add_argument("--user", default="root", help="run as this user (default root)")
    run.add_argument("command", nargs="+", metavar="COMMAND")
    run.set_defaults(func=_guarded(_exec))

    show = commands.add_parser("info", help="print hosts, addresses, users, commands as JSON")
    _name_option(show)
    show.set_defaults(func=_guarded(_info))

    story = commands.add_parser("demo", help="build a lab, show alice and bob, remove it")
    _name_option(story, demo.DEMO_NAME)
    story.set_defaults(func=_guarded(_demo))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pvpn")
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
