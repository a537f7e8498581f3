"""Process-local caches of the service: nothing in them that the database cannot rebuild.

* :class:`EngineCache`: each experiment's parsed spec with its sampler and
  rule, by (experiment id, spec version); ids are never reused and spec
  versions only grow, so an entry can never be stale.
* :class:`HistoryCache`: each experiment's sampler history as of its
  ``history_version`` (bumped by every change a sampler can see). A stale entry
  is refreshed by loading only the trials changed since, so an ask at 10,000
  trials loads one or two rows, not 10,000. It also keeps the counts the
  ask path needs (failures, best value), updated with each change, and, where
  known, the experiment row as of that version (:class:`Head`): what lets
  ``ask`` suggest before reading anything and allocate with one conditional
  statement that only succeeds if the version is still the stored one.

Entries are immutable; a refresh builds a new one, so a thread reading an
entry never sees it change.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from kubetune_suggestion.engine.history import Direction, TrialRecord, TrialState
from kubetune_suggestion.service import logic
from kubetune_suggestion.store import ExperimentRow, TrialRow
from kubetune_suggestion.store.oneshot import FinishRead, ReportOutcome

T = TypeVar("T")


@dataclass(frozen=True)
class Head:
    """The experiment row's fields that ``ask`` needs, as of a history version.

    Every write of ``next_number`` or ``sampler_state`` bumps ``history_version``,
    so at an unchanged version (and spec version) these are still the stored ones.

    Attributes:
        spec_version: The spec version they were read or written under.
        next_number: The number the next allocated trial gets.
        sampler_state: The sampler's state, as the database hands it back.
        pending: Trials that may still be pending: every pending one is in it.
            Only ``ask`` creates pending trials, and it bumps the version; a
            report or ``start`` may leave a started trial in it (then ``ask``
            takes the locked path, which reads the pending ones).
    """

    spec_version: int
    next_number: int
    sampler_state: dict[str, Any] | None
    pending: frozenset[int]


@dataclass(frozen=True)
class SamplerHistory:
    """What samplers see of one experiment, as of ``version``.

    Attributes:
        version: The experiment's ``history_version`` this reflects (-1: nothing loaded).
        records: Every trial by number.
        failures: Trials the engine sees as failed (failed, metrics_unavailable).
        best: The best finite objective of a succeeded trial, if any.
        head: The experiment row as of ``version``, when known.
        active: Trials handed out and not finished (pending or running):
            what counts against an experiment's parallelism.
        lease_deadline: The earliest a lease of an open trial can run out
            (seconds since the epoch), or None if no open trial has a lease.
            Renewals only postpone leases, and every new lease comes with an
            allocation (a new version), so the value stays a safe bound for
            as long as the version does: until then, no sweep is due.
    """

    version: int
    records: dict[int, TrialRecord]
    failures: int = 0
    best: float | None = None
    head: Head | None = None
    active: int = 0
    lease_deadline: float | None = None

    def updated(
        self,
        version: int,
        changed: Iterable[TrialRecord],
        direction: Direction,
        head: Head | None = None,
    ) -> SamplerHistory:
        """A new history with ``changed`` records replacing or adding to these, and ``head``."""
        records = dict(self.records)
        failures, best, active = self.failures, self.best, self.active
        for record in changed:
            old = records.get(record.number)
            failures -= old is not None and old.state is TrialState.FAILED
            failures += record.state is TrialState.FAILED
            # The engine sees pending and running trials alike as running.
            active -= old is not None and old.state is TrialState.RUNNING
            active += record.state is TrialState.RUNNING
            # Finished trials never change again, so the best only ever improves.
            if record.state is TrialState.SUCCEEDED and record.has_finite_value:
                assert record.value is not None
                if best is None or direction.better(record.value, best):
                    best = record.value
            records[record.number] = record
        return SamplerHistory(version, records, failures, best, head, active, self.lease_deadline)


class Lru(Generic[T]):
    """A small thread-safe LRU map."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[Any, T] = OrderedDict()

    def get(self, key: Any) -> T | None:
        """The item under ``key`` (now the most recently used), if any."""
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

    def pop(self, key: Any) -> T | None:
        """The item under ``key``, removed, if any."""
        with self._lock:
            return self._items.pop(key, None)


