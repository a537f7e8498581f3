"""Writes without a transaction block: the fast paths of the hot calls (PostgreSQL).

On PostgreSQL a statement sent outside a transaction block is a transaction
of its own, committed (its WAL flushed, as any commit) before its result
comes back. One statement instead of BEGIN, a locking read, the write and
COMMIT saves three round trips, and the CPU both sides spend on each.

Each write is conditional: it happens only if what the caller assumed (from
its process-local caches, or from a read just before) is still what is
stored, and the result says whether it did. When it did not, nothing was
written, and the caller reads again or takes the locked path
(:class:`~kubetune_suggestion.store.writes.WriteTxn`), which reads what it
needs under the experiment's or the trial's row lock.

The conditions hold on the rows as locked: in PostgreSQL's READ COMMITTED an
UPDATE or SELECT ... FOR UPDATE that waited for another transaction
re-checks its conditions against the row version that transaction
committed, so a statement racing with a replica's write either sees that
write or does nothing. ``finish`` reads a trial with its reports and then
ends it only if the trial row is still the version read (its ``xmin``);
every report rewrites its trial's row in the transaction that stores it, so
no report can slip in between unnoticed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from kubetune_suggestion.store.rows import ANONYMOUS, AskedBy, NewTrial, TrialRow, utcnow

# The experiment moves from ``expected`` to ``version`` only if nothing else
# changed it since the caller's cache saw it; the trials are inserted only if
# it did (``FROM e``). The stored sampler state comes back as a read gives it,
# on every row, and each new trial's id and row version (xmin) with it (one
# row with NULLs when no trial was inserted), so that a finish of a trial
# nobody reported on can skip its read too.
_ALLOCATE_IF_CURRENT = (
    "WITH e AS (UPDATE experiments SET next_number = %(next)s, sampler_state = %(state)s, "
    "history_version = %(version)s, updated_at = %(now)s WHERE id = %(eid)s "
    "AND history_version = %(expected)s AND spec_version = %(spec_version)s "
    "AND next_number = %(first)s RETURNING id, sampler_state), "
    "n AS (INSERT INTO trials (experiment_id, number, params, state, history_version, created_at, "
    "ask_id, lease_seconds, lease_expires_at) "
    "SELECT e.id, u.n, u.p, 'pending', %(version)s, %(now)s, %(ask_id)s, %(lease)s, %(expires)s "
    "FROM e, unnest(%(numbers)s::integer[], %(params)s::jsonb[]) AS u(n, p) "
    "RETURNING number, id, xmin::text AS version) "
    "SELECT e.sampler_state, n.number, n.id, n.version FROM e LEFT JOIN n ON true"
)
# A trial row's columns: TrialRow's fields are named after them, in order.
_TRIAL_COLUMNS = ", ".join(f.name for f in fields(TrialRow))
# The trial row is locked (as the locked path's lock_trials_of does) and its
# state read as locked: a trial that finished meanwhile gets nothing stored.
# The trial row is rewritten even when it stays running (see _FINISH_IF_UNCHANGED).
# Besides storing the report, it answers what a later finish needs to skip
# its read (see ReportOutcome.after): the row version before (xmin) and the
# number of reports stored before, as locked, and the trial row after.
# A report renews the trial's lease (NULL stays NULL).
_REPORT_IF_CURRENT = (
    "WITH t AS (SELECT t.id, t.state, t.stop_reason, t.xmin::text AS before, "
    "(SELECT count(*) FROM observations WHERE trial_id = t.id) AS reports FROM experiments e "
    "JOIN trials t ON t.experiment_id = e.id WHERE e.uid = %(uid)s AND e.id = %(eid)s "
    "AND e.spec_version = %(spec_version)s AND t.number = %(number)s FOR UPDATE OF t), "
    "o AS (INSERT INTO observations (trial_id, step, metrics, objective, created_at) "
    "SELECT t.id, %(step)s::bigint, %(metrics)s::jsonb, %(objective)s::double precision, "
    "%(now)s::timestamptz FROM t WHERE t.state IN ('pending', 'running') "
    "ON CONFLICT (trial_id, step) DO NOTHING RETURNING trial_id), "
    "r AS (UPDATE trials SET state = 'running', started_at = COALESCE(started_at, %(now)s), "
    "lease_expires_at = %(epoch)s::double precision + lease_seconds "
    "WHERE id = (SELECT id FROM t) AND state IN ('pending', 'running') "
    f"RETURNING xmin::text AS after, {_TRIAL_COLUMNS}) "
    "SELECT t.id, t.state, t.stop_reason, EXISTS (SELECT FROM o), t.before, t.reports, r.* "
    "FROM t LEFT JOIN r ON true"
)
# The trial with its reports, as of one snapshot; xmin names the row version read.
_FINISH_READ = (
    "SELECT e.id, e.spec_version, t.xmin::text, t.id, t.number, t.params, t.state, "
    "t.objective, t.message, t.stop_reason, t.history_version, t.created_at, t.started_at, "
    "t.finished_at, t.stop_step, o.steps, o.objectives FROM experiments e "
    "JOIN trials t ON t.experiment_id = e.id LEFT JOIN LATERAL ("
    "SELECT array_agg(step ORDER BY step) AS steps, "
    "array_agg(objective ORDER BY step) AS objectives "
    "FROM observations WHERE trial_id = t.id) o ON true "
    "WHERE e.uid = %s AND t.number = %s"
)
# The trial ends only if its row is still the version read with its reports.
# Every report rewrites the trial row in the transaction that stores it, so a
# report committed since (or still holding the row's lock, which this waits
# for) leaves another version: then nothing is written and the caller reads
# again. The experiment row is locked first, as the locked path locks them.
# With a final report (``%(report)s``), its observation is stored by the same
# statement, only if the trial was ended by it (``FROM u``).
_FINISH_IF_UNCHANGED = (
    "WITH v AS (SELECT history_version + 1 AS version FROM experiments "
    "WHERE id = %(eid)s FOR UPDATE), "
    "u AS (UPDATE trials SET state = %(state)s, objective = %(objective)s, "
    "message = %(message)s, history_version = (SELECT version FROM v), "
    "started_at = %(started)s, finished_at = %(now)s, "
    "stop_step = COALESCE(%(stop_step)s, stop_step) WHERE id = %(tid)s "
    "AND xmin = %(xmin)s::xid AND state IN ('pending', 'running') RETURNING id), "
    "e AS (UPDATE experiments SET history_version = (SELECT version FROM v), "
    "updated_at = %(now)s WHERE id = %(eid)s AND EXISTS (SELECT FROM u)), "
    "s AS (DELETE FROM stop_orders WHERE trial_id = %(tid)s AND %(close)s "
    "AND EXISTS (SELECT FROM u)), "
    "o AS (INSERT INTO observations (trial_id, step, metrics, objective, created_at) "
    "SELECT u.id, %(step)s::bigint, %(metrics)s::jsonb, %(value)s::double precision, "
    "%(now)s::timestamptz FROM u WHERE %(report)s ON CONFLICT (trial_id, step) DO NOTHING) "
    "SELECT version FROM v WHERE EXISTS (SELECT FROM u)"
)


class Connections:
    """A bounded pool of psycopg connections kept in autocommit.

    Apart from the engine's pool so that neither side switches a
    connection's mode at every checkout. At most ``size`` are open; a caller
    beyond that waits for one to come back.

    Args:
        connect: Opens a new connection (in autocommit).
        size: The most connections open at once.
    """

    def __init__(self, connect: Callable[[], Any], size: int) -> None:
        self._connect = connect
        self._size = size
        self._idle: list[Any] = []
        self._open = 0
        self._closed = False
        self._changed = threading.Condition()

    def acquire(self) -> Any:
        """An idle connection, or a new one (waiting while ``size`` are in use)."""
        with self._changed:
            while not self._idle and self._open >= self._size:
                self._changed.wait()
            if self._idle:
                return self._idle.pop()
            self._open += 1
        try:
            return self._connect()
        except BaseException:
            self._forget()
            raise

    def release(self, connection: Any) -> None:
        """Take ``connection`` back; one that is not idle and healthy is closed instead."""
        from psycopg.pq import TransactionStatus

        idle = connection.info.transaction_status == TransactionStatus.IDLE
        reusable = idle and not connection.broken
        with self._changed:
            if reusable and not self._closed:
                self._idle.append(connection)
                self._changed.notify()
                return
        connection.close()
        self._forget()

    def close(self) -> None:
        """Close the idle connections; those in use close when they come back."""
        with self._changed:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
            self._forget()

    def _forget(self) -> None:
        with self._changed:
            self._open -= 1
            self._changed.notify()


@dataclass(frozen=True)
class Allocation:
    """A conditional allocation that went through."""

    # The sampler's state as stored, as a read hands it back.
    sampler_state: dict[str, Any] | None
    # When the trials were created (their created_at).
    created_at: datetime
    # Each new trial's number, id and row version (xmin).
    trials: tuple[tuple[int, int, str], ...] = ()


@dataclass(frozen=True)
class FinishRead:
    """A trial and its reports as of one snapshot, for :meth:`OneShot.finish_if_unchanged`."""

    experiment_id: int
    spec_version: int
    trial: TrialRow
    # The trial row's version (its xmin) as read.
    version: str
    # (step, objective value or None) of every report, by step.
    observed: list[tuple[int, float | None]]


@dataclass(frozen=True)
class FinalReport:
    """A report that a finish stores with the trial's end."""

    step: int
    metrics: Mapping[str, float]
    # The objective metric's value in ``metrics``, if there.
    objective: float | None


