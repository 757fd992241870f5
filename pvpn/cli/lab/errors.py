"""Errors of the lab: every one says what failed and, where it can, what to do."""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from pvpn.errors import PvpnError


class LabError(PvpnError):
    """Building, using or removing a lab failed; the message names the piece."""


class CommandFailed(LabError):
    """A command the lab ran exited non-zero; carries its stderr."""

    def __init__(self, cmd: Sequence[str], returncode: int, stderr: str) -> None:
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stderr = stderr
        detail = stderr.strip() or "(no output on stderr)"
        super().__init__(f"command failed (exit {returncode}): {shlex.join(self.cmd)}\n{detail}")
