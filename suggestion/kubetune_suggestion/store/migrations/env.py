"""Alembic environment: runs on the connection that ``store.migrate.upgrade`` opened."""

from __future__ import annotations

from alembic import context

from kubetune_suggestion.store.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "run migrations with `kubetune-service migrate` "
        "or kubetune_suggestion.store.migrate.upgrade()"
    )

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    version_table=config.get_main_option("version_table") or "alembic_version",
    # SQLite cannot ALTER most things in place; batch mode copies the table.
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
