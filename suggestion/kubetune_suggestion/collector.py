"""The metrics collector: tail a trial's metrics file and deliver each report.

One piece of logic, two deployments:

- In a cluster it is the trial Pod's native sidecar,
  ``python -m kubetune_suggestion.collector``, configured by env
  (``KUBETUNE_SERVICE_URL``, ``KUBETUNE_EXPERIMENT_UID``,
  ``KUBETUNE_TRIAL_NUMBER``, ``KUBETUNE_TRIAL_TOKEN_FILE``,
  ``KUBETUNE_METRICS_FILE``). The token is read from a file (the operator
  mounts it from a Secret into this container only), never from the env: a
  Pod's env is readable by whoever may read Pods. It posts every report to the suggestion service
  over HTTP (:class:`HttpReporter`), retries with backoff while the service is
  unavailable, and on SIGTERM drains the complete lines left in the file and
  exits 0. It logs one line per report to stdout, so
  ``kubectl logs POD -c kubetune-collector`` shows the trial's progress.
- Under ``kubetune run`` the runner drives a :class:`Collector` per trial
  process with its own reporter
  (:class:`~kubetune_suggestion.runner.reporter.ServiceReporter`) that calls
  the in-process ``TuningService`` instead of HTTP. That reporter lives in the
  runner so that this module imports neither the service nor SQLAlchemy (an
  import-linter contract in pyproject.toml holds it to that): their import
  would be most of the sidecar's start-up time when a node starts many at once.

Both sides go through :class:`Reporter`: ``send(report) -> Ack``, raising
:class:`ReporterUnavailable` for a failure worth retrying (the service is
down, the database is busy, a service that lost its database does not know
the trial until the operator restores it) and :class:`ReportRejected` for one
that is not (a bad token, a report after the trial finished). Reports are idempotent on
(trial, step), so a retry or a restarted collector re-reading the file from
its start never duplicates an observation.
"""

from __future__ import annotations

import signal

# Signals that arrived before run_sidecar() installed its handler. As a
# sidecar this module may be stopped within a second of starting (a short
# trial), and the default SIGTERM action would kill it before it drains the
# metrics file; so the handler goes in before the heavy imports below.
_EARLY_SIGNALS: list[int] = []
if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda signum, frame: _EARLY_SIGNALS.append(signum))

import argparse
import os
import random
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Final, Protocol

import httpx

from kubetune_suggestion.metrics_protocol import (
    MetricsFileReader,
    MetricsParser,
    ParseError,
    Report,
)

__all__ = [
    "Ack",
    "Backoff",
    "Collector",
    "Delivery",
    "HttpReporter",
    "ReportRejected",
    "Reporter",
    "ReporterUnavailable",
    "SidecarConfig",
    "main",
    "run_sidecar",
]

ENV_SERVICE_URL: Final = "KUBETUNE_SERVICE_URL"
ENV_EXPERIMENT_UID: Final = "KUBETUNE_EXPERIMENT_UID"
ENV_TRIAL_NUMBER: Final = "KUBETUNE_TRIAL_NUMBER"
ENV_TRIAL_TOKEN_FILE: Final = "KUBETUNE_TRIAL_TOKEN_FILE"
ENV_METRICS_FILE: Final = "KUBETUNE_METRICS_FILE"
# Optional tuning knobs (seconds); the defaults suit a Pod's 30 s grace period.
ENV_POLL_INTERVAL: Final = "KUBETUNE_COLLECTOR_POLL_SECONDS"
ENV_DRAIN_TIMEOUT: Final = "KUBETUNE_COLLECTOR_DRAIN_SECONDS"


@dataclass(frozen=True)
class Ack:
    """The service's answer to a report.

    Attributes:
        stop: The early-stopping rule wants the trial to stop.
        reason: Why, for logs and events ("" when not stopping).
    """

    stop: bool = False
    reason: str = ""


class ReporterUnavailable(Exception):
    """The report could not be delivered now; retrying later may succeed."""


class ServiceForgot(ReporterUnavailable):
    """The service does not know the trial: it lost its database and is being restored.

    Reports it acknowledged before are gone with it: they are sent again.
    """


