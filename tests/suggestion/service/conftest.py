"""Fixtures for the service tests: a service, and two replicas on one database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kubetune_suggestion.service.core import TuningService


@pytest.fixture
def svc(db_url: str) -> Iterator[TuningService]:
    """A service over a fresh database."""
    service = TuningService.open(db_url)
    yield service
    service.close()


@pytest.fixture
def replicas(db_url: str) -> Iterator[tuple[TuningService, TuningService]]:
    """Two services on one database, as two replicas (each with its own caches)."""
    a = TuningService.open(db_url)
    b = TuningService.open(db_url, migrate=False)
    yield a, b
    a.close()
    b.close()
