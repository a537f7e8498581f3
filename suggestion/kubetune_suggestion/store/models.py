"""The observation store's tables, as SQLAlchemy 2 declarative models.

The schema is owned by the Alembic migrations in ``migrations/``; these models
must match them (a test compares ``alembic upgrade head`` with
``Base.metadata``).

Design notes:

* Experiments are keyed by the Kubernetes object's UID, but trials point at a
  surrogate integer id (``experiments.id``, never reused: SQLite AUTOINCREMENT,
  PostgreSQL identity), so process-local caches keyed by it can never confuse a
  deleted experiment with a re-created one of the same UID.
* ``history_version`` is a per-experiment counter bumped whenever a trial is
  added or changes what samplers see (state, objective). Each trial records
  the version of its last such change, so a sampler's history can be refreshed
  incrementally (``WHERE history_version > cached``) instead of reloaded.
* Trial tokens are not stored: they are an HMAC of the trial identity.
* A trial's lease (``lease_seconds``, ``lease_expires_at``) and the ``ask_id``
  it was asked under are columns of ``trials`` read only by ``ask`` and its
  lease sweep, so :class:`~kubetune_suggestion.store.rows.TrialRow` (what
  every other path reads) does not carry them.
* Each observation keeps the objective metric's value in its own column so
  history loads and final-objective computation never parse metrics JSON.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# JSONB on PostgreSQL (smaller, no re-parse on read), JSON text elsewhere.
JsonColumn = JSON().with_variant(postgresql.JSONB(), "postgresql")
# SQLite only auto-increments INTEGER PRIMARY KEY columns.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    """The declarative base of every store table."""


class Setting(Base):
    """Service-wide settings shared by every replica on one database (e.g. the token secret)."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Experiment(Base):
    """One registered Experiment."""

    __tablename__ = "experiments"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # The Kubernetes object's metadata.uid (or any unique key for `kubetune run`).
    uid: Mapped[str] = mapped_column(String(128), unique=True)
    name: Mapped[str] = mapped_column(String(253))
    namespace: Mapped[str] = mapped_column(String(253))
    # The ExperimentSpec as JSON (camelCase field names, as users write them).
    spec: Mapped[dict[str, Any]] = mapped_column(JsonColumn)
    # Bumped whenever ``spec`` changes; keys caches of the parsed spec.
    spec_version: Mapped[int] = mapped_column(Integer, default=1)
    # The sampler's JSON state after its last call (None before the first).
    sampler_state: Mapped[dict[str, Any] | None] = mapped_column(JsonColumn, nullable=True)
    # The number the next allocated trial gets; trial numbers are dense from 0.
    next_number: Mapped[int] = mapped_column(Integer, default=0)
    # See the module docstring.
    history_version: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Trial(Base):
    """One configuration handed out by ``ask``."""

    __tablename__ = "trials"
    __table_args__ = (
        UniqueConstraint("experiment_id", "number", name="uq_trials_experiment_number"),
        Index("ix_trials_experiment_history", "experiment_id", "history_version"),
        Index("ix_trials_experiment_state", "experiment_id", "state"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    params: Mapped[dict[str, Any]] = mapped_column(JsonColumn)
    # pending | running | succeeded | failed | pruned | metrics_unavailable
    state: Mapped[str] = mapped_column(String(32))
    # The trial's result (objective strategy applied) once finished; None without one.
    objective: Mapped[float | None] = mapped_column(Float, nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Why the early-stopping rule stopped it (kept after its stop order is gone).
    stop_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The experiment's history_version at this trial's last sampler-visible change.
    history_version: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The ``ask_id`` of the ask that handed it out: a repeated ask with that id
    # gets the trial back while it is pending. None: nobody gets it back.
    ask_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # The lease the ask gave, in seconds (None: none, the trial never expires).
    lease_seconds: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # When the lease runs out, in seconds since the epoch: a number, not a
    # timestamp, so a renewal is ``now + lease_seconds`` in SQL on SQLite and
    # PostgreSQL alike (and NULL stays NULL without a lease).
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The step whose report the stop was decided on (kept like stop_reason);
    # for a trial finished pruned without a decision, its last step with the
    # objective. Stops are asynchronous: later reports are stored but do not
    # count (see service/CONTRACT.md).
    stop_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class Observation(Base):
    """One intermediate report of a trial: a step and its metrics."""

    __tablename__ = "observations"
    __table_args__ = (
        UniqueConstraint("trial_id", "step", name="uq_observations_trial_step"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("trials.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, float]] = mapped_column(JsonColumn)
    # metrics[spec.objective.metric], when the report carried it.
    objective: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class StopOrder(Base):
    """An open decision that a running trial should stop (the operator deletes its Pod).

    Deleted when the trial finishes, so the table only ever holds open orders
    and the operator's long-poll over it stays cheap however many trials ran.
    """

    __tablename__ = "stop_orders"

    trial_id: Mapped[int] = mapped_column(
        ForeignKey("trials.id", ondelete="CASCADE"), primary_key=True
    )
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
