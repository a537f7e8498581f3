"""Start, record and stop the harness's long-running processes.

Every process is started in its own session (process group) and recorded in
``processes.json`` in the state directory together with its start time, so
``down`` can run from another shell than ``up``, never signals a recycled PID,
and takes whole process groups down: nothing is orphaned.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path


def _start_ticks(pid: int) -> int | None:
    """Return the process start time (clock ticks since boot), None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


@dataclass
class Record:
    """One started process as written to ``processes.json``."""

    name: str
    pid: int
    start_ticks: int
    log: str
    argv: list[str]

    def alive(self) -> bool:
        """Whether this very process (not a recycled PID) still runs."""
        return _start_ticks(self.pid) == self.start_ticks


class ProcessTable:
    """The processes of one harness state directory.

    Args:
        state_dir: The cluster's state directory.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "processes.json"
        self.log_dir = state_dir / "logs"
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def load(self) -> list[Record]:
        """Read the recorded processes (in start order)."""
        if not self.path.exists():
            return []
        return [Record(**r) for r in json.loads(self.path.read_text())]

    def _save(self, records: list[Record]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps([asdict(r) for r in records], indent=1))
        tmp.replace(self.path)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Record:
        """Start ``argv`` in a new session with output appended to ``logs/<name>.log``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        self._children[proc.pid] = proc
        ticks = _start_ticks(proc.pid) or 0
        record = Record(name, proc.pid, ticks, str(log), argv)
        self._save([*self.load(), record])
        return record

    def stop_all(self, timeout: float = 10.0) -> list[str]:
        """Stop every recorded process group, newest first, one after the other.

        SIGTERM lets each component shut down cleanly (the kubelets stop their
        pods); SIGKILL follows for a group still alive after ``timeout``.
        Sequential order matters: the API server shuts down in a second while
        etcd is still there, but hangs for its full timeout once etcd is gone.

        Returns:
            The names of the processes that were still running.
        """
        stopped = []
        for rec in reversed(self.load()):
            # A record whose process is gone is skipped entirely: its PID (and
            # so its group ID) may belong to someone else by now.
            if not rec.alive():
                self._reap(rec.pid)
                continue
            stopped.append(rec.name)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(rec.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while rec.alive() and time.monotonic() < deadline:
                self._reap(rec.pid)
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                # Also catches grandchildren left in the group after the
                # leader exited (the group ID stays ours while any member lives).
                os.killpg(rec.pid, signal.SIGKILL)
            self._reap(rec.pid)
        if self.path.exists():
            self.path.unlink()
        return stopped

    def _reap(self, pid: int) -> None:
        proc = self._children.get(pid)
        if proc is not None:
            proc.poll()
