"""`kubetune run` end to end: real trial processes, a real SQLite store, the real CLI."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.suggestion.runner.harness import experiment_body, kubetune

TRIAL = """
import os, sys, time
import kubetune

args = dict(a.lstrip("-").split("=", 1) for a in sys.argv[1:])
x = float(args["x"])
steps = int(args.get("steps", 3))
delay = float(args.get("delay", 0.0))
if args.get("odd_slow") and int(os.environ["KUBETUNE_TRIAL_NUMBER"]) % 2:
    delay *= 20
number, name = os.environ["KUBETUNE_TRIAL_NUMBER"], os.environ["KUBETUNE_EXPERIMENT"]
print("trial", number, "of", name, "x", x, flush=True)
if args.get("fail") == "always":
    print("boom: this trial is meant to fail", file=sys.stderr)
    sys.exit(3)
if args.get("nan"):
    kubetune.report(step=1, loss=float("nan"))
if args.get("silent"):
    print("training without reporting anything")
    sys.exit(0)
for step in range(1, steps + 1):
    time.sleep(delay)
    # --extra=1: a second metric, on even steps only.
    extra = {"acc": x * step} if args.get("extra") and step % 2 == 0 else {}
    kubetune.report(step=step, loss=(x - 0.3) ** 2 + 1.0 / step, **extra)
