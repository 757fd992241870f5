"""Configuration files of the lab's hosts, as text built from the topology (no I/O but reading
the shipped supervisord files).

The pvpn nodes (client, gateways, server) get the TOML formats of docs/design.md and copies
of the installed ``supervisord.d/supervisord.conf`` and ``pvpn-<client|gateway|server>.conf``
with the host's directory in place of a real node's /etc/pvpn, /var/log/pvpn and /run/pvpn;
the target gets nginx, iperf3, a UDP echo service and sshd, all under its own supervisord.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from pvpn.cli.lab.topology import (
    AUTHORIZED_USERS,
    ECHO_PORT,
    HTTP_PORT,
    IPERF_PORT,
    LAB_USERS,
    SSH_PORT,
    Topology,
)

# The target's files, by name: the sizes the issue asks for, plus a large one.
WWW_FILES: dict[str, int] = {
    "0": 0,
    "1k": 1024,
    "10k": 10 * 1024,
    "100k": 100 * 1024,
    "1m": 1024 * 1024,
    "big": 64 * 1024 * 1024,
}

CLIENT_QUEUE_BASE = 3000
SERVER_QUEUE = 4000
NAT_PORTS = "61000-64999"  # outside the default ip_local_port_range 32768-60999


CONNECT_TIMEOUT = 10  # seconds a gateway may take to reach its next hop


def supervisord_d() -> Path:
    """Where the ready-to-include program sections live.

    Installed as data into ``<sys.prefix>/share/pvpn/supervisord.d`` (setup.py data_files);
    when pvpn runs from a source checkout, the checkout's ``supervisord.d`` next to the
    package.
    """
    installed = Path(sys.prefix) / "share/pvpn/supervisord.d"
    if installed.is_dir():
        return installed
    return _checkout_supervisord_d()


def _checkout_supervisord_d() -> Path:
    return Path(__file__).resolve().parents[3] / "supervisord.d"


def shipped_file(name: str) -> Path:
    """The shipped ``supervisord.d/<name>``: the installed one, else (an older installation
    without it, or a source checkout) the checkout's."""
    installed = supervisord_d() / name
    if installed.is_file():
        return installed
    return _checkout_supervisord_d() / name


def program_section(program: str) -> Path:
    """The shipped program section ``<program>.conf`` (:func:`shipped_file`)."""
    return shipped_file(f"{program}.conf")


# The directories the shipped files name (a real node's), each as a whole path (also in a
# unix:// URL), never a part of another one such as /opt/etc/pvpn, /etc/pvpn-old or /run/pvpnx.
NODE_DIRECTORIES = re.compile(r"(?<![\w.-])(?:/etc/pvpn|/var/log/pvpn|/run/pvpn)(?![\w.-])")


def for_host(text: str, host_dir: Path) -> str:
    """``text`` of a shipped file with ``host_dir`` in place of /etc/pvpn, /var/log/pvpn and
    /run/pvpn in every setting (the comments, which describe a real node, stay as they are)."""
    return "".join(line if line.lstrip().startswith(";")
                   else NODE_DIRECTORIES.sub(lambda _m: str(host_dir), line)
                   for line in text.splitlines(keepends=True))


def node_program(role: str) -> str | None:
    """The pvpn daemon a lab host runs: pvpn-client, pvpn-gateway, pvpn-server, or None."""
    if role in ("client", "server"):
        return f"pvpn-{role}"
    if role.startswith("gw"):
        return "pvpn-gateway"
    return None


def node_log(topology: Topology, role: str) -> Path:
    """The JSON-lines log of a host's pvpn daemon (supervisord writes its stdout there)."""
    program = node_program(role)
    if program is None:
        raise ValueError(f"lab host {role!r} runs no pvpn node")
    return topology.host_dir(role) / f"{program}.log"


def node_config(topology: Topology, role: str) -> Path:
    """The TOML file of a host's pvpn daemon: client.toml, gateway.toml or server.toml."""
    kind = "gateway" if role.startswith("gw") else role
    return topology.host_dir(role) / f"{kind}.toml"


