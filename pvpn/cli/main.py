"""The `pvpn` command: keys, certificates, connect/disconnect/status, and the lab."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

from pvpn import __version__
from pvpn.client.peer import untrusted_peer
from pvpn.config import (
    DEAD_AFTER_KEEPALIVES, DEFAULT_CLIENT_SOCKET, DEFAULT_KEEPALIVE, DEFAULT_MAX_BYTES,
    DEFAULT_PORT, parse_endpoint, parse_prefixes,
)
from pvpn.envelope import MsgType
from pvpn.errors import ConfigError, PvpnError
from pvpn.local import Answer, one_question
from pvpn.text import printable, quoted

DEFAULT_SOCKET = Path(os.environ.get("PVPN_SOCKET", DEFAULT_CLIENT_SOCKET))


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "pvpn"


def default_key() -> Path:
    return config_dir() / "id_rsa"


# ---------------------------------------------------------------- keygen / ca


def cmd_keygen(args: argparse.Namespace) -> int:
    from pvpn import auth

    path: Path = args.key
    if path.exists() and not args.force:
        raise ConfigError(f"{path} already exists; use --force to replace it")
    pub = path.with_name(path.name + ".pub")  # X.pem -> X.pem.pub, as ssh-keygen names it
    if path.exists():
        path.unlink()
    key = auth.generate_user_key(auth.DEFAULT_KEY_BITS if args.bits is None else args.bits)
    auth.save_private_key(key, path)
    pub.unlink(missing_ok=True)
    auth.save_public_key(key, pub, f"{getpass.getuser()}@{socket.gethostname()}")
    print(f"private key: {path} (mode 0600)")
    print(f"public key:  {pub}")
    print(f"fingerprint: {auth.fingerprint(key.public_key())}")
    print(f"Give {pub} to the administrator of each pvpn node, to install as "
          f"<authorized_keys>/{getpass.getuser()}.pub")
    return 0


def cmd_ca_init(args: argparse.Namespace) -> int:
    from pvpn import pki

    crt, key = pki.create_ca(args.dir, args.name, args.days)
    print(f"CA certificate: {crt}\nCA key:         {key} (keep it secret)")
    return 0


def cmd_ca_issue(args: argparse.Namespace) -> int:
    from pvpn import pki

    crt, key = pki.issue_certificate(args.dir, args.name, args.out or args.dir,
                                     ips=args.ip, dns_names=args.dns, days=args.days)
    print(f"certificate: {crt}\nkey:         {key}")
    return 0


# ---------------------------------------------------------------- talking to pvpn-client


def ask_daemon(socket_path: Path, mtype: MsgType, fields: dict[str, Any],
               timeout: float = 10.0) -> tuple[MsgType, dict[str, Any]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(socket_path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise PvpnError(f"pvpn-client is not running on this host (nothing listens on "
                        f"{socket_path}); ask root to start it") from None
    except OSError:
        sock.close()
        raise
    distrust = untrusted_peer(sock, socket_path)
    if distrust is not None:  # nothing is sent to it, nothing it says is believed
        sock.close()
        raise PvpnError(distrust)
    with sock:
        sock.sendall(one_question(mtype, os.getuid(), fields))
        answer = Answer()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            got = answer.receive(data)
            if got is not None:
                return got
    raise PvpnError("pvpn-client gave no answer")


def node_control(config: Path) -> tuple[str, Path]:
    """The role and the status socket of the node a config file describes."""
    from pvpn.config import load_client_config, load_gateway_config, load_server_config, load_toml

    sections = load_toml(config)
    if "server" in sections:
        return "server", load_server_config(config).control
    if "gateway" in sections:
        return "gateway", load_gateway_config(config).control
    if "client" in sections:
        return "client", load_client_config(config).socket
    raise ConfigError(f"{config} is not a pvpn-client, pvpn-gateway or pvpn-server config")


def worker_controls(role: str, config: Path, control: Path) -> list[Path]:
    """The status sockets of a node: a server of several workers has one per worker."""
    if role != "server":
        return [control]
    from pvpn.config import load_server_config
    from pvpn.workers import worker_controls as of_workers

    return of_workers(load_server_config(config))


def supervisor_health(conf: Path) -> list[str]:
    """`supervisorctl status` lines: the daemons' health as supervisord sees it."""
    import subprocess

    program = Path(sys.executable).parent / "supervisorctl"
    proc = subprocess.run([str(program), "-c", str(conf), "status"], capture_output=True,
                          text=True, timeout=30)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if not lines:
        raise PvpnError(f"supervisord with {conf} did not answer: {proc.stderr.strip()}")
    return lines