def _never(_: Any) -> bool:
    return False


class HistoryCache:
    """Sampler histories by experiment id, refreshed incrementally.

    Args:
        size: Experiments kept (least recently used dropped).
    """

    def __init__(self, size: int = 256) -> None:
        self._entries: Lru[SamplerHistory] = Lru(size)

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
        records = [
            logic.trial_record(t.number, t.params, t.state, t.objective, t.stop_step)
            for t in changed
        ]
        return base.updated(row.history_version, records, direction)

    def get(self, experiment_id: int) -> SamplerHistory | None:
        """The cached history, whatever its version."""
        return self._entries.get(experiment_id)

    def remember(self, experiment_id: int, history: SamplerHistory) -> None:
        """Keep ``history`` (only call after the transaction it reflects committed)."""
        self._entries.put(experiment_id, history, keep=lambda c: c.version > history.version)

    def advance(
        self,
        experiment_id: int,
        version: int,
        record: TrialRecord,
        direction: Direction,
    ) -> None:
        """Apply a committed change of one trial that took the history from ``version - 1``.

        Only an entry at exactly ``version - 1`` can be advanced (it then
        misses nothing); any other is left for the next ``ask`` to refresh.
        """
        cached = self._entries.get(experiment_id)
        if cached is None or cached.version != version - 1:
            return
        head = cached.head
        if head is not None:
            head = replace(head, pending=head.pending - {record.number})
        self.remember(experiment_id, cached.updated(version, [record], direction, head))

    def restored(
        self,
        experiment_id: int,
        version: int,
        records: Iterable[TrialRecord],
        direction: Direction,
        next_number: int,
    ) -> None:
        """Apply a committed restore that took the history from ``version - 1``.

        A restore adds trials (none pending) and moves ``next_number``; it
        writes nothing else of the experiment row, so the head, if known,
        stays the stored one with the new ``next_number``. As in
        :meth:`advance`, only an entry at exactly ``version - 1`` is advanced.
        """
        cached = self._entries.get(experiment_id)
        if cached is None or cached.version != version - 1:
            return
        head = cached.head
        if head is not None:
            head = replace(head, next_number=next_number)
        self.remember(experiment_id, cached.updated(version, records, direction, head))

    def started(self, experiment_id: int, numbers: Iterable[int]) -> None:
        """Trials ``numbers`` are known to have left ``pending`` (a committed report or start)."""
        gone = frozenset(numbers)
        cached = self._entries.get(experiment_id)
        if cached is None or cached.head is None or cached.head.pending.isdisjoint(gone):
            return
        head = replace(cached.head, pending=cached.head.pending - gone)
        version = cached.version
        # Same version: ``keep`` must not prefer the entry this one replaces.
        self._entries.put(
            experiment_id, replace(cached, head=head), keep=lambda c: c.version > version
        )


class UidHints:
    """Each experiment uid's (id, spec version), as this process last saw them.

    Only a guess: the one-statement writes that use it check both against the
    stored row, so a deleted, re-created or re-specified experiment takes the
    locked path once, which corrects the guess.

    Args:
        size: Experiments kept (least recently used dropped).
    """

    def __init__(self, size: int = 4096) -> None:
        self._entries: Lru[tuple[int, int]] = Lru(size)

    def get(self, uid: str) -> tuple[int, int] | None:
        """(experiment id, spec version) last seen for ``uid``, if any."""
        return self._entries.get(uid)

    def put(self, uid: str, experiment_id: int, spec_version: int) -> None:
        """Remember what a read or a write under the row's lock found (replacing any guess)."""
        self._entries.put(uid, (experiment_id, spec_version), keep=_never)


