"""Which user holds which session slot on the client host: pure bookkeeping, no I/O.

A slot gives a session its NFQUEUE number, its connection mark and its TUN device name. The uid
of every request comes from the kernel (SO_PEERCRED), never from the message."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pvpn.config import ClientConfig, Network
from pvpn.errors import PolicyError
from pvpn.packet import FlowKey

MAX_FLOWS_PER_SESSION = 65536
FLOW_IDLE = 900.0


@dataclass(slots=True)
class SlotSession:
    """One user's protected prefixes on this host, with or without a live tunnel process."""

    slot: int
    uid: int
    user: str
    server: str
    networks: list[Network]
    queue: int
    mark: int
    tun: str
    opened: float
    session_id: bytes = b""
    attached: bool = False
    # Flows this session sent, so only replies to them may be injected (anti-spoofing).
    flows: dict[FlowKey, float] = field(default_factory=dict)
    packets_out: int = 0
    packets_in: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    drops: dict[str, int] = field(default_factory=dict)

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "slot": self.slot, "uid": self.uid, "user": self.user, "server": self.server,
            "session": self.session_id.hex(), "prefixes": [str(n) for n in self.networks],
            "state": "up" if self.attached and self.session_id else
                     ("connecting" if self.attached else "held (no tunnel process: dropping)"),
            "age": round(now - self.opened, 1), "queue": self.queue, "tun": self.tun,
            "packets_out": self.packets_out, "packets_in": self.packets_in,
            "bytes_out": self.bytes_out, "bytes_in": self.bytes_in, "drops": dict(self.drops),
        }

    def drop(self, reason: str) -> int:
        count = self.drops.get(reason, 0) + 1
        self.drops[reason] = count
        return count

    def prune_flows(self, now: float) -> None:
        stale = [k for k, seen in self.flows.items() if now - seen > FLOW_IDLE]
        for key in stale:
            del self.flows[key]


class Registry:
    """Slots by number; requests checked against the caller's kernel-given uid."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.sessions: dict[int, SlotSession] = {}
        self._shift = (config.mark_mask & -config.mark_mask).bit_length() - 1

    def mark_for(self, slot: int) -> int:
        # Slot 0 gets mark 1 (shifted into the mask): an unmarked connection is never a session.
        return ((slot + 1) << self._shift) & self.config.mark_mask

    def find_held(self, uid: int, networks: list[Network]) -> SlotSession | None:
        """A session of this uid for exactly these prefixes whose tunnel process is gone."""
        wanted = sorted(map(str, networks))
        for session in self.sessions.values():
            if (session.uid == uid and not session.attached
                    and sorted(map(str, session.networks)) == wanted):
                return session
        return None

    def allocate(self, uid: int, user: str, server: str, networks: list[Network],
                 now: float) -> SlotSession:
        for session in self.sessions.values():
            if session.uid != uid:
                continue  # other users may protect the same prefixes: the owner match splits them
            for mine in session.networks:
                for new in networks:
                    if mine.version == new.version and mine.overlaps(new):
                        raise PolicyError(
                            f"{new} overlaps {mine}, already protected by your session "
                            f"{session.session_id.hex() or '(connecting)'} in slot "
                            f"{session.slot}; `pvpn disconnect` it first")
        free = next((s for s in range(self.config.max_sessions) if s not in self.sessions), None)
        if free is None:
            raise PolicyError(f"all {self.config.max_sessions} session slots of this host are "
                              "in use; ask root to raise max_sessions")
        session = SlotSession(
            slot=free, uid=uid, user=user, server=server, networks=list(networks),
            queue=self.config.queue_base + free, mark=self.mark_for(free),
            tun=f"{self.config.instance}{free}", opened=now,
        )
        self.sessions[free] = session
        return session

    def adopt(self, slot: int, uid: int, user: str, networks: list[Network], queue: int,
              mark: int, tun: str, now: float) -> SlotSession:
        """A session whose rules survived a pvpn-client crash: held until its user's tunnel
        process registers again (its packets are dropped meanwhile)."""
        session = SlotSession(slot=slot, uid=uid, user=user, server="(recovered)",
                              networks=list(networks), queue=queue, mark=mark, tun=tun,
                              opened=now)
        self.sessions[slot] = session
        return session

    def release(self, slot: int) -> SlotSession | None:
        return self.sessions.pop(slot, None)

    def visible_to(self, uid: int) -> list[SlotSession]:
        return [s for s in self.sessions.values() if uid == 0 or s.uid == uid]

    def find_for_disconnect(self, uid: int, session_id: bytes) -> list[SlotSession]:
        """Sessions the caller may end: its own (root: anyone's); all of its own if no id."""
        found = [s for s in self.visible_to(uid)
                 if not session_id or s.session_id == session_id
                 or s.session_id.hex().startswith(session_id.hex())]
        if session_id and not found:
            raise PolicyError(f"no session {session_id.hex()} of yours on this host")
        return found
