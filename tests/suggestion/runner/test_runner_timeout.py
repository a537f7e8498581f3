"""``spec.trialTimeoutSeconds`` in ``kubetune run``: a trial past it is stopped and ends failed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_suggestion.runner.manifest import Manifest, parse_manifest
from kubetune_suggestion.runner.outcome import timed_out, trial_end
from kubetune_suggestion.service.core import TuningService
from tests.suggestion.runner.harness import (
    ServiceSpy,
    experiment_body,
    kubetune,
    run_local,
    run_paths,
)

# Reports every 50 ms for --seconds (30 by default), then exits 0. On SIGTERM
# it notes the time (wall clock, comparable across processes) and exits 0, as
# a well-behaved training script does, or with --term=ignore it ignores it.
TRIAL = """
import os, signal, sys, time
import kubetune

args = dict(a.lstrip("-").split("=", 1) for a in sys.argv[1:])
number = os.environ["KUBETUNE_TRIAL_NUMBER"]

def on_term(signum, frame):
    with open(f"sigterm-{number}", "w") as handle:
        handle.write(repr(time.time()))
    sys.exit(0)

signal.signal(signal.SIGTERM, signal.SIG_IGN if args.get("term") == "ignore" else on_term)
print("trial", number, "training", flush=True)
end = time.monotonic() + float(args.get("seconds", 30))
step = 0
while time.monotonic() < end:
    step += 1
    kubetune.report(step=step, loss=1.0 / step)
    time.sleep(0.05)
