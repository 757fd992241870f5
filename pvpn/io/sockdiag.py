"""Whose socket a packet would reach, over sock_diag (NETLINK_SOCK_DIAG, inet_diag).

pvpn-client lets a reply from a user's tunnel into the host only for a flow that user's session
sent; but a flow is remembered by its addresses and ports, and a local port changes hands: once
bob's socket on port 40000 closes, alice's may take it, and a "reply" bob's tunnel process hands
back for his old flow would reach alice's socket (a forged DNS answer, from any address bob
once sent to). So before a TCP or UDP reply (or an ICMP error about such a flow) is written to
a session's TUN device, the kernel is asked which socket it would deliver it to, with the same
lookup it delivers by (listeners and unconnected UDP sockets included): it goes in only if
that socket is the session user's, or no process's (none at all, a TIME_WAIT one).

The messages are built and read by pure functions (:func:`lookup_request`, :func:`read_owner`);
:class:`SocketOwners` holds one netlink socket and asks one question per packet (about 4 µs).
The ``ss`` tool shows the same sockets: ``ss -tuanpe``.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from pvpn.errors import ConfigError, PvpnError
from pvpn.packet import PROTO_TCP, PROTO_UDP, FlowKey

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLMSG_ERROR = 2
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, pid
_REQUEST = struct.Struct("=BBBBI")  # inet_diag_req_v2: family, protocol, ext, pad, states
_PORTS = struct.Struct(">HH")  # inet_diag_sockid: sport, dport (then src, dst, if, cookie)
_TAIL = struct.Struct("=III")  # idiag_if, idiag_cookie[2]
_NO_COOKIE = 0xFFFFFFFF
#: inet_diag_msg: family, state, timer, retrans (4), the sockid (48), expires, rqueue, wqueue
#: (12), then uid and inode.
_OWNER = struct.Struct("=II")
_OWNER_AT = _HEADER.size + 4 + 48 + 12
_STATE_AT = _HEADER.size + 1  # idiag_state
TIMEOUT = 1.0
#: TCP states (linux/tcp_states.h) of a synchronized connection: one that answers a SYN with a
#: challenge ACK (RFC 5961 4.2), where a connecting or listening socket would take it for a
#: connection of its own.
TCP_SYNCHRONIZED = frozenset({1, 4, 5, 8, 9, 11})  # ESTABLISHED, FIN_WAIT1/2, CLOSE_WAIT,
                                                   # LAST_ACK, CLOSING


def _padded(address: bytes) -> bytes:
    return address + b"\0" * (16 - len(address))


def lookup_request(flow: FlowKey, seq: int) -> bytes:
    """The question "which socket gets a packet of this flow's replies": ``flow`` as the local
    host sent it (``src``/``sport`` local, ``dst``/``dport`` the remote end)."""
    family = socket.AF_INET if len(flow.src) == 4 else socket.AF_INET6
    if flow.proto == PROTO_UDP:
        # udp_dump_one looks up by (source, destination) of an arriving packet ("src and dst
        # are swapped for historical reasons", net/ipv4/udp_diag.c); TCP by the socket's own.
        src, sport, dst, dport = flow.dst, flow.dport, flow.src, flow.sport
    elif flow.proto == PROTO_TCP:
        src, sport, dst, dport = flow.src, flow.sport, flow.dst, flow.dport
    else:
        raise ValueError(f"no socket lookup for protocol {flow.proto}")
    body = (_REQUEST.pack(family, flow.proto, 0, 0, 0xFFFFFFFF) + _PORTS.pack(sport, dport)
            + _padded(src) + _padded(dst) + _TAIL.pack(0, _NO_COOKIE, _NO_COOKIE))
    return _HEADER.pack(_HEADER.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq,
                        0) + body


def read_owner(data: bytes, seq: int) -> tuple[bool, int | None]:
    """``(answered, uid)`` from one recv: ``answered`` False if ``data`` answers another
    question (a late one); ``uid`` None if no process's socket would get the packet (none, or
    one without a file: TIME_WAIT, a request). PvpnError for any other answer."""
    answered, uid, _ = read_socket(data, seq)
    return answered, uid


def read_socket(data: bytes, seq: int) -> tuple[bool, int | None, int]:
    """:func:`read_owner`'s answer and the socket's state (``idiag_state``; 0 for none)."""
    if len(data) < _HEADER.size:
        raise PvpnError("sock_diag: short answer")
    length, kind, _, got_seq, _ = _HEADER.unpack_from(data)
    if length < _HEADER.size or length > len(data):
        raise PvpnError("sock_diag: malformed answer")
    if got_seq != seq:
        return False, None, 0
    if kind == NLMSG_ERROR:
        code = -struct.unpack_from("=i", data, _HEADER.size)[0] \
            if length >= _HEADER.size + 4 else errno.EPROTO
        if code == errno.ENOENT:
            return True, None, 0
        raise PvpnError(f"sock_diag refused: {os.strerror(code)}")
    if kind != SOCK_DIAG_BY_FAMILY or length < _OWNER_AT + _OWNER.size:
        raise PvpnError("sock_diag: unexpected answer")
    uid, inode = _OWNER.unpack_from(data, _OWNER_AT)
    return True, (uid if inode else None), data[_STATE_AT]


class SocketOwners:
    """One sock_diag socket; :meth:`owner` asks the kernel about one flow."""

    def __init__(self) -> None:
        try:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
            self._sock.bind((0, 0))
        except OSError as exc:
            raise PvpnError(f"cannot open a sock_diag socket: {exc.strerror}") from None
        self._sock.settimeout(TIMEOUT)
        self._seq = 0

    def owner(self, flow: FlowKey) -> int | None:
        """The uid of the process socket that would receive ``flow``'s replies, or None if no
        process's would. PvpnError if the kernel cannot tell (the caller drops: fail closed)."""
        return self.socket(flow)[0]

    def socket(self, flow: FlowKey) -> tuple[int | None, int]:
        """:meth:`owner` and that socket's state (a TCP state of linux/tcp_states.h; 0 if
        there is none)."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        try:
            self._sock.send(lookup_request(flow, self._seq))
            for _ in range(16):  # answers to questions that timed out earlier come first
                answered, uid, state = read_socket(self._sock.recv(8192), self._seq)
                if answered:
                    return uid, state
        except OSError as exc:
            raise PvpnError(f"sock_diag: {exc.strerror or exc}") from None
        raise PvpnError("sock_diag gave no answer")

    def close(self) -> None:
        self._sock.close()


def check() -> None:
    """ConfigError now if the kernel cannot say whose a socket is (the inet_diag, tcp_diag and
    udp_diag modules), not a silent "nobody's" for every packet later: a TCP listener and a
    UDP socket of our own must be found, with our uid."""
    try:
        owners = SocketOwners()
    except PvpnError as exc:
        raise ConfigError(f"{exc}; pvpn-client asks it whose socket a reply would reach") from None
    probes = [socket.socket(socket.AF_INET, socket.SOCK_STREAM),
              socket.socket(socket.AF_INET, socket.SOCK_DGRAM)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
            if probe.type == socket.SOCK_STREAM:
                probe.listen(1)
            port = probe.getsockname()[1]
            proto = PROTO_TCP if probe.type == socket.SOCK_STREAM else PROTO_UDP
            flow = FlowKey(proto, socket.inet_aton("127.0.0.1"), port,
                           socket.inet_aton("127.0.0.2"), 9)
            if owners.owner(flow) != os.geteuid():
                raise PvpnError(f"it did not find a {'TCP' if proto == PROTO_TCP else 'UDP'} "
                                "socket of ours")
    except (PvpnError, OSError) as exc:
        raise ConfigError(f"sock_diag cannot say whose a socket is ({exc}): pvpn-client asks "
                          "it whose socket each reply would reach (modprobe tcp_diag "
                          "udp_diag)") from None
    finally:
        for probe in probes:
            probe.close()
        owners.close()