class Backoff:
    """Whether to try an optimistic path for a key, given how its last tries went.

    A try that loses its race (another replica changed the experiment first)
    wastes the work done for it, a suggestion computed in vain. After ``n``
    consecutive losses the next ``2**n - 1`` calls (at most ``limit``) skip
    the try; a win starts over. An experiment served by one replica at a
    time always tries; one whose replicas interleave settles on the locked
    path, which it needs anyway.

    Args:
        limit: The most calls skipped in a row.
        size: Keys kept (least recently used dropped).
    """

    def __init__(self, limit: int = 63, size: int = 1024) -> None:
        self._limit = limit
        # Per key: [consecutive losses, calls still to skip]. Updated without
        # a lock: a lost update only shifts when the next try happens.
        self._entries: Lru[list[int]] = Lru(size)

    def should_try(self, key: Any) -> bool:
        """Whether to try now (counts a skipped call)."""
        entry = self._entries.get(key)
        if entry is None or entry[1] <= 0:
            return True
        entry[1] -= 1
        return False

    def skipping(self, key: Any) -> bool:
        """Whether the next call would skip the try (counting nothing)."""
        entry = self._entries.get(key)
        return entry is not None and entry[1] > 0

    def lost(self, key: Any) -> None:
        """The try lost its race."""
        entry = self._entries.get(key)
        losses = 1 if entry is None else entry[0] + 1
        self._entries.put(key, [losses, min(2**losses - 1, self._limit)], keep=_never)

    def won(self, key: Any) -> None:
        """The try went through."""
        if self._entries.get(key) is not None:
            self._entries.put(key, [0, 0], keep=_never)


class EngineCache(Generic[T]):
    """Compiled specs by (experiment id, spec version).

    Args:
        size: Entries kept (least recently used dropped).
    """

    def __init__(self, size: int = 1024) -> None:
        self._entries: Lru[T] = Lru(size)

    def get(self, experiment_id: int, spec_version: int) -> T | None:
        """The cached entry, if any."""
        return self._entries.get((experiment_id, spec_version))

    def put(self, experiment_id: int, spec_version: int, compiled: T) -> None:
        """Cache ``compiled``."""
        self._entries.put((experiment_id, spec_version), compiled)


class ReportedTrials:
    """Live trials as this process's one-statement writes left them, with every report.

    What a finish would read back (the trial row, its version, each report's
    step and objective), kept so that the finish can skip that read. An entry
    is only kept while this process stored every report of its trial: it
    starts with the trial's allocation here, or with a report that found
    none stored before, and each later
    report extends it only if the trial row is still the version the last
    one left (every report rewrites the row, so another process's report in
    between breaks the chain and drops the entry). The finish still writes
    only if the row is the version cached, so a stale entry costs a read,
    never a wrong objective.

    Args:
        size: Trials kept (least recently used dropped).
    """

    def __init__(self, size: int = 65536) -> None:
        self._entries: Lru[FinishRead] = Lru(size)

    def record(
        self,
        uid: str,
        number: int,
        experiment: tuple[int, int],
        outcome: ReportOutcome,
        step: int,
        objective: float | None,
    ) -> None:
        """Take in a committed one-statement report of trial ``number``."""
        key = (uid, number)
        # Replaced below if the chain holds, else dropped.
        known = self._entries.pop(key)
        earlier: list[tuple[int, float | None]] | None = None  # every earlier report, if known
        if (
            known is not None
            and known.version == outcome.before
            and len(known.observed) == outcome.reports_before
        ):
            earlier = known.observed
        elif outcome.reports_before == 0:
            earlier = []
        if outcome.after is None or earlier is None:
            return
        if outcome.stored:
            observed = sorted([*earlier, (step, objective)], key=lambda o: o[0])
        elif any(s == step for s, _ in earlier):
            observed = list(earlier)  # a repeated step: nothing new stored
        else:
            return
        eid, spec_version = experiment
        read = FinishRead(eid, spec_version, outcome.after, outcome.after_version, observed)
        self._entries.put(key, read, keep=_never)

    def allocated(self, uid: str, number: int, read: FinishRead) -> None:
        """Take in a trial this process allocated (its row as inserted, with no report)."""
        self._entries.put((uid, number), read, keep=_never)

    def pop(self, uid: str, number: int) -> FinishRead | None:
        """The entry of trial ``number``, removed (a finish uses it once)."""
        return self._entries.pop((uid, number))
