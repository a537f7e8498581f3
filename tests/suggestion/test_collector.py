"""The metrics collector: in-process under `kubetune run`, and as the sidecar over real HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kubetune_suggestion.collector import (
    Backoff,
    Collector,
    HttpReporter,
    ReporterUnavailable,
    ReportRejected,
    SidecarConfig,
)
from kubetune_suggestion.metrics_protocol import Report
from kubetune_suggestion.runner.reporter import ServiceReporter
from kubetune_suggestion.service.app import create_app
from kubetune_suggestion.service.core import TuningService
from kubetune_suggestion.service.settings import ServiceSettings
from kubetune_suggestion.service.testing import (
    API_KEY,
    CLIENT_HEADERS,
    free_port,
    serve_in_thread,
)
from kubetune_suggestion.service.tokens import trial_token
from tests import sigterm

SECRET = "collector-test-secret"
SPEC: dict[str, Any] = {
    "objective": {"metric": "loss", "direction": "minimize"},
    "parameters": [{"name": "x", "type": "float", "min": 0.0, "max": 1.0}],
    "algorithm": {"name": "random", "seed": 0},
    "maxTrials": 4,
    "template": {"spec": {"containers": [{"name": "train", "image": "trial:1"}]}},
}
# The sidecar's command line.
SIDECAR = [sys.executable, "-m", "kubetune_suggestion.collector"]


@pytest.fixture
def service(tmp_path: Path) -> Iterator[TuningService]:
    svc = TuningService.open(f"sqlite:///{tmp_path}/store.db", secret=SECRET)
    svc.register("exp-1", "exp", "default", SPEC)
    yield svc
    svc.close()


def _observations(svc: TuningService, uid: str, number: int) -> list[tuple[int, dict[str, float]]]:
    trial = next(t for t in svc.trials(uid, observations=True) if t.number == number)
    return [(o.step, o.metrics) for o in trial.observations or []]


def _wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_in_process_collector_delivers_complete_lines_and_skips_bad_ones(
    service: TuningService, tmp_path: Path
) -> None:
    number = service.ask("exp-1", 1).trials[0].number
    service.start("exp-1", number)
    path = tmp_path / "metrics"
    logged: list[str] = []
    collector = Collector(
        path,
        ServiceReporter(service, "exp-1", number, service.token("exp-1", number)),
        logged.append,
    )
    assert collector.collect() == []  # no file yet
    with path.open("a") as f:
        f.write('{"step": 1, "loss": 0.9}\nstep=2 loss=nan\n# note\nloss=0.7\nstep=4 lo')
    deliveries = collector.collect()
    assert [d.report for d in deliveries] == [Report(1, {"loss": 0.9}), Report(2, {"loss": 0.7})]
    assert all(not d.ack.stop for d in deliveries)
    assert any("line 2 skipped" in line and "finite" in line for line in logged)
    with path.open("a") as f:
        f.write("ss=0.5\n")
    assert [d.report.step for d in collector.collect()] == [4]
    assert _observations(service, "exp-1", number) == [
        (1, {"loss": 0.9}),
        (2, {"loss": 0.7}),
        (4, {"loss": 0.5}),
    ]
    assert collector.last is not None and collector.last.report.step == 4
    assert any(line.startswith("step=4 loss=0.5 -> ok") for line in logged)


def test_a_rejected_report_is_logged_and_skipped(service: TuningService, tmp_path: Path) -> None:
    number = service.ask("exp-1", 1).trials[0].number
    path = tmp_path / "metrics"
    path.write_text("step=1 loss=1\n")
    logged: list[str] = []
    wrong = ServiceReporter(service, "exp-1", number, "not-the-token")
    collector = Collector(path, wrong, logged.append)
    assert collector.collect() == []
    assert collector.undelivered == 0
    assert "rejected: forbidden" in logged[-1]
    # After the trial finished, the service refuses more reports: logged, not retried.
    service.finish("exp-1", number, "failed", "boom")
    right = ServiceReporter(service, "exp-1", number, service.token("exp-1", number))
    with pytest.raises(ReportRejected, match="conflict"):
        right.send(Report(2, {"loss": 0.5}))


def test_http_reporter_maps_statuses(service: TuningService) -> None:
    with pytest.raises(ReporterUnavailable):
        HttpReporter(f"http://127.0.0.1:{free_port()}", "exp-1", 0, "t").send(
            Report(1, {"loss": 1.0})
        )

    def reporter(status: int) -> HttpReporter:
        error = {"error": {"code": "x", "message": "no experiment 'exp-1'", "field": "uid"}}
        answer = httpx.MockTransport(lambda request: httpx.Response(status, json=error))
        return HttpReporter("http://service", "exp-1", 0, "t", httpx.Client(transport=answer))

    # A service that lost its database knows no trial until the operator restores it.
    with pytest.raises(ReporterUnavailable, match="does not know this trial yet"):
        reporter(404).send(Report(1, {"loss": 1.0}))
    for status in (408, 429, 500, 503):
        with pytest.raises(ReporterUnavailable, match=f"HTTP {status}"):
            reporter(status).send(Report(1, {"loss": 1.0}))
    for status in (400, 401, 403, 409, 422):
        with pytest.raises(ReportRejected, match=f"HTTP {status}"):
            reporter(status).send(Report(1, {"loss": 1.0}))


def _restore(svc: TuningService, uid: str, number: int) -> None:
    """What the operator does for a service that lost its database: register, restore the trial."""
    svc.register(uid, "exp", "default", SPEC)
    svc.restore(uid, [{"number": number, "params": {"x": 0.5}, "state": "running"}])


def _patient_collector(
    url: str, uid: str, number: int, metrics: Path, logged: list[str]
) -> tuple[HttpReporter, Collector]:
    """A collector of trial ``number``'s reports over HTTP, retrying every 0.02 to 0.1 s."""
    reporter = HttpReporter(url, uid, number, trial_token(SECRET, uid, number))
    backoff = Backoff(initial=0.02, maximum=0.1)
    return reporter, Collector(metrics, reporter, logged.append, backoff=backoff)


