"""Run a program the way a container runs it, and time how it takes SIGTERM.

In a container the program is PID 1 of its own PID namespace, and the kernel
drops a signal sent to such a process when it has no handler for it: a Python
program that does not catch SIGTERM ignores the kubelet's SIGTERM and is only
killed when the Pod's grace period (30 s) runs out. A plain subprocess test
cannot see that (the default action kills it), so where the tests run as root
with ``unshare`` the program runs as a real PID 1 (``unshare --pid --fork``);
elsewhere it runs as a plain child and :func:`catches_sigterm` checks the
handler the kernel would need instead.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# How long a program may take to end after SIGTERM. The kubelet waits 30 s
# by default before SIGKILL; these programs should need well under a second.
PROMPT_SECONDS = 2.0


@functools.cache
def pid1_available() -> bool:
    """Whether programs can run as PID 1 of a new PID namespace here (root and unshare)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    try:
        result = subprocess.run(
            ["unshare", "--pid", "--fork", "--kill-child", "--", "sh", "-c", 'test "$$" = 1'],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def catches_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a SIGTERM handler (the ``SigCgt`` mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


@dataclass
class Program:
    """A started program: ``popen`` (maybe the unshare wrapper) and the program's own pid."""

    popen: subprocess.Popen[str]
    pid: int
    as_pid1: bool

    def sigterm(self) -> tuple[int, float]:
        """Send SIGTERM to the program; its exit status and the seconds it took to end.

        Raises:
            AssertionError: If it was still running :data:`PROMPT_SECONDS`
                after the signal (then it is killed).
        """
        started = time.monotonic()
        os.kill(self.pid, signal.SIGTERM)
        try:
            code = self.popen.wait(timeout=PROMPT_SECONDS)
        except subprocess.TimeoutExpired:
            self.kill()
            where = "as PID 1" if self.as_pid1 else "as a child process"
            raise AssertionError(
                f"still running {PROMPT_SECONDS}s after SIGTERM ({where})"
            ) from None
        return code, time.monotonic() - started

    def kill(self) -> None:
        """SIGKILL whatever is left (the wrapper takes its child along: --kill-child)."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def start(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    as_pid1: bool = True,
    **popen_args: Any,
) -> Program:
    """Start ``argv``, as PID 1 of a new PID namespace where possible.

    Args:
        argv: The program and its arguments.
        env: Its environment (default: this process's).
        as_pid1: Run it as PID 1 when :func:`pid1_available`.
        **popen_args: More arguments for :class:`subprocess.Popen` (stdout, ...).
    """
    pid1 = as_pid1 and pid1_available()
    command = ["unshare", "--pid", "--fork", "--kill-child", "--", *argv] if pid1 else list(argv)
    popen: subprocess.Popen[str] = subprocess.Popen(
        command, env=dict(env) if env is not None else None, text=True, **popen_args
    )
    if not pid1:
        return Program(popen, popen.pid, False)
    # The program is unshare's only child.
    children = Path(f"/proc/{popen.pid}/task/{popen.pid}/children")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            pids = children.read_text().split()
        except OSError:
            pids = []
        if pids:
            return Program(popen, int(pids[0]), True)
        if popen.poll() is not None:
            raise AssertionError(f"unshare exited with {popen.returncode} before its child started")
        time.sleep(0.01)
    popen.kill()
    raise AssertionError("unshare started no child within 10 s")


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds.

    Raises:
        AssertionError: Naming ``what`` when ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
