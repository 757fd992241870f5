"""The pvpn envelope: a versioned msgpack frame carrying type, session id, uid, sequence
number, hop limit and a body.

On the wire an envelope is one msgpack array::

    [version, type, session, uid, seq, hops, body]

msgpack frames itself, so a stream of envelopes needs no length prefix. ``body`` is the raw IP
packet for ``PACKET`` and ``DATA`` envelopes (opaque bytes, never decoded by a relay) and a
msgpack-encoded map for control envelopes, checked against a per-type schema by
:func:`decode_control`.

The decoder is strict (after h11): any byte string either yields envelopes or raises
:class:`~pvpn.errors.MalformedFrame` / :class:`~pvpn.errors.SequenceError`. After such an error
the stream is out of step, so the caller closes that link and serves everyone else.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, NoReturn, Sequence

import msgpack

from pvpn.errors import LocalProtocolError, MalformedFrame, SequenceError
from pvpn.text import clip

VERSION = 1
SESSION_ID_LEN = 16
#: The largest body: the largest IP packet there is without jumbograms (IPv6: the 40-byte
#: header and a 65,535-byte payload; an IPv4 datagram is at most 65,535 bytes).
MAX_PACKET = 40 + 65535
#: An envelope is at most this big; anything larger is garbage or an attack.
MAX_FRAME = MAX_PACKET + 1024
DEFAULT_HOPS = 16
_MAX_UINT64 = (1 << 64) - 1


class MsgType(enum.IntEnum):
    """Envelope types. 1-19 cross the network; 20+ only the local socket to pvpn-client."""

    HELLO = 1  # user -> node: who I am, what I want, maybe a session to resume
    CHALLENGE = 2  # node -> user: fresh random challenge
    AUTH = 3  # user -> node: signature over challenge + TLS binding
    ACCEPT = 4  # node -> user: session id, resume token, allowed destinations
    REFUSE = 5  # node -> user: why not
    PACKET = 6  # one IP packet of the user's
    KEEPALIVE = 7
    KEEPALIVE_ACK = 8
    CLOSE = 9  # orderly end, with a reason
    DATA = 10  # opaque bytes of an inner (nested) session, relayed by gateways
    # Local socket between `pvpn connect` and pvpn-client.
    REGISTER = 20  # user process -> pvpn-client: protect these prefixes for my uid
    REGISTERED = 21  # pvpn-client -> user process: slot, queue, uid as the kernel saw it
    ATTACH = 22  # user process -> pvpn-client: the server accepted, here is the session id
    UNREGISTER = 23  # user process -> pvpn-client: end protection (explicit disconnect)
    DISCONNECT = 24  # any process of the uid -> pvpn-client: end that session
    STATUS = 25  # -> pvpn-client: list sessions
    STATUS_REPLY = 26
    ERROR = 27  # pvpn-client -> user process: request refused, with a message
    # pvpn-client holds the chain, the user's process is its agent (like ssh-agent).
    SIGN = 28  # pvpn-client -> user process: sign this challenge of this node, bound so
    SIGNED = 29  # user process -> pvpn-client: the signature (or why not)
    NOTICE = 30  # pvpn-client -> user process: the chain is up, down, back, failed


_TYPES = {int(t): t for t in MsgType}


# ---------------------------------------------------------------- super-packets (issue 12)
#
# A PACKET body is an IP packet, or, between nodes that both announced ``OFFLOAD`` in the
# handshake (HELLO's and ACCEPT's optional "offload" list), an offload header and then the
# packet: a TCP segment of up to 64 KB that the receiving kernel segments or delivers whole
# (a virtio_net_hdr's fields, linux/virtio_net.h). An IP packet's first byte starts with its
# version (4 or 6), so the header's first byte, OFFLOAD_MARK, tells the two apart. The header
# is big-endian on the wire:
#
#     mark (1) | flags (1) | gso_type (1) | reserved 0 (1) | hdr_len (2) | gso_size (2)
#     | csum_start (2) | csum_offset (2)
#
# A header's packet carries in its TCP checksum field the sum of its pseudo-header only (the
# kernel's CHECKSUM_PARTIAL; pvpn.packet.partial_checksum): whoever segments it (the kernel)
# or delivers it completes the checksum of each segment.

#: What a node announces it takes (HELLO's and ACCEPT's "offload").
OFFLOAD = "tcp-gso-1"
OFFLOAD_MARK = 0x01
OFFLOAD_HEADER = 12
F_NEEDS_CSUM = 1  # VIRTIO_NET_HDR_F_NEEDS_CSUM
GSO_NONE, GSO_TCPV4, GSO_TCPV6 = 0, 1, 4  # VIRTIO_NET_HDR_GSO_*
GSO_ECN = 0x80  # VIRTIO_NET_HDR_GSO_ECN: the super-packet carries CWR (its first segment)
#: The smallest segment size a header may ask for (IPv4's minimum MSS, RFC 879): a lying peer
#: must not make one 64 KB packet into thousands of segments.
MIN_GSO_SIZE = 536
_OFFLOAD = struct.Struct(">BBBxHHHH")


@dataclass(frozen=True, slots=True)
class Offload:
    """A super-packet's offload state: a virtio_net_hdr's fields."""

    gso_type: int
    gso_size: int
    csum_start: int
    csum_offset: int
    hdr_len: int
    flags: int = F_NEEDS_CSUM


def encode_offload(offload: Offload, packet: bytes) -> bytes:
    """The PACKET body carrying ``packet`` with its offload header."""
    return _OFFLOAD.pack(OFFLOAD_MARK, offload.flags, offload.gso_type, offload.hdr_len,
                         offload.gso_size, offload.csum_start, offload.csum_offset) + packet


def is_offloaded(body: bytes) -> bool:
    return bool(body) and body[0] == OFFLOAD_MARK


def bare_packet(body: bytes) -> bytes:
    """A PACKET body's IP packet, without its offload header if it has one (for captures)."""
    return body[OFFLOAD_HEADER:] if is_offloaded(body) else body