"""


def _manifest(
    tmp_path: Path, name: str = "tiny", args: list[str] | None = None, **spec: Any
) -> Path:
    (tmp_path / "trial.py").write_text(TRIAL)
    container = {
        "name": "train",
        "image": "trial:1",
        "command": ["python", "trial.py"],
        "args": ["--x=${params.x}", *(args or [])],
    }
    defaults = {"algorithm": {"name": "random", "seed": 3}, "maxTrials": 4, "parallelism": 2}
    body = experiment_body(name, container, **{**defaults, **spec})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def _trials(manifest: Path, cwd: Path) -> list[dict[str, Any]]:
    result = kubetune("trials", manifest, "-o", "json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    trials: list[dict[str, Any]] = json.loads(result.stdout)
    return trials


def test_run_json_reports_the_best_of_max_trials(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    result = kubetune("run", manifest, "-o", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(result.stdout)  # one JSON document and nothing else
    assert doc["experiment"] == "tiny"
    assert doc["status"] == "succeeded"
    assert doc["trials"] == doc["maxTrials"] == 4
    assert doc["counts"]["succeeded"] == 4
    assert doc["store"] == str(Path(".kubetune") / "tiny.db")
    assert (tmp_path / ".kubetune" / "tiny.db").is_file()
    trials = _trials(manifest, tmp_path)
    assert sorted(t["number"] for t in trials) == [0, 1, 2, 3]
    finals = {t["number"]: t["objective"] for t in trials}
    best = min(finals, key=lambda n: finals[n])
    assert doc["best"]["trial"] == best
    assert doc["best"]["objective"] == pytest.approx(finals[best])
    assert doc["best"]["objective"] == pytest.approx(
        (doc["best"]["params"]["x"] - 0.3) ** 2 + 1 / 3
    )
    # Each trial ran with its identity in the environment and its output in its log.
    log = (tmp_path / ".kubetune" / "tiny" / "trial-2.log").read_text()
    assert "trial 2 of tiny x" in log
    # Running it again continues the same, finished experiment: nothing new runs.
    again = kubetune("run", manifest, "-o", "json", cwd=tmp_path)
    assert again.returncode == 0
    assert json.loads(again.stdout)["best"] == doc["best"]
    assert len(_trials(manifest, tmp_path)) == 4
    # A changed search space cannot continue the stored experiment: a clear error.
    manifest.write_text(manifest.read_text().replace("max: 1.0", "max: 2.0"))
    changed = kubetune("run", manifest, cwd=tmp_path)
    assert changed.returncode == 2
    assert "spec.parameters cannot change" in changed.stderr
    assert "rename the experiment or delete the store" in changed.stderr


def test_plain_progress_and_final_summary_when_not_a_tty(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, maxTrials=2)
    result = kubetune("run", manifest, "--dir", "state", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "\x1b[" not in out  # no cursor movement in a pipe
    assert "trial 0 started: x=" in out
    assert "trial 1 succeeded: loss=" in out
    assert "Experiment tiny succeeded" in out
    assert "best: trial" in out
    assert "state/tiny.db" in out
    status = kubetune("status", "tiny", "--dir", "state", cwd=tmp_path)
    assert status.returncode == 0 and "2/2 trials done: 2 succeeded" in status.stdout
    table = kubetune("trials", "tiny", "--dir", "state", cwd=tmp_path)
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].split()[:4] == ["trial", "state", "loss", "step"]


def test_too_many_failed_trials_fail_the_experiment(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, args=["--fail=always"], maxTrials=6, maxFailedTrials=1)
    result = kubetune("run", manifest, "-o", "json", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert doc["status"] == "failed"
    assert "more than maxFailedTrials (1)" in doc["reason"]
    assert doc["best"] is None
    trials = _trials(manifest, tmp_path)
    failed = [t for t in trials if t["state"] == "failed"]
    assert len(failed) >= 2
    assert len(trials) < 6  # no new trial once the experiment failed
    assert "exited with code 3" in failed[0]["message"]
    assert "boom: this trial is meant to fail" in failed[0]["message"]


def test_reaching_the_target_ends_the_experiment_and_stops_running_trials(tmp_path: Path) -> None:
    manifest = _manifest(
        tmp_path,
        args=["--delay=0.05", "--odd_slow=1"],
        maxTrials=6,
        parallelism=2,
        objective={"metric": "loss", "direction": "minimize", "target": 10.0},
    )
    result = kubetune("run", manifest, "-o", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert doc["status"] == "succeeded"
    assert doc["reason"] == "objective target 10 reached"
    trials = {t["number"]: t for t in _trials(manifest, tmp_path)}
    assert trials[0]["state"] == "succeeded"
    assert trials[1]["state"] == "pruned"  # still running when the target was reached
    assert "the experiment ended: objective target 10 reached" in trials[1]["message"]
    assert len(trials) < 6


@pytest.mark.parametrize(
    ("command", "field"),
    [
        ("- ./no-such-program\n", "command[0]: './no-such-program' does not exist"),
        ("- no-such-program\n", "command[0]: 'no-such-program' is not on PATH"),
    ],
)
def test_a_command_that_cannot_start_is_refused_before_any_trial(
    tmp_path: Path, command: str, field: str
) -> None:
    manifest = _manifest(tmp_path, maxTrials=1)
    manifest.write_text(manifest.read_text().replace("- python\n", command))
    result = kubetune("run", manifest, cwd=tmp_path)
    assert result.returncode == 2
    assert f"kubetune: error: spec.template.spec.containers[0].{field}" in result.stderr
    assert not (tmp_path / ".kubetune" / "tiny.db").exists()


def test_without_max_failed_trials_five_failures_in_a_row_end_the_run(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, args=["--fail=always"], maxTrials=40, parallelism=2)
    result = kubetune("run", manifest, "-o", "json", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert doc["status"] == "failed"
    # 5, or 6 when the trial running beside the fifth failed in the same moment.
    assert doc["reason"].startswith(f"{doc['counts']['failed']} trials failed in a row")
    assert "maxFailedTrials unset" in doc["reason"]
    assert doc["counts"]["failed"] in (5, 6)
    status = json.loads(kubetune("status", manifest, "-o", "json", cwd=tmp_path).stdout)
    assert (status["status"], status["reason"]) == ("failed", doc["reason"])


def test_a_trial_that_never_reports_ends_metrics_unavailable(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, args=["--silent=1"], maxTrials=1)
    result = kubetune("run", manifest, "-o", "json", cwd=tmp_path)
    assert result.returncode == 1  # no trial produced the objective
    (trial,) = _trials(manifest, tmp_path)
    assert trial["state"] == "metrics_unavailable"
    assert "never reported 'loss'" in trial["message"]
    assert "training without reporting anything" in trial["message"]


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda b: b.update(apiVersion="kubetune.io/v2"), "apiVersion"),
        (lambda b: b["metadata"].update(name="Not_A_Name"), "metadata.name"),
        (lambda b: b["spec"]["parameters"][0].update(min=2.0), "spec.parameters[0]"),
        (lambda b: b["spec"].update(maxTrials=0), "spec.maxTrials"),
        (
            lambda b: b["spec"]["template"]["spec"]["containers"][0]["args"].append(
                "--y=${params.y}"
            ),
            "spec.template.spec.containers[0].args[1]",
        ),
    ],
)
def test_a_bad_manifest_exits_2_naming_the_field(tmp_path: Path, edit: Any, field: str) -> None:
    manifest = _manifest(tmp_path)
    body = yaml.safe_load(manifest.read_text())
    edit(body)
    manifest.write_text(yaml.safe_dump(body))
    result = kubetune("run", manifest, cwd=tmp_path)
    assert result.returncode == 2
    assert f"kubetune: error: {field}" in result.stderr
    assert not (tmp_path / ".kubetune" / "tiny.db").exists()


def test_a_missing_or_invalid_file_exits_2(tmp_path: Path) -> None:
    assert "file: cannot read" in kubetune("run", "nope.yaml", cwd=tmp_path).stderr
    (tmp_path / "bad.yaml").write_text("spec: [unclosed\n")
    result = kubetune("run", "bad.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "is not valid YAML at line" in result.stderr


def test_early_stopping_prunes_with_asha(tmp_path: Path) -> None:
    manifest = _manifest(
        tmp_path,
        args=["--steps=9", "--delay=0.05"],
        maxTrials=8,
        parallelism=2,
        earlyStopping={"name": "asha", "minResource": 1, "maxResource": 9, "reductionFactor": 3},
    )
    result = kubetune("run", manifest, "-o", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert doc["trials"] == 8
    assert doc["counts"]["pruned"] >= 1
    pruned = [t for t in _trials(manifest, tmp_path) if t["state"] == "pruned"]
    assert all("ASHA" in t["stop_reason"] for t in pruned)
    assert all(t["last_step"] < 9 for t in pruned)  # stopped before the end, not after


@pytest.mark.slow
def test_ctrl_c_then_rerun_continues_without_repeating_finished_trials(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, args=["--steps=4", "--delay=0.25"], maxTrials=6, parallelism=2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetune_suggestion.cli", "run", str(manifest), "-o", "json"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    logs = tmp_path / ".kubetune" / "tiny"
    deadline = time.monotonic() + 60
    # Interrupt once trials 0-1 are done and 2-3 are running.
    while not (logs / "trial-3.log").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    doc = json.loads(out)
    assert doc["status"] == "interrupted"
    assert "running" not in doc["counts"]  # nothing runs once the run is over
    before = {t["number"]: t for t in _trials(manifest, tmp_path)}
    finished = {n: t for n, t in before.items() if t["state"] not in ("interrupted", "pending")}
    interrupted = sorted(n for n, t in before.items() if t["state"] == "interrupted")
    assert finished and interrupted
    assert doc["counts"]["interrupted"] == len(interrupted)
    # Interrupted trial processes are gone: nothing is left writing to their logs.
    sizes = {n: (logs / f"trial-{n}.log").stat().st_size for n in interrupted}
    time.sleep(0.6)
    assert sizes == {n: (logs / f"trial-{n}.log").stat().st_size for n in interrupted}

    result = kubetune("run", manifest, "-o", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    after = {t["number"]: t for t in _trials(manifest, tmp_path)}
    assert sorted(after) == list(range(6))  # maxTrials in all, numbers dense
    assert doc["counts"]["succeeded"] == 6
    for number, trial in finished.items():
        assert after[number]["finished_at"] == trial["finished_at"]  # not run again
        assert after[number]["objective"] == trial["objective"]
    for number in interrupted:
        assert after[number]["params"] == before[number]["params"]  # same configuration
        assert "re-run after an interrupted run" in (logs / f"trial-{number}.log").read_text()


def test_a_second_run_of_the_same_experiment_is_refused_while_one_runs(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, args=["--steps=600", "--delay=0.1"], maxTrials=1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetune_suggestion.cli", "run", str(manifest)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / ".kubetune" / "tiny" / "trial-0.log").exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        second = kubetune("run", manifest, cwd=tmp_path)
        assert second.returncode == 1
        assert "already being run by pid" in second.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def test_live_table_on_a_terminal(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, args=["--steps=3", "--delay=0.3"], maxTrials=2)
    leader, follower = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetune_suggestion.cli", "run", str(manifest)],
        cwd=tmp_path,
        stdout=follower,
        stderr=follower,
        env={**os.environ, "COLUMNS": "120"},
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(timeout=60) == 0
    screen = b"".join(chunks).decode()
    assert "\x1b[" in screen  # redrawn in place
    assert "kubetune run tiny" in screen
    assert any(
        line.split() == ["trial", "time", "step", "loss", "params"] for line in screen.splitlines()
    )
    assert "Experiment tiny succeeded" in screen


def test_the_resume_hint_after_ctrl_c_continues_the_same_experiment(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, args=["--steps=3", "--delay=0.3"], maxTrials=1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetune_suggestion.cli", "run", "tiny.yaml", "--dir", "my state"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "my state" / "tiny" / "trial-0.log").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = out.splitlines()
    (at,) = [i for i, line in enumerate(lines) if line.endswith("the same command to continue:")]
    hint = lines[at + 1]
    command = shlex.split(hint)
    assert command[:2] == ["kubetune", "run"]
    resumed = kubetune(*command[1:], cwd=tmp_path)  # run as printed
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "continuing: 0/1 trials already done, 1 interrupted to re-run" in resumed.stdout
    assert not (tmp_path / ".kubetune").exists()  # nothing started elsewhere
    assert manifest.exists()


def test_status_tells_the_outcome_the_run_ended_with_in_the_same_json_schema(
    tmp_path: Path,
) -> None:
    manifest = _manifest(tmp_path, args=["--silent=1"], maxTrials=2)
    run = kubetune("run", manifest, "-o", "json", cwd=tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    ran = json.loads(run.stdout)
    assert ran["status"] == "failed"
    assert ran["reason"] == "maxTrials (2) reached, but no trial produced the objective"
    status = kubetune("status", manifest, "-o", "json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    told = json.loads(status.stdout)
    assert list(told) == list(ran)  # one schema
    assert told["elapsedSeconds"] is None  # only a run knows how long it took
    for key in ("experiment", "uid", "status", "reason", "objective", "best", "counts"):
        assert told[key] == ran[key], key
    table = kubetune("status", manifest, cwd=tmp_path)
    assert table.stdout.splitlines()[0] == (
        "Experiment tiny FAILED: maxTrials (2) reached, but no trial produced the objective"
    )


@pytest.mark.parametrize(
    ("arg", "last_line"),
    [
        ("--fail=always", "boom: this trial is meant to fail"),
        ("--nan=1", "ValueError: metric 'loss' must be finite, got nan"),
    ],
)
def test_a_crash_shows_the_last_lines_of_its_log(tmp_path: Path, arg: str, last_line: str) -> None:
    manifest = _manifest(tmp_path, args=[arg], maxTrials=1)
    result = kubetune("run", manifest, cwd=tmp_path)
    assert result.returncode == 1
    live = result.stdout.splitlines()
    (at,) = [i for i, line in enumerate(live) if "trial 0 failed" in line]
    assert live[at].endswith("last lines of its log:")
    assert f"  {last_line}" in live[at + 1 : at + 12]
    table = kubetune("trials", manifest, cwd=tmp_path).stdout.splitlines()
    assert table[1].endswith("last lines of its log:")
    assert f"      {last_line}" in table[2:]


def _without_root_powers() -> list[str]:
    """A prefix that makes file modes bind this process even as root (no CAP_DAC_OVERRIDE)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only folder would still be writable")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]