def node_session_lines(s: dict[str, Any]) -> str:
    """One session of a node's status as root's terminal shows it: every string came from
    someone else (a user's client host name, a peer address, a next hop), so every
    non-printable character is escaped and each value clipped; a missing field is '-'."""
    def shown(value: Any) -> str:
        return quoted(value if isinstance(value, str) else json.dumps(value, sort_keys=True))

    age = s.get("age")
    age_text = f"{age:.0f}" if isinstance(age, (int, float)) else "?"
    extra = {k: v for k, v in s.items()
             if k not in ("session", "user", "uid", "state", "age", "peer")}
    return (f"  {shown(s.get('session') or '(connecting)')}  {shown(s.get('user', '-'))} "
            f"(uid {shown(s.get('uid', '-'))})  {shown(s.get('state', '-'))}  age {age_text} s  "
            f"peer {shown(s.get('peer', '-'))}\n"
            "    " + ", ".join(f"{quoted(str(k), 64)} {shown(v)}" for k, v in extra.items()))


def cmd_node_status(args: argparse.Namespace) -> int:
    report: dict[str, Any] = {"nodes": [], "supervisord": []}
    for config in args.node:
        role, path = node_control(config)
        sessions: list[Any] = []
        for worker, control in enumerate(worker_controls(role, config, path)):
            mtype, reply = ask_daemon(control, MsgType.STATUS, {})
            if mtype is MsgType.ERROR:
                raise PvpnError(f"{role} at {control}: {reply.get('reason', 'refused')}")
            found = reply.get("sessions", [])
            if control != path:  # one of several workers: say whose each session is
                found = [{**s, "worker": worker} for s in found if isinstance(s, dict)]
            sessions += found
        report["nodes"].append({"role": role, "config": str(config), "sessions": sessions})
    if args.supervisord:
        report["supervisord"] = supervisor_health(args.supervisord)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for node in report["nodes"]:
        print(f"{node['role']} ({node['config']}): {len(node['sessions'])} session(s)")
        for s in node["sessions"]:
            print(node_session_lines(s))
    if report["supervisord"]:
        print("daemons (supervisord):")
        for line in report["supervisord"]:
            print(f"  {line}")
    return 0


def _text(value: Any) -> str:
    """A value from the daemon's description of a session, safe for the terminal: users
    choose some of it (the server they registered), so every non-printable character is
    escaped."""
    return printable(str(value))


def chain_text(session: dict[str, Any]) -> str:
    """Every hop of a session in order, the server last: each node's name (once its tunnel
    process said it) beside the endpoint the user named, "gw1 (10.77.1.1:4433) > server
    (10.77.3.1:4433)"."""
    via, nodes = session.get("via"), session.get("nodes")
    endpoints = [*(via if isinstance(via, list) else []), session.get("server", "?")]
    names = nodes if isinstance(nodes, list) and len(nodes) == len(endpoints) else []
    return " > ".join(f"{_text(name)} ({_text(end)})" if names else _text(end)
                      for name, end in zip(names or endpoints, endpoints))


def cmd_status(args: argparse.Namespace) -> int:
    if args.node or args.supervisord:
        return cmd_node_status(args)
    _, reply = ask_daemon(args.socket, MsgType.STATUS, {})
    sessions = reply["sessions"]
    if args.json:
        print(json.dumps(sessions, indent=2))  # JSON escapes control characters itself
        return 0
    if not sessions:
        print("no pvpn sessions" + ("" if os.getuid() == 0 else " of yours") + " on this host")
        return 0
    for s in sessions:
        get = s.get
        prefixes = get("prefixes") or []
        drops = get("drops") or {}
        drop_text = ", ".join(f"{_text(k)} {_text(v)}" for k, v in drops.items()) \
            if isinstance(drops, dict) else _text(drops)
        to = ", ".join(_text(p) for p in prefixes) if isinstance(prefixes, list) \
            else _text(prefixes)
        print(f"{_text(get('session') or '(connecting)'):32}  {_text(get('user', '?')):>10} "
              f"(uid {_text(get('uid', '?'))}, slot {_text(get('slot', '?'))})  "
              f"{_text(get('state', '?'))}\n"
              f"    to {to} via {chain_text(s)}; age {_text(get('age', '?'))} s; "
              f"out {_text(get('packets_out', 0))} pkts/{_text(get('bytes_out', 0))} B, "
              f"in {_text(get('packets_in', 0))} pkts/{_text(get('bytes_in', 0))} B; "
              f"drops {drop_text or 'none'}")
    return 0


