"""Connection marks in the kernel's connection tracking, through the conntrack tool
(conntrack-tools, which speaks ctnetlink).

A client-host session marks the connections whose replies come in through its TUN device with
its slot's mark (firewall.client_session); the ownerless packets of those connections follow
the mark into the session's queue. So when a session ends, the connections it marked are
forgotten (their entries deleted: the next packet of such a connection starts an unmarked
entry, or none at all for a FIN or RST), and before a slot's mark goes to another session the
table is asked whether any connection still carries it.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from pvpn.errors import ConfigError, PvpnError

_FAMILIES = ("ipv4", "ipv6")
_COUNT_RE = re.compile(r"(\d+) flow entries have been (?:shown|deleted)")


def tool() -> str:
    path = shutil.which("conntrack")
    if path is None:
        raise ConfigError("conntrack not found; install the conntrack package "
                          "(apt-get install conntrack): pvpn-client clears the connection marks "
                          "of ended sessions with it")
    return path


def _each_family(command: str, mark: int, mask: int) -> int:
    total = 0
    for family in _FAMILIES:
        args = [tool(), command, "-f", family, "-m", f"{mark:#x}/{mask:#x}"]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=30)
        found = _COUNT_RE.search(proc.stderr)
        if found is None:  # the tool says how many it showed or deleted, also for none
            raise PvpnError(f"{' '.join(args[1:])}: {proc.stderr.strip() or proc.returncode}")
        total += int(found[1])
    return total


def count_marked(mark: int, mask: int) -> int:
    """How many tracked connections (IPv4 and IPv6) carry ``mark`` under ``mask``."""
    return _each_family("-L", mark, mask)


def forget_marked(mark: int, mask: int) -> int:
    """Delete the entries of every connection carrying ``mark`` under ``mask``; how many."""
    return _each_family("-D", mark, mask)