class ReportRejected(Exception):
    """The service refused the report for good; retrying would not help."""


class Reporter(Protocol):
    """Delivers one report of one trial."""

    def send(self, report: Report) -> Ack:
        """Deliver ``report``.

        Raises:
            ReporterUnavailable: Worth retrying.
            ReportRejected: Not worth retrying.
        """
        ...


@dataclass(frozen=True)
class Delivery:
    """A report and the answer it got."""

    report: Report
    ack: Ack


@dataclass
class Backoff:
    """Exponential backoff with jitter, so sidecars do not retry in lockstep.

    Attributes:
        initial: The first delay in seconds.
        maximum: The cap on any delay.
        factor: Growth per failed attempt.
    """

    initial: float = 0.2
    maximum: float = 5.0
    factor: float = 2.0

    def delay(self, attempt: int) -> float:
        """The delay before retry number ``attempt`` (from 0)."""
        base = min(self.maximum, self.initial * self.factor**attempt)
        return base * random.uniform(0.8, 1.2)


class Collector:
    """Reads new complete lines of a metrics file and delivers each report in order.

    A line that does not parse is logged and skipped: one bad line must not
    lose the reports after it. A report the service rejects is logged and
    skipped for the same reason. A report that cannot be delivered is retried
    with backoff, in file order, until it is delivered or :attr:`deadline`
    passes (then it and the rest of the batch stay unsent, and the next call
    retries them). When the service answers that it does not know the trial
    (:class:`ServiceForgot`: its database was lost), every report delivered
    so far is sent again before the next one: the operator restores only the
    trial, and reports are idempotent by step.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        reporter: Reporter,
        log: Callable[[str], None],
        *,
        backoff: Backoff | None = None,
        interrupted: Callable[[], bool] = lambda: False,
        log_deliveries: bool = True,
    ) -> None:
        """Set up a collector.

        Args:
            path: The metrics file (it may not exist yet).
            reporter: Where reports go.
            log: Receives one human-readable line per event.
            backoff: Retry delays while the reporter is unavailable.
            interrupted: Polled while retrying; when it turns true (and no
                :attr:`deadline` is set) retrying stops and :meth:`collect`
                returns, so the caller can start a bounded drain or shut down.
            log_deliveries: Log every delivered report too, not only problems
                (the sidecar does; ``kubetune run`` shows them in its table).
        """
        self.reader = MetricsFileReader(path)
        self.parser = MetricsParser()
        self.reporter = reporter
        self.log = log
        self.backoff = backoff or Backoff()
        self.interrupted = interrupted
        self.log_deliveries = log_deliveries
        # time.monotonic() after which retries give up; None retries forever.
        self.deadline: float | None = None
        self.last: Delivery | None = None
        # Reports delivered so far, in order: what a service that lost them gets again.
        self._delivered: list[Report] = []
        self.delivered = 0
        self.line_number = 0
        self._queue: deque[Report] = deque()

    def collect(self, final: bool = False) -> list[Delivery]:
        """Read what was appended since the last call and deliver it.

        Args:
            final: The writer has exited; deliver an unterminated last line too.

        Returns:
            The reports delivered by this call, with their answers.
        """
        for line in self.reader.read_lines(final=final):
            self.line_number += 1
            try:
                report = self.parser.feed(line)
            except ParseError as exc:
                self.log(f"line {self.line_number} skipped: {exc}")
                continue
            if report is not None:
                self._queue.append(report)
        delivered: list[Delivery] = []
        while self._queue:
            report = self._queue[0]
            try:
                ack = self._send(report)
            except ServiceForgot:
                if not self._delivered:
                    break  # out of time, or interrupted, as below
                self.log(
                    f"the service lost this trial's reports: sending the {len(self._delivered)} "
                    "delivered so far again"
                )
                self._queue.extendleft(reversed(self._delivered))
                self._delivered = []
                continue
            except ReporterUnavailable:
                break
            self._queue.popleft()
            if ack is None:
                continue
            self._delivered.append(report)
            delivery = Delivery(report, ack)
            delivered.append(delivery)
            self.last = delivery
            self.delivered += 1
        return delivered

    @property
    def undelivered(self) -> int:
        """Reports read but not yet delivered (the service was unavailable)."""
        return len(self._queue)

    def _send(self, report: Report) -> Ack | None:
        attempt = 0
        while True:
            try:
                ack = self.reporter.send(report)
            except ReportRejected as exc:
                self.log(f"{report.format()} -> rejected: {exc}")
                return None
            except ReporterUnavailable as exc:
                if isinstance(exc, ServiceForgot) and self._delivered:
                    raise  # collect() queues the delivered reports again, first
                if self.deadline is None and self.interrupted():
                    # Hand control back so the caller can start a bounded drain.
                    raise
                delay = self.backoff.delay(attempt)
                if self.deadline is not None and time.monotonic() + delay > self.deadline:
                    self.log(f"{report.format()} -> not delivered: {exc}")
                    raise
                self.log(
                    f"{report.format()} -> service unavailable ({exc}); retrying in {delay:.1f}s"
                )
                attempt += 1
                _sleep(delay, lambda: self.interrupted() and self.deadline is None)
                continue
            if self.log_deliveries:
                note = f"stop: {ack.reason}" if ack.stop else "ok"
                self.log(f"{report.format()} -> {note}")
            return ack


def _sleep(seconds: float, wake: Callable[[], bool]) -> None:
    # Short slices instead of one sleep: a SIGTERM handler only sets a flag,
    # and the drain it asks for should not wait out a long backoff.
    end = time.monotonic() + seconds
    while not wake():
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(0.05, left))


class HttpReporter:
    """Delivers reports to the suggestion service's HTTP API (the sidecar)."""

    def __init__(
        self,
        base_url: str,
        uid: str,
        number: int,
        token: str,
        client: httpx.Client | None = None,
    ) -> None:
        self.url = f"{base_url.rstrip('/')}/v1/experiments/{uid}/trials/{number}/observations"
        self.token = token
        self.client = client or httpx.Client(timeout=httpx.Timeout(10.0, connect=3.0))

    def send(self, report: Report) -> Ack:
        """POST the report and return the service's stop answer.

        Raises:
            ReporterUnavailable: Connection errors, timeouts, 408, 425, 429,
                5xx, and 404: a service that lost its database does not know
                the trial until the operator restores it (seconds later).
            ReportRejected: Any other 4xx (bad token, finished trial).
        """
        try:
            response = self.client.post(
                self.url,
                json={"step": report.step, "metrics": report.metrics},
                headers={"Authorization": f"Bearer {self.token}"},
            )
        except httpx.TransportError as exc:
            raise ReporterUnavailable(f"{type(exc).__name__}: {exc}") from exc
        status = response.status_code
        if status in (408, 425, 429) or status >= 500:
            raise ReporterUnavailable(f"HTTP {status}")
        if status == 404:
            raise ServiceForgot(
                f"HTTP 404: the service does not know this trial yet ({_error_message(response)})"
            )
        if status >= 400:
            raise ReportRejected(f"HTTP {status}: {_error_message(response)}")
        try:
            body = response.json()
        except ValueError as exc:
            raise ReporterUnavailable(f"HTTP {status} with a body that is not JSON") from exc
        return Ack(stop=bool(body.get("stop", False)), reason=str(body.get("reason") or ""))

    def close(self) -> None:
        """Close the HTTP client."""
        self.client.close()


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        where = f" ({error['field']})" if error.get("field") else ""
        return f"{error.get('message', error)}{where}"
    return str(body)[:200]


