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

The same socket aborts a TCP connection that can no longer work (SOCK_DESTROY, as ``ss -K``
does; the kernel's CONFIG_INET_DIAG_DESTROY): the application's next call fails with
ECONNABORTED at once, instead of waiting for data that will never come.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Callable, NamedTuple, TypeVar

from pvpn.errors import ConfigError, PvpnError
from pvpn.io.netlink import (
    HEADER, NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, error_code, request,
)
from pvpn.packet import PROTO_TCP, PROTO_UDP, FlowKey

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
_REQUEST = struct.Struct("=BBBBI")  # inet_diag_req_v2: family, protocol, ext, pad, states
_PORTS = struct.Struct(">HH")  # inet_diag_sockid: sport, dport (then src, dst, if, cookie)
_NO_COOKIE_BYTES = b"\xff" * 8  # INET_DIAG_NOCOOKIE: find by addresses and ports
#: inet_diag_msg: family, state, timer, retrans (4), the sockid (48), expires, rqueue, wqueue
#: (12), then uid and inode.
_OWNER = struct.Struct("=II")
_OWNER_AT = HEADER.size + 4 + 48 + 12
_STATE_AT = HEADER.size + 1  # idiag_state
_COOKIE_AT = HEADER.size + 4 + 40  # idiag_cookie[2], after ports, addresses and interface
TIMEOUT = 1.0
#: TCP states (linux/tcp_states.h) of a synchronized connection: one that answers a SYN with a
#: challenge ACK (RFC 5961 4.2), where a connecting or listening socket would take it for a
#: connection of its own.
TCP_SYNCHRONIZED = frozenset({1, 4, 5, 8, 9, 11})  # ESTABLISHED, FIN_WAIT1/2, CLOSE_WAIT,
                                                   # LAST_ACK, CLOSING
TCP_SYN_SENT = 2
#: The states of a connection an application still waits on (a listener is not one).
TCP_CONNECTION = TCP_SYNCHRONIZED | {TCP_SYN_SENT}


class Found(NamedTuple):
    """The socket a flow's replies would reach: its owner (None: no process's), its state
    (0 if there is none), the kernel's cookie that names exactly it, and the uid the socket
    was made with, which an orphan keeps (a socket its process closed, still sending its FIN:
    no file, so no owner; None where not known)."""
    uid: int | None
    state: int
    cookie: bytes
    made_by: int | None = None


def _padded(address: bytes) -> bytes:
    return address + b"\0" * (16 - len(address))


def lookup_request(flow: FlowKey, seq: int) -> bytes:
    """The question "which socket gets a packet of this flow's replies": ``flow`` as the local
    host sent it (``src``/``sport`` local, ``dst``/``dport`` the remote end)."""
    return _request(flow, seq, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, _NO_COOKIE_BYTES)


#: inet_diag_req_v2's idiag_ext bit for INET_DIAG_INFO (struct tcp_info in the answer).
_EXT_INFO = 1 << (2 - 1)
_INET_DIAG_INFO = 2
_TCPI_OPT_TIMESTAMPS = 1
_ATTRIBUTES_AT = HEADER.size + 72  # after inet_diag_msg
_ATTRIBUTE = struct.Struct("=HH")


def mss_request(flow: FlowKey, seq: int) -> bytes:
    """:func:`lookup_request` for a TCP flow, asking for the socket's tcp_info too."""
    if flow.proto != PROTO_TCP:
        raise ValueError("only a TCP socket has a segment size")
    return _request(flow, seq, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, _NO_COOKIE_BYTES, _EXT_INFO)


def read_mss(data: bytes, seq: int) -> tuple[bool, tuple[int, bool] | None]:
    """``(answered, (snd_mss, timestamps))`` from one recv of :func:`mss_request`'s answer:
    tcp_info's tcpi_snd_mss (the largest segment it sends, its usual options taken off) and
    whether those options hold timestamps; None without a socket or a tcp_info."""
    answered, found = read_socket(data, seq)
    if not answered or not found.cookie:
        return answered, None
    length = HEADER.unpack_from(data)[0]
    at = _ATTRIBUTES_AT
    while at + _ATTRIBUTE.size <= length:
        size, kind = _ATTRIBUTE.unpack_from(data, at)
        if size < _ATTRIBUTE.size or at + size > length:
            break
        if kind == _INET_DIAG_INFO and size >= _ATTRIBUTE.size + 20:
            info = at + _ATTRIBUTE.size
            mss = struct.unpack_from("=I", data, info + 16)[0]
            return True, (mss, bool(data[info + 5] & _TCPI_OPT_TIMESTAMPS))
        at += (size + 3) & ~3
    return True, None


def destroy_request(flow: FlowKey, seq: int, cookie: bytes) -> bytes:
    """"Abort the TCP socket ``cookie`` names, which holds ``flow``": with the cookie the
    kernel aborts only that socket, never a listener or a newer socket on the same ports."""
    if flow.proto != PROTO_TCP or len(cookie) != 8:
        raise ValueError("only a TCP socket found with its cookie is aborted")
    return _request(flow, seq, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, cookie)


def _request(flow: FlowKey, seq: int, kind: int, flags: int, cookie: bytes,
             ext: int = 0) -> bytes:
    family = socket.AF_INET if len(flow.src) == 4 else socket.AF_INET6
    if flow.proto == PROTO_UDP:
        # udp_dump_one looks up by (source, destination) of an arriving packet ("src and dst
        # are swapped for historical reasons", net/ipv4/udp_diag.c); TCP by the socket's own.
        src, sport, dst, dport = flow.dst, flow.dport, flow.src, flow.sport
    elif flow.proto == PROTO_TCP:
        src, sport, dst, dport = flow.src, flow.sport, flow.dst, flow.dport
    else:
        raise ValueError(f"no socket lookup for protocol {flow.proto}")
    body = (_REQUEST.pack(family, flow.proto, ext, 0, 0xFFFFFFFF) + _PORTS.pack(sport, dport)
            + _padded(src) + _padded(dst) + struct.pack("=I", 0) + cookie)
    return request(kind, flags, seq, body)


def read_owner(data: bytes, seq: int) -> tuple[bool, int | None]:
    """``(answered, uid)`` from one recv: ``answered`` False if ``data`` answers another
    question (a late one); ``uid`` None if no process's socket would get the packet (none, or
    one without a file: TIME_WAIT, a request). PvpnError for any other answer."""
    answered, found = read_socket(data, seq)
    return answered, found.uid


_NONE = Found(None, 0, b"")


def read_socket(data: bytes, seq: int) -> tuple[bool, Found]:
    """:func:`read_owner`'s answer, with the socket's state (``idiag_state``) and cookie."""
    if len(data) < HEADER.size:
        raise PvpnError("sock_diag: short answer")
    length, kind, _, got_seq, _ = HEADER.unpack_from(data)
    if length < HEADER.size or length > len(data):
        raise PvpnError("sock_diag: malformed answer")
    if got_seq != seq:
        return False, _NONE
    if kind == NLMSG_ERROR:
        code = error_code(data, 0, length)
        if code in (0, errno.ENOENT):  # 0: the acknowledgement of a SOCK_DESTROY
            return True, _NONE
        raise PvpnError(f"sock_diag refused: {os.strerror(code)}")
    if kind != SOCK_DIAG_BY_FAMILY or length < _OWNER_AT + _OWNER.size:
        raise PvpnError("sock_diag: unexpected answer")
    uid, inode = _OWNER.unpack_from(data, _OWNER_AT)
    return True, Found(uid if inode else None, data[_STATE_AT],
                       bytes(data[_COOKIE_AT:_COOKIE_AT + 8]), uid)


_A = TypeVar("_A")


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
        found = self.find(flow)
        return found.uid, found.state

    def find(self, flow: FlowKey) -> Found:
        """The socket ``flow``'s replies would reach."""
        return self._ask(lookup_request, flow, read_socket)

    def send_mss(self, flow: FlowKey) -> tuple[int, bool] | None:
        """The local TCP socket of ``flow`` (as sent): its segment size and whether its
        segments carry timestamps (:func:`read_mss`); None if there is no such socket.
        PvpnError if the kernel cannot tell."""
        return self._ask(mss_request, flow, read_mss)

    def abort(self, flow: FlowKey, cookie: bytes) -> None:
        """Abort the TCP socket :meth:`find` named by ``cookie`` (gone already: nothing to
        do). PvpnError if the kernel refuses (no CONFIG_INET_DIAG_DESTROY, not root)."""
        self._ask(lambda f, seq: destroy_request(f, seq, cookie), flow, read_socket)

    def _ask(self, build: Callable[[FlowKey, int], bytes], flow: FlowKey,
             read: Callable[[bytes, int], tuple[bool, _A]]) -> _A:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        try:
            self._sock.send(build(flow, self._seq))
            for _ in range(16):  # answers to questions that timed out earlier come first
                answered, found = read(self._sock.recv(8192), self._seq)
                if answered:
                    return found
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
