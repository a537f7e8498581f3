"""The step a trial's stop was decided on.

Revision ID: 0003
Revises: 0002
Create Date: 2027-01-20
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``trials.stop_step`` (NULL: never stopped, or stopped before it was recorded)."""
    with op.batch_alter_table("trials") as batch:
        batch.add_column(sa.Column("stop_step", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    """Drop ``trials.stop_step``."""
    with op.batch_alter_table("trials") as batch:
        batch.drop_column("stop_step")
