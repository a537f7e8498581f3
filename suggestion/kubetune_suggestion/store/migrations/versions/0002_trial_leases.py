"""Trial leases and ask ids: who asked for a trial, and until when it may stay silent.

Revision ID: 0002
Revises: 0001
Create Date: 2027-01-12
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the ask id and the lease columns to trials (NULL: no key, no lease)."""
    with op.batch_alter_table("trials") as batch:
        batch.add_column(sa.Column("ask_id", sa.String(128), nullable=True))
        batch.add_column(sa.Column("lease_seconds", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.Float(), nullable=True))


def downgrade() -> None:
    """Drop the ask id and the lease columns."""
    with op.batch_alter_table("trials") as batch:
        batch.drop_column("lease_expires_at")
        batch.drop_column("lease_seconds")
        batch.drop_column("ask_id")