def _collect_while_unknown(
    collector: Collector, logged: list[str]
) -> tuple[threading.Thread, list[int]]:
    """``collector.collect()`` in a thread, once the service said it does not know the trial.

    Returns the thread and the steps it delivered (filled in when it ends).
    """
    delivered: list[int] = []
    worker = threading.Thread(
        target=lambda: delivered.extend(d.report.step for d in collector.collect())
    )
    worker.start()
    _wait_for(lambda: any("does not know this trial yet" in line for line in logged))
    return worker, delivered


def test_reports_wait_for_a_restore_after_the_service_lost_its_database(
    tmp_path: Path,
) -> None:
    """404 while the experiment is unknown; delivered once it is registered and restored."""
    svc = TuningService.open(f"sqlite:///{tmp_path}/fresh.db", secret=SECRET)
    metrics = tmp_path / "metrics"
    metrics.write_text("step=0 loss=0.9\nstep=1 loss=0.8\n")
    logged: list[str] = []
    app = create_app(ServiceSettings(db_url="unused", api_key=API_KEY), svc)
    with serve_in_thread(app) as url:
        reporter, collector = _patient_collector(url, "exp-lost", 3, metrics, logged)
        worker, delivered = _collect_while_unknown(collector, logged)
        assert worker.is_alive() and delivered == []
        # The operator registers the experiment again and restores its trials.
        _restore(svc, "exp-lost", 3)
        worker.join(timeout=30)
        reporter.close()
    assert delivered == [0, 1]
    assert _observations(svc, "exp-lost", 3) == [(0, {"loss": 0.9}), (1, {"loss": 0.8})]
    assert "step=0 loss=0.9 -> ok" in logged
    svc.close()


def test_reports_delivered_before_the_database_was_lost_are_sent_again(tmp_path: Path) -> None:
    """The restore brings back the trial, not its reports: the collector sends them again."""
    first = TuningService.open(f"sqlite:///{tmp_path}/first.db", secret=SECRET)
    _restore(first, "exp-lost", 0)
    apps = [create_app(ServiceSettings(db_url="unused", api_key=API_KEY), first)]

    async def current(scope: Any, receive: Any, send: Any) -> None:
        await apps[-1](scope, receive, send)  # whichever service is up, as behind a Service

    metrics = tmp_path / "metrics"
    metrics.write_text("step=0 loss=0.9\nstep=1 loss=0.8\n")
    logged: list[str] = []
    with serve_in_thread(current) as url:
        reporter, collector = _patient_collector(url, "exp-lost", 0, metrics, logged)
        assert [d.report.step for d in collector.collect()] == [0, 1]
        # The service's Pod is replaced: an empty database.
        second = TuningService.open(f"sqlite:///{tmp_path}/second.db", secret=SECRET)
        apps.append(create_app(ServiceSettings(db_url="unused", api_key=API_KEY), second))
        with metrics.open("a") as f:
            f.write("step=2 loss=0.7\n")
        worker, delivered = _collect_while_unknown(collector, logged)
        _restore(second, "exp-lost", 0)
        worker.join(timeout=30)
        reporter.close()
    assert delivered == [0, 1, 2]
    assert [step for step, _ in _observations(second, "exp-lost", 0)] == [0, 1, 2]
    assert any("sending the 2 delivered so far again" in line for line in logged), logged
    first.close()
    second.close()


