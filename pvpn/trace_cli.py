"""``pvpn trace``: follow one session (or a user's sessions) through the nodes' logs.

The logs are JSON-line files given with ``--logs PATH`` (files, or directories searched for
``*.log``, ``*.log.N`` and ``*.jsonl``), or a lab's node logs with ``--lab NAME``; with
neither, the one lab that is up on this host, if there is exactly one.  The reading is here;
the tracing itself is :mod:`pvpn.trace` (pure).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pvpn.errors import ConfigError, PvpnError
from pvpn.text import printable
from pvpn.trace import (
    LogRecord,
    format_listing,
    format_trace,
    group_by_session,
    match_sessions,
    parse_lines,
    sessions_of_user,
    trace_session,
    trace_to_json,
)

LOG_NAME = re.compile(r"\.(log|jsonl)(\.\d+)?$")
SESSION_ARG = re.compile(r"[0-9a-fA-F]{1,32}")
MAX_LOG_FILES = 10000  # a directory walk that finds more was pointed at the wrong place


def log_files(paths: Sequence[Path]) -> list[Path]:
    """The files behind ``--logs``: a file as given, a directory's log files (recursively,
    sorted).  A path that does not exist is a mistake worth saying."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside: list[Path] = []
            for directory, _dirs, names in os.walk(path):
                inside += [Path(directory) / n for n in names if LOG_NAME.search(n)]
                if len(found) + len(inside) > MAX_LOG_FILES:
                    raise ConfigError(f"--logs {path}: more than {MAX_LOG_FILES} log files "
                                      "under it; name the nodes' log directories")
            found += sorted(inside)
        elif path.exists():
            found.append(path)
        else:
            raise ConfigError(f"--logs {path}: no such file or directory")
    return found


def with_rotated(path: Path) -> list[Path]:
    """A log file and its rotated siblings (supervisord's ``NAME.log.1`` ...)."""
    rotated = sorted((p for p in path.parent.glob(path.name + ".*")
                      if p.name[len(path.name) + 1:].isdigit()), reverse=True)
    return [*rotated, path]


def labs_up() -> list[str]:
    """The names of the labs that are up on this host."""
    from pvpn.lab.lab import STATE_FILE
    from pvpn.lab.topology import LAB_ROOT

    try:
        return sorted(p.name for p in LAB_ROOT.iterdir() if (p / STATE_FILE).is_file())
    except OSError:
        return []


def lab_log_files(name: str) -> list[Path]:
    """The pvpn nodes' logs of lab ``name`` (``pvpn lab info``'s ``logs``), rotated ones too."""
    from pvpn.lab import lab

    info = lab.info(name)
    files: list[Path] = []
    for entries in info["logs"].values():
        for program, path in entries.items():
            if program.startswith("pvpn-"):
                files += with_rotated(Path(path))
    return files


def resolve_logs(logs: Sequence[Path], lab_name: str | None) -> list[Path]:
    """The files to read: ``--logs``, else ``--lab``, else the only lab that is up."""
    if logs:
        files = log_files(logs)
        if lab_name:
            files += lab_log_files(lab_name)
        return files
    if lab_name:
        return lab_log_files(lab_name)
    labs = labs_up()
    if len(labs) == 1:
        return lab_log_files(labs[0])
    if labs:
        raise ConfigError(f"{len(labs)} labs are up ({', '.join(labs)}): say which with "
                          "--lab NAME, or give the logs with --logs PATH")
    raise ConfigError("no logs to read: give the nodes' log files or directories with "
                      "--logs PATH (repeatable), or a lab with --lab NAME")


