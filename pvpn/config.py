"""Node configuration files (TOML), checked strictly: a bad setting is a ConfigError that names
the file, the setting and what to do. The layouts are documented in docs/design.md."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Debian 11 / Ubuntu 22.04
    import tomli as tomllib

from pvpn.addresses import Local, address_exclusion
from pvpn.errors import ConfigError
from pvpn.flowtable import MAX_FLOWS
from pvpn.records import NODE_NAME, USER_NAME
from pvpn.text import quoted

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Policy = TypeVar("_Policy")
# Bounds of a session's pcap capture (pvpn.io.pcap) and of a server's capture directory.
DEFAULT_MAX_BYTES = 100 * 1000 * 1000
DEFAULT_MAX_TOTAL_BYTES = 1000 * 1000 * 1000  # all of a server's capture directory
DEFAULT_MAX_FILES = 1000
#: A node or a user's process sends a keepalive after this many quiet seconds ([server] /
#: [gateway] keepalive, pvpn connect --keepalive) ...
DEFAULT_KEEPALIVE = 10.0
#: ... and takes a link for dead after this many keepalive intervals with nothing from the
#: peer ([server] / [gateway] dead_after; pvpn connect: its --keepalive times this).
DEAD_AFTER_KEEPALIVES = 3
DEFAULT_DEAD_AFTER = DEAD_AFTER_KEEPALIVES * DEFAULT_KEEPALIVE
#: The daemons' local sockets ([server] / [gateway] control, [client] socket).
RUN_DIR = Path("/run/pvpn")
DEFAULT_SERVER_CONTROL = RUN_DIR / "server.ctl"
DEFAULT_GATEWAY_CONTROL = RUN_DIR / "gateway.ctl"
DEFAULT_CLIENT_SOCKET = RUN_DIR / "client.sock"
#: Sessions (server) or splices (gateway) one user may have at once: OpenSSH's MaxSessions.
DEFAULT_SESSIONS_PER_USER = 10

# fullmatch, never match: `$` also matches before a final newline, so "s\n" passed `^...$`.
_INSTANCE_RE = re.compile(r"[a-z][a-z0-9]{0,7}")


def parse_prefix(text: str, where: str = "prefix") -> Network:
    """Parse ``10.0.0.0/24``, ``fd00::/64`` or a bare address (a /32 or /128).

    An IPv6 zone (``fe80::1%eth0``) is refused: a prefix has none (RFC 4007 11.7), and
    Python's ipaddress takes any text after the ``%``, line breaks included, which would
    reach iptables-restore as lines of its own (a local user's REGISTER wrote rules as root)."""
    if "%" in text:
        raise ConfigError(f"{where}: {quoted(text, 64)} has a zone (%...); a prefix has none")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not an IPv4/IPv6 address or prefix") from None


def parse_endpoint(text: str, default_port: int, where: str = "address") -> tuple[str, int]:
    """Parse ``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address."""
    host, port = text, default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"{where}: {text!r} has '[' without ']'")
        host = text[1:end]
        rest = text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"{where}: {text!r}: expected ':PORT' after ']'")
            port = _port(rest[1:], where)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        port = _port(port_text, where)
    if not host:
        raise ConfigError(f"{where}: {text!r} has no host")
    return host, port


