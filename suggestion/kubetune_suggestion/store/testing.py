"""Test helpers: a throw-away database per test, on SQLite or PostgreSQL.

PostgreSQL tests get their own schema (``search_path`` in the URL), so tests
and concurrent test runs on one server never see each other's tables, and the
URL can be handed to other processes as is.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

POSTGRES_ENV = "KUBETUNE_TEST_POSTGRES_URL"


def postgres_base_url() -> str | None:
    """The test server's URL (``source .ci/postgres.sh`` sets it), or None."""
    return os.environ.get(POSTGRES_ENV) or None


def postgres_required() -> bool:
    """Whether a missing PostgreSQL must fail rather than skip (in CI)."""
    return os.environ.get("CI", "").lower() == "true"


@contextmanager
def postgres_schema(base_url: str) -> Iterator[str]:
    """A URL whose connections live in a fresh schema, dropped afterwards."""
    schema = f"kt_test_{secrets.token_hex(6)}"
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()