@dataclass(frozen=True)
class SidecarConfig:
    """The sidecar's settings, read from its environment."""

    service_url: str
    experiment_uid: str
    trial_number: int
    token: str
    metrics_file: str
    poll_interval: float = 0.2
    drain_timeout: float = 20.0

    @classmethod
    def from_env(cls, env: dict[str, str]) -> SidecarConfig:
        """Read the settings.

        Raises:
            ValueError: Naming a missing or malformed variable.
        """
        names = (
            ENV_SERVICE_URL,
            ENV_EXPERIMENT_UID,
            ENV_TRIAL_NUMBER,
            ENV_TRIAL_TOKEN_FILE,
            ENV_METRICS_FILE,
        )
        missing = [name for name in names if not env.get(name)]
        if missing:
            raise ValueError(f"missing environment variable(s): {', '.join(missing)}")
        try:
            number = int(env[ENV_TRIAL_NUMBER])
        except ValueError:
            raise ValueError(
                f"{ENV_TRIAL_NUMBER} must be an integer, got {env[ENV_TRIAL_NUMBER]!r}"
            ) from None
        try:
            poll = float(env.get(ENV_POLL_INTERVAL) or 0.2)
            drain = float(env.get(ENV_DRAIN_TIMEOUT) or 20.0)
        except ValueError:
            raise ValueError(
                f"{ENV_POLL_INTERVAL} and {ENV_DRAIN_TIMEOUT} must be numbers"
            ) from None
        return cls(
            service_url=env[ENV_SERVICE_URL],
            experiment_uid=env[ENV_EXPERIMENT_UID],
            trial_number=number,
            token=_read_token(env[ENV_TRIAL_TOKEN_FILE]),
            metrics_file=env[ENV_METRICS_FILE],
            poll_interval=poll,
            drain_timeout=drain,
        )


