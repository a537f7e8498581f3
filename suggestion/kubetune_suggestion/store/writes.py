"""The write transaction: every statement that changes the store.

:meth:`~kubetune_suggestion.store.repository.Store.write` opens one; the
service's application layer reads, decides with the pure engine and writes
inside it, atomically.

Concurrency: :meth:`WriteTxn.lock_experiment` takes the experiment's row lock
(``SELECT ... FOR UPDATE`` on PostgreSQL; on SQLite every write transaction
already holds the database's write lock), so two replicas never allocate the
same trial number; the unique constraint on (experiment, number) backs that up.
Trial rows are locked the same way by reports and by ``finish``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Table, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from kubetune_suggestion.store.db import is_postgres
from kubetune_suggestion.store.rows import (
    ANONYMOUS,
    OPEN_STATES,
    AskedBy,
    ExperimentRow,
    ExpiredTrial,
    NewTrial,
    RestoredTrial,
    StepRow,
    TrialRow,
    count_states,
    experiment_row,
    trial_row,
    utcnow,
)
from kubetune_suggestion.store.rows import EXPERIMENT_COLUMNS as _EXPERIMENT_COLUMNS
from kubetune_suggestion.store.rows import EXPERIMENTS as _experiments
from kubetune_suggestion.store.rows import OBSERVATIONS as _observations
from kubetune_suggestion.store.rows import SETTINGS as _settings
from kubetune_suggestion.store.rows import STOP_ORDERS as _stop_orders
from kubetune_suggestion.store.rows import TRIAL_COLUMNS as _TRIAL_COLUMNS
from kubetune_suggestion.store.rows import TRIALS as _trials


def _insert_for(connection: Connection) -> Any:
    """The dialect's INSERT construct (both support ON CONFLICT DO NOTHING)."""
    return postgresql.insert if is_postgres(connection) else sqlite.insert


# Hot-path statements are built once, with bind parameters, and reused:
# building a statement and its cache key costs about three times what
# executing a prebuilt one does. Keyed by (name, is PostgreSQL, extra).
_STATEMENTS: dict[tuple[Any, ...], Any] = {}


