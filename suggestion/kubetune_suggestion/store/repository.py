"""All database I/O of the suggestion service, as small typed operations.

:class:`Store` answers read-only questions in short transactions;
:meth:`Store.write` opens one write transaction (a
:class:`~kubetune_suggestion.store.writes.WriteTxn`) in which the service's
application layer (:mod:`kubetune_suggestion.service.core`) reads, decides with
the pure engine, and writes, atomically. No domain rules live here: which
trials to hand out, what the objective is, whether to stop, are decided by
the caller.

Statements are SQLAlchemy Core over the model tables, the same on SQLite and
PostgreSQL, through the engine's one connection pool.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, func, insert, select, text, update
from sqlalchemy.engine import Connection

from kubetune_suggestion.store.db import make_engine, writer
from kubetune_suggestion.store.migrate import upgrade
from kubetune_suggestion.store.rows import EXPERIMENT_COLUMNS as _EXPERIMENT_COLUMNS
from kubetune_suggestion.store.rows import EXPERIMENTS as _experiments
from kubetune_suggestion.store.rows import OBSERVATIONS as _observations
from kubetune_suggestion.store.rows import (
    OPEN_STATES,
    ExperimentRow,
    StopRow,
    TrialRow,
    count_states,
    experiment_row,
    trial_row,
    utcnow,
)
from kubetune_suggestion.store.rows import STOP_ORDERS as _stop_orders
from kubetune_suggestion.store.rows import TRIAL_COLUMNS as _TRIAL_COLUMNS
from kubetune_suggestion.store.rows import TRIALS as _trials
from kubetune_suggestion.store.writes import WriteTxn


class Store:
    """The observation store over one database.

    Args:
        engine: From :func:`~kubetune_suggestion.store.db.make_engine`.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._writer = writer(engine)

    @classmethod
    def open(cls, url: str, *, migrate: bool = True, pool_size: int = 10) -> Store:
        """Connect to ``url`` and (by default) bring its schema up to date."""
        engine = make_engine(url, pool_size=pool_size)
        if migrate:
            upgrade(engine)
        return cls(engine)

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    @contextmanager
    def write(self) -> Iterator[WriteTxn]:
        """One write transaction: committed on success, rolled back on any exception."""
        with self._writer.begin() as connection:
            yield WriteTxn(connection)

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """One read-only transaction (a consistent snapshot on SQLite)."""
        with self.engine.connect() as connection:
            yield connection

    def ping(self) -> None:
        """Raise unless the database answers."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def secret(self, candidate: str) -> str:
        """The shared token secret: stored once, so every replica on the database agrees.

        Args:
            candidate: Stored if no secret exists yet (the first replica wins a race).
        """
        with self.write() as tx:
            value = tx.setting("trial_token_secret", candidate)
        return value

    def experiment(self, uid: str) -> ExperimentRow | None:
        """The experiment, or None."""
        with self.engine.connect() as connection:
            row = connection.execute(
                select(*_EXPERIMENT_COLUMNS).where(_experiments.c.uid == uid)
            ).first()
        return None if row is None else experiment_row(row)

    def trial(self, experiment_id: int, number: int) -> TrialRow | None:
        """One trial, or None."""
        with self.engine.connect() as connection:
            row = connection.execute(
                select(*_TRIAL_COLUMNS).where(
                    _trials.c.experiment_id == experiment_id, _trials.c.number == number
                )
            ).first()
        return None if row is None else trial_row(row)

    def trials(self, experiment_id: int) -> list[tuple[TrialRow, int | None]]:
        """Every trial by number, each with its last reported step."""
        last_step = (
            select(_observations.c.trial_id, func.max(_observations.c.step).label("last_step"))
            .group_by(_observations.c.trial_id)
            .subquery()
        )
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(*_TRIAL_COLUMNS, last_step.c.last_step)
                .outerjoin(last_step, last_step.c.trial_id == _trials.c.id)
                .where(_trials.c.experiment_id == experiment_id)
                .order_by(_trials.c.number)
            )
            return [(trial_row(r), None if r.last_step is None else int(r.last_step)) for r in rows]

    def last_step(self, trial_id: int) -> int | None:
        """The trial's last reported step."""
        with self.engine.connect() as connection:
            value = connection.execute(
                select(func.max(_observations.c.step)).where(_observations.c.trial_id == trial_id)
            ).scalar_one_or_none()
        return None if value is None else int(value)

    def observations(self, experiment_id: int) -> dict[int, list[tuple[int, dict[str, float]]]]:
        """Every report of the experiment's trials, by trial number, by step."""
        out: dict[int, list[tuple[int, dict[str, float]]]] = {}
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(_trials.c.number, _observations.c.step, _observations.c.metrics)
                .join(_observations, _observations.c.trial_id == _trials.c.id)
                .where(_trials.c.experiment_id == experiment_id)
                .order_by(_trials.c.number, _observations.c.step)
            )
            for r in rows:
                out.setdefault(r.number, []).append((int(r.step), r.metrics))
        return out

    def count_states(self, experiment_id: int) -> dict[str, int]:
        """How many trials are in each state."""
        with self.engine.connect() as connection:
            return count_states(connection, experiment_id)

    def best_trial(self, experiment_id: int, maximize: bool) -> TrialRow | None:
        """The succeeded trial with the best objective (lowest number on ties)."""
        order = _trials.c.objective.desc() if maximize else _trials.c.objective.asc()
        with self.engine.connect() as connection:
            row = connection.execute(
                select(*_TRIAL_COLUMNS)
                .where(
                    _trials.c.experiment_id == experiment_id,
                    _trials.c.state == "succeeded",
                    _trials.c.objective.is_not(None),
                )
                .order_by(order, _trials.c.number)
                .limit(1)
            ).first()
        return None if row is None else trial_row(row)

    def open_stops(self, experiment_uid: str | None = None) -> list[StopRow]:
        """Stop orders of trials that have not finished yet, oldest first."""
        stmt = (
            select(_experiments.c.uid, _trials.c.number, _stop_orders.c.reason)
            .select_from(_stop_orders)
            .join(_trials, _trials.c.id == _stop_orders.c.trial_id)
            .join(_experiments, _experiments.c.id == _trials.c.experiment_id)
            .where(_trials.c.state.in_(OPEN_STATES))
            .order_by(_stop_orders.c.created_at, _trials.c.number)
        )
        if experiment_uid is not None:
            stmt = stmt.where(_experiments.c.uid == experiment_uid)
        with self.engine.connect() as connection:
            return [StopRow(r.uid, r.number, r.reason) for r in connection.execute(stmt)]

    def bulk_insert_finished(
        self, experiment_id: int, trials: Iterable[tuple[int, Mapping[str, Any], float]]
    ) -> None:
        """Insert succeeded trials directly (benchmarks and tests prefill history with this)."""
        now = utcnow()
        with self.write() as tx:
            version = tx.connection.execute(
                update(_experiments)
                .where(_experiments.c.id == experiment_id)
                .values(history_version=_experiments.c.history_version + 1)
                .returning(_experiments.c.history_version)
            ).scalar_one()
            rows = [
                {
                    "experiment_id": experiment_id,
                    "number": number,
                    "params": dict(params),
                    "state": "succeeded",
                    "objective": value,
                    "history_version": version,
                    "created_at": now,
                    "started_at": now,
                    "finished_at": now,
                }
                for number, params, value in trials
            ]
            if rows:
                tx.connection.execute(insert(_trials), rows)
            count = select(func.count()).where(_trials.c.experiment_id == experiment_id)
            tx.connection.execute(
                update(_experiments)
                .where(_experiments.c.id == experiment_id)
                .values(next_number=count.scalar_subquery())
            )
