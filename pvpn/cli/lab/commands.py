"""The one place through which the lab runs external commands.

Every command is an argument list (never a shell string).  :func:`run` waits with a timeout
and raises :class:`CommandFailed` carrying the command's stderr, so the error says what went
wrong; :func:`spawn` starts one that runs alongside (the demo's concurrent downloads) or
talks to the user (``pvpn lab exec``).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from pvpn.cli.lab.errors import CommandFailed, LabError

DEFAULT_TIMEOUT = 60.0

# Where the lab looks for programs: the venv pvpn runs from first (supervisord, pvpn-client,
# pvpn-server live there), then the usual system directories.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def venv_bin() -> Path:
    """The scripts directory of the Python environment pvpn runs from."""
    return Path(sys.prefix) / "bin"


def search_path() -> str:
    return f"{venv_bin()}:{SYSTEM_PATH}"


def find_program(name: str) -> str | None:
    """Full path of ``name`` on the lab's search path, or None."""
    for directory in search_path().split(":"):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def require_program(name: str) -> str:
    path = find_program(name)
    if path is None:
        raise LabError(
            f"{name} not found on {search_path()}; install the lab's dependencies with "
            "`bash scripts/run test` (or `demo`) from the pvpn checkout"
        )
    return path


def quote(cmd: Sequence[str]) -> str:
    """The command as one would type it in a shell (for messages and the demo)."""
    return shlex.join(list(cmd))


def run(
    cmd: Sequence[str],
    *,
    input: bytes | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``cmd`` and capture its output; raise :class:`CommandFailed` if it fails.

    With ``check=False`` a non-zero exit is returned instead of raised; a missing program
    and a timeout always raise.
    """
    argv = [str(part) for part in cmd]
    try:
        result = subprocess.run(
            argv,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            check=False,
        )
    except FileNotFoundError as exc:
        raise LabError(
            f"cannot run {quote(argv)}: {argv[0]} is not installed "
            "(install the lab's dependencies with `bash scripts/run test`)"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if exc.stderr else ""
        raise LabError(f"command timed out after {timeout:g} s: {quote(argv)}\n{stderr}") from exc
    if check and result.returncode != 0:
        raise CommandFailed(argv, result.returncode, result.stderr.decode(errors="replace"))
    return result


def spawn(cmd: Sequence[str], *, capture: bool, cwd: Path | str | None = None
          ) -> subprocess.Popen[bytes]:
    """Start ``cmd`` without waiting: with its output captured (``capture``), or sharing our
    stdin, stdout and stderr.  For commands that run alongside others or talk to the user."""
    argv = [str(part) for part in cmd]
    try:
        if capture:
            return subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return subprocess.Popen(argv, cwd=cwd)
    except FileNotFoundError as exc:
        raise LabError(f"cannot run {quote(argv)}: {argv[0]} is not installed") from exc


def succeeds(cmd: Sequence[str], *, input: bytes | None = None, timeout: float = 10.0) -> bool:
    """True if ``cmd`` exits 0 within ``timeout``; never raises for a failing command."""
    try:
        return run(cmd, input=input, timeout=timeout, check=False).returncode == 0
    except LabError:
        return False


def wait_until(
    what: str,
    probe: Callable[[], bool],
    *,
    timeout: float,
    interval: float = 0.2,
) -> None:
    """Call ``probe`` until it returns True; bounded in time and in the number of tries."""
    tries = max(1, int(timeout / interval) + 1)
    deadline = time.monotonic() + timeout
    for _ in range(tries):
        if probe():
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise LabError(f"timed out after {timeout:g} s waiting for {what}")
