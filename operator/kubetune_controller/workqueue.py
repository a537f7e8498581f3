"""A work queue of experiment keys, in the manner of client-go's.

Many watch events about one experiment (dozens of Pods changing at once)
collapse into one pending reconcile; an experiment is never reconciled by two
workers at once; an event that arrives while its experiment is being
reconciled schedules exactly one more run after the current one. That keeps
per-experiment work serial without serialising experiments with each other.

With ``min_interval``, a key is not run again sooner than that after its last
run ended: under a steady stream of events (fifty trials a second ending and
starting), one reconcile then handles a batch of them instead of each event
costing a reconcile and its service calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    """Deduplicating queue with per-key exclusion and delayed adds."""

    def __init__(self, min_interval: float = 0.0) -> None:
        self.min_interval = min_interval
        # When each key's last run ended (event loop time).
        self._ended: dict[K, float] = {}
        self._ready: asyncio.Queue[K] = asyncio.Queue()
        self._queued: set[K] = set()
        self._active: set[K] = set()
        # Keys added while active: run again once the current run is done.
        self._again: set[K] = set()
        # Pending delayed adds: when each is due, and its handle. (The due time
        # is kept here: uvloop answers call_at for a past time with a plain
        # Handle, which has no ``when()``.)
        self._timers: dict[K, tuple[float, asyncio.Handle]] = {}

    def add(self, key: K) -> None:
        """Schedule a reconcile of ``key`` (a no-op if one is already pending)."""
        if key in self._active:
            self._again.add(key)
        elif key in self._queued:
            return
        elif (wait := self._wait(key)) > 0:
            self.add_after(key, wait)
        else:
            self._queued.add(key)
            self._ready.put_nowait(key)

    def add_after(self, key: K, delay: float) -> None:
        """Schedule a reconcile in ``delay`` seconds (an earlier pending timer wins)."""
        loop = asyncio.get_running_loop()
        timer = self._timers.get(key)
        due = loop.time() + delay
        if timer is not None and timer[0] <= due:
            return
        if timer is not None:
            timer[1].cancel()
        self._timers[key] = (due, loop.call_at(due, self._fire, key))

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def _wait(self, key: K) -> float:
        """Seconds until ``key`` may run again (``min_interval`` after its last run)."""
        ended = self._ended.get(key)
        if ended is None or self.min_interval <= 0:
            return 0.0
        return ended + self.min_interval - asyncio.get_running_loop().time()

    async def get(self) -> K:
        """The next key to reconcile; the caller must call :meth:`done` after."""
        key = await self._ready.get()
        self._queued.discard(key)
        self._active.add(key)
        return key

    def done(self, key: K) -> None:
        """Mark a reconcile finished; re-queue it if events arrived meanwhile."""
        self._active.discard(key)
        if self.min_interval > 0:
            self._ended[key] = asyncio.get_running_loop().time()
        if key in self._again:
            self._again.discard(key)
            self.add(key)

    def forget(self, key: K) -> None:
        """Drop a pending timer (the object is gone)."""
        self._ended.pop(key, None)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer[1].cancel()

    def __len__(self) -> int:
        return len(self._queued)
