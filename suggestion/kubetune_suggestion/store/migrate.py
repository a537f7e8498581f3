"""Schema migrations, run programmatically (no ``alembic.ini`` needed at runtime).

The Alembic environment lives in ``migrations/`` inside the package. Several
replicas may start at once against one database: on PostgreSQL an advisory
lock serialises them, on SQLite the ``BEGIN IMMEDIATE`` write lock does, and
the whole upgrade runs in one transaction (both databases have transactional
DDL), so a replica either sees the old schema or the new one.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

from kubetune_suggestion.store.db import is_postgres, writer

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Our own version table, so the store can share a database with other apps.
VERSION_TABLE = "kubetune_alembic_version"
# Arbitrary constant key for pg_advisory_xact_lock ("kubetune" in ASCII, truncated).
_ADVISORY_LOCK_KEY = 0x6B75626574756E


def alembic_config() -> Config:
    """An Alembic config pointing at the packaged migrations."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("version_table", VERSION_TABLE)
    return config


def head_revision() -> str:
    """The newest migration shipped with this version of kubetune."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None for an empty database)."""
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database schema to ``revision`` (idempotent, safe to race)."""
    config = alembic_config()
    with writer(engine).begin() as connection:
        if is_postgres(connection):
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK_KEY}
            )
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Take the database schema back to ``revision`` (``base`` drops every table)."""
    config = alembic_config()
    with writer(engine).begin() as connection:
        if is_postgres(connection):
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK_KEY}
            )
        config.attributes["connection"] = connection
        command.downgrade(config, revision)