def _port(text: str, where: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError(f"{where}: port {text!r} must be a number from 1 to 65535")
    return int(text)


class _Table:
    """Reads typed settings out of one TOML table and names the setting in every error."""

    def __init__(self, path: Path, section: str, data: dict[str, Any]) -> None:
        self.path, self.section, self.data = path, section, data
        self.used: set[str] = set()

    def where(self, key: str) -> str:
        return f"{self.path}: [{self.section}] {key}"

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is ...:
                raise ConfigError(f"{self.where(key)} is missing; add it")
            return default
        value = self.data[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            wanted = getattr(kind, "__name__", "number")
            raise ConfigError(f"{self.where(key)} must be a {wanted}, not {type(value).__name__}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        """A true/false setting (TOML's booleans only: 1 or "yes" are refused)."""
        self.used.add(key)
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.where(key)} must be true or false, not "
                              f"{type(value).__name__}")
        return value

    def strings(self, key: str, default: Any = ...) -> list[str]:
        value = self.get(key, list, default)
        if not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self.where(key)} must be a list of strings")
        return list(value)

    def finish(self) -> None:
        unknown = set(self.data) - self.used
        if unknown:
            raise ConfigError(
                f"{self.path}: [{self.section}] has unknown setting(s) {sorted(unknown)}; "
                "check the spelling against docs/design.md"
            )


def load_toml(path: Path) -> dict[str, Any]:
    """A TOML file as data; ConfigError naming the file if it is missing or not TOML."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable (run as root?)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _defaults(config: type[Any]) -> SimpleNamespace:
    """The defaults a config class gives its settings: each is written once, in the class."""
    return SimpleNamespace(**{f.name: f.default for f in dataclasses.fields(config)
                              if f.default is not dataclasses.MISSING})


def _existing_file(table: _Table, key: str) -> Path:
    path = Path(table.get(key, str))
    if not path.is_file():
        raise ConfigError(f"{table.where(key)}: file {path} does not exist")
    return path


def _timers(table: _Table) -> tuple[float, float]:
    """[server] / [gateway] keepalive and dead_after (at least two keepalive intervals)."""
    keepalive = float(table.get("keepalive", (int, float), DEFAULT_KEEPALIVE))
    dead_after = float(table.get("dead_after", (int, float), DEFAULT_DEAD_AFTER))
    if not 0.5 <= keepalive <= 3600:
        raise ConfigError(f"{table.where('keepalive')} must be 0.5 to 3600 seconds")
    if dead_after < 2 * keepalive:
        raise ConfigError(f"{table.where('dead_after')} ({dead_after:g}) must be at least two "
                          f"keepalive intervals ({2 * keepalive:g} s)")
    return keepalive, dead_after


def _sessions_per_user(table: _Table) -> int:
    sessions = table.get("sessions_per_user", int, DEFAULT_SESSIONS_PER_USER)
    if not 1 <= sessions <= 1024:
        raise ConfigError(f"{table.where('sessions_per_user')} must be 1 to 1024")
    return int(sessions)


def _pcap_settings(table: _Table) -> tuple[Path | None, int]:
    """[server] pcap_dir (absolute; created 0700 at start) and pcap_max_bytes per file."""
    text = table.get("pcap_dir", str, "")
    pcap_dir = Path(text) if text else None
    if pcap_dir is not None and not pcap_dir.is_absolute():
        raise ConfigError(f"{table.where('pcap_dir')} must be an absolute directory path")
    max_bytes = table.get("pcap_max_bytes", int, DEFAULT_MAX_BYTES)
    if max_bytes < 1024:
        raise ConfigError(f"{table.where('pcap_max_bytes')} must be at least 1024 bytes")
    return pcap_dir, int(max_bytes)


def _name(table: _Table) -> str:
    name = table.get("name", str)
    if not NODE_NAME.fullmatch(name):
        raise ConfigError(f"{table.where('name')}: {name!r} must be letters, digits, '.-_'")
    return str(name)


def _instance(table: _Table, default: str) -> str:
    instance = table.get("instance", str, default)
    if not _INSTANCE_RE.fullmatch(instance):
        raise ConfigError(
            f"{table.where('instance')}: {instance!r} must be 1-8 lower-case letters/digits"
        )
    return str(instance)


@dataclass(frozen=True, slots=True)
class NodeLimits:
    """What a stranger may cost a node before it has authenticated, and how often a live
    session proves again that its user still holds a key ([server] and [gateway] settings;
    docs/design.md "Limits and defences: the nodes" says why each default)."""

    hello_timeout: float = 10.0  # TCP accepted -> HELLO received
    auth_timeout: float = 15.0  # TCP accepted -> authenticated; also the answer to a re-CHALLENGE
    reauth_interval: float = 3600.0  # a live session is challenged again this often (OpenVPN reneg-sec)
    preauth_per_source: int = 32  # connections awaiting authentication from one address (/64)
    preauth_max: int = 256  # ... from everyone


def _limits(t: _Table) -> NodeLimits:
    default = NodeLimits()
    hello = float(t.get("hello_timeout", (int, float), default.hello_timeout))
    auth = float(t.get("auth_timeout", (int, float), default.auth_timeout))
    reauth = float(t.get("reauth_interval", (int, float), default.reauth_interval))
    per_source = t.get("preauth_per_source", int, default.preauth_per_source)
    total = t.get("preauth_max", int, default.preauth_max)
    if not 1 <= hello <= 120:
        raise ConfigError(f"{t.where('hello_timeout')} must be 1 to 120 seconds")
    if not hello <= auth <= 600:
        raise ConfigError(f"{t.where('auth_timeout')} must be from hello_timeout ({hello:g} s) "
                          "to 600 seconds")
    if not 10 <= reauth <= 86400:
        raise ConfigError(f"{t.where('reauth_interval')} must be 10 to 86400 seconds")
    if not 1 <= total <= 4096:
        raise ConfigError(f"{t.where('preauth_max')} must be 1 to 4096 connections")
    if not 1 <= per_source <= total:
        raise ConfigError(f"{t.where('preauth_per_source')} must be 1 to preauth_max ({total})")
    return NodeLimits(hello, auth, reauth, int(per_source), int(total))


@dataclass(slots=True)
class UserPolicy:
    """What one user may reach through this node (like SSH ``permitopen``)."""

    allow: list[Network]

    def permits(self, network: Network) -> bool:
        return any(
            network.version == allowed.version and network.subnet_of(allowed)  # type: ignore[arg-type]
            for allowed in self.allow
        )


@dataclass(slots=True)
class NodeConfig:
    """What every node users connect to ([server], [gateway]) has in its section."""

    path: Path
    name: str
    listen: list[tuple[str, int]]
    certificate: Path
    private_key: Path
    authorized_keys: Path
    # Keyword-only, so that each role's own settings follow the six above in its positional
    # order.
    keepalive: float = field(default=DEFAULT_KEEPALIVE, kw_only=True)
    dead_after: float = field(default=DEFAULT_DEAD_AFTER, kw_only=True)
    limits: NodeLimits = field(default_factory=NodeLimits, kw_only=True)
    # Sessions (server) or splices, connecting ones included (gateway), one user may have at
    # once: at the cap a server ends the user's oldest detached session or refuses the new
    # one, a gateway refuses it.
    sessions_per_user: int = field(default=DEFAULT_SESSIONS_PER_USER, kw_only=True)


@dataclass(slots=True)
class ServerConfig(NodeConfig):
    queue: int
    nat_ports: tuple[int, int]
    instance: str
    users: dict[str, UserPolicy] = field(default_factory=dict)
    resume_grace: float = 120.0
    control: Path = DEFAULT_SERVER_CONTROL
    # Inner packets of every session to <pcap_dir>/<session>.pcap (off when None).
    pcap_dir: Path | None = None
    pcap_max_bytes: int = DEFAULT_MAX_BYTES
    # The share of one destination's NAT ports one user may hold in open mappings.
    nat_share: float = 0.5
    # NAT mappings one user (all sessions) and one session may hold; at the cap a new one
    # replaces the oldest unreplied, then the oldest closed mapping (conntrack's early drop).
    nat_flows_per_user: int = 16384
    nat_flows_per_session: int = 8192
    # How long a mapping the remote end never answered is kept: opened by a SYN
    # (conntrack's SYN_SENT, 120 s), or picked up mid-stream (conntrack's 300 s).
    nat_syn_timeout: float = 120.0
    nat_unreplied_timeout: float = 300.0
    # The capture directory as a whole: the oldest closed captures are deleted first.
    pcap_max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES
    pcap_max_files: int = DEFAULT_MAX_FILES
    # Sessions and NAT mappings kept across a restart (pvpn.state; off when None): saved at
    # most every state_interval seconds while they change, and on an orderly stop.
    state_file: Path | None = None
    state_interval: float = 2.0
    # Worker processes sharing the users (pvpn.workers; 1: the server is one process), and
    # which of them this config is for (pvpn.workers.worker_config).
    workers: int = 1
    worker: int = 0
    # Users' TCP super-packets go whole to the kernel's forwarding (server.uploads), where
    # the host lets them; false: every upload byte is segmented and sent by the raw socket,
    # seen by the host's OUTPUT rules, never by its FORWARD rules.
    forward_uploads: bool = True


DEFAULT_PORT = 4433
#: Where pvpn-server keeps its sessions across a restart unless [server] state_file says.
DEFAULT_STATE_FILE = "/var/lib/pvpn/server.state"


def _node_tables(path: Path, role: str) -> tuple[dict[str, Any], _Table]:
    """A node config has its [role] section and [users.NAME] sections, nothing else."""
    data = load_toml(path)
    unknown = set(data) - {role, "users"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}")
    if role not in data or not isinstance(data[role], dict):
        raise ConfigError(f"{path}: the [{role}] section is missing")
    return data, _Table(path, role, data[role])


def _node_basics(t: _Table) -> tuple[str, list[tuple[str, int]], Path, Path, Path]:
    """What every listening node has: name, listen addresses, certificate and key, users."""
    name = _name(t)
    listen = [parse_endpoint(x, DEFAULT_PORT, t.where("listen")) for x in t.strings("listen")]
    if not listen:
        raise ConfigError(f"{t.where('listen')} is empty; give at least one address:port")
    certificate = _existing_file(t, "certificate")
    private_key = _existing_file(t, "private_key")
    authorized_keys = Path(t.get("authorized_keys", str))
    if not authorized_keys.is_dir():
        raise ConfigError(f"{t.where('authorized_keys')}: directory {authorized_keys} not found")
    return name, listen, certificate, private_key, authorized_keys


def _users(path: Path, data: dict[str, Any], policy: Callable[[_Table], _Policy]
           ) -> dict[str, _Policy]:
    """The [users.NAME] sections of a node config, each read by ``policy``."""
    sections = data.get("users", {})
    if not isinstance(sections, dict):
        raise ConfigError(f"{path}: [users] must be a table of [users.NAME] sections")
    users: dict[str, _Policy] = {}
    for user, section in sections.items():
        if not USER_NAME.fullmatch(user):
            raise ConfigError(f"{path}: [users.{user}]: not a valid user name")
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: [users.{user}] must be a table")
        table = _Table(path, f"users.{user}", section)
        users[user] = policy(table)
        table.finish()
    return users


def _user_policy(u: _Table) -> UserPolicy:
    return UserPolicy([parse_prefix(p, u.where("allow")) for p in u.strings("allow")])


def load_server_config(path: Path) -> ServerConfig:
    data, t = _node_tables(path, "server")
    name, listen, certificate, private_key, authorized_keys = _node_basics(t)
    queue = t.get("queue", int, 4000)
    if not 0 <= queue <= 65535:
        raise ConfigError(f"{t.where('queue')} must be 0..65535")
    ports_text = t.get("nat_ports", str, "61000-64999")
    match = re.fullmatch(r"(\d+)-(\d+)", ports_text)
    if not match or not 1024 <= int(match[1]) < int(match[2]) <= 65535:
        raise ConfigError(f"{t.where('nat_ports')} must look like 61000-64999 (within 1024-65535)")
    default = _defaults(ServerConfig)
    nat_share = float(t.get("nat_share", (int, float), default.nat_share))
    if not 0 < nat_share <= 1:
        raise ConfigError(f"{t.where('nat_share')} must be more than 0 and at most 1")
    per_user = t.get("nat_flows_per_user", int, default.nat_flows_per_user)
    if not 1 <= per_user <= MAX_FLOWS:
        raise ConfigError(f"{t.where('nat_flows_per_user')} must be 1 to {MAX_FLOWS}")
    per_session = t.get("nat_flows_per_session", int, min(default.nat_flows_per_session, per_user))
    if not 1 <= per_session <= per_user:
        raise ConfigError(f"{t.where('nat_flows_per_session')} must be 1 to "
                          f"nat_flows_per_user ({per_user})")
    syn_timeout = float(t.get("nat_syn_timeout", (int, float), default.nat_syn_timeout))
    unreplied_timeout = float(t.get("nat_unreplied_timeout", (int, float),
                                    default.nat_unreplied_timeout))
    for key, value in (("nat_syn_timeout", syn_timeout),
                       ("nat_unreplied_timeout", unreplied_timeout)):
        if not 1 <= value <= 7440:
            raise ConfigError(f"{t.where(key)} must be 1 to 7440 seconds")
    sessions_per_user = _sessions_per_user(t)
    keepalive, dead_after = _timers(t)
    grace = float(t.get("resume_grace", (int, float), default.resume_grace))
    instance = _instance(t, "pvpns")
    pcap_dir, pcap_max_bytes = _pcap_settings(t)
    pcap_total = t.get("pcap_max_total_bytes", int, max(DEFAULT_MAX_TOTAL_BYTES, pcap_max_bytes))
    if pcap_total < pcap_max_bytes:
        raise ConfigError(f"{t.where('pcap_max_total_bytes')} must be at least pcap_max_bytes "
                          f"({pcap_max_bytes})")
    pcap_files = t.get("pcap_max_files", int, DEFAULT_MAX_FILES)
    if not 1 <= pcap_files <= 1_000_000:
        raise ConfigError(f"{t.where('pcap_max_files')} must be 1 to 1000000")
    control = Path(t.get("control", str, DEFAULT_SERVER_CONTROL))
    state_text = t.get("state_file", str, DEFAULT_STATE_FILE)
    state_file = Path(state_text) if state_text else None
    if state_file is not None and not state_file.is_absolute():
        raise ConfigError(f"{t.where('state_file')} must be an absolute file path (or \"\" "
                          "to keep no state: a restart then ends every session)")
    state_interval = float(t.get("state_interval", (int, float), default.state_interval))
    if not 0.5 <= state_interval <= 60:
        raise ConfigError(f"{t.where('state_interval')} must be 0.5 to 60 seconds")
    workers = t.get("workers", int, default.workers)
    if not 1 <= workers <= 16:
        raise ConfigError(f"{t.where('workers')} must be 1 to 16")
    forward_uploads = t.flag("forward_uploads", default.forward_uploads)
    limits = _limits(t)
    t.finish()
    users = _users(path, data, _user_policy)
    config = ServerConfig(
        path, name, listen, certificate, private_key, authorized_keys, queue,
        (int(match[1]), int(match[2])), instance, users, grace, control,
        keepalive=keepalive, dead_after=dead_after, limits=limits,
        sessions_per_user=sessions_per_user,
        pcap_dir=pcap_dir, pcap_max_bytes=pcap_max_bytes, nat_share=nat_share,
        nat_flows_per_user=int(per_user), nat_flows_per_session=int(per_session),
        nat_syn_timeout=syn_timeout, nat_unreplied_timeout=unreplied_timeout,
        pcap_max_total_bytes=int(pcap_total), pcap_max_files=int(pcap_files),
        state_file=state_file, state_interval=state_interval, workers=int(workers),
        forward_uploads=forward_uploads,
    )
    low, high = config.nat_ports
    if queue + workers - 1 > 65535 or high - low + 1 < workers:
        raise ConfigError(f"{t.where('workers')}: {workers} workers need {workers} queues from "
                          f"queue ({queue}) and a slice of nat_ports each")
    return config


@dataclass(slots=True)
class ClientConfig:
    path: Path
    name: str
    socket: Path
    queue_base: int
    max_sessions: int
    mark_mask: int
    instance: str
    # What one local user may take (docs/design.md, "Limits and defences: the client host").
    max_sessions_per_uid: int = 8
    max_prefixes_per_session: int = 64
    max_prefixes_per_uid: int = 256
    max_flows_per_session: int = 8192
    max_local_connections_per_uid: int = 16
    max_local_connections: int = 512
    grace_time: float = 120.0
    held_timeout: float = 86400.0
    max_new_sessions_per_minute: int = 120


def contiguous_mask(mask: int) -> bool:
    """One run of set bits (0x00ff0000, not 0x00ff00ff): a slot's mark is its number shifted
    into the mask, so a gap in the mask could give a slot the mark 0 (no session) or another
    slot's mark."""
    low = mask & -mask
    return mask > 0 and (mask + low) & mask == 0


def _count(t: _Table, key: str, default: int, low: int, high: int) -> int:
    value = int(t.get(key, int, default))
    if not low <= value <= high:
        raise ConfigError(f"{t.where(key)} must be {low}..{high}")
    return value


def load_client_config(path: Path) -> ClientConfig:
    data = load_toml(path)
    if set(data) != {"client"} or not isinstance(data["client"], dict):
        raise ConfigError(f"{path}: expected exactly one [client] section")
    t = _Table(path, "client", data["client"])
    name = _name(t)
    socket_path = Path(t.get("socket", str, DEFAULT_CLIENT_SOCKET))
    queue_base = t.get("queue_base", int, 3000)
    max_sessions = t.get("max_sessions", int, 64)
    mask_text = t.get("mark_mask", str, "0x00ff0000")
    try:
        mark_mask = int(mask_text, 0)
    except ValueError:
        raise ConfigError(f"{t.where('mark_mask')}: {mask_text!r} is not a number") from None
    if not 0 < mark_mask < 1 << 32 or not contiguous_mask(mark_mask):
        raise ConfigError(
            f"{t.where('mark_mask')}: {mask_text} must be one run of set bits within 32 "
            "(like 0x00ff0000): with a gap in it a slot's mark could be 0 or another slot's")
    bits = bin(mark_mask).count("1")
    if (1 << bits) - 1 < max_sessions + 1:
        raise ConfigError(
            f"{t.where('mark_mask')}: {mask_text} must be a 32-bit mask with room for "
            f"max_sessions={max_sessions} marks"
        )
    if not 1 <= max_sessions <= 1024:
        raise ConfigError(f"{t.where('max_sessions')} must be 1..1024")
    if not 0 <= queue_base <= 65536 - 2 * max_sessions:
        raise ConfigError(f"{t.where('queue_base')} must leave room for 2 x max_sessions queues "
                          "(each session's, and the one the kernel segments its super-packets "
                          "in: queue_base + max_sessions + slot)")
    instance = _instance(t, "pvpnc")
    default = _defaults(ClientConfig)
    per_uid = _count(t, "max_sessions_per_uid", min(default.max_sessions_per_uid, max_sessions),
                     1, max_sessions)
    prefixes = _count(t, "max_prefixes_per_session", default.max_prefixes_per_session, 1, 256)
    prefixes_uid = _count(t, "max_prefixes_per_uid", max(default.max_prefixes_per_uid, prefixes),
                          prefixes, 65536)
    flows = _count(t, "max_flows_per_session", default.max_flows_per_session, 64, 1 << 20)
    conns_uid = _count(t, "max_local_connections_per_uid",
                       default.max_local_connections_per_uid, 2, 4096)
    conns = _count(t, "max_local_connections", max(default.max_local_connections, conns_uid),
                   conns_uid, 65536)
    grace = float(t.get("grace_time", (int, float), default.grace_time))
    if not 10 <= grace <= 3600:
        raise ConfigError(f"{t.where('grace_time')} must be 10 to 3600 seconds")
    new_sessions = _count(t, "max_new_sessions_per_minute", default.max_new_sessions_per_minute, 1,
                          6000)
    held = float(t.get("held_timeout", (int, float), default.held_timeout))
    if held != 0 and not grace <= held <= 366 * 86400:
        raise ConfigError(f"{t.where('held_timeout')} must be 0 (held until `pvpn "
                          f"disconnect`) or {grace:g} (grace_time) to {366 * 86400} seconds")
    t.finish()
    return ClientConfig(path, name, socket_path, queue_base, max_sessions, mark_mask, instance,
                        max_sessions_per_uid=per_uid, max_prefixes_per_session=prefixes,
                        max_prefixes_per_uid=prefixes_uid, max_flows_per_session=flows,
                        max_local_connections_per_uid=conns_uid, max_local_connections=conns,
                        grace_time=grace, held_timeout=held,
                        max_new_sessions_per_minute=new_sessions)


def parse_prefixes(texts: Sequence[str], where: str = "--to") -> list[Network]:
    if not texts:
        raise ConfigError(f"{where}: name at least one destination prefix to protect")
    return [parse_prefix(t, where) for t in texts]


@dataclass(frozen=True, slots=True)
class NextHopRule:
    """One allowed next hop: an address or prefix, and a port (None = any port)."""

    network: Network
    port: int | None

    def permits(self, address: str, port: int) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return ip.version == self.network.version and ip in self.network and (
            self.port is None or self.port == port)

    def __str__(self) -> str:
        net = str(self.network)
        if self.port is None:
            return net
        if self.network.num_addresses == 1:
            net = str(self.network.network_address)
        return f"[{net}]:{self.port}" if self.network.version == 6 else f"{net}:{self.port}"


def parse_next_hop_rule(text: str, where: str) -> NextHopRule:
    """``10.0.0.2:4433``, ``[fd00::2]:4433``, ``10.0.0.0/24`` (any port), ``[fd00::/64]:4433``."""
    port: int | None = None
    body = text
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1:].startswith(":"):
            raise ConfigError(f"{where}: {text!r}: write [ADDRESS]:PORT")
        body, port = text[1:end], _port(text[end + 2:], where)
    elif text.count(":") == 1:
        body, port_text = text.split(":")
        port = _port(port_text, where)
    return NextHopRule(parse_prefix(body, where), port)


