"""`kubetune curves`: the rows and their layout, then the real CLI on finished and running runs."""

from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kubetune_suggestion.runner.curves import csv_rows, curves_of, render_curves
from kubetune_suggestion.service.models import ObservationView, TrialState, TrialView
from tests.suggestion.runner.harness import kubetune
from tests.suggestion.runner.test_run_cli import _manifest


def _trial(number: int, state: str, *reports: tuple[int, dict[str, float]]) -> TrialView:
    return TrialView(
        number=number,
        state=TrialState(state),
        params={"x": 0.5},
        objective=None,
        last_step=reports[-1][0] if reports else None,
        stop_reason=None,
        message=None,
        created_at=None,
        started_at=None,
        finished_at=None,
        observations=[ObservationView(step=s, metrics=m) for s, m in reports],
    )


def test_rows_columns_table_and_csv() -> None:
    trials = [
        _trial(1, "running", (1, {"z_loss": 0.5, "acc": 0.25})),
        _trial(0, "succeeded", (2, {"z_loss": 0.125}), (1, {"z_loss": 1.0, "lr": 0.1})),
        _trial(2, "failed"),
    ]
    curves = curves_of(trials, "z_loss", runner_alive=False)
    assert curves.metrics == ("z_loss", "acc", "lr")  # the objective first, the rest by name
    assert [(r.trial, r.state, r.step, r.values) for r in curves.rows] == [
        (0, "succeeded", 1, (1.0, None, 0.1)),
        (0, "succeeded", 2, (0.125, None, None)),
        (1, "interrupted", 1, (0.5, 0.25, None)),  # no runner runs it any more
        (2, "failed", None, (None, None, None)),
    ]
    assert curves_of(trials, "z_loss", runner_alive=True).rows[2].state == "running"
    assert render_curves(curves, best=0) == [
        "trial  state        step  z_loss   acc   lr",
        "0*     succeeded       1       1     -  0.1",
        "                       2   0.125     -    -",
        "1      interrupted     1     0.5  0.25    -",
        "2      failed          -       -     -    -",
        "* best trial",
    ]
    assert csv_rows(curves) == [
        ["trial", "state", "step", "z_loss", "acc", "lr"],
        ["0", "succeeded", "1", "1.0", "", "0.1"],
        ["0", "succeeded", "2", "0.125", "", ""],
        ["1", "interrupted", "1", "0.5", "0.25", ""],
    ]  # a trial without reports has no CSV row
    assert render_curves(curves_of([], "loss", runner_alive=False), best=None) == [
        "trial  state  step  loss"
    ]


def _expected(x: float, step: int) -> dict[str, float]:
    """What the test trial reports (test_run_cli.TRIAL with --extra=1)."""
    reported = {"loss": (x - 0.3) ** 2 + 1.0 / step}
    if step % 2 == 0:
        reported["acc"] = x * step
    return reported


def _curves_json(name: str, cwd: Path) -> list[dict[str, Any]]:
    result = kubetune("curves", name, "-o", "json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    documents: list[dict[str, Any]] = json.loads(result.stdout)
    return documents


def _csv(name: str, cwd: Path, metrics: list[str]) -> list[dict[str, str]]:
    result = kubetune("curves", name, "-o", "csv", cwd=cwd)
    assert result.returncode == 0, result.stderr
    reader = csv.DictReader(io.StringIO(result.stdout))
    assert reader.fieldnames == ["trial", "state", "step", *metrics]
    return list(reader)


def test_curves_of_a_finished_run_match_what_the_trials_reported(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, args=["--steps=4", "--extra=1"], maxTrials=3)
    run = kubetune("run", manifest, "-o", "json", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    best = json.loads(run.stdout)["best"]["trial"]
    documents = _curves_json("tiny", tmp_path)
    xs = {d["number"]: d["params"]["x"] for d in documents}
    assert sorted(xs) == [0, 1, 2]
    for document in documents:  # the `trials -o json` documents, with every report
        assert document["state"] == "succeeded"
        assert [(o["step"], o["metrics"]) for o in document["observations"]] == [
            (step, pytest.approx(_expected(xs[document["number"]], step))) for step in (1, 2, 3, 4)
        ]

    rows = _csv("tiny", tmp_path, ["loss", "acc"])
    assert [(int(r["trial"]), int(r["step"])) for r in rows] == [
        (n, step) for n in (0, 1, 2) for step in (1, 2, 3, 4)
    ]
    for row in rows:
        expected = _expected(xs[int(row["trial"])], int(row["step"]))
        assert row["state"] == "succeeded"
        assert float(row["loss"]) == pytest.approx(expected["loss"], rel=1e-15)
        if "acc" in expected:
            assert float(row["acc"]) == pytest.approx(expected["acc"], rel=1e-15)
        else:
            assert row["acc"] == ""  # not reported at this step

    table = kubetune("curves", manifest, cwd=tmp_path)  # by manifest, as the other commands
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["trial", "state", "step", "loss", "acc"]
    assert lines[-1] == "* best trial"
    trial = -1
    for line in lines[1:-1]:
        cells = line.split()
        if len(cells) == 5:  # a trial's first row: its number and state
            trial = int(cells[0].rstrip("*"))
            assert cells[0].endswith("*") == (trial == best)
            assert cells[1] == "succeeded"
            cells = cells[2:]
        expected = _expected(xs[trial], int(cells[0]))
        assert cells[1] == f"{expected['loss']:.5g}"
        assert cells[2] == (f"{expected['acc']:.5g}" if "acc" in expected else "-")
    assert len(lines) == 1 + 3 * 4 + 1


def test_an_unknown_experiment_is_a_clear_error(tmp_path: Path) -> None:
    for output in ("table", "csv", "json"):
        result = kubetune("curves", "nope", "-o", output, cwd=tmp_path)
        assert result.returncode == 2
        assert result.stdout == ""
        assert result.stderr == (
            "kubetune: error: no local experiment 'nope' under .kubetune "
            f"({Path('.kubetune') / 'nope.db'} is missing)\n"
        )
    # csv is the curves' format only
    assert kubetune("trials", "nope", "-o", "csv", cwd=tmp_path).returncode == 2


@pytest.mark.slow
def test_curves_of_a_running_run_then_of_the_interrupted_one(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, args=["--steps=200", "--delay=0.05"], maxTrials=2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetune_suggestion.cli", "run", str(manifest), "-o", "json"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / ".kubetune" / "tiny.db").exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        # Read while the run writes: both trials running, each with some steps.
        while True:
            documents = _curves_json("tiny", tmp_path)
            if len(documents) == 2 and all(len(d["observations"]) >= 2 for d in documents):
                break
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        for document in documents:
            assert document["state"] == "running"
            x = document["params"]["x"]
            observations = document["observations"]
            assert [o["step"] for o in observations] == list(range(1, len(observations) + 1))
            for o in observations:
                assert o["metrics"] == pytest.approx({"loss": _expected(x, o["step"])["loss"]})
        seen = _csv("tiny", tmp_path, ["loss"])  # only the metrics reported
        assert {r["state"] for r in seen} == {"running"}
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    after = _csv("tiny", tmp_path, ["loss"])
    assert {r["state"] for r in after} == {"interrupted"}
    steps = {(r["trial"], r["step"]): r["loss"] for r in after}
    assert {(r["trial"], r["step"]): r["loss"] for r in seen}.items() <= steps.items()