def _config_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "KUBETUNE_SERVICE_URL": "http://x",
        "KUBETUNE_EXPERIMENT_UID": "u",
        "KUBETUNE_TRIAL_NUMBER": "1",
        "KUBETUNE_METRICS_FILE": str(tmp_path / "metrics"),
        **extra,
    }


def test_sidecar_reads_its_token_from_the_file_named(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("tok-1\n")
    env = _config_env(tmp_path, KUBETUNE_TRIAL_TOKEN_FILE=str(token_file))
    assert SidecarConfig.from_env(env).token == "tok-1"
    # The token as an env value is not a setting (any Pod reader would see it).
    env_value = _config_env(tmp_path, KUBETUNE_TRIAL_TOKEN="tok-1")
    with pytest.raises(ValueError, match="KUBETUNE_TRIAL_TOKEN_FILE"):
        SidecarConfig.from_env(env_value)


@pytest.mark.parametrize("content", [None, "", "  \n"])
def test_an_unreadable_or_empty_token_file_is_named(tmp_path: Path, content: str | None) -> None:
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content)
    env = _config_env(tmp_path, KUBETUNE_TRIAL_TOKEN_FILE=str(token_file))
    with pytest.raises(ValueError, match=f"KUBETUNE_TRIAL_TOKEN_FILE: .*{token_file}"):
        SidecarConfig.from_env(env)


