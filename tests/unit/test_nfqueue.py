"""The batch verdict message pvpn sends on an NFQUEUE's netlink socket, field by field."""

from __future__ import annotations

import socket
import struct

from pvpn.io.nfqueue import verdict_batch_message


def test_verdict_batch_message_layout() -> None:
    message = verdict_batch_message(queue_num=0x1234, last_id=0xA0B0C0D, seq=7)
    # struct nlmsghdr: length, type (NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_VERDICT_BATCH),
    # flags (NLM_F_REQUEST), sequence, port id 0 (the kernel): host byte order.
    length, mtype, flags, seq, portid = struct.unpack_from("=IHHII", message)
    assert (length, mtype, flags, seq, portid) == (len(message), 0x0303, 1, 7, 0)
    assert length == 16 + 4 + 12
    # struct nfgenmsg: AF_UNSPEC, NFNETLINK_V0, the queue number in network order.
    family, version, res_id = struct.unpack_from("=BB2s", message, 16)
    assert (family, version, res_id) == (socket.AF_UNSPEC, 0, b"\x12\x34")
    # One attribute, NFQA_VERDICT_HDR (2): struct nfqnl_msg_verdict_hdr, both fields big-endian.
    nla_len, nla_type = struct.unpack_from("=HH", message, 20)
    assert (nla_len, nla_type) == (12, 2)
    assert message[24:] == b"\x00\x00\x00\x00" + b"\x0a\x0b\x0c\x0d"  # NF_DROP, the last id


def test_verdict_batch_message_sequence_wraps() -> None:
    message = verdict_batch_message(queue_num=1, last_id=1, seq=2**32 + 5)
    assert struct.unpack_from("=I", message, 8)[0] == 5