"""

TIMED_OUT = "the trial timed out after 1 s: it ran longer than spec.trialTimeoutSeconds (TimedOut)"


@pytest.mark.parametrize("code", [0, 1, -signal.SIGTERM, -signal.SIGKILL])
def test_a_timeout_fails_the_trial_however_it_exited(code: int) -> None:
    end = trial_end(
        code,
        stop_reason=None,
        saw_objective=True,
        metric="loss",
        log_tail=["epoch 3"],
        metrics_tail=[],
        timed_out_after=1,
    )
    assert end.state == "failed"
    assert end.message is not None and end.message.startswith(TIMED_OUT + " and was stopped (")
    assert end.message.endswith("; last lines of its log:\n  epoch 3")
    # Recorded by the next run when the one that stopped it ended first: how it exited is unknown.
    assert timed_out(1, []).message == TIMED_OUT + " and was stopped\n(its log is empty)"


def _body(tmp_path: Path, args: list[str], **spec: Any) -> dict[str, Any]:
    (tmp_path / "trial.py").write_text(TRIAL)
    container = {"name": "train", "command": ["python", "trial.py"], "args": args}
    return experiment_body("slow", container, **{"maxTrials": 1, "trialTimeoutSeconds": 1, **spec})


def _manifest(tmp_path: Path, args: list[str], **spec: Any) -> Manifest:
    return parse_manifest(_body(tmp_path, args, **spec), tmp_path / "slow.yaml")


class _StartClock(ServiceSpy):
    """The service, noting when each trial was marked running (just before its process starts)."""

    def __init__(self, service: TuningService) -> None:
        super().__init__(service)
        self.started: dict[int, float] = {}

    def start(self, uid: str, number: int) -> None:
        self.started[number] = time.time()
        self.service.start(uid, number)


def test_a_trial_past_its_limit_is_stopped_within_a_poll_and_fails(tmp_path: Path) -> None:
    paths = run_paths(tmp_path, "slow")
    run = run_local(_manifest(tmp_path, []), paths, _StartClock, grace=2.0)
    result, trials, clock = run.result, run.trials, run.spy
    # It reported the objective and exited 0 on SIGTERM: failed all the same.
    assert trials[0]["state"] == "failed"
    assert trials[0]["last_step"] is not None
    message = trials[0]["message"]
    assert message.startswith(TIMED_OUT + " and was stopped (exited with code 0)")
    assert "trial 0 training" in message  # the last lines of its log, as other failures
    signalled = float((tmp_path / "sigterm-0").read_text())
    assert 1.0 <= signalled - clock.started[0] < 1.1
    assert result.status == "failed"
    assert result.elapsed is not None and result.elapsed < 1.0 + 2.0
    assert not paths.timed_out(0).exists()


def test_a_trial_within_its_limit_succeeds_beside_one_that_times_out(tmp_path: Path) -> None:
    manifest = _manifest(
        tmp_path,
        ["--seconds=${params.seconds}"],
        parameters=[{"name": "seconds", "type": "categorical", "values": ["0.3", "30"]}],
        algorithm={"name": "grid"},
        maxTrials=2,
        parallelism=2,
        trialTimeoutSeconds=2,
    )
    run = run_local(manifest, run_paths(tmp_path, "slow"), _StartClock, grace=2.0)
    result, trials = run.result, run.trials
    by_seconds = {t["params"]["seconds"]: t for t in trials.values()}
    assert by_seconds["0.3"]["state"] == "succeeded"
    assert by_seconds["0.3"]["objective"] is not None
    assert by_seconds["30"]["state"] == "failed"
    assert "the trial timed out after 2 s" in by_seconds["30"]["message"]
    assert result.status == "succeeded"
    assert result.summary.best is not None and result.summary.best.params["seconds"] == "0.3"


def test_a_trial_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    begun = time.monotonic()
    manifest = _manifest(tmp_path, ["--term=ignore"])
    trials = run_local(manifest, run_paths(tmp_path, "slow"), _StartClock, grace=0.5).trials
    took = time.monotonic() - begun
    assert trials[0]["state"] == "failed"
    assert trials[0]["message"].startswith(TIMED_OUT + " and was stopped (killed by SIGKILL)")
    assert 1.5 <= took < 1.5 + 1.5  # the limit, the grace, and starting up
    assert not (tmp_path / "sigterm-0").exists()


def _write_manifest(tmp_path: Path, args: list[str], **spec: Any) -> Path:
    path = tmp_path / "slow.yaml"
    path.write_text(yaml.safe_dump(_body(tmp_path, args, **spec), sort_keys=False))
    return path


def test_the_timeout_shows_in_the_live_log_trials_and_status_json(tmp_path: Path) -> None:
    _write_manifest(tmp_path, [], maxTrials=3, maxFailedTrials=0)
    run = kubetune("run", "slow.yaml", "--grace", "2", cwd=tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"trial 0 failed (log: .kubetune/slow/trial-0.log): {TIMED_OUT}" in run.stdout
    assert "Experiment slow FAILED" in run.stdout

    status = kubetune("status", "slow", "-o", "json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["status"] == "failed"
    assert doc["counts"]["failed"] == 1  # counted toward maxFailedTrials
    assert doc["reason"] == "1 trials failed, more than maxFailedTrials (0)"

    shown = json.loads(kubetune("trials", "slow", "-o", "json", cwd=tmp_path).stdout)
    assert [(t["state"], t["message"].startswith(TIMED_OUT)) for t in shown] == [("failed", True)]
    table = kubetune("trials", "slow", cwd=tmp_path).stdout
    assert TIMED_OUT in table.splitlines()[1]


def _wait_for(path: Path, runner: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if time.monotonic() > deadline or runner.poll() is not None:
            runner.kill()
            runner.communicate()
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.02)


def _group_gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "kill -9"])
def test_a_timed_out_trial_is_not_rerun_when_its_run_ends_first(tmp_path: Path, how: str) -> None:
    # The trial ignores SIGTERM: the run ends during its grace period.
    _write_manifest(tmp_path, ["--term=ignore"])
    runner = subprocess.Popen(
        [sys.executable, "-m", "kubetune_suggestion.cli", "run", "slow.yaml", "--grace", "3"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    logs = tmp_path / ".kubetune" / "slow"
    _wait_for(logs / "trial-0.timedout", runner)
    pid = int((logs / "trial-0.pid").read_text())
    if how == "ctrl-c":
        runner.send_signal(signal.SIGINT)
        out, err = runner.communicate(timeout=30)
        # Interrupted, but the trial is recorded failed rather than left to re-run.
        assert runner.returncode == 130, out + err
        assert f"trial 0 failed (log: .kubetune/slow/trial-0.log): {TIMED_OUT}" in out
    else:
        runner.send_signal(signal.SIGKILL)
        runner.communicate(timeout=30)
        deadline = time.monotonic() + 5
        while not _group_gone(pid):  # it dies with its runner
            assert time.monotonic() < deadline
            time.sleep(0.02)

    again = kubetune("run", "slow.yaml", "-o", "json", cwd=tmp_path)
    assert again.returncode == 1, again.stdout + again.stderr
    doc = json.loads(again.stdout)
    assert {state: n for state, n in doc["counts"].items() if n} == {"failed": 1}
    assert doc["reason"] == "maxTrials (1) reached, but no trial produced the objective"
    (trial,) = json.loads(kubetune("trials", "slow", "-o", "json", cwd=tmp_path).stdout)
    assert trial["state"] == "failed" and trial["message"].startswith(TIMED_OUT)
    assert "re-run" not in (logs / "trial-0.log").read_text()  # its clock was not reset
    assert not (logs / "trial-0.timedout").exists()
