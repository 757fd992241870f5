"""``pvpn trace``: follow one session (or a user's sessions) through the nodes' logs.

The logs are JSON-line files given with ``--logs PATH`` (files, or directories searched for
``*.log``, ``*.log.N`` and ``*.jsonl``), or a lab's node logs with ``--lab NAME``; with
neither, the one lab that is up on this host, if there is exactly one.  The reading is here;
the tracing itself is :mod:`pvpn.trace` (pure).

With ``--packets`` (or ``--pcap PATH``) the session's packet captures are read too
(:mod:`pvpn.cli.trace_packets`, with scapy): the files the server's ``capture:opened`` records
name, the lab's server captures, and those given with ``--pcap`` (a file, or a directory of
``<session>.pcap`` files).  ``--html FILE`` writes the page of :mod:`pvpn.cli.trace_html`.
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
from pvpn.names import CAPTURE_OPENED
from pvpn.text import printable
from pvpn.trace import (
    LogRecord,
    SessionTrace,
    format_listing,
    format_trace,
    group_by_session,
    match_sessions,
    parse_lines,
    sessions_of_user,
    trace_session,
    trace_to_json,
)
from pvpn.cli.trace_packets import CaptureSummary, capture_to_json, format_captures

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
    from pvpn.cli.lab.lab import STATE_FILE
    from pvpn.cli.lab.topology import LAB_ROOT

    try:
        return sorted(p.name for p in LAB_ROOT.iterdir() if (p / STATE_FILE).is_file())
    except OSError:
        return []


def lab_log_files(name: str) -> list[Path]:
    """The pvpn nodes' logs of lab ``name`` (``pvpn lab info``'s ``logs``), rotated ones too."""
    from pvpn.cli.lab import lab

    info = lab.info(name)
    files: list[Path] = []
    for entries in info["logs"].values():
        for program, path in entries.items():
            if program.startswith("pvpn-"):
                files += with_rotated(Path(path))
    return files


def chosen_lab(logs: Sequence[Path], lab_name: str | None) -> str | None:
    """The lab whose logs are read: ``--lab``, else without ``--logs`` the only lab up."""
    if lab_name or logs:
        return lab_name
    labs = labs_up()
    return labs[0] if len(labs) == 1 else None


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


MAX_CAPTURE_FILES = 100  # of one session: <session>.pcap, <session>-2.pcap ...


def _capture_name(session: str) -> re.Pattern[str]:
    """The name a server gives a session's capture (``pvpn.io.pcap.SessionCaptures``)."""
    return re.compile(re.escape(session) + r"(-[0-9]{1,6})?\.pcap")


def _session_files(directory: Path, named: re.Pattern[str]) -> list[Path]:
    """The session's captures in ``directory``, in the order the server made them."""
    def number(path: Path) -> int:
        match = named.fullmatch(path.name)
        return int(match.group(1)[1:]) if match and match.group(1) else 1

    try:
        with os.scandir(directory) as entries:
            found = [Path(e.path) for e in entries if named.fullmatch(e.name)]
        return sorted(found, key=number)
    except PermissionError:
        raise ConfigError(f"cannot read the directory {directory}: permission denied (the "
                          "server's captures are root's; run pvpn trace as root)") from None
    except OSError:
        return []


def lab_capture_dir(name: str) -> Path | None:
    """Where lab ``name``'s server writes its captures (None if there is no such lab)."""
    from pvpn.cli.lab import lab, services

    try:
        return services.server_pcap_dir(lab.load_topology(name))
    except (PvpnError, OSError):
        return None


