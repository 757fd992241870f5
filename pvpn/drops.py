"""Why a packet was dropped: one fixed set of codes for every node, the per-session counter
that decides which drops are logged, and a session's counters (:class:`Counters`).

The code is all a drop record and a session's counters carry as its reason; the packet's flow,
which a user chooses, goes in the record's own ``flow`` field. So a user sending packets to
ten thousand ports adds ten thousand to one counter, not ten thousand keys, and the log gets a
bounded number of lines (:class:`DropCounter`). docs/design.md lists the codes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from pvpn.records import RecordBudget


class Drop(enum.Enum):
    """A drop reason. The value is the code records and ``pvpn status`` show."""

    # pvpn-client: packets of a session on their way out
    TUNNEL_DOWN = "tunnel-down"
    TUNNEL_CONGESTED = "tunnel-congested"
    # pvpn-client: replies the user's tunnel process hands back (REPLY_ICMP_REFUSED also at
    # pvpn-server, for errors from the network on their way to a session)
    MALFORMED_REPLY = "malformed-reply"
    REPLY_NO_FLOW = "reply-no-flow"
    REPLY_ICMP_REFUSED = "reply-icmp-refused"
    REPLY_NOT_YOURS = "reply-not-yours"
    TUN_FULL = "tun-full"
    TUN_WRITE_FAILED = "tun-write-failed"
    MALFORMED_OFFLOAD = "malformed-offload"
    # pvpn-server: packets a session sends (IP_OPTIONS also for replies)
    MALFORMED_PACKET = "malformed-packet"
    IP_OPTIONS = "ip-options"
    DESTINATION_NOT_ALLOWED = "destination-not-allowed"
    DESTINATION_SPECIAL = "destination-special"
    ICMP_ERROR_NO_FLOW = "icmp-error-no-flow"
    ICMP_ERROR_REFUSED = "icmp-error-refused"
    FLOW_TABLE_FULL = "flow-table-full"
    FLOW_CAP_SESSION = "flow-cap-session"
    FLOW_CAP_USER = "flow-cap-user"
    NAT_SHARE = "nat-share"
    NO_NAT_PORT = "no-nat-port"
    NO_ROUTE = "no-route"
    TOO_BIG = "too-big"
    TCP_NO_MAPPING = "tcp-no-mapping"
    OFFLOAD_UNSUPPORTED = "offload-unsupported"
    # pvpn-server: replies on their way to a session
    SESSION_DETACHED = "session-detached"
    LINK_CONGESTED = "link-congested"

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS: dict[Drop, str] = {
    Drop.TUNNEL_DOWN: "no tunnel process attached to the session: dropped (fail closed)",
    Drop.TUNNEL_CONGESTED: "the user's tunnel process is not keeping up",
    Drop.MALFORMED_REPLY: "a reply from the tunnel that is not a packet pvpn carries",
    Drop.REPLY_NO_FLOW: "a reply to no flow this session sent (anti-spoofing)",
    Drop.REPLY_ICMP_REFUSED: "an ICMP error whose type, addresses or length a host would "
                             "not receive for this flow",
    Drop.REPLY_NOT_YOURS: "a reply to a flow of this session whose local port another user's "
                          "socket now holds",
    Drop.TUN_FULL: "the session's TUN device is full",
    Drop.TUN_WRITE_FAILED: "writing to the session's TUN device failed",
    Drop.MALFORMED_OFFLOAD: "a super-packet whose offload header lies about its packet, or "
                            "over a link that never offered them",
    Drop.MALFORMED_PACKET: "a packet that is not one pvpn carries",
    Drop.IP_OPTIONS: "an IPv4 packet with options (source routing among them)",
    Drop.DESTINATION_NOT_ALLOWED: "a destination outside the user's allow list",
    Drop.DESTINATION_SPECIAL: "loopback, link-local, multicast, broadcast or one of the "
                              "server's own addresses, not named in the allow list",
    Drop.ICMP_ERROR_NO_FLOW: "an ICMP error about no flow of this session",
    Drop.ICMP_ERROR_REFUSED: "an ICMP error of a type, with addresses or of a length a host "
                             "does not send",
    Drop.FLOW_TABLE_FULL: "the server's NAT table is full",
    Drop.FLOW_CAP_SESSION: "the session holds as many NAT mappings as one session may",
    Drop.FLOW_CAP_USER: "the user holds as many NAT mappings as one user may",
    Drop.NAT_SHARE: "the user holds its share of one destination's NAT ports",
    Drop.NO_NAT_PORT: "every NAT port towards the destination is in use",
    Drop.NO_ROUTE: "the server has no route to the destination",
    Drop.TOO_BIG: "larger than the link towards the destination and not to be fragmented "
                  "(IPv4 DF): answered with the ICMP error of path MTU discovery",
    Drop.TCP_NO_MAPPING: "a TCP segment (not a SYN) of a connection the server has no "
                         "mapping for (lost in a restart, expired, or ended): answered "
                         "with a reset",
    Drop.OFFLOAD_UNSUPPORTED: "a reply the kernel queued as one UDP super-packet (UDP GSO), "
                              "which pvpn does not carry",
    Drop.SESSION_DETACHED: "a reply while the user reconnects",
    Drop.LINK_CONGESTED: "the link to the user is congested",
}


class DropCounter:
    """One session's drops: counted by code, and which of them to log.

    The first drop of each code is always logged (the codes are few); after that at most
    ``burst`` records, refilled at ``rate`` per second, for the whole session (a token
    bucket). Drops not logged are counted until a record takes them
    (:meth:`take_unlogged`). Time is passed in.
    """

    __slots__ = ("counts", "_budget")

    def __init__(self, burst: float = 10.0, rate: float = 1.0) -> None:
        self.counts: dict[Drop, int] = {}
        self._budget = RecordBudget(burst, rate)

    def count(self, drop: Drop, now: float) -> int:
        """Count one drop. Returns the code's count so far if this drop should be logged, 0 if
        not (it is then counted as unlogged)."""
        counts = self.counts
        seen = counts.get(drop, 0) + 1
        counts[drop] = seen
        return seen if self._budget.take(now, always=seen == 1) else 0

    def take_unlogged(self) -> int:
        """How many drops went unlogged since the last call (for the next record)."""
        return self._budget.take_unlogged()

    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        """The counters by code, for records and ``pvpn status``."""
        return {drop.value: count for drop, count in self.counts.items()}


@dataclass(slots=True, kw_only=True)
class Counters:
    """What one session carried and dropped, at the server (Session) and at the client host
    (SlotSession): *out* is what its user sends, *in* what reaches its user."""

    packets_out: int = 0
    packets_in: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    # Super-packets (issue 12): TCP segments of up to 64 KB carried whole, each counted once
    # in packets_* as well.
    super_out: int = 0
    super_in: int = 0
    drops: DropCounter = field(default_factory=DropCounter)

    def count_out(self, size: int) -> None:
        self.packets_out += 1
        self.bytes_out += size

    def count_in(self, size: int) -> None:
        self.packets_in += 1
        self.bytes_in += size

    def traffic(self) -> dict[str, Any]:
        """The counters as ``pvpn status`` and the records show them, out before in."""
        return {"packets_out": self.packets_out, "packets_in": self.packets_in,
                "bytes_out": self.bytes_out, "bytes_in": self.bytes_in,
                **({"super_out": self.super_out, "super_in": self.super_in}
                   if self.super_out or self.super_in else {}),
                "drops": self.drops.as_dict()}
