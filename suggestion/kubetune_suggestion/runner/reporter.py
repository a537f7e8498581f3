"""Reports delivered in-process to the ``TuningService``: ``kubetune run``'s reporter.

Also what else a trial's collector is wired to in ``kubetune run``: the
reporter that stops the trial on a stop answer (:class:`StopOnAnswer`), and the
trial's log for the collector's remarks (:class:`LineLog`).

The cluster sidecar posts reports over HTTP
(:class:`~kubetune_suggestion.collector.HttpReporter`); ``kubetune run`` drives
the same :class:`~kubetune_suggestion.collector.Collector` with this reporter,
which calls the service in its own process. It lives here, beside its only
user, so that the collector (the sidecar's whole program) imports neither the
service nor SQLAlchemy: that import is most of a sidecar's start-up time when a
node starts many at once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import sqlalchemy.exc

from kubetune_suggestion.collector import Ack, Reporter, ReporterUnavailable, ReportRejected
from kubetune_suggestion.metrics_protocol import Report
from kubetune_suggestion.service.errors import ServiceError
from kubetune_suggestion.service.models import StopAnswer

__all__ = ["LineLog", "ServiceReporter", "StopOnAnswer"]


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


class StopOnAnswer:
    """A trial's reporter that acts on a stop answer the moment the service gives it.

    The collector forwards a batch of reports before handing back their
    answers; a trial behind by a few reports would otherwise keep training
    while the rest of its batch is stored.
    """

    def __init__(self, reporter: Reporter, stop: Callable[[str], None]) -> None:
        self.reporter = reporter
        self.stop = stop

    def send(self, report: Report) -> Ack:
        """Forward ``report``; stop the trial if the answer says so."""
        ack = self.reporter.send(report)
        if ack.stop:
            self.stop(ack.reason)
        return ack


class LineLog:
    """Appends the collector's remarks (skipped lines, rejected reports) to the trial's log."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, line: str) -> None:
        """Append ``line``, marked as kubetune's."""
        # O_APPEND: whole lines land between the trial's own writes.
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(f"[kubetune] {line}\n")