def _statement(key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
    stmt = _STATEMENTS.get(key)
    if stmt is None:
        stmt = _STATEMENTS[key] = build()
    return stmt


def _locked(stmt: Any, postgres: bool, of: Table | None = None) -> Any:
    # SQLite has no row locks: its write transactions hold the database lock.
    return stmt.with_for_update(of=of) if postgres else stmt


def _trial_of_select(postgres: bool, many: bool) -> Any:
    number = (
        _trials.c.number.in_(bindparam("numbers", expanding=True))
        if many
        else _trials.c.number == bindparam("number")
    )
    stmt = (
        select(
            _experiments.c.id.label("experiment_id"), _experiments.c.spec_version, *_TRIAL_COLUMNS
        )
        .join(_trials, _trials.c.experiment_id == _experiments.c.id)
        .where(_experiments.c.uid == bindparam("uid"), number)
        .order_by(_trials.c.id)
    )
    return _locked(stmt, postgres, of=_trials)


# PostgreSQL hot-path statements, run on the transaction's psycopg connection
# itself: SQLAlchemy's execution machinery costs several times what psycopg
# does for these small statements, and they are prepared on the server at
# first use. Data-modifying CTEs let one round trip do what took two or three.
_T = "t.id, t.number, t.params, t.state, t.objective, t.message, t.stop_reason, " + (
    "t.history_version, t.created_at, t.started_at, t.finished_at, t.stop_step"
)
_PG_LOCK_EXPERIMENT = (
    "SELECT id, uid, name, namespace, spec, spec_version, sampler_state, next_number, "
    "history_version, created_at FROM experiments WHERE uid = %s FOR UPDATE"
)
# The last column: whether a pending trial was handed out under the ask id
# given (false for every trial when it is NULL).
_PG_ASK_TRIALS = (
    f"SELECT {_T}, COALESCE(t.state = 'pending' AND t.ask_id = %s, false) FROM trials t "
    "WHERE t.experiment_id = %s AND (t.history_version > %s OR t.state = 'pending') "
    "ORDER BY t.number"
)
_PG_ALLOCATE = (
    "WITH e AS (UPDATE experiments SET next_number = %(next)s, sampler_state = %(state)s, "
    "history_version = %(version)s, updated_at = %(now)s WHERE id = %(eid)s "
    "RETURNING sampler_state), "
    "n AS (INSERT INTO trials (experiment_id, number, params, state, history_version, created_at, "
    "ask_id, lease_seconds, lease_expires_at) "
    "SELECT %(eid)s, u.n, u.p, 'pending', %(version)s, %(now)s, %(ask_id)s, %(lease)s, "
    "%(expires)s FROM unnest(%(numbers)s::integer[], %(params)s::jsonb[]) AS u(n, p)) "
    "SELECT sampler_state FROM e"
)
_PG_LOCK_TRIALS_OF = (
    f"SELECT e.id, e.spec_version, {_T} FROM experiments e "
    "JOIN trials t ON t.experiment_id = e.id WHERE e.uid = %s AND t.number = ANY(%s) "
    "ORDER BY t.id FOR UPDATE OF t"
)
_PG_LOCK_FOR_FINISH = (
    f"SELECT e.id, e.spec_version, e.history_version, {_T} FROM experiments e "
    "JOIN trials t ON t.experiment_id = e.id WHERE e.uid = %s AND t.number = %s "
    "FOR UPDATE OF e, t"
)
# Every reported trial's row is rewritten, not only the pending ones': the
# optimistic finish (oneshot._FINISH_IF_UNCHANGED) relies on a report leaving
# a new row version. A report renews the trial's lease (NULL stays NULL).
_PG_STORE_REPORTS = (
    "WITH r AS (UPDATE trials SET state = 'running', started_at = COALESCE(started_at, %(now)s), "
    "lease_expires_at = %(epoch)s::double precision + lease_seconds "
    "WHERE id = ANY(%(trials)s) AND state IN ('pending', 'running')) "
    "INSERT INTO observations (trial_id, step, metrics, objective, created_at) "
    "SELECT u.t, u.s, u.m, u.o, %(now)s "
    "FROM unnest(%(trials)s::bigint[], %(steps)s::bigint[], %(metrics)s::jsonb[], "
    "%(objectives)s::double precision[]) AS u(t, s, m, o) "
    "ON CONFLICT (trial_id, step) DO NOTHING RETURNING trial_id, step"
)
_PG_FINISH = (
    "WITH e AS (UPDATE experiments SET history_version = %(version)s, updated_at = %(now)s "
    "WHERE id = %(eid)s), s AS (DELETE FROM stop_orders WHERE trial_id = %(tid)s AND %(close)s) "
    "UPDATE trials SET state = %(state)s, objective = %(objective)s, message = %(message)s, "
    "history_version = %(version)s, started_at = %(started)s, finished_at = %(now)s, "
    "stop_step = COALESCE(%(stop_step)s, stop_step) WHERE id = %(tid)s"
)
_PG_OBSERVED_STEPS = "SELECT step, objective FROM observations WHERE trial_id = %s ORDER BY step"


def lease_expired_message(lease_seconds: int) -> str:
    """The message of a trial failed because its lease ran out."""
    return (
        f"lease expired: no start, report or finish within {lease_seconds} s; failed as abandoned"
    )


def _trial(row: Sequence[Any], at: int = 0) -> TrialRow:
    """A :class:`TrialRow` from the columns of ``_T`` starting at ``at`` (PostgreSQL)."""
    return TrialRow(*row[at : at + 12])


class WriteTxn:
    """One write transaction; every method runs inside it."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._postgres = is_postgres(connection)

    def _pg(self, sql: str, params: Any) -> Any:
        """Run ``sql`` on the psycopg connection of this transaction; the cursor."""
        cursor = self.connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
        cursor.execute(sql, params, prepare=True)
        return cursor

    @property
    def postgres(self) -> bool:
        """Whether this transaction runs on PostgreSQL."""
        return self._postgres

    def _run(
        self, name: str, build: Callable[[], Any], params: Any = None, extra: Any = None
    ) -> Any:
        stmt = _statement((name, self._postgres, extra), build)
        return self.connection.execute(stmt, params)

    def setting(self, key: str, default: str) -> str:
        """The service-wide setting ``key``, stored as ``default`` if absent (first writer wins)."""
        self.connection.execute(
            _insert_for(self.connection)(_settings)
            .values(key=key, value=default)
            .on_conflict_do_nothing(index_elements=["key"])
        )
        value: str = self.connection.execute(
            select(_settings.c.value).where(_settings.c.key == key)
        ).scalar_one()
        return value

    def insert_experiment_if_absent(
        self, uid: str, name: str, namespace: str, spec: Mapping[str, Any]
    ) -> bool:
        """Create the experiment unless one with ``uid`` exists; True if created."""
        now = utcnow()
        stmt = (
            _insert_for(self.connection)(_experiments)
            .values(
                uid=uid,
                name=name,
                namespace=namespace,
                spec=dict(spec),
                spec_version=1,
                sampler_state=None,
                next_number=0,
                history_version=0,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing(index_elements=["uid"])
            .returning(_experiments.c.id)
        )
        # RETURNING, not rowcount: with RETURNING psycopg reports rowcount -1.
        return self.connection.execute(stmt).first() is not None

    def lock_experiment(self, uid: str) -> ExperimentRow | None:
        """The experiment, row-locked until the transaction ends."""
        if self._postgres:
            found = self._pg(_PG_LOCK_EXPERIMENT, (uid,)).fetchone()
            return None if found is None else ExperimentRow(*found)
        row = self._run(
            "lock_experiment",
            lambda: _locked(
                select(*_EXPERIMENT_COLUMNS).where(_experiments.c.uid == bindparam("uid")),
                self._postgres,
            ),
            {"uid": uid},
        ).first()
        return None if row is None else experiment_row(row)

    def experiment_id(self, uid: str) -> int | None:
        """The experiment's id, without locking it."""
        return self.connection.execute(
            select(_experiments.c.id).where(_experiments.c.uid == uid)
        ).scalar_one_or_none()

    def update_experiment(self, experiment_id: int, **values: Any) -> None:
        """Set columns of the experiment (and its ``updated_at``)."""
        values["updated_at"] = utcnow()
        keys = tuple(sorted(values))
        self._run(
            "update_experiment",
            lambda: (
                update(_experiments)
                .where(_experiments.c.id == bindparam("b_id"))
                .values({k: bindparam(f"b_{k}") for k in keys})
            ),
            {"b_id": experiment_id, **{f"b_{k}": v for k, v in values.items()}},
            keys,
        )

    def delete_experiment(self, uid: str) -> bool:
        """Delete the experiment with everything it owns; True if it existed."""
        return (
            self.connection.execute(delete(_experiments).where(_experiments.c.uid == uid)).rowcount
            > 0
        )

    def pending_trials(self, experiment_id: int, limit: int) -> list[TrialRow]:
        """The oldest ``limit`` trials handed out but never started."""
        rows = self._run(
            "pending_trials",
            lambda: (
                select(*_TRIAL_COLUMNS)
                .where(_trials.c.experiment_id == bindparam("eid"), _trials.c.state == "pending")
                .order_by(_trials.c.number)
            ),
            {"eid": experiment_id},
        )
        # Pending trials are few (at most what the caller can run): no LIMIT in SQL.
        return [trial_row(r) for r in rows][:limit]

    def history_since(self, experiment_id: int, version: int) -> list[TrialRow]:
        """Trials added or changed after history ``version`` (all for -1)."""
        rows = self._run(
            "history_since",
            lambda: (
                select(*_TRIAL_COLUMNS)
                .where(
                    _trials.c.experiment_id == bindparam("eid"),
                    _trials.c.history_version > bindparam("version"),
                )
                .order_by(_trials.c.number)
            ),
            {"eid": experiment_id, "version": version},
        )
        return [trial_row(r) for r in rows]

    def ask_trials(
        self, experiment_id: int, version: int, ask_id: str | None = None
    ) -> tuple[list[TrialRow], frozenset[int]]:
        """Trials changed after history ``version`` or still pending, by number, in one query.

        What ``ask`` needs: :meth:`history_since` and :meth:`pending_trials`
        together (the caller tells them apart by ``history_version`` and
        ``state``), and the numbers of the pending ones handed out under
        ``ask_id`` (none when it is None).
        """
        if self._postgres:
            found = [
                (_trial(r), bool(r[12]))
                for r in self._pg(_PG_ASK_TRIALS, (ask_id, experiment_id, version))
            ]
            return [t for t, _ in found], frozenset(t.number for t, mine in found if mine)
        mine = (_trials.c.state == "pending") & (_trials.c.ask_id == bindparam("ask_id"))
        rows = self._run(
            "ask_trials",
            lambda: (
                select(*_TRIAL_COLUMNS, func.coalesce(mine, False).label("mine"))
                .where(
                    _trials.c.experiment_id == bindparam("eid"),
                    or_(
                        _trials.c.history_version > bindparam("version"),
                        _trials.c.state == "pending",
                    ),
                )
                .order_by(_trials.c.number)
            ),
            {"eid": experiment_id, "version": version, "ask_id": ask_id},
        )
        found = [(trial_row(r), bool(r.mine)) for r in rows]
        return [t for t, _ in found], frozenset(t.number for t, m in found if m)

    def expire_leases(
        self, experiment_id: int, now: float, history_version: int
    ) -> tuple[list[ExpiredTrial], float | None]:
        """Fail the experiment's open trials whose lease ran out by ``now``.

        Each is failed with the reason as its message, its stop order (if
        any) closed, and the experiment moved to ``history_version`` (when
        one expired), as a finish would. The caller holds the experiment's
        row lock.

        Args:
            experiment_id: The experiment.
            now: The time, in seconds since the epoch.
            history_version: The experiment's next history version.

        Returns:
            The trials failed now, and the earliest expiry of the leases still
            running (None if no open trial has one).
        """
        rows = self._run(
            "leased_trials",
            lambda: select(
                _trials.c.id, _trials.c.number, _trials.c.lease_seconds, _trials.c.lease_expires_at
            ).where(
                _trials.c.experiment_id == bindparam("eid"),
                _trials.c.state.in_(OPEN_STATES),
                _trials.c.lease_expires_at.is_not(None),
            ),
            {"eid": experiment_id},
        ).all()
        expired = [r for r in rows if r.lease_expires_at <= now]
        live = [float(r.lease_expires_at) for r in rows if r.lease_expires_at > now]
        if expired:
            at = utcnow()
            self._run(
                "expire_lease",
                lambda: (
                    update(_trials)
                    .where(_trials.c.id == bindparam("b_id"))
                    .values(
                        state="failed",
                        message=bindparam("b_message"),
                        history_version=bindparam("b_version"),
                        started_at=func.coalesce(_trials.c.started_at, bindparam("b_now")),
                        finished_at=bindparam("b_now"),
                    )
                ),
                [
                    {
                        "b_id": r.id,
                        "b_message": lease_expired_message(r.lease_seconds),
                        "b_version": history_version,
                        "b_now": at,
                    }
                    for r in expired
                ],
            )
            self.connection.execute(
                delete(_stop_orders).where(_stop_orders.c.trial_id.in_([r.id for r in expired]))
            )
            self.update_experiment(experiment_id, history_version=history_version)
        return (
            [ExpiredTrial(int(r.number), int(r.lease_seconds)) for r in expired],
            min(live, default=None),
        )

    def allocate(
        self,
        experiment_id: int,
        trials: Sequence[NewTrial],
        history_version: int,
        next_number: int,
        sampler_state: Any,
        asked: AskedBy = ANONYMOUS,
    ) -> dict[str, Any] | None:
        """Insert freshly allocated ``pending`` trials and advance the experiment, at once.

        :meth:`insert_trials` plus :meth:`update_experiment` (next number,
        sampler state, history version); one statement on PostgreSQL.
        Returns the sampler state as stored, as a read would hand it back.
        """
        if not self._postgres:
            self.insert_trials(experiment_id, trials, history_version, asked)
            self.update_experiment(
                experiment_id,
                next_number=next_number,
                sampler_state=sampler_state,
                history_version=history_version,
            )
            # The JSON column stores json.dumps and reads back json.loads.
            stored: dict[str, Any] | None = json.loads(json.dumps(sampler_state))
            return stored
        from psycopg.types.json import Jsonb

        stored = self._pg(
            _PG_ALLOCATE,
            {
                "eid": experiment_id,
                "next": next_number,
                # As SQLAlchemy's JSONB column stores it: None is a JSON null.
                "state": Jsonb(sampler_state),
                "version": history_version,
                "now": utcnow(),
                "numbers": [t.number for t in trials],
                "params": [Jsonb(dict(t.params)) for t in trials],
                "ask_id": asked.ask_id,
                "lease": asked.lease_seconds,
                "expires": asked.expires_at,
            },
        ).fetchone()[0]
        return stored

    def count_states(self, experiment_id: int) -> dict[str, int]:
        """How many trials are in each state."""
        return count_states(self.connection, experiment_id)

    def insert_trials(
        self,
        experiment_id: int,
        trials: Sequence[NewTrial],
        history_version: int,
        asked: AskedBy = ANONYMOUS,
    ) -> None:
        """Insert freshly allocated trials as ``pending`` (asked by ``asked``)."""
        if not trials:
            return
        now = utcnow()
        self._run(
            "insert_trials",
            lambda: insert(_trials),
            [
                {
                    "experiment_id": experiment_id,
                    "number": t.number,
                    "params": dict(t.params),
                    "state": "pending",
                    "history_version": history_version,
                    "created_at": now,
                    "ask_id": asked.ask_id,
                    "lease_seconds": asked.lease_seconds,
                    "lease_expires_at": asked.expires_at,
                }
                for t in trials
            ],
        )

    def insert_restored(
        self, experiment_id: int, trials: Sequence[RestoredTrial], history_version: int
    ) -> None:
        """Insert trials as a restore gives them: started now, and finished now unless running.

        They carry no ask id and no lease (nobody asked for them here).
        """
        if not trials:
            return
        now = utcnow()
        self._run(
            "insert_restored",
            lambda: insert(_trials),
            [
                {
                    "experiment_id": experiment_id,
                    "number": t.number,
                    "params": dict(t.params),
                    "state": t.state,
                    "objective": t.objective,
                    "message": t.message,
                    "stop_reason": t.stop_reason,
                    "stop_step": t.stop_step,
                    "history_version": history_version,
                    "created_at": now,
                    "started_at": now,
                    "finished_at": None if t.state in OPEN_STATES else now,
                    "ask_id": None,
                    "lease_seconds": None,
                    "lease_expires_at": None,
                }
                for t in trials
            ],
        )

    def restart_trial(
        self, trial_id: int, handed_back: tuple[str, int] | None = None
    ) -> datetime | None:
        """Start an open trial over: a new attempt of it.

        Deletes its reports and its stop order, clears its stop (reason and
        step), and marks it running, started now (its lease, if any, renewed)
        or, with ``handed_back`` (an ask id and the history version to
        record), pending under that ask id: the next ask with it returns the
        trial. The row is rewritten, so the optimistic finish of
        :mod:`.oneshot` does not end it from what it read before. Returns the
        start time (None when pending).
        """
        now = utcnow()
        self.connection.execute(delete(_observations).where(_observations.c.trial_id == trial_id))
        self.close_stop_order(trial_id)
        values: dict[str, Any] = {
            "state": "running",
            "started_at": now,
            "stop_reason": None,
            "stop_step": None,
            "lease_expires_at": time.time() + _trials.c.lease_seconds,
        }
        if handed_back is not None:
            ask_id, version = handed_back
            values.update(state="pending", started_at=None, ask_id=ask_id, history_version=version)
        self.connection.execute(update(_trials).where(_trials.c.id == trial_id).values(values))
        return None if handed_back is not None else now

    def lock_trial(self, experiment_id: int, number: int) -> TrialRow | None:
        """The trial, row-locked until the transaction ends."""
        row = self._run(
            "lock_trial",
            lambda: _locked(
                select(*_TRIAL_COLUMNS).where(
                    _trials.c.experiment_id == bindparam("eid"),
                    _trials.c.number == bindparam("number"),
                ),
                self._postgres,
            ),
            {"eid": experiment_id, "number": number},
        ).first()
        return None if row is None else trial_row(row)

    def lock_trial_of(self, uid: str, number: int) -> tuple[int, int, TrialRow] | None:
        """(experiment id, spec version, trial) with the trial row-locked, in one round trip.

        None when the experiment or the trial does not exist.
        """
        row = self._run(
            "lock_trial_of",
            lambda: _trial_of_select(self._postgres, many=False),
            {"uid": uid, "number": number},
        ).first()
        if row is None:
            return None
        return int(row.experiment_id), int(row.spec_version), trial_row(row)

    def lock_trials_of(
        self, uid: str, numbers: Sequence[int]
    ) -> dict[int, tuple[int, int, TrialRow]]:
        """Like :meth:`lock_trial_of` for several trials of one experiment, in one round trip.

        Rows are locked in id order, so two transactions locking overlapping
        sets cannot deadlock on each other. Missing numbers are absent.
        """
        if self._postgres:
            return {
                int(r[3]): (int(r[0]), int(r[1]), _trial(r, 2))
                for r in self._pg(_PG_LOCK_TRIALS_OF, (uid, list(numbers)))
            }
        rows = self._run(
            "lock_trials_of",
            lambda: _trial_of_select(self._postgres, many=True),
            {"uid": uid, "numbers": list(numbers)},
        )
        return {
            int(row.number): (int(row.experiment_id), int(row.spec_version), trial_row(row))
            for row in rows
        }

    def lock_for_finish(self, uid: str, number: int) -> tuple[int, int, int, TrialRow] | None:
        """(experiment id, spec version, history version, trial), both rows locked.

        The experiment row first, then the trial's, as :meth:`lock_experiment`
        then :meth:`lock_trial` would, in one round trip on PostgreSQL. None
        when the experiment or the trial does not exist.
        """
        if self._postgres:
            row = self._pg(_PG_LOCK_FOR_FINISH, (uid, number)).fetchone()
            if row is None:
                return None
            return int(row[0]), int(row[1]), int(row[2]), _trial(row, 3)
        experiment = self.lock_experiment(uid)
        if experiment is None:
            return None
        trial = self.lock_trial(experiment.id, number)
        if trial is None:
            return None
        return experiment.id, experiment.spec_version, experiment.history_version, trial

    def finish_trial(
        self,
        experiment_id: int,
        trial_id: int,
        history_version: int,
        close_stop_order: bool,
        stop_step: int | None = None,
        **values: Any,
    ) -> None:
        """Record a trial's end, in one statement on PostgreSQL.

        Sets the trial's columns (``values``: state, objective, message,
        started_at, finished_at), its ``stop_step`` (None keeps the stored
        one) and history version, the experiment's history version, and removes
        the trial's stop order when ``close_stop_order``.
        """
        if not self._postgres:
            self.update_experiment(experiment_id, history_version=history_version)
            if stop_step is not None:
                values["stop_step"] = stop_step
            self.update_trial(trial_id, history_version=history_version, **values)
            if close_stop_order:
                self.close_stop_order(trial_id)
            return
        self._pg(
            _PG_FINISH,
            {
                "eid": experiment_id,
                "tid": trial_id,
                "version": history_version,
                "now": values["finished_at"],
                "close": close_stop_order,
                "state": values["state"],
                "objective": values["objective"],
                "message": values["message"],
                "started": values["started_at"],
                "stop_step": stop_step,
            },
        )

    def store_reports(
        self,
        rows: Sequence[tuple[int, int, Mapping[str, float], float | None]],
        reporting: Iterable[int],
    ) -> set[tuple[int, int]]:
        """Store reports and mark the ``reporting`` trial ids running, at once.

        :meth:`insert_observations` plus :meth:`mark_running_many` (which
        also renews their leases), in one statement on PostgreSQL, which
        rewrites every reported trial's row (the pending ones become
        running): the optimistic finish of :mod:`.oneshot` relies on a
        report leaving a new row version. Returns the (trial id, step)
        pairs stored now.
        """
        if not self._postgres or not rows:
            stored = self.insert_observations(rows)
            self.mark_running_many(reporting)
            return stored
        from psycopg.types.json import Jsonb

        result = self._pg(
            _PG_STORE_REPORTS,
            {
                "now": utcnow(),
                "trials": [t for t, _, _, _ in rows],
                "steps": [s for _, s, _, _ in rows],
                "metrics": [Jsonb(dict(m)) for _, _, m, _ in rows],
                "objectives": [o for _, _, _, o in rows],
                "epoch": time.time(),
            },
        )
        return {(int(t), int(s)) for t, s in result}

    def experiment_spec(self, experiment_id: int) -> tuple[int, dict[str, Any]]:
        """(spec version, spec) of the experiment."""
        row = self.connection.execute(
            select(_experiments.c.spec_version, _experiments.c.spec).where(
                _experiments.c.id == experiment_id
            )
        ).one()
        return int(row.spec_version), row.spec

    def update_trial(self, trial_id: int, **values: Any) -> None:
        """Set columns of the trial."""
        keys = tuple(sorted(values))
        self._run(
            "update_trial",
            lambda: (
                update(_trials)
                .where(_trials.c.id == bindparam("b_id"))
                .values({k: bindparam(f"b_{k}") for k in keys})
            ),
            {"b_id": trial_id, **{f"b_{k}": v for k, v in values.items()}},
            keys,
        )

    def mark_running(self, trial_id: int) -> None:
        """Move a pending trial to running and renew its lease (no-op once finished)."""
        self.mark_running_many([trial_id])

    def insert_observations(
        self, rows: Sequence[tuple[int, int, Mapping[str, float], float | None]]
    ) -> set[tuple[int, int]]:
        """Store reports (trial id, step, metrics, objective) in one statement.

        A (trial, step) already stored is skipped. Returns the (trial id, step)
        pairs stored now. The service stores reports with
        :meth:`store_reports`, which also rewrites the trials' rows (what the
        optimistic finish on PostgreSQL relies on).
        """
        if not rows:
            return set()
        now = utcnow()
        result = self._run(
            "insert_observations",
            lambda: (
                _insert_for(self.connection)(_observations)
                .on_conflict_do_nothing(index_elements=["trial_id", "step"])
                .returning(_observations.c.trial_id, _observations.c.step)
            ),
            [
                {"trial_id": t, "step": s, "metrics": dict(m), "objective": o, "created_at": now}
                for t, s, m, o in rows
            ],
        )
        return {(int(r.trial_id), int(r.step)) for r in result}

    def mark_running_many(self, trial_ids: Iterable[int]) -> None:
        """Move pending trials to running and renew their leases (no-op once finished).

        A running trial keeps its start time; its lease is renewed too (a
        start or a report is a sign of life).
        """
        ids = sorted(set(trial_ids))
        if ids:
            self._run(
                "mark_running",
                lambda: (
                    update(_trials)
                    .where(
                        _trials.c.id.in_(bindparam("ids", expanding=True)),
                        _trials.c.state.in_(OPEN_STATES),
                    )
                    .values(
                        state="running",
                        started_at=func.coalesce(_trials.c.started_at, bindparam("now")),
                        lease_expires_at=bindparam("epoch") + _trials.c.lease_seconds,
                    )
                ),
                {"ids": ids, "now": utcnow(), "epoch": time.time()},
            )

    def observed_steps(self, trial_id: int) -> list[tuple[int, float | None]]:
        """The trial's reported steps with their objective value (None if not reported), by step."""
        if self._postgres:
            return [
                (int(step), None if value is None else float(value))
                for step, value in self._pg(_PG_OBSERVED_STEPS, (trial_id,))
            ]
        rows = self._run(
            "observed_steps",
            lambda: (
                select(_observations.c.step, _observations.c.objective)
                .where(_observations.c.trial_id == bindparam("tid"))
                .order_by(_observations.c.step)
            ),
            {"tid": trial_id},
        )
        return [(int(r.step), None if r.objective is None else float(r.objective)) for r in rows]

    def step_history(self, experiment_id: int, max_step: int) -> list[StepRow]:
        """Every trial's objective values at steps up to ``max_step``, in one query.

        Early-stopping rules decide "now": no rule needs another trial's values
        beyond the step being decided, and the bound keeps the load small for
        early rungs.
        """
        rows = self._run(
            "step_history",
            lambda: (
                select(
                    _trials.c.number,
                    _trials.c.state,
                    _trials.c.objective,
                    _observations.c.step,
                    _observations.c.objective.label("value"),
                    _trials.c.stop_step,
                )
                .join(_observations, _observations.c.trial_id == _trials.c.id)
                .where(
                    _trials.c.experiment_id == bindparam("eid"),
                    _observations.c.objective.is_not(None),
                    _observations.c.step <= bindparam("max_step"),
                )
            ),
            {"eid": experiment_id, "max_step": max_step},
        )
        return [
            StepRow(r.number, r.state, r.objective, int(r.step), float(r.value), r.stop_step)
            for r in rows
        ]

    def add_stop_order(self, trial_id: int, reason: str, step: int) -> bool:
        """Order the trial to stop, decided on its report at ``step`` (idempotent); True if now."""
        stmt = (
            _insert_for(self.connection)(_stop_orders)
            .values(trial_id=trial_id, reason=reason, created_at=utcnow())
            .on_conflict_do_nothing(index_elements=["trial_id"])
            .returning(_stop_orders.c.trial_id)
        )
        added = self.connection.execute(stmt).first() is not None
        if added:
            self.update_trial(trial_id, stop_reason=reason, stop_step=step)
        return added

    def close_stop_order(self, trial_id: int) -> None:
        """Remove the trial's stop order (it has finished; its reason stays on the trial)."""
        self.connection.execute(delete(_stop_orders).where(_stop_orders.c.trial_id == trial_id))
