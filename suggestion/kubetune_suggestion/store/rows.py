"""Table handles, the row types the store hands out, and queries both sides share."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, func, select
from sqlalchemy.engine import Connection

from kubetune_suggestion.store import models

EXPERIMENTS = cast(Table, models.Experiment.__table__)
TRIALS = cast(Table, models.Trial.__table__)
OBSERVATIONS = cast(Table, models.Observation.__table__)
STOP_ORDERS = cast(Table, models.StopOrder.__table__)
SETTINGS = cast(Table, models.Setting.__table__)

# Trial states with no end yet (the stop long-poll only lists these).
OPEN_STATES = ("pending", "running")


def utcnow() -> datetime:
    """The current time, timezone-aware."""
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything we store is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


@dataclass(frozen=True)
class ExperimentRow:
    """An experiment as stored."""

    id: int
    uid: str
    name: str
    namespace: str
    # The ExperimentSpec as JSON.
    spec: dict[str, Any]
    spec_version: int
    # The sampler's state after its last call.
    sampler_state: dict[str, Any] | None
    # The number the next allocated trial gets (= trials allocated so far).
    next_number: int
    history_version: int
    created_at: datetime | None


@dataclass(frozen=True)
class TrialRow:
    """A trial as stored."""

    id: int
    number: int
    params: dict[str, Any]
    state: str
    objective: float | None
    message: str | None
    stop_reason: str | None
    history_version: int
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    # See ``models.Trial.stop_step``.
    stop_step: int | None = None
    # The lease an ask gave it, renewed by each start and report (None: none).
    lease_seconds: int | None = None


@dataclass(frozen=True)
class NewTrial:
    """A trial to insert."""

    number: int
    params: Mapping[str, Any]


@dataclass(frozen=True)
class RestoredTrial:
    """A trial to insert as a restore gives it (a lost database re-seeded, see ``restore``)."""

    number: int
    params: Mapping[str, Any]
    # running or a final state.
    state: str
    objective: float | None
    message: str | None
    stop_reason: str | None
    stop_step: int | None


@dataclass(frozen=True)
class AskedBy:
    """Who asked for new trials, and the lease they get (see ``models.Trial``)."""

    # The ask's idempotency key (None: no later ask gets these trials back).
    ask_id: str | None = None
    # The lease in seconds (None: no lease, the trials never expire).
    lease_seconds: int | None = None
    # When it runs out, in seconds since the epoch (None without a lease).
    expires_at: float | None = None


# New trials with no ask id and no lease.
ANONYMOUS = AskedBy()


@dataclass(frozen=True)
class ExpiredTrial:
    """A trial whose lease ran out, failed by the lease sweep."""

    number: int
    lease_seconds: int


@dataclass(frozen=True)
class StopRow:
    """An open stop order."""

    experiment_uid: str
    number: int
    reason: str


@dataclass(frozen=True)
class StepRow:
    """One intermediate objective value of a trial (for early-stopping rules)."""

    number: int
    state: str
    objective: float | None
    step: int
    value: float
    # The trial's ``stop_step``: its values after it do not count (unless it succeeded).
    stop_step: int | None = None


EXPERIMENT_COLUMNS = (
    EXPERIMENTS.c.id,
    EXPERIMENTS.c.uid,
    EXPERIMENTS.c.name,
    EXPERIMENTS.c.namespace,
    EXPERIMENTS.c.spec,
    EXPERIMENTS.c.spec_version,
    EXPERIMENTS.c.sampler_state,
    EXPERIMENTS.c.next_number,
    EXPERIMENTS.c.history_version,
    EXPERIMENTS.c.created_at,
)
TRIAL_COLUMNS = (
    TRIALS.c.id,
    TRIALS.c.number,
    TRIALS.c.params,
    TRIALS.c.state,
    TRIALS.c.objective,
    TRIALS.c.message,
    TRIALS.c.stop_reason,
    TRIALS.c.history_version,
    TRIALS.c.created_at,
    TRIALS.c.started_at,
    TRIALS.c.finished_at,
    TRIALS.c.stop_step,
    TRIALS.c.lease_seconds,
)


def experiment_row(row: Any) -> ExperimentRow:
    """An :class:`ExperimentRow` from a result row of :data:`EXPERIMENT_COLUMNS`."""
    return ExperimentRow(
        id=row.id,
        uid=row.uid,
        name=row.name,
        namespace=row.namespace,
        spec=row.spec,
        spec_version=row.spec_version,
        sampler_state=row.sampler_state,
        next_number=row.next_number,
        history_version=row.history_version,
        created_at=_aware(row.created_at),
    )


def trial_row(row: Any) -> TrialRow:
    """A :class:`TrialRow` from a result row holding :data:`TRIAL_COLUMNS`."""
    return TrialRow(
        id=row.id,
        number=row.number,
        params=row.params,
        state=row.state,
        objective=row.objective,
        message=row.message,
        stop_reason=row.stop_reason,
        history_version=row.history_version,
        created_at=_aware(row.created_at),
        started_at=_aware(row.started_at),
        finished_at=_aware(row.finished_at),
        stop_step=row.stop_step,
        lease_seconds=row.lease_seconds,
    )


def count_states(connection: Connection, experiment_id: int) -> dict[str, int]:
    """How many trials of the experiment are in each state."""
    rows = connection.execute(
        select(TRIALS.c.state, func.count())
        .where(TRIALS.c.experiment_id == experiment_id)
        .group_by(TRIALS.c.state)
    )
    return {state: int(n) for state, n in rows}
