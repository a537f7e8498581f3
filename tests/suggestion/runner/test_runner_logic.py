"""The runner's pure parts: manifest checks, trial and experiment outcomes, the progress table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubetune_suggestion.runner.manifest import experiment_uid, parse_manifest
from kubetune_suggestion.runner.outcome import (
    experiment_outcome,
    failure_streak,
    grid_exhausted,
    shown_counts,
    trial_end,
)
from kubetune_suggestion.runner.process import describe_exit, resolve_command
from kubetune_suggestion.runner.progress import (
    Best,
    RunningTrial,
    Snapshot,
    format_params,
    render_table,
)
from kubetune_suggestion.spec import ExperimentSpec, SpecError, parse_experiment


def _spec(**extra: Any) -> ExperimentSpec:
    return parse_experiment(
        {
            "objective": {"metric": "loss", "direction": "minimize", **extra.pop("objective", {})},
            "parameters": [{"name": "x", "type": "float", "min": 0.0, "max": 1.0}],
            "template": {"spec": {"containers": [{"name": "t", "command": ["python", "t.py"]}]}},
            **extra,
        }
    )


def _body(**metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "Experiment",
        "metadata": {"name": "demo", **metadata},
        "spec": _spec().model_dump(mode="json"),
    }


def test_manifest_uid_is_derived_from_the_name() -> None:
    manifest = parse_manifest(_body(), Path("demo.yaml"))
    assert manifest.uid == experiment_uid("demo") == parse_manifest(_body(), Path("x.yaml")).uid
    assert experiment_uid("demo") != experiment_uid("demo2")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], "file"),
        ({**_body(), "apiVersion": "v1"}, "apiVersion"),
        ({**_body(), "kind": "Trial"}, "kind"),
        ({**_body(), "metadata": None}, "metadata"),
        ({**_body(), "metadata": {}}, "metadata.name"),
        ({**_body(), "metadata": {"name": "-bad-"}}, "metadata.name"),
        ({**_body(), "spec": None}, "spec"),
        ({**_body(), "spec": {**_body()["spec"], "parallelism": 0}}, "spec.parallelism"),
    ],
)
def test_manifest_errors_name_the_field(body: Any, field: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_manifest(body, Path("demo.yaml"))
    assert info.value.field == field


def test_trial_end_classification() -> None:
    common: dict[str, Any] = {
        "metric": "loss",
        "log_tail": ["epoch 1", "Traceback", "ValueError: x"],
        "metrics_tail": [],
    }
    assert trial_end(0, stop_reason=None, saw_objective=True, **common).state == "succeeded"
    pruned = trial_end(-15, stop_reason="ASHA rung 1", saw_objective=True, **common)
    assert (pruned.state, pruned.message) == ("pruned", "ASHA rung 1")
    failed = trial_end(2, stop_reason=None, saw_objective=True, **common)
    assert failed.state == "failed"
    assert failed.message is not None and "exited with code 2" in failed.message
    assert failed.message.endswith("  Traceback\n  ValueError: x")
    killed = trial_end(-9, stop_reason=None, saw_objective=False, **common)
    assert killed.message is not None and "killed by SIGKILL" in killed.message
    silent = trial_end(
        0, stop_reason=None, saw_objective=False, **{**common, "metrics_tail": ["acc=0.5"]}
    )
    assert silent.state == "metrics_unavailable"
    assert (
        silent.message is not None
        and "never reported 'loss'" in silent.message
        and "acc=0.5" in silent.message
    )


def test_experiment_outcome_rules() -> None:
    spec = _spec(maxTrials=4, maxFailedTrials=1, objective={"target": 0.1})
    assert experiment_outcome(spec, {"succeeded": 2}, 0.5) is None
    done = experiment_outcome(spec, {"succeeded": 3, "pruned": 1}, 0.5)
    assert done is not None and done.succeeded and "maxTrials (4) reached" in done.reason
    target = experiment_outcome(spec, {"succeeded": 1}, 0.1)
    assert target is not None and target.succeeded and "target 0.1 reached" in target.reason
    failed = experiment_outcome(spec, {"failed": 1, "metrics_unavailable": 1}, None)
    assert (
        failed is not None
        and not failed.succeeded
        and "more than maxFailedTrials (1)" in failed.reason
    )
    assert (
        experiment_outcome(spec, {"failed": 1, "succeeded": 1}, 0.5) is None
    )  # 1 failure is allowed
    nothing = experiment_outcome(spec, {"pruned": 4}, None)
    assert nothing is not None and not nothing.succeeded and "no trial produced" in nothing.reason
    grid = experiment_outcome(spec, {"succeeded": 2}, 0.5, exhausted=True)
    assert grid is not None and grid.succeeded and "exhausted" in grid.reason
    maximize = _spec(objective={"direction": "maximize", "target": 0.9})
    assert experiment_outcome(maximize, {"succeeded": 1}, 0.8) is None
    assert experiment_outcome(maximize, {"succeeded": 1}, 0.95) is not None


def test_progress_table() -> None:
    snapshot = Snapshot(
        name="demo",
        metric="val_loss",
        elapsed=12.3,
        max_trials=10,
        counts={"succeeded": 3, "pruned": 2, "failed": 1, "running": 2},
        best=Best(4, {"lr": 0.0123456, "optimizer": "adam"}, 0.123456789),
        running=[
            RunningTrial(7, {"lr": 0.1}, 1.5, last_step=3, last_value=0.5),
            RunningTrial(6, {"lr": 0.2}, 2.5, stopping=True),
        ],
    )
    lines = render_table(snapshot)
    assert "trials 6/10 done: 2 running, 3 succeeded, 2 pruned, 1 failed" in lines[0]
    assert lines[1] == "best  trial 4  val_loss=0.12346  lr=0.01235 optimizer=adam"
    assert lines[2].split() == ["trial", "time", "step", "val_loss", "params"]
    assert lines[3].split()[:4] == ["6", "2.5s", "-", "-"] and lines[3].endswith("(stopping)")
    assert lines[4].split() == ["7", "1.5s", "3", "0.5", "lr=0.1"]
    empty = render_table(Snapshot("demo", "loss", 0.0, 5, {}, None))
    assert "no finished trial reported loss yet" in empty[1]
    assert len(empty) == 2


def test_small_helpers() -> None:
    assert format_params({"a": 1, "b": True, "c": 1e-5}) == "a=1 b=true c=1e-05"
    assert describe_exit(1) == "exited with code 1"
    assert describe_exit(-15) == "killed by SIGTERM"
    import sys

    assert resolve_command(["python", "t.py"]) == [sys.executable, "t.py"]
    assert resolve_command(["python3", "-m", "x"])[0] == sys.executable
    assert resolve_command(["bash", "-c", "python x"]) == ["bash", "-c", "python x"]


def test_grid_exhaustion_and_interrupted_counts() -> None:
    grid = _spec(
        maxTrials=10,
        algorithm={"name": "grid"},
        parameters=[{"name": "k", "type": "int", "min": 1, "max": 3}],
    )
    assert not grid_exhausted(grid, 2)
    assert grid_exhausted(grid, 3)
    assert not grid_exhausted(_spec(maxTrials=10), 3)  # only a grid runs dry
    assert shown_counts({"running": 2, "succeeded": 1}, runner_alive=True) == {
        "running": 2,
        "succeeded": 1,
    }
    assert shown_counts({"running": 2, "succeeded": 1}, runner_alive=False) == {
        "interrupted": 2,
        "succeeded": 1,
    }


def test_failures_in_a_row_end_a_run_without_max_failed_trials() -> None:
    ends = [("failed", None), ("succeeded", None), ("failed", None), ("metrics_unavailable", "")]
    assert failure_streak(ends) == 2
    assert failure_streak([("failed", None), ("pruned", "ASHA: rung 1")]) == 0
    # Stopped because the streak ended the experiment: the streak stands.
    assert failure_streak([("failed", None), ("pruned", "the experiment ended: ...")]) == 1
    unset = _spec(maxTrials=40)
    assert experiment_outcome(unset, {"failed": 4}, None, streak=4) is None
    ended = experiment_outcome(unset, {"failed": 5}, None, streak=5)
    assert ended is not None and not ended.succeeded
    assert ended.reason.startswith("5 trials failed in a row")
    # A limit the user set is theirs: no streak rule then.
    assert experiment_outcome(_spec(maxTrials=40, maxFailedTrials=9), {}, None, streak=8) is None
