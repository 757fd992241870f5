"""Strings that came from someone else: bounded before they are logged or sent back, and made
harmless before a person reads them on a terminal.

A user name from an unauthenticated HELLO, the ``server`` a local user registered, the reason a
peer gave for closing: each reaches a log record, an envelope or root's terminal. Without a
bound, one frame writes a record of a hundred kilobytes; without escaping, a string with
terminal escape sequences rewrites what root sees in ``pvpn status`` or ``pvpn trace``.
"""

from __future__ import annotations

#: What a log record or a refusal keeps of one string taken from the wire or a local socket.
MAX_QUOTED = 256


def clip(text: str, limit: int = MAX_QUOTED) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text) - limit} more characters)"


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped (ESC becomes ``\\x1b``), so a
    terminal shows what was sent and obeys none of it."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def quoted(text: str, limit: int = MAX_QUOTED) -> str:
    """A peer's string as a person should read it: clipped, then escaped."""
    return printable(clip(text, limit))