def cmd_disconnect(args: argparse.Namespace) -> int:
    from pvpn.nodes.client import MIN_ID_PREFIX

    text = (args.session or "").lower()
    if text and not re.fullmatch(rf"[0-9a-f]{{{MIN_ID_PREFIX},32}}", text):
        raise ConfigError(f"{printable(args.session)!r} is not a session id: give at least "
                          f"{MIN_ID_PREFIX} of its hex digits (`pvpn status` lists them), "
                          "or --all")
    if args.all and (text or args.slot is not None):
        raise ConfigError("--all ends every session you may end; do not name one as well")
    if text and args.slot is not None:
        raise ConfigError("name a session by its id or by its slot, not both")
    mtype, reply = ask_daemon(args.socket, MsgType.DISCONNECT,
                              {"session": text, "slot": args.slot, "all": bool(args.all)})
    if mtype is MsgType.ERROR:
        print(f"pvpn: {printable(str(reply['reason']))}", file=sys.stderr)
        return 1
    if not reply["sessions"]:
        print("pvpn: no session to disconnect")
        return 1
    for s in reply["sessions"]:
        get = s.get
        prefixes = get("prefixes") or []
        print(f"pvpn: disconnected session {_text(get('session') or '(connecting)')} of "
              f"{_text(get('user', '?'))} (uid {_text(get('uid', '?'))}, slot "
              f"{_text(get('slot', '?'))}): "
              f"{', '.join(_text(p) for p in prefixes) if isinstance(prefixes, list) else ''}")
    return 0


PROFILE_KEYS: dict[str, type] = {
    "server": str, "via": list, "to": list, "ca": str, "pin": str, "server_name": str,
    "user": str, "key": str, "socket": str, "keepalive": float,
}


def apply_profile(args: argparse.Namespace, profiles_file: Path) -> None:
    """Fill what the command line left out from ``[profile.NAME]`` in the user's profiles file;
    what is given on the command line wins."""
    from pvpn.config import load_toml

    profiles = load_toml(profiles_file).get("profile", {})
    section = profiles.get(args.profile) if isinstance(profiles, dict) else None
    if not isinstance(section, dict):
        names = ", ".join(sorted(profiles)) if isinstance(profiles, dict) else ""
        raise ConfigError(f"{profiles_file}: no [profile.{args.profile}] (profiles: "
                          f"{names or 'none'})")
    where = f"{profiles_file}: [profile.{args.profile}]"
    for key, value in section.items():
        kind = PROFILE_KEYS.get(key)
        if kind is None:
            raise ConfigError(f"{where} {key}: unknown setting (known: {', '.join(PROFILE_KEYS)})")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is list:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where} {key} must be a list of strings")
            if not getattr(args, key):
                setattr(args, key, list(value))
            continue
        if not isinstance(value, kind):
            raise ConfigError(f"{where} {key} must be a {kind.__name__}")
        if key in ("key", "socket", "keepalive"):
            if getattr(args, f"{key}_given") is None:  # not on the command line
                setattr(args, key, Path(str(value)).expanduser() if key != "keepalive"
                        else value)
        elif getattr(args, key) is None:
            setattr(args, key, value)


