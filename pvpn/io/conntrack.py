"""Connection marks in the kernel's connection tracking, over ctnetlink (NETLINK_NETFILTER).

A client-host session marks the connections whose replies come in through its TUN device with
its slot's mark (firewall.client_session); the ownerless packets of those connections follow
the mark into the session's queue. So when a session ends, the connections it marked are
forgotten (their entries deleted: the next packet of such a connection starts an unmarked
entry, or none at all for a FIN or RST), and before a slot's mark goes to another session the
table is asked whether any connection still carries it.

The messages are built and read by pure functions (:func:`mark_request`, :func:`read_replies`);
:func:`count_marked` and :func:`forget_marked` do the I/O, one netlink socket per call, bounded
in time and in messages. The kernel filters by mark itself (CTA_MARK, CTA_MARK_MASK), for the
dump and for the flush, in both address families (AF_UNSPEC). The conntrack tool shows the
same: ``conntrack -L -m MARK/MASK`` (and ``-f ipv6``).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from dataclasses import dataclass

from pvpn.errors import ConfigError, PvpnError
from pvpn.io.netlink import (
    HEADER, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR,
    error_code, request,
)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
CTA_MARK = 8
CTA_MARK_MASK = 21
_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, res_id
#: Bounds on one exchange: a dump of a full table ends long before either.
TIMEOUT = 5.0
MAX_REPLY_BYTES = 64 << 20


def _attribute(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + b"\0" * (-length % 4)


def mark_request(message: int, flags: int, seq: int, mark: int, mask: int) -> bytes:
    """One ctnetlink request about the connections whose mark & ``mask`` == ``mark``, in
    both address families."""
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, 0)
    body += _attribute(CTA_MARK, struct.pack(">I", mark))
    body += _attribute(CTA_MARK_MASK, struct.pack(">I", mask))
    kind = NFNL_SUBSYS_CTNETLINK << 8 | message
    return request(kind, NLM_F_REQUEST | flags, seq, body)


@dataclass(slots=True)
class Replies:
    """What the kernel answered so far: connections listed, whether it is done, an errno."""

    entries: int = 0
    done: bool = False
    error: int = 0


def read_replies(data: bytes, seq: int, into: Replies) -> None:
    """Account for the netlink messages in ``data`` (whole messages, as one recv gives them)
    that answer request ``seq``. A malformed message is an error (EPROTO), never a crash."""
    offset = 0
    while offset + HEADER.size <= len(data):
        length, kind, _, got_seq, _ = HEADER.unpack_from(data, offset)
        if length < HEADER.size or offset + length > len(data):
            into.error, into.done = errno.EPROTO, True
            return
        if got_seq == seq:
            if kind == NLMSG_DONE:
                into.done = True
            elif kind == NLMSG_ERROR:
                code = error_code(data, offset, length)
                into.error, into.done = code, True  # code 0: the ACK of a request
            elif kind == NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW:
                into.entries += 1
        offset += (length + 3) & ~3


def _exchange(message: int, flags: int, mark: int, mask: int) -> Replies:
    seq = int.from_bytes(os.urandom(4), "little") or 1
    replies = Replies()
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    except OSError as exc:
        raise PvpnError(f"cannot open a ctnetlink socket: {exc.strerror}") from None
    with sock:
        sock.settimeout(TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        received = 0
        try:
            sock.bind((0, 0))
            sock.send(mark_request(message, flags, seq, mark, mask))
            while not replies.done:
                if time.monotonic() > deadline or received > MAX_REPLY_BYTES:
                    raise PvpnError("ctnetlink gave no complete answer")
                data = sock.recv(1 << 16)
                received += len(data)
                read_replies(data, seq, replies)
        except OSError as exc:
            raise PvpnError(f"ctnetlink: {exc.strerror or exc}") from None
    if replies.error:
        raise PvpnError(f"ctnetlink refused: {os.strerror(replies.error)}")
    return replies


def count_marked(mark: int, mask: int) -> int:
    """How many tracked connections (IPv4 and IPv6) carry ``mark`` under ``mask``."""
    return _exchange(IPCTNL_MSG_CT_GET, NLM_F_DUMP, mark, mask).entries


def forget_marked(mark: int, mask: int) -> int:
    """Delete every tracked connection carrying ``mark`` under ``mask``; how many there were
    (counted just before)."""
    count = count_marked(mark, mask)
    if count:
        _exchange(IPCTNL_MSG_CT_DELETE, NLM_F_ACK, mark, mask)
    return count


def check() -> None:
    """ConfigError now if the kernel's connection tracking cannot be asked (the
    nf_conntrack_netlink module), not when the first session ends."""
    try:
        count_marked(0xFFFFFFFF, 0xFFFFFFFF)  # a question with a short answer
    except PvpnError as exc:
        raise ConfigError(f"{exc}; pvpn-client clears the connection marks of ended sessions "
                          "through it (modprobe nf_conntrack_netlink)") from None
