"""Fixtures for the store and service tests: a throw-away database on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune_suggestion.store import testing


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a fresh schema on the test PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/store.db"
        return
    base = testing.postgres_base_url()
    if base is None:
        if testing.postgres_required():
            pytest.fail(
                f"CI=true but {testing.POSTGRES_ENV} is unset: .ci/run must source .ci/postgres.sh"
            )
        pytest.skip(
            f"{testing.POSTGRES_ENV} is unset (run `source .ci/postgres.sh` to test PostgreSQL)"
        )
    with testing.postgres_schema(base) as url:
        yield url