def split_offload(body: bytes) -> tuple[Offload, bytes]:
    """A body with an offload header: the header and the packet, checked against each other
    (MalformedFrame for a header that lies): only a TCP segment right after a 20-byte IPv4 or
    40-byte IPv6 header (no options: the strict parse refuses them anyway), the checksum
    field at csum_start + 16, hdr_len the IP and TCP headers, a GSO type that is the packet's
    IP version, a segment size of MIN_GSO_SIZE to what the packet holds, the packet at most
    65,535 bytes (IPv4) or 65,575 (IPv6) and its IP length all of it."""
    if len(body) < OFFLOAD_HEADER + 40 or body[0] != OFFLOAD_MARK:
        raise MalformedFrame("offload header: too short")
    _, flags, gso_type, hdr_len, gso_size, start, offset = _OFFLOAD.unpack_from(body)
    packet = body[OFFLOAD_HEADER:]
    n = len(packet)
    version = packet[0] >> 4
    if version == 4:
        ip_len, proto, bound = (packet[2] << 8 | packet[3]), packet[9], 65535
        ihl, gso = (packet[0] & 0x0F) * 4, GSO_TCPV4
    elif version == 6:
        ip_len, proto, bound = 40 + (packet[4] << 8 | packet[5]), packet[6], MAX_PACKET
        ihl, gso = 40, GSO_TCPV6
    else:
        raise MalformedFrame("offload header: not an IP packet after it")
    if n > bound or ip_len != n:
        raise MalformedFrame(f"offload header: IP length {ip_len} for {n} bytes")
    if proto != 6 or ihl != (20 if version == 4 else 40):
        raise MalformedFrame("offload header: only a TCP segment without IP options")
    if flags != F_NEEDS_CSUM or start != ihl or offset != 16:
        raise MalformedFrame(f"offload header: checksum at {start}+{offset}, flags {flags}")
    if hdr_len != ihl + (packet[ihl + 12] >> 4) * 4 or hdr_len < ihl + 20 or hdr_len > n:
        raise MalformedFrame(f"offload header: header length {hdr_len}")
    if gso_type == GSO_NONE:
        if gso_size:
            raise MalformedFrame("offload header: a segment size without GSO")
    elif gso_type != gso or not MIN_GSO_SIZE <= gso_size < n - hdr_len:
        raise MalformedFrame(f"offload header: GSO type {gso_type}, segment size {gso_size} "
                             f"for {n - hdr_len} bytes")
    return Offload(gso_type, gso_size, start, offset, hdr_len, flags), packet


