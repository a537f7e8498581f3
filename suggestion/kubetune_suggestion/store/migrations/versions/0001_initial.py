"""Initial schema: settings, experiments, trials, observations, stop orders.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the model types: a migration must not change when models do.
_json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_ts = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create every table."""
    op.create_table(
        "settings",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
    )
    op.create_table(
        "experiments",
        sa.Column("id", _id, primary_key=True, autoincrement=True),
        sa.Column("uid", sa.String(128), nullable=False),
        sa.Column("name", sa.String(253), nullable=False),
        sa.Column("namespace", sa.String(253), nullable=False),
        sa.Column("spec", _json, nullable=False),
        sa.Column("spec_version", sa.Integer(), nullable=False),
        sa.Column("sampler_state", _json, nullable=True),
        sa.Column("next_number", sa.Integer(), nullable=False),
        sa.Column("history_version", sa.BigInteger(), nullable=False),
        sa.Column("created_at", _ts, server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", _ts, server_default=sa.func.now(), nullable=False),
        sa.UniqueConstraint("uid", name="uq_experiments_uid"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "trials",
        sa.Column("id", _id, primary_key=True, autoincrement=True),
        sa.Column(
            "experiment_id",
            _id,
            sa.ForeignKey("experiments.id", ondelete="CASCADE", name="fk_trials_experiment"),
            nullable=False,
        ),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("params", _json, nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("objective", sa.Float(), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("stop_reason", sa.Text(), nullable=True),
        sa.Column("history_version", sa.BigInteger(), nullable=False),
        sa.Column("created_at", _ts, server_default=sa.func.now(), nullable=False),
        sa.Column("started_at", _ts, nullable=True),
        sa.Column("finished_at", _ts, nullable=True),
        sa.UniqueConstraint("experiment_id", "number", name="uq_trials_experiment_number"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_trials_experiment_history", "trials", ["experiment_id", "history_version"])
    op.create_index("ix_trials_experiment_state", "trials", ["experiment_id", "state"])
    op.create_table(
        "observations",
        sa.Column("id", _id, primary_key=True, autoincrement=True),
        sa.Column(
            "trial_id",
            _id,
            sa.ForeignKey("trials.id", ondelete="CASCADE", name="fk_observations_trial"),
            nullable=False,
        ),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("metrics", _json, nullable=False),
        sa.Column("objective", sa.Float(), nullable=True),
        sa.Column("created_at", _ts, server_default=sa.func.now(), nullable=False),
        sa.UniqueConstraint("trial_id", "step", name="uq_observations_trial_step"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "stop_orders",
        sa.Column(
            "trial_id",
            _id,
            sa.ForeignKey("trials.id", ondelete="CASCADE", name="fk_stop_orders_trial"),
            primary_key=True,
        ),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", _ts, server_default=sa.func.now(), nullable=False),
    )


def downgrade() -> None:
    """Drop every table."""
    op.drop_table("stop_orders")
    op.drop_table("observations")
    op.drop_index("ix_trials_experiment_state", table_name="trials")
    op.drop_index("ix_trials_experiment_history", table_name="trials")
    op.drop_table("trials")
    op.drop_table("experiments")
    op.drop_table("settings")
