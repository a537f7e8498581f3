"""One trial as a local process: start it, watch it, stop it.

Each trial runs in its own session (process group), so a Ctrl-C typed at the
terminal reaches ``kubetune run`` only, which then stops every trial cleanly,
and so stopping a trial also stops anything it spawned (data loader workers,
a shell's children).

On Linux a trial also dies with the runner (``PR_SET_PDEATHSIG``): after a
``kill -9`` of ``kubetune run`` nothing is left holding the GPU or writing to
the metrics file the next run uses. That reaches the trial's own process,
not what it spawned: :func:`group_alive` tells the next run about those.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

__all__ = [
    "TrialProcess",
    "describe_exit",
    "group_alive",
    "missing_executable",
    "resolve_command",
    "tail",
]

# How a manifest names the interpreter; locally it means the one running
# kubetune, so the trial sees the same installed packages (kubetune's SDK too).
_PYTHON_NAMES: Final = frozenset({"python", "python3", f"python3.{sys.version_info.minor}"})


_PR_SET_PDEATHSIG: Final = 1
# Loaded before any fork: the child of a fork should only call into it.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _die_with_parent(parent: int) -> None:
    """In the forked child, before exec: SIGKILL when the runner goes away."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)  # the runner died before the signal was armed


def group_alive(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` (a trial and its children) still runs."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive, and not ours to signal
    return True


def resolve_command(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``python``/``python3`` replaced by the current interpreter."""
    out = list(argv)
    if out and out[0] in _PYTHON_NAMES:
        out[0] = sys.executable
    return out


def missing_executable(program: str, cwd: Path, search_path: str | None) -> str | None:
    """Why ``program`` cannot be started from ``cwd``, or None when it can.

    Args:
        program: ``argv[0]``: a path (with a ``/``, relative to ``cwd``) or a
            name looked up on ``search_path`` (the trial's ``PATH``).
        cwd: Where the trial runs.
        search_path: The ``PATH`` the trial gets.
    """
    if "/" in program:
        path = cwd / program
        if not path.is_file():
            return f"{program!r} does not exist (relative to {cwd})"
        if not os.access(path, os.X_OK):
            return f"{program!r} is not executable"
        return None
    if shutil.which(program, path=search_path) is None:
        return f"{program!r} is not on PATH ({search_path or ''})"
    return None


def tail(path: Path, lines: int = 10, max_bytes: int = 16 * 1024) -> list[str]:
    """The last ``lines`` non-empty lines of a text file ([] if it does not exist)."""
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
    except FileNotFoundError:
        return []
    text = data.decode("utf-8", errors="replace")
    return [line for line in text.splitlines() if line.strip()][-lines:]


def describe_exit(code: int) -> str:
    """An exit status in words ("exited with code 1", "killed by SIGKILL")."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class TrialProcess:
    """A running trial process whose output goes to a log file."""

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: Path,
        log_path: Path,
        header: str,
    ) -> None:
        """Start the process.

        Raises:
            OSError: The command cannot be started (not found, not executable).
        """
        self.log_path = log_path
        self.started = time.monotonic()
        self.exit_code: int | None = None
        self._kill_at: float | None = None
        with log_path.open("ab") as log:
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            log.write(f"--- {stamp} {header}: {' '.join(argv)}\n".encode())
            log.flush()
            parent = os.getpid()
            self.popen = subprocess.Popen(
                list(argv),
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=lambda: _die_with_parent(parent),
            )

    @property
    def pid(self) -> int:
        """The process id (also its process group id)."""
        return self.popen.pid

    @property
    def terminating(self) -> bool:
        """Whether :meth:`terminate` was called."""
        return self._kill_at is not None

    def poll(self) -> int | None:
        """The exit status once the process ended (negative: killed by that signal).

        Also escalates a pending :meth:`terminate` to SIGKILL once its grace
        period is over.
        """
        if self.exit_code is None:
            self.exit_code = self.popen.poll()
            overdue = self._kill_at is not None and time.monotonic() >= self._kill_at
            if self.exit_code is None and overdue:
                self._signal(signal.SIGKILL)
        return self.exit_code

    def terminate(self, grace: float) -> None:
        """Ask the process group to stop (SIGTERM); SIGKILL follows after ``grace`` seconds."""
        if self._kill_at is None:
            self._kill_at = time.monotonic() + grace
            self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """Stop the process group now (SIGKILL)."""
        self._kill_at = time.monotonic()
        self._signal(signal.SIGKILL)

    def wait(self, timeout: float) -> int | None:
        """Poll until the process ended or ``timeout`` seconds passed."""
        end = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < end:
            time.sleep(0.02)
        return self.exit_code

    def _signal(self, signum: signal.Signals) -> None:
        # Never signal a group whose leader was reaped: its id may be reused.
        if self.popen.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
            os.killpg(self.popen.pid, signum)
