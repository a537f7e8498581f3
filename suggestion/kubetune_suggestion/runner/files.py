"""An experiment's files under ``kubetune run --dir``, and the lock that lets one run at a time.

Files, for experiment ``NAME`` under ``--dir`` (default ``.kubetune``)::

    NAME.db                 the store (SQLite): experiments, trials, observations
    NAME.lock               held while a run is going (one runner per experiment)
    NAME/trial-N.log        the trial's stdout and stderr (one header line per attempt)
    NAME/trial-N.metrics    its metrics file (KUBETUNE_METRICS_FILE)
    NAME/trial-N.pid        its running attempt's process id (gone once it ended)
    NAME/trial-N.timedout   it ran past trialTimeoutSeconds and is being stopped
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

__all__ = ["RunPaths", "RunnerBusy", "experiment_lock", "runner_of"]

# How long a starting run waits for the lock: `kubetune status` holds it for a
# moment to see whether a run is going.
_LOCK_PATIENCE: Final = 0.5


class RunnerBusy(RuntimeError):
    """Another ``kubetune run`` is running the same experiment, or one of its trials."""


@dataclass(frozen=True)
class RunPaths:
    """Where one experiment's local files live."""

    root: Path
    name: str

    @property
    def database(self) -> Path:
        """The SQLite store."""
        return self.root / f"{self.name}.db"

    @property
    def lock(self) -> Path:
        """Held while a run is going."""
        return self.root / f"{self.name}.lock"

    @property
    def trials(self) -> Path:
        """Per-trial logs and metrics files."""
        return self.root / self.name

    def log(self, number: int) -> Path:
        """Trial ``number``'s stdout and stderr."""
        return self.trials / f"trial-{number}.log"

    def metrics(self, number: int) -> Path:
        """Trial ``number``'s metrics file."""
        return self.trials / f"trial-{number}.metrics"

    def timed_out(self, number: int) -> Path:
        """Present from trial ``number``'s timeout until its end is recorded; holds the limit."""
        return self.trials / f"trial-{number}.timedout"

    def pid(self, number: int) -> Path:
        """The process id of trial ``number``'s running attempt (gone once it ended)."""
        return self.trials / f"trial-{number}.pid"

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL of the store."""
        return f"sqlite:///{self.database.resolve()}"


@contextlib.contextmanager
def experiment_lock(paths: RunPaths) -> Iterator[None]:
    """Hold the experiment's lock file for the duration of a run.

    Raises:
        RunnerBusy: Another process holds it.
    """
    paths.root.mkdir(parents=True, exist_ok=True)
    handle: IO[str] = paths.lock.open("a+")
    try:
        if not _try_lock(handle.fileno(), fcntl.LOCK_EX, patience=_LOCK_PATIENCE):
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunnerBusy(
                f"experiment {paths.name!r} is already being run by {holder} "
                f"(lock file {paths.lock})"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the lock


def runner_of(paths: RunPaths) -> str | None:
    """Who runs the experiment now (``pid N``), or None when no run is going.

    The lock, not the pid it names, tells: the kernel releases it when the
    runner exits, however it exits (``kill -9`` included).
    """
    try:
        handle = paths.lock.open("r")
    except FileNotFoundError:
        return None
    with handle:
        if _try_lock(handle.fileno(), fcntl.LOCK_SH, patience=0.0):
            return None  # closing the file releases the probe at once
        return handle.read().strip() or "another process"


def _try_lock(fd: int, kind: int, *, patience: float) -> bool:
    """Take ``flock(kind)`` without blocking, retrying for ``patience`` seconds."""
    end = time.monotonic() + patience
    while True:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= end:
                return False
            time.sleep(0.02)
