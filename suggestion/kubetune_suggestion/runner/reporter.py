"""Reports delivered in-process to the ``TuningService``: ``kubetune run``'s reporter.

The cluster sidecar posts reports over HTTP
(:class:`~kubetune_suggestion.collector.HttpReporter`); ``kubetune run`` drives
the same :class:`~kubetune_suggestion.collector.Collector` with this reporter,
which calls the service in its own process. It lives here, beside its only
user, so that the collector (the sidecar's whole program) imports neither the
service nor SQLAlchemy: that import is most of a sidecar's start-up time when a
node starts many at once.
"""

from __future__ import annotations

from typing import Protocol

import sqlalchemy.exc

from kubetune_suggestion.collector import Ack, ReporterUnavailable, ReportRejected
from kubetune_suggestion.metrics_protocol import Report
from kubetune_suggestion.service.errors import ServiceError
from kubetune_suggestion.service.models import StopAnswer

__all__ = ["ServiceReporter"]


class _ReportsObservations(Protocol):
    def report(
        self, uid: str, number: int, token: str, step: int, metrics: dict[str, float]
    ) -> StopAnswer: ...


class ServiceReporter:
    """Delivers one trial's reports in-process to a ``TuningService``."""

    def __init__(self, service: _ReportsObservations, uid: str, number: int, token: str) -> None:
        self.service = service
        self.uid = uid
        self.number = number
        self.token = token

    def send(self, report: Report) -> Ack:
        """Store the report through the service and return its stop answer.

        Raises:
            ReportRejected: The service refused it (a finished trial, a bad value).
            ReporterUnavailable: The database is busy (SQLite locked by another process).
        """
        try:
            answer = self.service.report(
                self.uid, self.number, self.token, report.step, report.metrics
            )
        except ServiceError as exc:
            # The in-process twin of a 4xx: a finished trial, a bad value.
            raise ReportRejected(f"{exc.code}: {exc.message}") from exc
        except sqlalchemy.exc.OperationalError as exc:
            # "database is locked" beyond the busy timeout: worth retrying.
            raise ReporterUnavailable(str(exc).splitlines()[0]) from exc
        return Ack(stop=answer.stop, reason=answer.reason)
