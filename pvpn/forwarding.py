"""Uploads' super-packets forwarded whole (docs/design.md "Uploads"): pvpn-server writes each,
NATed, into its TUN device with a virtio_net_hdr, and the kernel forwards it and segments it
in C (or not at all, on a veth), one system call per 64 KB instead of one per 1,500 bytes.

That needs the host's FORWARD rules to let those packets through, and pvpn owns none of
them. So the server counts what leaves (firewall.forward_count) against what it wrote, and
a family whose super-packets do not get out goes back to being segmented by pvpn-server and
sent by its raw socket, which no FORWARD rule sees, until the server is reloaded or
restarted. TCP inside the tunnel retransmits what was lost before the check. This module is
that check's logic, without the I/O.
"""

from __future__ import annotations

from typing import Iterable, Mapping

#: The fewest super-packets written in a check for it to judge: a few may still be on their
#: way, or lost to a full queue like any packet.
SAMPLE = 8
#: Seconds between checks while super-packets are written: the first checks soon (what is
#: lost before one is lost to TCP's retransmission), then less often.
FIRST_INTERVAL = 1.0
INTERVAL = 10.0
FIRST_CHECKS = 10


class ForwardCheck:
    """Which IP versions' super-packets go whole (:attr:`whole`), judged by the count of
    those that left (:meth:`check`) against those written (:meth:`wrote`)."""

    def __init__(self, versions: Iterable[int], counted: Mapping[int, int | None]) -> None:
        self.whole = set(versions)
        self._written = dict.fromkeys(self.whole, 0)
        self._counted = dict(counted)
        self._next = 0.0
        self.checks = 0

    def wrote(self, version: int) -> None:
        self._written[version] += 1

    def due(self, now: float) -> bool:
        return now >= self._next and any(self._written[v] >= SAMPLE for v in self.whole)

    def check(self, counted: Mapping[int, int | None], now: float) -> dict[int, str]:
        """Judge each version written enough since the last check by ``counted`` (the rule's
        packet count now, None where the rule was not found). Returns the versions that no
        longer go whole, each with why."""
        self.checks += 1
        self._next = now + (FIRST_INTERVAL if self.checks < FIRST_CHECKS else INTERVAL)
        off: dict[int, str] = {}
        for version in sorted(self.whole):
            written = self._written[version]
            if written < SAMPLE:
                continue
            now_counted, before = counted.get(version), self._counted.get(version)
            self._written[version] = 0
            self._counted[version] = now_counted
            if now_counted is None:
                off[version] = "the rule that counts them is gone"
            elif before is None or now_counted < before:
                continue  # the rules were put back: counting starts again
            elif (now_counted - before) * 2 < written:
                off[version] = (f"{now_counted - before} of the last {written} left the host: "
                                "its FORWARD rules drop them")
        self.whole -= set(off)
        return off
