"""The runner and its trial processes: stop latency, dying with the runner, duplicates."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from kubetune_suggestion.runner.manifest import Manifest, parse_manifest
from kubetune_suggestion.service.core import TuningService
from kubetune_suggestion.service.models import StopAnswer
from tests.suggestion.runner.harness import (
    ServiceSpy,
    experiment_body,
    kubetune,
    run_local,
    run_paths,
)

# Trial 0 is good, every later trial worse than all before it: ASHA stops them at rung 1. Each trial
# notes when it reported step 1 and when SIGTERM reached it (wall clock,
# comparable across processes).
EPOCHS = """
import os, signal, sys, time
import kubetune

number = int(os.environ["KUBETUNE_TRIAL_NUMBER"])

def on_term(signum, frame):
    with open(f"sigterm-{number}", "w") as handle:
        handle.write(repr(time.time()))
    sys.exit(0)

signal.signal(signal.SIGTERM, on_term)
for step in range(1, 101):
    time.sleep(0.01)
    kubetune.report(step=step, loss=0.1 if number == 0 else 5.0 + number)
    if step == 1:
        with open(f"reported-{number}", "w") as handle:
            handle.write(repr(time.time()))
"""


def _manifest(tmp_path: Path, script: str, **spec: Any) -> Manifest:
    (tmp_path / "t.py").write_text(script)
    container = {"name": "t", "command": ["python", "t.py"]}
    body = experiment_body("procs", container, **{"maxTrials": 2, "parallelism": 1, **spec})
    return parse_manifest(body, tmp_path / "procs.yaml")


class _DecisionClock(ServiceSpy):
    """The service, noting when it first decided that each trial should stop."""

    def __init__(self, service: TuningService) -> None:
        super().__init__(service)
        self.decided: dict[int, float] = {}

    def report(
        self, uid: str, number: int, token: str, step: int, metrics: dict[str, float]
    ) -> StopAnswer:
        answer = self.service.report(uid, number, token, step, metrics)
        if answer.stop:
            self.decided.setdefault(number, time.time())
        return answer


def test_a_stop_reaches_the_trial_within_50_ms_of_the_decision(tmp_path: Path) -> None:
    manifest = _manifest(
        tmp_path,
        EPOCHS,
        earlyStopping={"name": "asha", "minResource": 1, "maxResource": 100},
        maxTrials=6,
    )
    # The CLI's poll interval: the stop must not wait for the next poll.
    run = run_local(manifest, run_paths(tmp_path, "procs"), _DecisionClock)
    result, clock = run.result, run.spy
    counts = {str(state): n for state, n in result.summary.counts.items()}
    assert (counts["succeeded"], counts["pruned"]) == (1, 5)
    assert sorted(clock.decided) == [1, 2, 3, 4, 5]
    for number, decided in clock.decided.items():
        signalled = float((tmp_path / f"sigterm-{number}").read_text())
        reported = float((tmp_path / f"reported-{number}").read_text())
        assert 0 <= signalled - decided < 0.05
        # The decision is due once the trial reported rung 1: no waiting for a slow poll either.
        assert signalled - reported < 0.05


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone but not yet reaped


def test_trials_die_with_a_killed_runner_and_a_survivor_blocks_a_rerun(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, "import time\ntime.sleep(600)\n", parallelism=2)
    (tmp_path / "procs.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "Experiment",
                "metadata": {"name": "procs"},
                "spec": manifest.raw_spec,
            }
        )
    )
    runner = subprocess.Popen(
        [sys.executable, "-m", "kubetune_suggestion.cli", "run", "procs.yaml"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    trials = tmp_path / ".kubetune" / "procs"
    pid_files = [trials / "trial-0.pid", trials / "trial-1.pid"]
    deadline = time.monotonic() + 60
    try:
        while not all(p.exists() and p.read_text().strip() for p in pid_files):
            assert time.monotonic() < deadline and runner.poll() is None
            time.sleep(0.05)
    except AssertionError:
        runner.terminate()  # it stops its trials
        runner.wait(timeout=60)
        raise
    pids = [int(p.read_text()) for p in pid_files]
    assert all(_alive(pid) for pid in pids)
    runner.send_signal(signal.SIGKILL)
    runner.wait(timeout=10)
    deadline = time.monotonic() + 2
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, "trial processes outlived their runner"
        time.sleep(0.02)
    # Nothing runs them any more: they do not show as running.
    shown = json.loads(kubetune("trials", "procs", "-o", "json", cwd=tmp_path).stdout)
    assert [t["state"] for t in shown] == ["interrupted", "interrupted"]
    status = json.loads(kubetune("status", "procs", "-o", "json", cwd=tmp_path).stdout)
    assert status["status"] == "interrupted" and status["counts"]["interrupted"] == 2

    # A trial process that survived anyway (here: a stand-in) keeps a re-run from duplicating it.
    survivor = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        pid_files[1].write_text(f"{survivor.pid}\n")
        again = kubetune("run", "procs.yaml", cwd=tmp_path)
        assert again.returncode == 1
        assert (
            f"trial 1 of an earlier run is still running (process group {survivor.pid})"
            in again.stderr
        )
        assert not (trials / "trial-0.log").read_text().count("re-run after an interrupted run")
    finally:
        survivor.kill()
        survivor.wait()
