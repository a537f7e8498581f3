"""The service's one cache: what it keeps of each experiment between calls.

Two things cost the most to rebuild on every call, and both are kept here,
by experiment id (never reused, so a deleted experiment is never confused
with a re-created one of the same uid):

* the experiment's compiled spec (the parsed spec with its sampler and rule),
  by spec version;
* its sampler history (every trial as the engine sees it, with the counts an
  ask needs), as of a ``history_version`` of the experiment.

Consistency
-----------
The database is the only source of truth; every replica, and a restarted
process, works from it.

* A compiled spec is keyed by (experiment id, ``spec_version``); the version
  is bumped by every spec change, so an entry can never be stale.
* A sampler history is only ever *used* under the experiment's row lock, at
  the ``history_version`` of the locked row. Every write that changes what
  samplers see (an allocation, a finish, a lease expiry, a restore, a retry
  handed back to an ask) bumps that version in the same transaction, and
  each trial row records the version of its last such change. So an entry
  at the locked version is exactly the stored history, and an older one is
  brought up to it by reading only the trials whose version is greater
  (:meth:`ExperimentCache.history_base` gives the version to read from). An
  entry newer than the locked row (a rolled-back write cannot leave one: see
  below) is ignored.
* Entries are remembered only after the transaction that wrote them
  committed, and never replace a newer one; a process that never saw a
  change simply reads it at its next ask. What another replica wrote is
  therefore read, never assumed.
* Counts outside the sampler history (trials by state, the best trial for the
  summary) are never cached: reads go to the database.

Entries are immutable; an update builds a new one, so a thread reading an
entry never sees it change. Both maps are bounded (least recently used
experiments are dropped and rebuilt from the database when next used).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from kubetune_suggestion.engine.history import Direction, RecordState, TrialRecord

T = TypeVar("T")


@dataclass(frozen=True)
class SamplerHistory:
    """What samplers see of one experiment, as of ``version``.

    Attributes:
        version: The experiment's ``history_version`` this reflects (-1: nothing loaded).
        records: Every trial by number.
        failures: Trials the engine sees as failed (failed, metrics_unavailable).
        best: The best finite objective of a succeeded trial, if any.
        active: Trials handed out and not finished (pending or running):
            what counts against an experiment's parallelism.
    """

    version: int
    records: dict[int, TrialRecord]
    failures: int = 0
    best: float | None = None
    active: int = 0

    def updated(
        self, version: int, changed: Iterable[TrialRecord], direction: Direction
    ) -> SamplerHistory:
        """A new history at ``version``, with ``changed`` records replacing or adding to these."""
        records = dict(self.records)
        failures, best, active = self.failures, self.best, self.active
        for record in changed:
            old = records.get(record.number)
            failures -= old is not None and old.state is RecordState.FAILED
            failures += record.state is RecordState.FAILED
            # The engine sees pending and running trials alike as running.
            active -= old is not None and old.state is RecordState.RUNNING
            active += record.state is RecordState.RUNNING
            # Finished trials never change again, so the best only ever improves.
            if record.state is RecordState.SUCCEEDED and record.has_finite_value:
                assert record.value is not None
                if best is None or direction.better(record.value, best):
                    best = record.value
            records[record.number] = record
        return SamplerHistory(version, records, failures, best, active)


EMPTY = SamplerHistory(-1, {})


class _Lru(Generic[T]):
    """A small thread-safe map that drops its least recently used entries."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[Any, T] = OrderedDict()

    def get(self, key: Any) -> T | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: Any, item: T, keep: Callable[[T], bool]) -> None:
        """Store ``item`` unless the current entry should be kept (``keep(current)``)."""
        with self._lock:
            current = self._items.get(key)
            if current is None or not keep(current):
                self._items[key] = item
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


class ExperimentCache(Generic[T]):
    """Compiled specs (of type ``T``) and sampler histories by experiment id.

    Args:
        size: Experiments kept in each map.
    """

    def __init__(self, size: int = 256) -> None:
        self._compiled: _Lru[tuple[int, T]] = _Lru(size)
        self._histories: _Lru[SamplerHistory] = _Lru(size)

    def compiled(
        self, experiment_id: int, spec_version: int, load: Callable[[], tuple[int, T]]
    ) -> T:
        """The compiled spec at ``spec_version``, unless cached built by ``load``.

        ``load`` gives (spec version, compiled spec) as stored now, which may
        be newer than the version asked for: it is kept under its own version.
        """
        cached = self._compiled.get(experiment_id)
        if cached is not None and cached[0] == spec_version:
            return cached[1]
        version, compiled = load()
        self._compiled.put(experiment_id, (version, compiled), keep=lambda c: c[0] > version)
        return compiled

    def history_base(self, experiment_id: int, locked_version: int) -> SamplerHistory:
        """The cached history to bring up to ``locked_version`` (the locked row's); empty if none.

        The caller reads the trials changed after the returned history's
        version and applies them with :meth:`SamplerHistory.updated`.
        """
        cached = self._histories.get(experiment_id)
        if cached is None or cached.version > locked_version:
            return EMPTY
        return cached

    def remember(self, experiment_id: int, history: SamplerHistory) -> None:
        """Keep ``history`` (only after the transaction it reflects committed)."""
        self._histories.put(experiment_id, history, keep=lambda c: c.version >= history.version)

    def advance(
        self,
        experiment_id: int,
        version: int,
        changed: Iterable[TrialRecord],
        direction: Direction,
    ) -> None:
        """Apply a committed change that took the experiment's history from ``version - 1``.

        Only an entry at exactly ``version - 1`` is advanced (it then misses
        nothing); any other is left for the next ask to bring up to date.
        """
        cached = self._histories.get(experiment_id)
        if cached is not None and cached.version == version - 1:
            self.remember(experiment_id, cached.updated(version, changed, direction))
