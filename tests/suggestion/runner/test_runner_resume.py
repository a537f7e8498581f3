"""Resuming an interrupted run: re-run what was running, prune what was ordered to stop."""

from __future__ import annotations

from pathlib import Path

from kubetune_suggestion.runner.manifest import parse_manifest
from kubetune_suggestion.runner.progress import Quiet
from kubetune_suggestion.runner.run import LocalRunner, RunPaths
from kubetune_suggestion.service.core import TuningService

SCRIPT = "import kubetune, sys\nkubetune.report(step=1, loss=float(sys.argv[1]))\n"


def test_resume_reruns_interrupted_trials_and_prunes_those_ordered_to_stop(tmp_path: Path) -> None:
    (tmp_path / "t.py").write_text(SCRIPT)
    body = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "Experiment",
        "metadata": {"name": "resume"},
        "spec": {
            "objective": {"metric": "loss", "direction": "minimize"},
            "parameters": [{"name": "x", "type": "float", "min": 0.0, "max": 1.0}],
            "algorithm": {"name": "random", "seed": 0},
            "earlyStopping": {"name": "asha", "minResource": 1, "maxResource": 9},
            "maxTrials": 2,
            "parallelism": 2,
            "template": {
                "spec": {
                    "containers": [{"name": "t", "command": ["python", "t.py", "${params.x}"]}]
                }
            },
        },
    }
    manifest = parse_manifest(body, tmp_path / "resume.yaml")
    paths = RunPaths(tmp_path / "state", "resume")
    paths.root.mkdir()
    service = TuningService.open(paths.database_url)
    try:
        # What an interrupted run leaves behind: two running trials, one of
        # which ASHA already ordered to stop (worse than the other at rung 1).
        uid = manifest.uid
        service.register(uid, "resume", "local", manifest.spec)
        first, second = service.ask(uid, 2).trials
        for trial in (first, second):
            service.start(uid, trial.number)
        assert not service.report(uid, first.number, first.token, 1, {"loss": 0.1}).stop
        assert service.report(uid, second.number, second.token, 1, {"loss": 5.0}).stop

        runner = LocalRunner(
            manifest, service, paths, Quiet(), lambda n: service.token(uid, n), poll_interval=0.02
        )
        result = runner.run()
    finally:
        service.close()

    assert result.status == "succeeded"
    counts = {str(state): n for state, n in result.summary.counts.items()}
    assert (counts["succeeded"], counts["pruned"]) == (1, 1)
    assert result.summary.allocated == 2  # nothing new was asked for
    assert "re-run after an interrupted run" in paths.log(first.number).read_text()
    assert not paths.log(second.number).exists()  # pruned without running again
    assert result.summary.best is not None and result.summary.best.number == first.number


def test_resume_runs_trials_asked_for_but_never_started(tmp_path: Path) -> None:
    # Every ask allocates new trials: one a run asked for and died before
    # starting is the resumed run's to start, or the experiment never ends.
    (tmp_path / "t.py").write_text(SCRIPT)
    body = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "Experiment",
        "metadata": {"name": "asked"},
        "spec": {
            "objective": {"metric": "loss", "direction": "minimize"},
            "parameters": [{"name": "x", "type": "float", "min": 0.0, "max": 1.0}],
            "algorithm": {"name": "random", "seed": 0},
            "maxTrials": 2,
            "template": {
                "spec": {
                    "containers": [{"name": "t", "command": ["python", "t.py", "${params.x}"]}]
                }
            },
        },
    }
    manifest = parse_manifest(body, tmp_path / "asked.yaml")
    paths = RunPaths(tmp_path / "state", "asked")
    paths.root.mkdir()
    service = TuningService.open(paths.database_url)
    try:
        uid = manifest.uid
        service.register(uid, "asked", "local", manifest.spec)
        (pending,) = service.ask(uid, 1).trials
        runner = LocalRunner(
            manifest, service, paths, Quiet(), lambda n: service.token(uid, n), poll_interval=0.02
        )
        result = runner.run()
    finally:
        service.close()
    assert result.status == "succeeded", result
    counts = {str(state): n for state, n in result.summary.counts.items()}
    assert counts.get("succeeded") == 2 and counts.get("pending", 0) == 0, counts
    assert paths.log(pending.number).exists()