@dataclass(slots=True)
class GatewayPolicy:
    """Which next hops one user may ask this gateway for.

    A rule covers special addresses (loopback, IPv4-mapped ``::ffff:127.0.0.1``, link-local,
    multicast, ...) and the gateway's own addresses only when it names them (it lies inside
    the special range, or is that own address): ``::/0`` does not take a user to the
    gateway's loopback (pvpn.addresses)."""

    next: list[NextHopRule]

    def permits(self, address: str, port: int) -> bool:
        """Whether a rule covers ``address:port`` (before the special-address exclusion)."""
        return any(rule.permits(address, port) for rule in self.next)

    def exclusion(self, address: str, port: int, local: Local) -> str | None:
        """Why the rules that cover ``address:port`` do not take a user there: it is special or
        one of the gateway's own (``local``) and none of them names it. None if they do."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return f"{address!r} is not an IP address"
        covering = [rule.network for rule in self.next if rule.permits(address, port)]
        return address_exclusion(ip, covering, local)


@dataclass(slots=True)
class GatewayConfig(NodeConfig):
    connect_timeout: float
    users: dict[str, GatewayPolicy] = field(default_factory=dict)
    control: Path = DEFAULT_GATEWAY_CONTROL


def _gateway_policy(u: _Table) -> GatewayPolicy:
    return GatewayPolicy([parse_next_hop_rule(x, u.where("next")) for x in u.strings("next")])


def load_gateway_config(path: Path) -> GatewayConfig:
    data, t = _node_tables(path, "gateway")
    name, listen, certificate, private_key, authorized_keys = _node_basics(t)
    connect_timeout = float(t.get("connect_timeout", (int, float), 10.0))
    keepalive, dead_after = _timers(t)
    control = Path(t.get("control", str, DEFAULT_GATEWAY_CONTROL))
    limits = _limits(t)
    sessions_per_user = _sessions_per_user(t)
    t.finish()
    users = _users(path, data, _gateway_policy)
    return GatewayConfig(path, name, listen, certificate, private_key, authorized_keys,
                         connect_timeout, users, control, keepalive=keepalive,
                         dead_after=dead_after, limits=limits,
                         sessions_per_user=sessions_per_user)