def _read_token(path: str) -> str:
    """The trial's token from its file.

    Raises:
        ValueError: Naming the variable and the file if it cannot be read or is empty.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            token = handle.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{ENV_TRIAL_TOKEN_FILE}: cannot read {path}: {exc}") from None
    if not token:
        raise ValueError(f"{ENV_TRIAL_TOKEN_FILE}: {path} is empty")
    return token


def run_sidecar(config: SidecarConfig, reporter: Reporter | None = None) -> int:
    """Tail the metrics file until SIGTERM (or SIGINT), then drain and return 0."""
    stopping = bool(_EARLY_SIGNALS)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    prefix = f"trial {config.trial_number}: "

    def log(line: str) -> None:
        print(prefix + line, flush=True)

    http = reporter or HttpReporter(
        config.service_url, config.experiment_uid, config.trial_number, config.token
    )
    collector = Collector(config.metrics_file, http, log, interrupted=lambda: stopping)
    log(f"collecting {config.metrics_file} for experiment {config.experiment_uid}")
    while not stopping:
        collector.collect()
        _sleep(config.poll_interval, lambda: stopping)
    collector.deadline = time.monotonic() + config.drain_timeout
    collector.collect()
    left = collector.undelivered
    log(
        f"stopping after {collector.delivered} report(s)"
        + (f"; {left} could not be delivered" if left else "")
    )
    if isinstance(http, HttpReporter):
        http.close()
    return 0


def _parser() -> argparse.ArgumentParser:
    settings = [
        (ENV_SERVICE_URL, "the suggestion service's base URL"),
        (ENV_EXPERIMENT_UID, "the Experiment's uid"),
        (ENV_TRIAL_NUMBER, "the trial number"),
        (ENV_TRIAL_TOKEN_FILE, "a file holding the trial's token (reports of this trial only)"),
        (ENV_METRICS_FILE, "the file the trial appends its reports to"),
        (ENV_POLL_INTERVAL, "seconds between reads (default 0.2)"),
        (ENV_DRAIN_TIMEOUT, "seconds to deliver what is left after SIGTERM (default 20)"),
    ]
    width = max(len(name) for name, _ in settings)
    return argparse.ArgumentParser(
        prog="python -m kubetune_suggestion.collector",
        description="kubetune's metrics collector, the trial Pod's sidecar: it tails the\n"
        "metrics file and posts each report to the suggestion service; on SIGTERM\n"
        "it delivers what is left in the file and exits 0.",
        epilog="configured by the environment only (the operator sets it):\n"
        + "\n".join(f"  {name:<{width}}  {text}" for name, text in settings),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m kubetune_suggestion.collector``."""
    _parser().parse_args(argv)  # --help only: configured by env, like any sidecar
    try:
        config = SidecarConfig.from_env(dict(os.environ))
    except ValueError as exc:
        print(f"kubetune collector: {exc}", file=sys.stderr, flush=True)
        return 2
    return run_sidecar(config)


if __name__ == "__main__":
    sys.exit(main())
