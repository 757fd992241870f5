"""What ctnetlink (pvpn.io.conntrack) and sock_diag (pvpn.io.sockdiag) share of netlink
(linux/netlink.h): the message header, its flags and types, a request's framing and an
error message's code."""

from __future__ import annotations

import errno
import struct

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, pid (0: the kernel)


def request(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    """One netlink message to the kernel: ``body`` behind its header."""
    return HEADER.pack(HEADER.size + len(body), kind, flags, seq, 0) + body


def error_code(data: bytes, offset: int, length: int) -> int:
    """The errno of the NLMSG_ERROR message of ``length`` bytes at ``offset`` (0: the
    acknowledgement of a request); EPROTO if it is too short to carry one."""
    if length < HEADER.size + 4:
        return errno.EPROTO
    return int(-struct.unpack_from("=i", data, offset + HEADER.size)[0])
