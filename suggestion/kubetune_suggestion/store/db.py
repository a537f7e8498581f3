"""Database engines for the store: SQLite (embedded default) and PostgreSQL (psycopg 3).

SQLite is configured for a service with several threads (and possibly several
processes) on one file: WAL so readers never block the writer, a busy timeout
so writers queue instead of failing, foreign keys on (for cascading deletes).
Transactions that write start with ``BEGIN IMMEDIATE``: a deferred transaction
that reads and then writes can fail with "database is locked" when another
writer got in between, without waiting for the busy timeout.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Connection, make_url

# Execution option that marks a connection whose transactions will write.
WRITE_OPTION = "kubetune_write"


class UnsupportedDatabase(ValueError):
    """A database URL the store cannot use."""


def make_engine(url: str, *, pool_size: int = 10, busy_timeout_ms: int = 30_000) -> Engine:
    """An engine for ``url``: ``sqlite:///path`` or ``postgresql+psycopg://...``.

    Args:
        url: The database URL. ``postgresql://`` is taken as psycopg 3.
        pool_size: Connections kept open per process (PostgreSQL).
        busy_timeout_ms: How long SQLite waits for another writer.

    Raises:
        UnsupportedDatabase: For any other kind of database.
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise UnsupportedDatabase(
                "an in-memory SQLite database cannot be shared by the service's threads; "
                "use sqlite:///path/to/file.db"
            )
        engine = create_engine(
            parsed, connect_args={"check_same_thread": False, "timeout": busy_timeout_ms / 1000}
        )
        _configure_sqlite(engine, busy_timeout_ms)
        return engine
    if backend == "postgresql":
        if parsed.get_driver_name() in ("", "psycopg2"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        return create_engine(
            parsed,
            pool_size=pool_size,
            max_overflow=2 * pool_size,
            # No pre-ping: it costs a round trip per request on the hot path. After
            # a database restart the first statement on each dead connection fails
            # (one 500, which callers retry) and SQLAlchemy then replaces the pool.
            pool_recycle=3600,
        )
    raise UnsupportedDatabase(
        f"unsupported database {backend!r}: use sqlite:///PATH or postgresql+psycopg://..."
    )


def writer(engine: Engine) -> Engine:
    """The same engine (same pool), for transactions that write."""
    return engine.execution_options(**{WRITE_OPTION: True})


def is_postgres(engine: Engine | Connection) -> bool:
    """Whether the engine talks to PostgreSQL."""
    return engine.dialect.name == "postgresql"


def _enable_wal(cursor: Any, patience: float) -> None:
    """Switch a (new) database file to WAL, waiting out other connections doing the same.

    The switch needs an exclusive lock, and SQLite answers "database is
    locked" at once, without its busy handler, when replicas open a new file
    together (it would deadlock otherwise). Once switched, the file stays WAL.
    """
    deadline = time.monotonic() + patience
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _configure_sqlite(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below emit BEGIN instead of pysqlite's
        # own implicit transaction handling, which cannot do BEGIN IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        _enable_wal(cursor, busy_timeout_ms / 1000)
        cursor.execute("PRAGMA foreign_keys=ON")
        # In WAL mode NORMAL loses no committed transaction on a process crash,
        # only (possibly) the last ones on a power loss; FULL costs an fsync per commit.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get(WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