def test_a_read_only_dir_gives_a_one_line_error(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, maxTrials=1)
    assert kubetune("run", manifest, cwd=tmp_path).returncode == 0
    (tmp_path / "locked").mkdir()
    paths = [tmp_path / "locked", *(tmp_path / ".kubetune").rglob("*"), tmp_path / ".kubetune"]
    for path in paths:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        for args in (
            ["status", "tiny"],
            ["trials", "tiny"],
            ["run", manifest.name],
            ["run", manifest.name, "--dir", "locked/state"],
        ):
            result = subprocess.run(
                [*_without_root_powers(), sys.executable, "-m", "kubetune_suggestion.cli", *args],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert result.returncode == 2, (args, result.stderr)
            (line,) = result.stderr.splitlines()  # one line, no traceback
            assert line.startswith("kubetune: error: "), args
            assert "Permission denied" in line or "readonly database" in line, args
    finally:
        for path in paths:
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_grace_must_not_be_negative_and_version_is_known(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    result = kubetune("run", manifest, "--grace", "-1", cwd=tmp_path)
    assert result.returncode == 2
    assert "argument --grace: must be 0 or more seconds, got -1" in result.stderr
    assert not (tmp_path / ".kubetune").exists()
    version = kubetune("--version", cwd=tmp_path)
    assert version.returncode == 0
    assert version.stdout.strip() == f"kubetune {importlib.metadata.version('kubetune')}"