def _toml_string(value: str) -> str:
    # JSON string syntax is valid TOML basic-string syntax for the paths and names we write.
    return json.dumps(value)


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(_toml_string(v) for v in values) + "]"


LAB_PCAP_MAX_BYTES = 16 * 1000 * 1000


def server_pcap_dir(topology: Topology) -> Path:
    """Where the lab's server writes each session's packets (``<session hex>.pcap``)."""
    return topology.host_dir("server") / "pcap"


def server_state_file(topology: Topology) -> Path:
    """Where the lab's server keeps its sessions across a restart ([server] state_file)."""
    return topology.host_dir("server") / "state" / "server.state"


def client_socket(topology: Topology) -> Path:
    return topology.host_dir("client") / "pvpn-client.sock"


def ca_certificate(topology: Topology) -> Path:
    return topology.root / "ca" / "ca.crt"


def user_key(topology: Topology, user: str) -> Path:
    return topology.root / "users" / user / "id_rsa"


def ssh_key(topology: Topology, user: str) -> Path:
    return topology.root / "ssh" / user


def known_hosts(topology: Topology) -> Path:
    return topology.root / "ssh" / "known_hosts"


def connect_argv(topology: Topology, user: str, pvpn: str = "pvpn") -> list[str]:
    """``pvpn connect`` through the whole chain for ``user``: ``--via`` every gateway's
    IPv4 address in order, then the server, protecting the target's subnets."""
    chain = [topology.endpoints(role)[0] for role in topology.chain_roles]
    vias = [word for hop in chain[:-1] for word in ("--via", hop)]
    link = topology.target_link
    return [pvpn, "connect", *vias, chain[-1],
            "--to", str(link.subnet4), "--to", str(link.subnet6),
            "--ca", str(ca_certificate(topology)), "--key", str(user_key(topology, user)),
            "--socket", str(client_socket(topology))]


def target_subnets(topology: Topology) -> list[str]:
    link = topology.target_link
    return [str(link.subnet4), str(link.subnet6)]


def client_toml(topology: Topology) -> str:
    return "\n".join([
        f"# pvpn-client of lab {topology.name}; generated by `pvpn lab up`.",
        "[client]",
        'name = "client"',
        f"socket = {_toml_string(str(client_socket(topology)))}",
        f"queue_base = {CLIENT_QUEUE_BASE}",
        "max_sessions = 64",
        'mark_mask = "0x00ff0000"',
        'instance = "pvpnc"',
        "",
    ])


# The lab's nodes notice a dead peer faster than the defaults (10 s keepalives, dead after
# 30 s, sessions resumable for 120 s), so fault tests fit in a test run.
LAB_TIMERS = ("keepalive = 5", "dead_after = 15")
LAB_RESUME_GRACE = 20


def server_toml(topology: Topology) -> str:
    server_dir = topology.host_dir("server")
    allow = target_subnets(topology)
    lines = [
        f"# pvpn-server of lab {topology.name}; generated by `pvpn lab up`.",
        "[server]",
        'name = "server"',
        f"listen = {_toml_list(topology.endpoints('server'))}",
        f"certificate = {_toml_string(str(server_dir / 'server.crt'))}",
        f"private_key = {_toml_string(str(server_dir / 'server.key'))}",
        f"authorized_keys = {_toml_string(str(server_dir / 'users'))}",
        f"queue = {SERVER_QUEUE}",
        f'nat_ports = "{NAT_PORTS}"',
        'instance = "pvpns"',
        *LAB_TIMERS,
        f"resume_grace = {LAB_RESUME_GRACE}",
        f"control = {_toml_string(str(server_dir / 'server.ctl'))}",
        # Every session's inner packets, so one can see what went through (0600, root);
        # bounded per session, as /run is often a small tmpfs.
        f"pcap_dir = {_toml_string(str(server_pcap_dir(topology)))}",
        f"pcap_max_bytes = {LAB_PCAP_MAX_BYTES}",
        # Its sessions and NAT mappings across a restart, in the lab's own directory (the
        # default, /var/lib/pvpn, would be shared by every lab on the machine).
        f"state_file = {_toml_string(str(server_state_file(topology)))}",
    ]
    for user in AUTHORIZED_USERS:  # carol is authorised nowhere
        lines += ["", f"[users.{user}]", f"allow = {_toml_list(allow)}"]
    return "\n".join(lines) + "\n"


