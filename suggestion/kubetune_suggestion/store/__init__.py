"""The observation store: experiments, trials, observations and stop orders (SQLAlchemy 2).

SQLite (WAL) is the embedded default, PostgreSQL (psycopg 3) the production
store for several service replicas. The schema is migrated with Alembic at
startup (:func:`~kubetune_suggestion.store.migrate.upgrade`). Every write is
SQLAlchemy Core, the same statements on both databases (:mod:`.writes`).
"""

from kubetune_suggestion.store.db import UnsupportedDatabase, make_engine
from kubetune_suggestion.store.migrate import upgrade
from kubetune_suggestion.store.repository import Store
from kubetune_suggestion.store.rows import (
    AskedBy,
    ExperimentRow,
    ExpiredTrial,
    NewTrial,
    RestoredTrial,
    StepRow,
    StopRow,
    TrialRow,
)
from kubetune_suggestion.store.writes import WriteTxn

__all__ = [
    "AskedBy",
    "ExperimentRow",
    "ExpiredTrial",
    "NewTrial",
    "RestoredTrial",
    "StepRow",
    "StopRow",
    "Store",
    "TrialRow",
    "UnsupportedDatabase",
    "WriteTxn",
    "make_engine",
    "upgrade",
]