def find_captures(trace: SessionTrace, pcaps: Sequence[Path], lab_name: str | None
                  ) -> list[tuple[Path, str]]:
    """The capture files of ``trace``'s session and who recorded each (a server's name, or
    "file" for one given): every ``--pcap`` file as given and the session's files in every
    ``--pcap`` directory; the files the server's ``capture:opened`` records name; the lab's
    server captures.  A record's path counts only if the file is named after the session."""
    named = _capture_name(trace.session)
    found: dict[str, tuple[Path, str]] = {}

    def add(path: Path, where: str) -> None:
        if len(found) < MAX_CAPTURE_FILES:
            found.setdefault(os.path.realpath(path), (path, where))

    for path in pcaps:
        if path.is_dir():
            for file in _session_files(path, named):
                add(file, "file")
        elif path.exists():
            add(path, "file")
        else:
            raise ConfigError(f"--pcap {path}: no such file or directory")
    server = next((hop.name for hop in trace.hops if hop.role == "server"), "server")
    for record in trace.timeline:
        written = record.get("path")
        if (record.get("role") == "server" and record.get("event") == CAPTURE_OPENED
                and isinstance(written, str) and named.fullmatch(Path(written).name)):
            add(Path(written), str(record.get("node") or server))
    directory = lab_capture_dir(lab_name) if lab_name else None
    if directory is not None:
        for file in _session_files(directory, named):
            add(file, server)
    return list(found.values())


def read_captures(trace: SessionTrace, pcaps: Sequence[Path], lab_name: str | None
                  ) -> list[CaptureSummary]:
    """The summaries of ``trace``'s captures (:func:`find_captures`), read with scapy."""
    from pvpn.cli.trace_packets import read_capture, scapy_classes

    scapy_classes()  # says how to install scapy before any file is looked at
    return [read_capture(path, where) for path, where in find_captures(trace, pcaps, lab_name)]