def gateway_toml(topology: Topology, role: str) -> str:
    """gateway.toml of gateway ``role``: listens on its left link; alice and bob may pass,
    each only to the next host of the chain (its left-link addresses, port 4433)."""
    gw_dir = topology.host_dir(role)
    next_hop = topology.next_hop(role)
    lines = [
        f"# pvpn-gateway {role} of lab {topology.name}; generated by `pvpn lab up`.",
        "[gateway]",
        f"name = {_toml_string(role)}",
        f"listen = {_toml_list(topology.endpoints(role))}",
        f"certificate = {_toml_string(str(gw_dir / f'{role}.crt'))}",
        f"private_key = {_toml_string(str(gw_dir / f'{role}.key'))}",
        f"authorized_keys = {_toml_string(str(gw_dir / 'users'))}",
        f"connect_timeout = {CONNECT_TIMEOUT}",
        *LAB_TIMERS,
        f"control = {_toml_string(str(gw_dir / 'gateway.ctl'))}",
    ]
    for user in AUTHORIZED_USERS:  # carol is authorised nowhere
        lines += ["", f"[users.{user}]",
                  f"# the next hop, {topology.name}-{next_hop}",
                  f"next = {_toml_list(topology.endpoints(next_hop))}"]
    return "\n".join(lines) + "\n"


def _supervisord_header(topology: Topology, role: str) -> str:
    """The head of the target's supervisord.conf (the nodes' is the shipped one's)."""
    host_dir = topology.host_dir(role)
    return f"""\
; supervisord of lab host {topology.name}-{role}; generated by `pvpn lab up`.
[unix_http_server]
file={host_dir}/supervisor.sock
chmod=0700

[supervisorctl]
serverurl=unix://{host_dir}/supervisor.sock

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisord]
logfile={host_dir}/supervisord.log
logfile_maxbytes=1MB
logfile_backups=1
pidfile={host_dir}/supervisord.pid
childlogdir={host_dir}
identifier={topology.name}-{role}
nodaemon=false
"""


def _generated(topology: Topology, role: str, source: Path) -> str:
    host_dir = topology.host_dir(role)
    return (f"; {source.name} of lab host {topology.name}-{role}; generated by `pvpn lab up`\n"
            f"; from {source}, with {host_dir} for /etc/pvpn, /var/log/pvpn and /run/pvpn.\n")


SHIPPED_INCLUDE = "files = %(here)s/pvpn-*.conf\n"


def node_supervisord_conf(topology: Topology, role: str, program: str) -> str:
    """supervisord.conf of a pvpn node: the shipped one (logs and the nodes' files root's
    alone, umask 077) for the host's directory, naming the lab, and including the host's copy
    of its role's section only (:func:`node_program_conf`)."""
    source = shipped_file("supervisord.conf")
    host_dir = topology.host_dir(role)
    text = for_host(source.read_text(), host_dir)
    if text.count(SHIPPED_INCLUDE) != 1 or text.count("\n[supervisord]\n") != 1:
        raise ValueError(f"{source}: not the shipped supervisord.conf (its [supervisord] and "
                         f"[include] {SHIPPED_INCLUDE.strip()!r} are what the lab adapts)")
    text = text.replace(SHIPPED_INCLUDE, f"files = {host_dir}/{program}.conf\n")
    text = text.replace("\n[supervisord]\n",
                        f"\n[supervisord]\nidentifier={topology.name}-{role}\n")
    return _generated(topology, role, source) + text