@dataclass(slots=True)
class Envelope:
    """One decoded frame. ``body`` is raw bytes; control bodies go through decode_control."""

    type: MsgType
    session: bytes
    uid: int
    seq: int
    hops: int
    body: bytes


_packer = msgpack.Packer(use_bin_type=True)


def encode_envelope(
    type: MsgType, session: bytes, uid: int, seq: int, body: bytes, hops: int = DEFAULT_HOPS
) -> bytes:
    """Encode one envelope. Only our own misuse can fail here (LocalProtocolError)."""
    if len(body) > MAX_PACKET and not (body[0] == OFFLOAD_MARK
                                       and len(body) <= MAX_PACKET + OFFLOAD_HEADER):
        raise LocalProtocolError(f"envelope body of {len(body)} bytes exceeds {MAX_PACKET}")
    return _packer.pack([VERSION, int(type), session, uid, seq, hops, body])  # type: ignore[no-any-return]


def encode_control(fields: Mapping[str, Any]) -> bytes:
    """Encode the body of a control envelope."""
    return _packer.pack(dict(fields))  # type: ignore[no-any-return]


class Sequencer:
    """Numbers envelopes leaving on one link, 0, 1, 2, ... (one per direction per link)."""

    __slots__ = ("next",)

    def __init__(self) -> None:
        self.next = 0

    def take(self) -> int:
        seq = self.next
        self.next = seq + 1
        return seq


class EnvelopeDecoder:
    """Turns a byte stream into envelopes; checks framing, types and sequence numbers.

    Driven by :meth:`feed`; every envelope must carry the next sequence number of the link
    (starting at 0), so a replayed, duplicated or dropped envelope is refused.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._unpacker = msgpack.Unpacker(
            # A small first buffer (msgpack's default is the whole bound, ~200 KB, and costs
            # 44 KB resident per link before a byte arrives); it grows with the frames.
            read_size=4096,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_buffer_size=max_frame * 3,
            max_bin_len=max_frame,
            max_str_len=4096,
            max_array_len=64,
            max_map_len=64,
            max_ext_len=0,
        )
        self._max_frame = max_frame
        self._expected_seq = 0
        self._failed: MalformedFrame | SequenceError | None = None
        self._fed = 0

    @property
    def buffered(self) -> int:
        """Bytes fed that are not yet part of a whole envelope (a frame still arriving)."""
        return self._fed - self._unpacker.tell()  # type: ignore[no-any-return]

    def feed(self, data: bytes) -> Iterator[Envelope]:
        """Yield every complete envelope in the stream so far.

        Raises MalformedFrame or SequenceError; after that the decoder stays failed.
        """
        if self._failed is not None:
            raise self._failed
        # Feed in slices no larger than one frame, draining between them, so the buffer bound
        # holds for any read size and only a frame that is really too large trips it.
        step = self._max_frame
        for start in range(0, len(data), step):
            chunk = data[start:start + step] if len(data) > step else data
            try:
                self._unpacker.feed(chunk)
                self._fed += len(chunk)
            except (msgpack.BufferFull, ValueError) as exc:
                self._fail(MalformedFrame(f"frame larger than {self._max_frame} bytes: "
                                          f"{clip(str(exc), 200)}"))
            while True:
                try:
                    obj = self._unpacker.unpack()
                except msgpack.OutOfData:
                    break
                except (msgpack.UnpackException, ValueError, TypeError) as exc:
                    self._fail(MalformedFrame(f"undecodable msgpack: {type(exc).__name__}: "
                                              f"{clip(str(exc), 200)}"))
                yield self._check(obj)

    def _fail(self, error: MalformedFrame | SequenceError) -> NoReturn:
        self._failed = error
        raise error

    def _check(self, obj: object) -> Envelope:
        if not isinstance(obj, list) or len(obj) != 7:
            self._fail(MalformedFrame("an envelope must be an array of 7 fields"))
        fields: list[Any] = obj
        version, mtype, session, uid, seq, hops, body = fields
        if version != VERSION or type(version) is not int:
            self._fail(MalformedFrame(f"unknown envelope version {_shown(version)}"))
        if type(mtype) is not int or mtype not in _TYPES:
            self._fail(MalformedFrame(f"unknown envelope type {_shown(mtype)}"))
        if type(session) is not bytes or len(session) not in (0, SESSION_ID_LEN):
            self._fail(MalformedFrame("session id must be 0 or 16 bytes"))
        if type(uid) is not int or not -1 <= uid <= 0xFFFFFFFF:
            self._fail(MalformedFrame("uid must be an integer"))
        if type(seq) is not int or not 0 <= seq <= _MAX_UINT64:
            self._fail(MalformedFrame("sequence number must be an unsigned integer"))
        if type(hops) is not int or not 0 <= hops <= 255:
            self._fail(MalformedFrame("hop limit must be 0..255"))
        if type(body) is not bytes:
            self._fail(MalformedFrame("body must be bytes"))
        if seq != self._expected_seq:
            kind = "replayed or duplicated" if seq < self._expected_seq else "out of order"
            self._fail(
                SequenceError(f"{kind} envelope: sequence {seq}, expected {self._expected_seq}")
            )
        self._expected_seq = seq + 1
        return Envelope(_TYPES[mtype], session, uid, seq, hops, body)


def _shown(value: object) -> str:
    """A field off the wire as an error message may quote it: short, whatever it was (a
    64 KB byte string in the version field must not become a 160 KB log record)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 1 << 64:
        return str(value)
    if isinstance(value, (str, bytes)):
        return f"({type(value).__name__} of {len(value)})"
    return f"({type(value).__name__})"


