"""Who answers on pvpn-client's socket: the user's processes (`pvpn connect`, `pvpn status`,
`pvpn disconnect`) hand their packets and questions only to a peer the kernel says is root.

Anyone who could put a listener where the socket is expected (a stale path, a --socket typo,
a directory another user can write) would otherwise receive the user's protected packets and
answer with forged replies and statuses."""

from __future__ import annotations

import pwd
import socket
import struct
from pathlib import Path

DAEMON_UID = 0


def peer_uid(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a connected unix socket, from the kernel."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    return pid, uid


def untrusted_peer(sock: socket.socket, path: Path) -> str | None:
    """Why the peer on ``sock`` is not pvpn-client, or None if it runs as root."""
    pid, uid = peer_uid(sock)
    if uid == DAEMON_UID:
        return None
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = "no such user"
    return (f"the process answering on {path} (pid {pid}) runs as uid {uid} ({name}), not "
            "root: it is not pvpn-client, so nothing is sent to it; check --socket, and tell "
            "root if that is the host's pvpn-client socket")
