"""Process-local caches of the service: nothing in them that the database cannot rebuild.

* :class:`EngineCache`: each experiment's parsed spec with its sampler and
  rule, by (experiment id, spec version); ids are never reused and spec
  versions only grow, so an entry can never be stale.
* :class:`HistoryCache`: each experiment's sampler history as of its
  ``history_version`` (bumped by every change a sampler can see). A stale entry
  is refreshed by loading only the trials changed since, so an ask at 10,000
  trials loads one or two rows, not 10,000. It also keeps the counts the
  ask path needs (failures, best value), updated with each change.

Entries are immutable; a refresh builds a new one, so a thread reading an
entry never sees it change.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from kubetune_suggestion.engine.history import Direction, TrialRecord, TrialState
from kubetune_suggestion.service import logic
from kubetune_suggestion.store import ExperimentRow, TrialRow, WriteTxn

T = TypeVar("T")


@dataclass(frozen=True)
class SamplerHistory:
    """What samplers see of one experiment, as of ``version``.

    Attributes:
        version: The experiment's ``history_version`` this reflects (-1: nothing loaded).
        records: Every trial by number.
        failures: Trials the engine sees as failed (failed, metrics_unavailable).
        best: The best finite objective of a succeeded trial, if any.
    """

    version: int
    records: dict[int, TrialRecord]
    failures: int = 0
    best: float | None = None

    def updated(
        self, version: int, changed: Iterable[TrialRecord], direction: Direction
    ) -> SamplerHistory:
        """A new history with ``changed`` records replacing or adding to these."""
        records = dict(self.records)
        failures, best = self.failures, self.best
        for record in changed:
            old = records.get(record.number)
            failures -= old is not None and old.state is TrialState.FAILED
            failures += record.state is TrialState.FAILED
            # Finished trials never change again, so the best only ever improves.
            if record.state is TrialState.SUCCEEDED and record.has_finite_value:
                assert record.value is not None
                if best is None or direction.better(record.value, best):
                    best = record.value
            records[record.number] = record
        return SamplerHistory(version, records, failures, best)


class _Lru(Generic[T]):
    """A small thread-safe LRU map."""

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

    def put(self, key: Any, item: T, keep: Callable[[T], bool] = lambda _: True) -> None:
        """Store ``item`` unless the current entry should be kept (``keep(current)``)."""
        with self._lock:
            current = self._items.get(key)
            if current is None or not keep(current):
                self._items[key] = item
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


class HistoryCache:
    """Sampler histories by experiment id, refreshed incrementally.

    Args:
        size: Experiments kept (least recently used dropped).
    """

    def __init__(self, size: int = 256) -> None:
        self._entries: _Lru[SamplerHistory] = _Lru(size)

    def load(self, tx: WriteTxn, row: ExperimentRow, direction: Direction) -> SamplerHistory:
        """The history as of ``row.history_version`` (call with the experiment row-locked)."""
        cached = self._entries.get(row.id)
        if cached is not None and cached.version == row.history_version:
            return cached
        if cached is None or cached.version > row.history_version:
            cached = SamplerHistory(-1, {})
        changed = [
            logic.trial_record(t.number, t.params, t.state, t.objective)
            for t in tx.history_since(row.id, cached.version)
        ]
        return cached.updated(row.history_version, changed, direction)

    def base(self, row: ExperimentRow) -> SamplerHistory:
        """The cached history to refresh up to ``row.history_version`` (empty if none fits)."""
        cached = self._entries.get(row.id)
        if cached is None or cached.version > row.history_version:
            return SamplerHistory(-1, {})
        return cached

    def refresh(
        self,
        base: SamplerHistory,
        row: ExperimentRow,
        changed: Iterable[TrialRow],
        direction: Direction,
    ) -> SamplerHistory:
        """``base`` with the trials changed since its version (the caller loaded them)."""
        if base.version == row.history_version:
            return base
        records = [logic.trial_record(t.number, t.params, t.state, t.objective) for t in changed]
        return base.updated(row.history_version, records, direction)

    def remember(self, experiment_id: int, history: SamplerHistory) -> None:
        """Keep ``history`` (only call after the transaction it reflects committed)."""
        self._entries.put(experiment_id, history, keep=lambda c: c.version > history.version)


class EngineCache(Generic[T]):
    """Compiled specs by (experiment id, spec version).

    Args:
        size: Entries kept (least recently used dropped).
    """

    def __init__(self, size: int = 1024) -> None:
        self._entries: _Lru[T] = _Lru(size)

    def get(self, experiment_id: int, spec_version: int) -> T | None:
        """The cached entry, if any."""
        return self._entries.get((experiment_id, spec_version))

    def put(self, experiment_id: int, spec_version: int, compiled: T) -> None:
        """Cache ``compiled``."""
        self._entries.put((experiment_id, spec_version), compiled)
