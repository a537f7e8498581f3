"""The write transaction: every statement that changes the store.

:meth:`~kubetune_suggestion.store.repository.Store.write` opens one; the
service's application layer reads, decides with the pure engine and writes
inside it, atomically. Every statement is SQLAlchemy Core, the same on SQLite
and PostgreSQL.

Concurrency: :meth:`WriteTxn.lock_experiment` takes the experiment's row lock
(``SELECT ... FOR UPDATE`` on PostgreSQL; on SQLite every write transaction
already holds the database's write lock), so two replicas never allocate the
same trial number; the unique constraint on (experiment, number) backs that up.
Trial rows are locked the same way by reports and by ``finish``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, delete, func, insert, or_, select, update
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

# Statements are built once, with bind parameters, and reused: building a
# statement and its cache key costs about three times what executing a
# prebuilt one does. Keyed by (name, dialect, extra).
_STATEMENTS: dict[tuple[Any, ...], Any] = {}


def _insert_for(connection: Connection) -> Any:
    """The dialect's INSERT construct (both support ON CONFLICT DO NOTHING)."""
    return postgresql.insert if is_postgres(connection) else sqlite.insert


def _trial_of_select(many: bool) -> Any:
    """Trials of the experiment ``uid`` by number, with its id and spec version, row-locked."""
    number = (
        _trials.c.number.in_(bindparam("numbers", expanding=True))
        if many
        else _trials.c.number == bindparam("number")
    )
    return (
        select(
            _experiments.c.id.label("experiment_id"), _experiments.c.spec_version, *_TRIAL_COLUMNS
        )
        .join(_trials, _trials.c.experiment_id == _experiments.c.id)
        .where(_experiments.c.uid == bindparam("uid"), number)
        .order_by(_trials.c.id)
        # SQLite has no row locks (its write transactions hold the database
        # lock) and leaves FOR UPDATE out.
        .with_for_update(of=_trials)
    )


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _lease(trial: TrialRow) -> int:
    # Only a trial with a lease can expire.
    assert trial.lease_seconds is not None
    return trial.lease_seconds


def lease_expired_message(lease_seconds: int) -> str:
    """The message of a trial failed because its lease ran out."""
    return (
        f"lease expired: no start, report or finish within {lease_seconds} s; failed as abandoned"
    )


@dataclass(frozen=True)
class AskTrials:
    """What an ask reads of its experiment's trials (see :meth:`WriteTxn.ask_trials`).

    Attributes:
        changed: Trials added or changed after the history version given, by number.
        pending: Trials handed out and never started, by number.
        mine: Numbers of the pending trials handed out under the ask id given.
        expired: Open trials whose lease ran out.
    """

    changed: list[TrialRow]
    pending: list[TrialRow]
    mine: frozenset[int]
    expired: list[TrialRow]


@dataclass(frozen=True)
class LockedForFinish:
    """What a finish reads, in one round trip, with the rows it changes locked."""

    experiment_id: int
    spec_version: int
    # The experiment's history version.
    history_version: int
    trial: TrialRow
    # The trial's reported steps with their objective value (None if not reported), by step.
    reported: list[tuple[int, float | None]]