def read_records(files: Sequence[Path]) -> Iterator[LogRecord]:
    """Every record in ``files``, file by file, line by line.  A missing file (a node that
    never ran, a rotation that did not happen) is skipped; an unreadable one is an error."""
    for path in files:
        try:
            handle = open(path, encoding="utf-8", errors="replace")
        except (FileNotFoundError, NotADirectoryError):
            continue
        except IsADirectoryError:
            raise ConfigError(f"{path} is a directory; give it with --logs") from None
        except PermissionError:
            raise ConfigError(f"cannot read {path}: permission denied (the nodes' logs are "
                              "usually root's; run pvpn trace as root)") from None
        with handle:
            # node:started and the like have no session to follow: skip them unparsed.
            yield from parse_lines(line for line in handle if '"session"' in line)


def _where(files: Sequence[Path]) -> str:
    shown = ", ".join(str(f) for f in files[:6])
    more = f" and {len(files) - 6} more" if len(files) > 6 else ""
    return f"{len(files)} log file(s): {shown}{more}" if files else "no log files"


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


def cmd_trace(args: argparse.Namespace) -> int:
    session: str | None = args.session
    user: str | None = args.user
    if not session and not user:
        raise ConfigError("name a session (pvpn trace SESSION) or a user "
                          "(pvpn trace --user NAME)")
    if session is not None and not SESSION_ARG.fullmatch(session):
        raise ConfigError(f"{session!r} is not a session id: give its 32 hex digits, or the "
                          "first few of them")
    if args.all and not user:
        raise ConfigError("--all traces every session of a user: give --user NAME")
    files = resolve_logs(args.logs, args.lab)
    groups = group_by_session(read_records(files))
    timeline = not args.no_timeline

    if user:
        listing = sessions_of_user(groups, user)
        if session:
            listing = [s for s in listing if s.session.startswith(session.lower())]
        if not (args.all or session):
            if args.json:
                _print_json({"user": user, "sessions": [s.to_json() for s in listing]})
            else:
                print(format_listing(user, listing))
            return 0 if listing else 1
        traces = [trace_session(groups[s.session], s.session) for s in listing]
        if args.json:
            _print_json({"user": user, "traces": [trace_to_json(t) for t in traces]})
        else:
            print("\n\n".join(format_trace(t, timeline) for t in traces)
                  or f"no sessions of {printable(user)} in these logs")
        return 0 if traces else 1

    assert session is not None  # a session or a user was required above
    matches = match_sessions(groups, session)
    if not matches:
        raise PvpnError(f"no records of session {session} in {_where(files)}")
    if len(matches) > 1:
        raise ConfigError(f"{session} is the start of {len(matches)} sessions "
                          f"({', '.join(matches[:5])}{', ...' if len(matches) > 5 else ''}); "
                          "give more of the id")
    trace = trace_session(groups[matches[0]], matches[0])
    if args.json:
        _print_json(trace_to_json(trace))
    else:
        print(format_trace(trace, timeline))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``trace`` to the main ``pvpn`` command line."""
    parser = subparsers.add_parser(
        "trace", help="follow a session hop by hop through the nodes' logs",
        description="Show a session's path through the chain from the nodes' JSON-line "
                    "logs: per hop the node, user and uid, when it opened and closed, bytes, "
                    "packets and envelopes each way, drops and their reasons, reconnects; "
                    "then every record on one timeline (times relative to the session's "
                    "first record).",
        usage="%(prog)s [SESSION] [--user NAME [--all]] [--logs PATH ...] [--lab NAME] "
              "[--json]")
    parser.add_argument("session", nargs="?", metavar="SESSION",
                        help="session id (32 hex digits) or its first few digits")
    parser.add_argument("--user", metavar="NAME",
                        help="list the sessions of user NAME (with SESSION or --all: trace them)")
    parser.add_argument("--all", action="store_true", help="with --user: trace every session")
    parser.add_argument("--logs", action="append", type=Path, default=[], metavar="PATH",
                        help="a node's log file, or a directory of them (repeatable)")
    parser.add_argument("--lab", metavar="NAME",
                        help="read the node logs of lab NAME (default: the only lab up)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--no-timeline", action="store_true",
                        help="only the per-hop blocks, not every record")
    parser.set_defaults(func=cmd_trace)
