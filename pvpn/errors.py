"""Typed errors of pvpn.

Three families, after h11: *remote* errors for anything parsed off the wire or a
local socket (the peer sent garbage), *local* errors for our own misuse, and
*config* errors whose message tells the user what to do.
"""

from __future__ import annotations


class PvpnError(Exception):
    """Base of every error pvpn raises on purpose."""


class RemoteProtocolError(PvpnError):
    """The peer (network or local socket) sent something we cannot accept."""


class LocalProtocolError(PvpnError):
    """We used an API wrongly; a bug in pvpn, never the peer's fault."""


class ConfigError(PvpnError):
    """A configuration or command-line setting is wrong; the message names it."""


class MalformedFrame(RemoteProtocolError):
    """An envelope could not be decoded (wrong types, missing fields, oversize)."""


class SequenceError(RemoteProtocolError):
    """An envelope arrived out of sequence: replayed, duplicated or lost."""


class MalformedPacket(RemoteProtocolError):
    """An IP packet is too short, truncated or of an unsupported kind."""


class TlsError(RemoteProtocolError):
    """The TLS layer failed (handshake, record, or close)."""


class CertificateError(TlsError):
    """The peer's certificate was refused; the message names the cause."""


class AuthError(RemoteProtocolError):
    """User authentication failed (unknown user, wrong key, bad signature)."""


class PolicyError(PvpnError):
    """A request is well-formed but not allowed (destination, next hop, user)."""


class FlowTableFull(PvpnError):
    """No free NAT port or flow slot is left; the packet is dropped."""


class StateError(PvpnError):
    """The server's saved state can't be used or written (corrupt, forged, of another node,
    unsafe permissions, a failed write); the message says why."""