# Control body schemas: field -> accepted Python type(s). Missing or extra fields, or a field of
# the wrong type, make the body malformed.
_STR = (str,)
_BYTES = (bytes,)
_INT = (int,)
_LIST = (list,)
_OPT_BYTES = (bytes, type(None))
CONTROL_SCHEMAS: dict[MsgType, dict[str, tuple[type, ...]]] = {
    MsgType.HELLO: {"user": _STR, "want": _LIST, "token": _OPT_BYTES, "client": _STR,
                    "next": (str, type(None)), "path": _LIST},
    MsgType.CHALLENGE: {"nonce": _BYTES, "node": _STR},
    MsgType.AUTH: {"signature": _BYTES},
    MsgType.ACCEPT: {"token": _BYTES, "allow": _LIST, "node": _STR, "resumed": (bool,)},
    MsgType.REFUSE: {"code": _STR, "reason": _STR},
    MsgType.CLOSE: {"reason": _STR},
    MsgType.KEEPALIVE: {},
    MsgType.KEEPALIVE_ACK: {},
    MsgType.REGISTER: {"prefixes": _LIST, "server": _STR},
    MsgType.REGISTERED: {"slot": _INT, "queue": _INT, "uid": _INT, "user": _STR},
    MsgType.ATTACH: {"session": _BYTES},
    MsgType.UNREGISTER: {"reason": _STR},
    # A session id or a prefix of it (hex, at least 8 digits), a slot, or every session the
    # caller may end; "" / None / False each name nothing (pvpn/client/registry.py).
    MsgType.DISCONNECT: {"session": _STR, "slot": (int, type(None)), "all": (bool,)},
    MsgType.STATUS: {},
    MsgType.STATUS_REPLY: {"sessions": _LIST, "more": (bool,)},
    MsgType.ERROR: {"code": _STR, "reason": _STR},
    # pvpn-client asks the user's process (its agent) to sign: ``id`` numbers the request,
    # ``user`` is whom pvpn-client authenticates as (the agent refuses any but its own).
    MsgType.SIGN: {"id": _INT, "challenge": _BYTES, "binding": _BYTES, "node": _STR,
                   "user": _STR},
    MsgType.SIGNED: {"id": _INT, "signature": _BYTES, "refused": _STR},
    # ``event``: up (with the server's session, token, allow, nodes, resumed), down, retry,
    # failed (``fatal``: for good); ``reason`` says why.
    MsgType.NOTICE: {"event": _STR, "reason": _STR},
}