class WriteTxn:
    """One write transaction; every method runs inside it."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._dialect = connection.dialect.name

    def _run(
        self, name: str, build: Callable[[], Any], params: Any = None, extra: Any = None
    ) -> Any:
        key = (name, self._dialect, extra)
        stmt = _STATEMENTS.get(key)
        if stmt is None:
            stmt = _STATEMENTS[key] = build()
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

    # -- experiments -------------------------------------------------------------

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
        row = self._run(
            "lock_experiment",
            lambda: (
                select(*_EXPERIMENT_COLUMNS)
                .where(_experiments.c.uid == bindparam("uid"))
                .with_for_update()
            ),
            {"uid": uid},
        ).first()
        return None if row is None else experiment_row(row)

    def experiment_id(self, uid: str) -> int | None:
        """The experiment's id, without locking it."""
        return self.connection.execute(
            select(_experiments.c.id).where(_experiments.c.uid == uid)
        ).scalar_one_or_none()

    def experiment_spec(self, experiment_id: int) -> tuple[int, dict[str, Any]]:
        """(spec version, spec) of the experiment."""
        row = self.connection.execute(
            select(_experiments.c.spec_version, _experiments.c.spec).where(
                _experiments.c.id == experiment_id
            )
        ).one()
        return int(row.spec_version), row.spec

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

    def count_states(self, experiment_id: int) -> dict[str, int]:
        """How many trials are in each state."""
        return count_states(self.connection, experiment_id)

    # -- asking ------------------------------------------------------------------

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
        self, experiment_id: int, version: int, ask_id: str | None, now: float
    ) -> AskTrials:
        """What an ask reads of the trials, in one query.

        The trials changed after history ``version``, the pending ones (and
        which of them ``ask_id`` handed out), and the open ones whose lease
        ran out by ``now`` (seconds since the epoch).
        """
        mine = (_trials.c.state == "pending") & (_trials.c.ask_id == bindparam("ask_id"))
        open_ = _trials.c.state.in_(OPEN_STATES)
        expired = and_(open_, _trials.c.lease_expires_at <= bindparam("now"))
        rows = self._run(
            "ask_trials",
            lambda: (
                select(
                    *_TRIAL_COLUMNS,
                    func.coalesce(mine, False).label("mine"),
                    func.coalesce(expired, False).label("expired"),
                )
                .where(
                    _trials.c.experiment_id == bindparam("eid"),
                    or_(
                        _trials.c.history_version > bindparam("version"),
                        _trials.c.state == "pending",
                        expired,
                    ),
                )
                .order_by(_trials.c.number)
            ),
            {"eid": experiment_id, "version": version, "ask_id": ask_id, "now": now},
        ).all()
        trials = [(trial_row(r), r) for r in rows]
        return AskTrials(
            changed=[t for t, _ in trials if t.history_version > version],
            pending=[t for t, r in trials if t.state == "pending" and not r.expired],
            mine=frozenset(t.number for t, r in trials if r.mine and not r.expired),
            expired=[t for t, r in trials if r.expired],
        )

    def expire(
        self, experiment_id: int, expired: Sequence[TrialRow], history_version: int
    ) -> list[ExpiredTrial]:
        """Fail trials whose lease ran out, as a finish would.

        Each gets the reason as its message, its stop order (if any) closed,
        and the experiment moves to ``history_version``. The caller holds the
        experiment's row lock.
        """
        if not expired:
            return []
        now = utcnow()
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
                    "b_id": trial.id,
                    "b_message": lease_expired_message(_lease(trial)),
                    "b_version": history_version,
                    "b_now": now,
                }
                for trial in expired
            ],
        )
        self.connection.execute(
            delete(_stop_orders).where(_stop_orders.c.trial_id.in_([t.id for t in expired]))
        )
        self.update_experiment(experiment_id, history_version=history_version)
        return [ExpiredTrial(trial.number, _lease(trial)) for trial in expired]

    def allocate(
        self,
        experiment_id: int,
        trials: Sequence[NewTrial],
        history_version: int,
        next_number: int,
        sampler_state: Any,
        asked: AskedBy = ANONYMOUS,
    ) -> None:
        """Insert freshly allocated ``pending`` trials and advance the experiment.

        The experiment gets its next number, the sampler's state and the
        history version the new trials carry.
        """
        now = utcnow()
        if trials:
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
        self.update_experiment(
            experiment_id,
            next_number=next_number,
            sampler_state=sampler_state,
            history_version=history_version,
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

    # -- trials ------------------------------------------------------------------

    def lock_trial_of(self, uid: str, number: int) -> tuple[int, int, TrialRow] | None:
        """(experiment id, spec version, trial) with the trial row-locked, in one round trip.

        None when the experiment or the trial does not exist.
        """
        row = self._run(
            "lock_trial_of", lambda: _trial_of_select(many=False), {"uid": uid, "number": number}
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
        rows = self._run(
            "lock_trials_of",
            lambda: _trial_of_select(many=True),
            {"uid": uid, "numbers": list(numbers)},
        )
        return {
            int(row.number): (int(row.experiment_id), int(row.spec_version), trial_row(row))
            for row in rows
        }

    def lock_for_finish(self, uid: str, number: int) -> LockedForFinish | None:
        """The trial to finish with its experiment, both rows locked, and its reports.

        One round trip. The experiment's row is locked because a finish moves
        its history version, as every allocation does. None when the
        experiment or the trial does not exist.
        """
        rows = self._run(
            "lock_for_finish",
            lambda: (
                select(
                    _experiments.c.id.label("experiment_id"),
                    _experiments.c.spec_version,
                    _experiments.c.history_version.label("experiment_version"),
                    *_TRIAL_COLUMNS,
                    _observations.c.step.label("observed_step"),
                    _observations.c.objective.label("observed_objective"),
                )
                .join(_trials, _trials.c.experiment_id == _experiments.c.id)
                .outerjoin(_observations, _observations.c.trial_id == _trials.c.id)
                .where(
                    _experiments.c.uid == bindparam("uid"), _trials.c.number == bindparam("number")
                )
                .order_by(_observations.c.step)
                .with_for_update(of=[_experiments, _trials])
            ),
            {"uid": uid, "number": number},
        ).all()
        if not rows:
            return None
        first = rows[0]
        return LockedForFinish(
            experiment_id=int(first.experiment_id),
            spec_version=int(first.spec_version),
            history_version=int(first.experiment_version),
            trial=trial_row(first),
            reported=[
                (
                    int(r.observed_step),
                    None if r.observed_objective is None else float(r.observed_objective),
                )
                for r in rows
                if r.observed_step is not None
            ],
        )

    def restart_trial(self, trial_id: int, handed_back_to: str | None = None) -> datetime | None:
        """Start an open trial over: a new attempt of it.

        Deletes its reports and its stop order, clears its stop (reason and
        step), and marks it running, started now (its lease, if any, renewed)
        or, with ``handed_back_to`` (an ask id), pending under that ask id:
        the next ask with it returns the trial. Returns the start time (None
        when pending).
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
        if handed_back_to is not None:
            values.update(state="pending", started_at=None, ask_id=handed_back_to)
        self.connection.execute(update(_trials).where(_trials.c.id == trial_id).values(values))
        return None if handed_back_to is not None else now

    def mark_running(self, trial_ids: Iterable[int]) -> None:
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

    def finish_trial(
        self,
        experiment_id: int,
        trial_id: int,
        history_version: int,
        close_stop_order: bool,
        stop_step: int | None = None,
        **values: Any,
    ) -> None:
        """Record a trial's end.

        Sets the trial's columns (``values``: state, objective, message,
        started_at, finished_at), its ``stop_step`` (None keeps the stored
        one) and history version, the experiment's history version, and removes
        the trial's stop order when ``close_stop_order``.
        """
        self.update_experiment(experiment_id, history_version=history_version)
        if stop_step is not None:
            values["stop_step"] = stop_step
        self.update_trial(trial_id, history_version=history_version, **values)
        if close_stop_order:
            self.close_stop_order(trial_id)

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

    # -- reports -----------------------------------------------------------------

    def store_reports(
        self, rows: Sequence[tuple[int, int, Mapping[str, float], float | None]]
    ) -> set[tuple[int, int]]:
        """Store reports (trial id, step, metrics, objective) in one statement.

        A (trial, step) already stored is skipped. Returns the (trial id, step)
        pairs stored now.
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

    # -- stops -------------------------------------------------------------------

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
