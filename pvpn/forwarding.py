"""Uploads' super-packets forwarded whole (docs/design.md "Uploads"): pvpn-server writes each,
NATed, into its TUN device with a virtio_net_hdr, and the kernel forwards it and segments it
in C (or not at all, on a veth), one system call per 64 KB instead of one per 1,500 bytes.

That needs the host's FORWARD rules to let those packets through, and pvpn owns none of
them. So the server counts what leaves (firewall.forward_count) against what it wrote, and
a family whose super-packets do not get out goes back to being segmented by pvpn-server and
sent by its raw socket, which no FORWARD rule sees, for a while (RETRY_FIRST, then longer)
or until the server is reloaded. TCP inside the tunnel retransmits what was lost before the
check. This module is that check's logic, without the I/O.
"""

from __future__ import annotations

from typing import Iterable, Mapping

#: The fewest super-packets written in a check for it to judge: a few may still be on their
#: way, or lost to a full queue like any packet.
SAMPLE = 8
#: Seconds between checks while super-packets are written: the first checks soon (what is
#: lost before one is lost to TCP's retransmission), then a little less often. Each check
#: asks iptables, in a thread (a big ruleset takes a while to list).
FIRST_INTERVAL = 1.0
INTERVAL = 2.0
FIRST_CHECKS = 10
#: A family turned off is tried again after this long, then twice as long each time it fails
#: again, at most RETRY_MAX: a host whose firewall changes back gets the speed back, and one
#: whose firewall keeps dropping (or a user who makes the kernel drop their own packets on
#: purpose) costs at most one check's worth of retransmissions per RETRY_MAX.
RETRY_FIRST = 30.0
RETRY_MAX = 600.0


class ForwardCheck:
    """Which IP versions' super-packets go whole (:attr:`whole`), judged by the count of
    those that left against those written: :meth:`wrote` for each; when :meth:`due`,
    :meth:`take` the numbers written, read the count, and :meth:`judge`. A version turned
    off comes back (:meth:`retries`, :meth:`resume`) after a growing wait."""

    def __init__(self, versions: Iterable[int], counted: Mapping[int, int | None]) -> None:
        self.whole = set(versions)
        self._written = dict.fromkeys(self.whole, 0)
        self._counted = dict(counted)
        self._next = 0.0
        self.checks = 0
        self._retry_at: dict[int, float] = {}
        self._wait: dict[int, float] = {}  # the next wait of a version that failed

    def wrote(self, version: int) -> None:
        self._written[version] += 1

    def due(self, now: float) -> bool:
        return now >= self._next and any(self._written[v] >= SAMPLE for v in self.whole)

    def take(self, now: float) -> dict[int, int]:
        """The super-packets written since the last check (taken before the count is read,
        so every one of them is in it), and the next check's time."""
        self.checks += 1
        self._next = now + (FIRST_INTERVAL if self.checks < FIRST_CHECKS else INTERVAL)
        written = {v: self._written[v] for v in self.whole if self._written[v] >= SAMPLE}
        for version in written:
            self._written[version] = 0
        return written

    def judge(self, written: Mapping[int, int], counted: Mapping[int, int | None],
              now: float) -> dict[int, str]:
        """Judge each version in ``written`` by ``counted`` (the rule's packet count, read
        after :meth:`take`; None where the rule was not found). Returns the versions that no
        longer go whole, each with why."""
        off: dict[int, str] = {}
        for version, number in sorted(written.items()):
            if version not in self.whole:
                continue
            now_counted, before = counted.get(version), self._counted.get(version)
            self._counted[version] = now_counted
            if now_counted is None:
                off[version] = "the rule that counts them is gone"
            elif before is None or now_counted < before:
                continue  # the rules were put back: counting starts again
            elif (now_counted - before) * 2 < number:
                off[version] = f"{now_counted - before} of the last {number} left the host"
            else:
                self._wait.pop(version, None)  # it works: a later failure waits little
        for version in off:
            self.off(version, now)
        return off

    def off(self, version: int, now: float) -> bool:
        """Turn ``version`` off for another reason (a write the device refused); whether it
        was on."""
        if version not in self.whole:
            return False
        self.whole.discard(version)
        wait = self._wait.get(version, RETRY_FIRST)
        self._retry_at[version] = now + wait
        self._wait[version] = min(RETRY_MAX, wait * 2)
        return True

    def retries(self, now: float) -> list[int]:
        """The versions turned off whose wait is over."""
        return sorted(v for v, at in self._retry_at.items() if now >= at)

    def resume(self, version: int, counted: int | None) -> None:
        """``version`` goes whole again, its count from ``counted`` on (a reload, or its wait
        is over)."""
        self._retry_at.pop(version, None)
        self.whole.add(version)
        self._written[version] = 0
        self._counted[version] = counted

    def next_try(self, version: int) -> float | None:
        return self._retry_at.get(version)