def write_page(path: Path, text: str) -> None:
    """Write the page to ``path``, mode 0600: it shows what the nodes' logs (root's) hold."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except OSError as exc:
        raise ConfigError(f"cannot write the page {path}: {exc.strerror or exc}") from None
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            fd = -1
            handle.write(text)
    except OSError as exc:
        raise ConfigError(f"cannot write the page {path}: {exc.strerror or exc}") from None
    finally:
        if fd >= 0:
            os.close(fd)


def _where(files: Sequence[Path]) -> str:
    shown = ", ".join(str(f) for f in files[:6])
    more = f" and {len(files) - 6} more" if len(files) > 6 else ""
    return f"{len(files)} log file(s): {shown}{more}" if files else "no log files"


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


def _traced(trace: SessionTrace, captures: Sequence[CaptureSummary] | None
            ) -> dict[str, Any]:
    data = trace_to_json(trace)
    if captures is not None:
        data["captures"] = [capture_to_json(c, trace.start, trace.end) for c in captures]
    return data


def _shown(trace: SessionTrace, captures: Sequence[CaptureSummary] | None, timeline: bool
           ) -> str:
    extra = [] if captures is None else format_captures(captures, trace.start).splitlines()
    return format_trace(trace, timeline, extra)


def cmd_trace(args: argparse.Namespace) -> int:
    session: str | None = args.session
    user: str | None = args.user
    pcaps: list[Path] = args.pcap
    packets = bool(args.packets or pcaps)
    if not session and not user:
        raise ConfigError("name a session (pvpn trace SESSION) or a user "
                          "(pvpn trace --user NAME)")
    if session is not None and not SESSION_ARG.fullmatch(session):
        raise ConfigError(f"{session!r} is not a session id: give its 32 hex digits, or the "
                          "first few of them")
    if args.all and not user:
        raise ConfigError("--all traces every session of a user: give --user NAME")
    if packets:
        from pvpn.cli.trace_packets import scapy_classes

        scapy_classes()  # no scapy: say so before reading any log
    files = resolve_logs(args.logs, args.lab)
    lab_name = chosen_lab(args.logs, args.lab)
    groups = group_by_session(read_records(files))
    timeline = not args.no_timeline

    if user:
        listing = sessions_of_user(groups, user)
        if session:
            listing = [s for s in listing if s.session.startswith(session.lower())]
        if not (args.all or session):
            if packets or args.html:
                raise ConfigError("--packets, --pcap and --html show a traced session: give "
                                  "SESSION or --all")
            if args.json:
                _print_json({"user": user, "sessions": [s.to_json() for s in listing]})
            else:
                print(format_listing(user, listing))
            return 0 if listing else 1
        traces = [trace_session(groups[s.session], s.session) for s in listing]
    else:
        assert session is not None  # a session or a user was required above
        matches = match_sessions(groups, session)
        if not matches:
            raise PvpnError(f"no records of session {session} in {_where(files)}")
        if len(matches) > 1:
            raise ConfigError(f"{session} is the start of {len(matches)} sessions "
                              f"({', '.join(matches[:5])}"
                              f"{', ...' if len(matches) > 5 else ''}); give more of the id")
        traces = [trace_session(groups[matches[0]], matches[0])]
    if len(traces) > 1 and (args.html or any(p.is_file() for p in pcaps)):
        raise ConfigError(f"{len(traces)} sessions match: --html draws one, and a --pcap "
                          "file belongs to one; name the session (or give --pcap a "
                          "directory of <session>.pcap files)")
    captured = [read_captures(t, pcaps, lab_name) if packets else None for t in traces]

    if args.html:
        from pvpn.cli.trace_html import render_html

        write_page(args.html, render_html(traces[0], captured[0] or ()))
        if not args.json:
            print(f"wrote the page of session {traces[0].session} to {args.html}")
            return 0
    if user:
        if args.json:
            _print_json({"user": user,
                         "traces": [_traced(t, c) for t, c in zip(traces, captured)]})
        else:
            print("\n\n".join(_shown(t, c, timeline) for t, c in zip(traces, captured))
                  or f"no sessions of {printable(user)} in these logs")
        return 0 if traces else 1
    if args.json:
        _print_json(_traced(traces[0], captured[0]))
    else:
        print(_shown(traces[0], captured[0], timeline))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``trace`` to the main ``pvpn`` command line."""
    parser = subparsers.add_parser(
        "trace", help="follow a session hop by hop through the nodes' logs",
        description="Show a session's path through the chain from the nodes' JSON-line "
                    "logs: per hop the node, user and uid, when it opened and closed, bytes, "
                    "packets and envelopes each way, drops and their reasons, reconnects; "
                    "then every record on one timeline (times relative to the session's "
                    "first record).  With --packets, the session's packet captures too, "
                    "flow by flow; with --html FILE, a page with the hops on one time axis "
                    "and bytes per second per hop and direction.",
        usage="%(prog)s [SESSION] [--user NAME [--all]] [--logs PATH ...] [--lab NAME] "
              "[--packets] [--pcap PATH ...] [--html FILE] [--json]")
    parser.add_argument("session", nargs="?", metavar="SESSION",
                        help="session id (32 hex digits) or its first few digits")
    parser.add_argument("--user", metavar="NAME",
                        help="list the sessions of user NAME (with SESSION or --all: trace them)")
    parser.add_argument("--all", action="store_true", help="with --user: trace every session")
    parser.add_argument("--logs", action="append", type=Path, default=[], metavar="PATH",
                        help="a node's log file, or a directory of them (repeatable)")
    parser.add_argument("--lab", metavar="NAME",
                        help="read the node logs of lab NAME (default: the only lab up)")
    parser.add_argument("--packets", action="store_true",
                        help="also read the session's packet captures (the server's, found "
                             "from its records or the lab, and --pcap): per flow bytes and "
                             "packets each way, retransmissions, resets, first and last "
                             "packet (needs scapy)")
    parser.add_argument("--pcap", action="append", type=Path, default=[], metavar="PATH",
                        help="a capture of the session (pvpn connect --pcap's file), or a "
                             "directory of <session>.pcap files; implies --packets "
                             "(repeatable)")
    parser.add_argument("--html", type=Path, metavar="FILE",
                        help="write the session as a self-contained page to FILE (0600): "
                             "the hops on one time axis, bytes per second per hop and "
                             "direction")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--no-timeline", action="store_true",
                        help="only the per-hop blocks, not every record")
    parser.set_defaults(func=cmd_trace)