def node_program_conf(topology: Topology, role: str, program: str) -> str:
    """The host's copy of the shipped section ``<program>.conf``: its config, log and socket
    in the host's directory."""
    source = program_section(program)
    return _generated(topology, role, source) + for_host(source.read_text(),
                                                         topology.host_dir(role))


def _program(name: str, command: str, log_dir: Path, *, stopsignal: str = "TERM") -> str:
    return f"""
[program:{name}]
command={command}
stdout_logfile={log_dir}/{name}.log
stdout_logfile_maxbytes=1MB
stdout_logfile_backups=1
redirect_stderr=true
autorestart=true
startsecs=1
startretries=3
stopsignal={stopsignal}
stopwaitsecs=5
; socat forks a child per datagram: stop and kill the whole group.
stopasgroup=true
killasgroup=true
"""


def target_supervisord_conf(topology: Topology, programs: dict[str, str]) -> str:
    """supervisord.conf of the target: nginx, iperf3, UDP echo (v4, v6) and sshd."""
    target_dir = topology.host_dir("target")
    return _supervisord_header(topology, "target") + "".join([
        _program("nginx",
                 f"{programs['nginx']} -e {target_dir}/nginx-error.log "
                 f"-p {target_dir}/nginx/ -c {target_dir}/nginx.conf",
                 target_dir, stopsignal="QUIT"),
        _program("iperf3", f"{programs['iperf3']} -s -p {IPERF_PORT}", target_dir),
        # One child per datagram (RECVFROM,fork) echoes it through a pipe; -T ends the child.
        # -b: a datagram of any size whole (socat's 8 KB default cuts the larger ones).
        _program("echo4",
                 f"{programs['socat']} -b 65536 -T 2 UDP4-RECVFROM:{ECHO_PORT},fork PIPE",
                 target_dir),
        _program("echo6",
                 f"{programs['socat']} -b 65536 -T 2 UDP6-RECVFROM:{ECHO_PORT},fork,ipv6only=1 "
                 "PIPE", target_dir),
        # sshd re-executes itself, so it needs its absolute path; -D stays in the foreground,
        # -e logs to stderr (into supervisord's log).
        _program("sshd", f"{programs['sshd']} -D -e -f {target_dir}/sshd_config", target_dir),
    ])


def nginx_conf(topology: Topology, worker_user: str) -> str:
    target_dir = topology.host_dir("target")
    temp = target_dir / "nginx"
    return f"""\
# nginx of lab host {topology.name}-target; generated by `pvpn lab up`.
daemon off;
user {worker_user};
worker_processes 1;
pid {target_dir}/nginx.pid;
error_log {target_dir}/nginx-error.log;

events {{
    worker_connections 256;
}}

http {{
    access_log {target_dir}/nginx-access.log;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    default_type application/octet-stream;
    sendfile on;
    server {{
        listen {HTTP_PORT};
        listen [::]:{HTTP_PORT};
        root {target_dir}/www;
        autoindex on;
    }}
}}
"""


def sshd_config(topology: Topology) -> str:
    target_dir = topology.host_dir("target")
    ssh_dir = topology.root / "ssh"
    return f"""\
# sshd of lab host {topology.name}-target; generated by `pvpn lab up`.
Port {SSH_PORT}
ListenAddress 0.0.0.0
ListenAddress ::
HostKey {target_dir}/ssh_host_ed25519_key
PidFile {target_dir}/sshd.pid
AuthorizedKeysFile {ssh_dir}/%u.pub
AllowUsers {" ".join(LAB_USERS)}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
# PAM accepts the lab users' locked passwords ("!") for key logins, as on a stock Debian.
UsePAM yes
PrintMotd no
X11Forwarding no
Subsystem sftp internal-sftp
"""


def sha256sums(digests: dict[str, str]) -> str:
    """SHA256SUMS in the format ``sha256sum -c`` reads."""
    return "".join(f"{digests[name]}  {name}\n" for name in sorted(digests))


def parse_sha256sums(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        digest, _, name = line.partition("  ")
        if digest and name:
            out[name] = digest
    return out