def test_sidecar_config_names_missing_variables() -> None:
    with pytest.raises(ValueError, match="KUBETUNE_TRIAL_TOKEN_FILE, KUBETUNE_METRICS_FILE"):
        SidecarConfig.from_env(
            {
                "KUBETUNE_SERVICE_URL": "http://x",
                "KUBETUNE_EXPERIMENT_UID": "u",
                "KUBETUNE_TRIAL_NUMBER": "1",
            }
        )
    result = subprocess.run(
        SIDECAR,
        env={k: v for k, v in os.environ.items() if not k.startswith("KUBETUNE_")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "missing environment variable(s): KUBETUNE_SERVICE_URL" in result.stderr


# -- the sidecar against the real HTTP service ------------------------------------------


class _ServiceProcess:
    """The tuning service as its own process on a SQLite file, on a fixed port across restarts."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, timeout=10.0, headers=CLIENT_HEADERS)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and wait until it is ready."""
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kubetune_suggestion.service",
                "--db",
                f"sqlite:///{self.db}",
                "--port",
                str(self.port),
                "--metrics-port",
                str(free_port()),
                "--log-level",
                "warning",
            ],
            env={**os.environ, "KUBETUNE_SECRET": SECRET, "KUBETUNE_API_KEY": API_KEY},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, "the service exited"
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("the service did not become ready")

    def stop(self) -> None:
        """SIGTERM it and wait; SIGKILL after 30 s."""
        if self.process is None:
            return
        server, self.process = self.process, None
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    def new_trial(self, uid: str) -> int:
        """Register experiment ``uid`` and ask for one trial: its number."""
        put = self.client.put(f"/v1/experiments/{uid}", json={"name": "exp", "spec": SPEC})
        assert put.status_code in (200, 201), put.text
        asked = self.client.post(f"/v1/experiments/{uid}/ask", json={"count": 1})
        number: int = asked.json()["trials"][0]["number"]
        return number

    def stored(self, uid: str) -> list[int]:
        """The steps stored for the experiment's first trial."""
        trials = self.client.get(
            f"/v1/experiments/{uid}/trials", params={"observations": "true"}
        ).json()
        return [o["step"] for o in trials[0]["observations"] or []]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[_ServiceProcess]:
    """The service running as its own process on ``tmp_path/store.db``; stopped at the end."""
    service = _ServiceProcess(tmp_path / "store.db")
    service.start()
    yield service
    service.stop()
    service.client.close()


def _sidecar_env(
    url: str, uid: str, metrics: Path, poll_seconds: str | None = "0.05"
) -> dict[str, str]:
    """The sidecar's settings for trial 0 of ``uid``; ``poll_seconds`` None: its default.

    The token goes in a file beside the metrics file, as the operator mounts it.
    """
    token_file = metrics.parent / "token"
    token_file.write_text(trial_token(SECRET, uid, 0) + "\n")
    env = {
        **os.environ,
        "KUBETUNE_SERVICE_URL": url,
        "KUBETUNE_EXPERIMENT_UID": uid,
        "KUBETUNE_TRIAL_NUMBER": "0",
        "KUBETUNE_TRIAL_TOKEN_FILE": str(token_file),
        "KUBETUNE_METRICS_FILE": str(metrics),
    }
    if poll_seconds is not None:
        env["KUBETUNE_COLLECTOR_POLL_SECONDS"] = poll_seconds
    return env


@pytest.mark.slow
def test_sidecar_retries_until_the_service_is_up_then_drains_on_sigterm(
    tmp_path: Path, served: _ServiceProcess
) -> None:
    metrics = tmp_path / "metrics"
    metrics.write_text('{"step": 1, "loss": 0.9}\n')
    assert served.new_trial("exp-http") == 0
    served.stop()
    # The service is down (a restart): the sidecar must wait for it, not give up.
    sidecar = subprocess.Popen(
        SIDECAR,
        env=_sidecar_env(served.url, "exp-http", metrics),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(1.0)
    try:
        served.start()
        _wait_for(lambda: served.stored("exp-http") == [1])
        with metrics.open("a") as f:
            f.write("step=2 loss=0.8\nstep=3 loss=0.7\nstep=4 lo")  # the last line is incomplete
        sidecar.send_signal(signal.SIGTERM)
        out, _ = sidecar.communicate(timeout=60)
        assert sidecar.returncode == 0, out
        assert served.stored("exp-http") == [1, 2, 3]
        assert "service unavailable" in out  # it retried while the service was down
        assert "step=1 loss=0.9 -> ok" in out
        assert "step=3 loss=0.7 -> ok" in out
        assert "stopping after 3 report(s)" in out

        # A wrong token is refused for good (403) and logged; the sidecar goes on.
        bad = HttpReporter(served.url, "exp-http", 0, "wrong")
        with pytest.raises(ReportRejected, match="HTTP 403"):
            bad.send(Report(5, {"loss": 0.1}))
        bad.close()
    finally:
        if sidecar.poll() is None:
            sidecar.kill()
            sidecar.wait()


def test_sidecar_stopped_right_after_start_still_delivers_the_file(
    tmp_path: Path, served: _ServiceProcess
) -> None:
    # A trial shorter than the sidecar's start-up: the kubelet sends SIGTERM
    # while Python is still importing; the reports must not be lost.
    metrics = tmp_path / "metrics"
    metrics.write_text('{"step": 1, "loss": 0.9}\nstep=2 loss=0.5\n')
    served.new_trial("exp-short")
    sidecar = subprocess.Popen(
        SIDECAR,
        env=_sidecar_env(served.url, "exp-short", metrics, poll_seconds=None),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(0.15)
    sidecar.send_signal(signal.SIGTERM)
    out, _ = sidecar.communicate(timeout=60)
    assert sidecar.returncode == 0, out
    assert served.stored("exp-short") == [1, 2]


# -- as a container's PID 1 -------------------------------------------------------------


def test_sidecar_as_pid1_ships_what_is_left_and_exits_promptly_at_sigterm(
    tmp_path: Path, served: _ServiceProcess
) -> None:
    # The kubelet stops the native sidecar with SIGTERM once the trial has
    # exited: it must deliver the last lines and end, not wait out the grace period.
    metrics = tmp_path / "metrics"
    metrics.write_text('{"step": 1, "loss": 0.9}\n')
    served.new_trial("exp-pid1")
    sidecar = sigterm.start(
        SIDECAR,
        env=_sidecar_env(served.url, "exp-pid1", metrics),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_for(lambda: served.stored("exp-pid1") == [1])
        assert sigterm.catches_sigterm(sidecar.pid)
        with metrics.open("a") as f:
            f.write("step=2 loss=0.8\nstep=3 loss=0.7\n")
        code, seconds = sidecar.sigterm()
    finally:
        sidecar.kill()
    out = sidecar.popen.stdout.read() if sidecar.popen.stdout else ""
    assert code == 0, out
    assert seconds < sigterm.PROMPT_SECONDS
    assert served.stored("exp-pid1") == [1, 2, 3]
    assert "stopping after 3 report(s)" in out


def test_sidecar_as_pid1_with_nothing_to_ship_exits_at_once(tmp_path: Path) -> None:
    # No reports pending: nothing to retry, even with the service unreachable.
    metrics = tmp_path / "metrics"
    sidecar = sigterm.start(
        SIDECAR,
        env=_sidecar_env(f"http://127.0.0.1:{free_port()}", "exp-idle", metrics),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        sigterm.wait_until(lambda: sigterm.catches_sigterm(sidecar.pid), 30, "the handler")
        code, seconds = sidecar.sigterm()
    finally:
        sidecar.kill()
    out = sidecar.popen.stdout.read() if sidecar.popen.stdout else ""
    assert code == 0, out
    assert seconds < sigterm.PROMPT_SECONDS


def test_sidecar_help_names_its_settings() -> None:
    result = subprocess.run(
        [*SIDECAR, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    for name in ("KUBETUNE_SERVICE_URL", "KUBETUNE_TRIAL_TOKEN_FILE", "KUBETUNE_METRICS_FILE"):
        assert name in result.stdout