@dataclass(frozen=True)
class ReportOutcome:
    """What a conditional report found and did."""

    trial_id: int
    # The trial's state as locked, before this report (a finished one got nothing stored).
    state: str
    stop_reason: str | None
    # Whether this (trial, step) was stored now (False: stored before, or finished).
    stored: bool
    # The trial row's version (xmin) before this report, and how many reports
    # it had then: a process that knows every earlier report (it stored them
    # itself, with nothing between) knows them all after this one too.
    before: str = ""
    reports_before: int = -1
    # The trial row as this report left it, and its new version (None when
    # nothing was written: a finished trial).
    after: TrialRow | None = None
    after_version: str = ""


class OneShot:
    """One-statement conditional writes on a psycopg connection in autocommit."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection

    def _execute(self, sql: str, params: Mapping[str, Any] | Sequence[Any]) -> Any:
        cursor = self._connection.cursor()
        # Prepared on the server at first use, as the locked path's statements are.
        cursor.execute(sql, params, prepare=True)
        return cursor

    def allocate_if_current(
        self,
        experiment_id: int,
        expected: tuple[int, int, int],
        trials: Sequence[NewTrial],
        sampler_state: Any,
        asked: AskedBy = ANONYMOUS,
    ) -> Allocation | None:
        """Insert ``trials`` as pending and advance the experiment, if it is as expected.

        Args:
            experiment_id: The experiment.
            expected: (history version, spec version, next number) the caller
                assumes are stored; the trials are numbered from that next number.
            trials: The new trials (possibly none: the sampler state still advances).
            sampler_state: The sampler's new state.
            asked: The ask id and lease the new trials get.

        Returns:
            None, having written nothing, if the experiment is gone or differs.
        """
        from psycopg.types.json import Jsonb

        version, spec_version, first = expected
        now = utcnow()
        rows = self._execute(
            _ALLOCATE_IF_CURRENT,
            {
                "eid": experiment_id,
                "expected": version,
                "spec_version": spec_version,
                "first": first,
                "version": version + 1,
                "next": first + len(trials),
                # As SQLAlchemy's JSONB column stores it: None is a JSON null.
                "state": Jsonb(sampler_state),
                "now": now,
                "numbers": [t.number for t in trials],
                "params": [Jsonb(dict(t.params)) for t in trials],
                "ask_id": asked.ask_id,
                "lease": asked.lease_seconds,
                "expires": asked.expires_at,
            },
        ).fetchall()
        if not rows:
            return None
        return Allocation(
            sampler_state=rows[0][0],
            created_at=now,
            trials=tuple((int(r[1]), int(r[2]), r[3]) for r in rows if r[1] is not None),
        )

    def finish_read(self, uid: str, number: int) -> FinishRead | None:
        """Trial ``number`` of experiment ``uid`` with its reports; None if there is none."""
        row = self._execute(_FINISH_READ, (uid, number)).fetchone()
        if row is None:
            return None
        steps, objectives = row[15] or [], row[16] or []
        return FinishRead(
            experiment_id=int(row[0]),
            spec_version=int(row[1]),
            trial=TrialRow(*row[3:15]),
            version=row[2],
            observed=[
                (int(step), None if value is None else float(value))
                for step, value in zip(steps, objectives, strict=True)
            ],
        )

    def finish_if_unchanged(
        self,
        read: FinishRead,
        state: str,
        objective: float | None,
        message: str | None,
        started_at: datetime,
        finished_at: datetime,
        report: FinalReport | None = None,
        stop_step: int | None = None,
    ) -> int | None:
        """End the trial of ``read``, if its row is still the version read.

        Sets its state, objective, message, times and ``stop_step`` (None
        keeps the stored one), bumps the experiment's
        history version (the trial takes the new one), removes the trial's
        stop order if it had one, and stores ``report`` if given (a step
        already stored is kept as it was).

        Returns:
            The new history version; None, having written nothing, if the
            trial changed since ``read`` (a report, a stop order, an end) or
            is gone.
        """
        from psycopg.types.json import Jsonb

        row = self._execute(
            _FINISH_IF_UNCHANGED,
            {
                "eid": read.experiment_id,
                "tid": read.trial.id,
                "xmin": read.version,
                "close": read.trial.stop_reason is not None,
                "state": state,
                "objective": objective,
                "message": message,
                "started": started_at,
                "now": finished_at,
                "report": report is not None,
                "step": None if report is None else report.step,
                "metrics": None if report is None else Jsonb(dict(report.metrics)),
                "value": None if report is None else report.objective,
                "stop_step": stop_step,
            },
        ).fetchone()
        return None if row is None else int(row[0])

    def report_if_current(
        self,
        uid: str,
        number: int,
        experiment: tuple[int, int],
        step: int,
        metrics: Mapping[str, float],
        objective: float | None,
    ) -> ReportOutcome | None:
        """Store a report of trial ``number`` (and start it if pending), unless it finished.

        Args:
            uid: The experiment's uid.
            number: The trial.
            experiment: (id, spec version) the caller assumes ``uid`` has; the
                objective was taken from ``metrics`` by that spec.
            step: The report's step.
            metrics: The report's metrics.
            objective: The objective metric's value in them, if any.

        Returns:
            None, having written nothing, if there is no such trial under that
            experiment id and spec version.
        """
        from psycopg.types.json import Jsonb

        experiment_id, spec_version = experiment
        row = self._execute(
            _REPORT_IF_CURRENT,
            {
                "uid": uid,
                "eid": experiment_id,
                "spec_version": spec_version,
                "number": number,
                "step": step,
                "metrics": Jsonb(dict(metrics)),
                "objective": objective,
                "now": utcnow(),
                "epoch": time.time(),
            },
        ).fetchone()
        if row is None:
            return None
        after = None if row[6] is None else TrialRow(*row[7:19])
        return ReportOutcome(
            trial_id=int(row[0]),
            state=row[1],
            stop_reason=row[2],
            stored=row[3],
            before=row[4],
            reports_before=int(row[5]),
            after=after,
            after_version=row[6] or "",
        )