def cmd_connect(args: argparse.Namespace) -> int:
    from pvpn.client.connect import ConnectOptions, run_connect

    args.key_given, args.socket_given, args.keepalive_given = args.key, args.socket, args.keepalive
    args.key = args.key or default_key()
    args.socket = args.socket or DEFAULT_SOCKET
    args.keepalive = args.keepalive or DEFAULT_KEEPALIVE
    if args.profile:
        apply_profile(args, args.profiles or config_dir() / "profiles.toml")
    if not args.server:
        raise ConfigError("name the server (SERVER[:PORT]) or a --profile that has one")
    if not args.to:
        raise ConfigError("name at least one destination prefix to protect (--to PREFIX)")
    host, port = parse_endpoint(args.server, DEFAULT_PORT, "SERVER")
    via = [parse_endpoint(v, DEFAULT_PORT, "--via") for v in args.via]
    parse_prefixes(args.to)
    if bool(args.ca) == bool(args.pin):
        raise ConfigError("give the server's CA (--ca FILE) or its pinned certificate "
                          "(--pin FILE), one of the two")
    if via and args.pin:
        raise ConfigError("--pin names one certificate; with --via every hop has its own, so "
                          "give the CA that signed them (--ca FILE)")
    hops = [*via, (host, port)]
    for i, hop in enumerate(hops):
        if hop in hops[:i]:
            raise ConfigError(f"the chain names {hop[0]}:{hop[1]} twice; a chain that comes back "
                              "to a node would loop")
    options = ConnectOptions(
        host=host, port=port, prefixes=list(args.to), key_path=args.key,
        remote_user=args.user or getpass.getuser(), socket_path=args.socket,
        ca_file=args.ca, pinned_cert=args.pin, server_name=args.server_name,
        keepalive=args.keepalive, dead_after=args.keepalive * DEAD_AFTER_KEEPALIVES, via=via,
        pcap=args.pcap.expanduser().absolute() if args.pcap else None,
        pcap_max_bytes=args.pcap_max_bytes,
    )
    log = args.log or (Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local/state")
                       / "pvpn" / "connect.log")
    return int(run_connect(options, args.background, log))


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pvpn", description="pvpn, a personal VPN.")
    parser.add_argument("--version", action="version", version=f"pvpn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("keygen", help="make your RSA key pair")
    p.add_argument("--key", type=Path, default=default_key(), help="private key file")
    # No default here: pvpn.auth's, read when the key is made (auth loads cryptography).
    p.add_argument("--bits", type=int)
    p.add_argument("--force", action="store_true", help="replace an existing key")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("connect", help="open your personal VPN")
    p.add_argument("server", metavar="SERVER[:PORT]", nargs="?")
    p.add_argument("--profile", metavar="NAME", help="take the settings of [profile.NAME] "
                   "in ~/.config/pvpn/profiles.toml; the command line wins")
    p.add_argument("--profiles", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--via", action="append", default=[], metavar="GATEWAY[:PORT]",
                   help="a gateway to go through, in order (repeatable)")
    p.add_argument("--to", action="append", default=[], metavar="PREFIX",
                   help="destination prefix to protect (repeatable)")
    p.add_argument("--key", type=Path, help="your private key (default ~/.config/pvpn/id_rsa)")
    p.add_argument("--ca", help="CA certificate that signed the server's certificate")
    p.add_argument("--pin", help="the server's own certificate, pinned")
    p.add_argument("--server-name", help="name or IP the certificate must carry "
                   "(default: the host in SERVER)")
    p.add_argument("--user", help="user name at the server (default: your login name)")
    p.add_argument("--socket", type=Path, help=f"pvpn-client's socket (default {DEFAULT_SOCKET})")
    p.add_argument("--background", action="store_true", help="return once the VPN is up")
    p.add_argument("--log", type=Path, help="log file in --background mode")
    p.add_argument("--keepalive", type=float,
                   help=f"seconds between keepalives (default {DEFAULT_KEEPALIVE:g})")
    p.add_argument("--pcap", type=Path, metavar="FILE",
                   help="write the session's inner packets, both ways, to FILE (pcap, 0600)")
    p.add_argument("--pcap-max-bytes", type=int, default=DEFAULT_MAX_BYTES, metavar="N",
                   help=f"stop writing --pcap at N bytes (default {DEFAULT_MAX_BYTES // 10**6} MB)")
    p.set_defaults(func=cmd_connect)

    p = sub.add_parser("disconnect", help="close your VPN: SESSION, or your only one without "
                       "it; --all for all of yours (root: everyone's)")
    p.add_argument("session", nargs="?", help="session id, or a prefix of it of at least 8 hex "
                   "digits (`pvpn status` lists them)")
    p.add_argument("--all", action="store_true", help="every session you may end (root: all "
                   "of this host's, each named as it ends)")
    p.add_argument("--slot", type=int, help="the session in this slot (one that has no id yet)")
    p.add_argument("--socket", type=Path, default=DEFAULT_SOCKET)
    p.set_defaults(func=cmd_disconnect)

    p = sub.add_parser("status", help="your sessions on this host (root: everyone's); on a "
                       "node, its sessions and the daemons' health")
    p.add_argument("--socket", type=Path, default=DEFAULT_SOCKET)
    p.add_argument("--node", type=Path, action="append", default=[], metavar="CONFIG",
                   help="a local node's config file (client.toml, gateway.toml, server.toml): "
                   "show that daemon's sessions (root)")
    p.add_argument("--supervisord", type=Path, metavar="CONF",
                   help="supervisord.conf of this node: show the daemons' health")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("ca", help="a small CA for node certificates")
    ca = p.add_subparsers(dest="ca_command", required=True)
    q = ca.add_parser("init", help="create a CA in DIR")
    q.add_argument("dir", type=Path)
    q.add_argument("--name", default="pvpn CA")
    q.add_argument("--days", type=int, default=3650)
    q.set_defaults(func=cmd_ca_init)
    q = ca.add_parser("issue", help="issue a node certificate signed by the CA in DIR")
    q.add_argument("dir", type=Path)
    q.add_argument("name")
    q.add_argument("--ip", action="append", default=[], help="IP address the node is reached at")
    q.add_argument("--dns", action="append", default=[], help="DNS name of the node")
    q.add_argument("--out", type=Path, help="output directory (default: DIR)")
    q.add_argument("--days", type=int, default=825)
    q.set_defaults(func=cmd_ca_issue)

    from pvpn.cli.trace import register as register_trace
    register_trace(sub)
    from pvpn.cli.lab.cli import register

    register(sub)
    from pvpn.cli.bench.cli import register as register_bench
    register_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"pvpn: {exc}", file=sys.stderr)
        return 2
    except PvpnError as exc:
        print(f"pvpn: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