#: Fields a body may leave out, so that a peer older than the field still speaks: a
#: `pvpn connect` that was running when pvpn-client was upgraded registers again without them.
OPTIONAL_FIELDS: dict[MsgType, dict[str, tuple[type, ...]]] = {
    MsgType.REGISTER: {"via": _LIST},  # the gateways' endpoints, in order
    # Super-packets (OFFLOAD): a user's process offers them, a node that takes them says so.
    MsgType.HELLO: {"offload": _LIST},
    MsgType.ACCEPT: {"offload": _LIST},
    MsgType.ATTACH: {"nodes": _LIST},  # the names the chain's nodes gave, the server last
}
#: REGISTER of a user's process that has pvpn-client hold its chain (pvpn.hosted.ChainSpec):
#: the hops, the server's name, the trust anchors' PEM (contents, never a path), ...
OPTIONAL_FIELDS[MsgType.REGISTER].update({
    "hops": _LIST, "server_name": _STR, "ca_pem": _BYTES, "pin_pem": _BYTES,
    "trust_name": _STR, "user": _STR, "client": _STR, "keepalive": (int, float),
    "dead_after": (int, float), "session": _BYTES, "token": _BYTES, "capture": (bool,),
})
OPTIONAL_FIELDS[MsgType.NOTICE] = {
    "session": _BYTES, "token": _BYTES, "allow": _LIST, "nodes": _LIST, "resumed": (bool,),
    "fatal": (bool,),
}
#: The bodies whose byte strings may be longer than a control field's 4096 bytes: REGISTER
#: carries the trust anchors' PEM (bounded by pvpn.tls.MAX_PEM and the frame).
_MAX_BIN = {MsgType.REGISTER: MAX_FRAME}


#: Sessions in one STATUS_REPLY page: under the decoder's array bound (256).
MAX_PAGE_ITEMS = 200


def status_pages(sessions: Sequence[Mapping[str, Any]],
                 limit: int = MAX_PACKET - 1024) -> list[dict[str, Any]]:
    """The bodies of the STATUS_REPLY envelopes that carry ``sessions``, in order: as many
    pages as it takes to keep each envelope under ``limit`` bytes, each with ``more`` set but
    the last. A node with a thousand sessions answers in pages instead of failing to build one
    envelope. A description too large for a page on its own (the sources bound their strings,
    so only a bug makes one) is shown by its session id alone."""
    pages: list[dict[str, Any]] = []
    page: list[Mapping[str, Any]] = []
    size = 0
    for item in sessions:
        item_size = len(_packer.pack(dict(item)))
        if item_size > limit - 64:
            item = {"session": str(item.get("session", ""))[:64],
                    "error": f"description of {item_size} bytes too large to show"}
            item_size = len(_packer.pack(item))
        if page and (size + item_size > limit - 64 or len(page) >= MAX_PAGE_ITEMS):
            pages.append({"sessions": page, "more": True})
            page, size = [], 0
        page.append(item)
        size += item_size
    pages.append({"sessions": page, "more": False})
    return pages


def decode_control(envelope: Envelope) -> dict[str, Any]:
    """Decode and check a control body against its schema (MalformedFrame otherwise)."""
    schema = CONTROL_SCHEMAS.get(envelope.type)
    if schema is None:
        raise MalformedFrame(f"{envelope.type.name} envelopes carry no control body")
    try:
        fields = msgpack.unpackb(
            envelope.body, raw=False, strict_map_key=True, max_str_len=4096,
            max_bin_len=_MAX_BIN.get(envelope.type, 4096), max_array_len=256, max_map_len=32, max_ext_len=0,
        )
    except (msgpack.UnpackException, ValueError, TypeError) as exc:
        raise MalformedFrame(f"undecodable {envelope.type.name} body: {clip(str(exc), 200)}"
                             ) from None
    if not isinstance(fields, dict):
        raise MalformedFrame(f"{envelope.type.name} body must be a map")
    optional = OPTIONAL_FIELDS.get(envelope.type, {})
    if not set(schema) <= set(fields) <= set(schema) | set(optional):
        names = sorted(clip(str(name), 32) for name in list(fields)[:6])
        more = f" and {len(fields) - 6} more" if len(fields) > 6 else ""
        also = f" (and optionally {sorted(optional)})" if optional else ""
        raise MalformedFrame(
            f"{envelope.type.name} body has fields {names}{more}, expected {sorted(schema)}"
            f"{also}"
        )
    for name, types in [*schema.items(), *optional.items()]:
        if name not in fields:
            continue
        value = fields[name]
        # bool is an int subclass: keep them apart.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise MalformedFrame(f"{envelope.type.name} field {name!r} has the wrong type")
    return fields
