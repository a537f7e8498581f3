"""Resuming an interrupted run: re-run what was running, prune what was ordered to stop."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kubetune_suggestion.runner.files import RunPaths
from kubetune_suggestion.runner.manifest import Manifest, parse_manifest
from kubetune_suggestion.runner.result import RunResult
from kubetune_suggestion.service.core import TuningService
from tests.suggestion.runner.harness import experiment_body, local_runner, run_paths

SCRIPT = "import kubetune, sys\nkubetune.report(step=1, loss=float(sys.argv[1]))\n"


@dataclass(frozen=True)
class Interrupted:
    """What an interrupted run left: its manifest, state directory and (open) service."""

    manifest: Manifest
    paths: RunPaths
    service: TuningService

    @property
    def uid(self) -> str:
        """The experiment's uid in the service."""
        return self.manifest.uid

    def resume(self) -> RunResult:
        """Run the experiment again on the same state, as ``kubetune run`` resumes it."""
        return local_runner(self.manifest, self.paths, self.service, poll_interval=0.02).run()


@pytest.fixture
def interrupted(tmp_path: Path) -> Iterator[Callable[..., Interrupted]]:
    """A factory: the experiment ``name`` registered in a fresh run state.

    Its trials run ``SCRIPT``, which reports the parameter ``x`` as the loss;
    ``spec`` entries replace the spec's defaults. The test leaves the service
    as an interrupted run would, then resumes.
    """
    services: list[TuningService] = []
    (tmp_path / "t.py").write_text(SCRIPT)

    def make(name: str, **spec: Any) -> Interrupted:
        container = {"name": "t", "command": ["python", "t.py", "${params.x}"]}
        body = experiment_body(name, container, **{"maxTrials": 2, **spec})
        manifest = parse_manifest(body, tmp_path / f"{name}.yaml")
        paths = run_paths(tmp_path, name)
        service = TuningService.open(paths.database_url)
        services.append(service)
        service.register(manifest.uid, name, "local", manifest.spec)
        return Interrupted(manifest, paths, service)

    yield make
    for service in services:
        service.close()


def test_resume_reruns_interrupted_trials_and_prunes_those_ordered_to_stop(
    interrupted: Callable[..., Interrupted],
) -> None:
    run = interrupted(
        "resume",
        earlyStopping={"name": "asha", "minResource": 1, "maxResource": 9},
        parallelism=2,
    )
    service, uid = run.service, run.uid
    # What an interrupted run leaves behind: two running trials, one of
    # which ASHA already ordered to stop (worse than the other at rung 1).
    first, second = service.ask(uid, 2).trials
    for trial in (first, second):
        service.start(uid, trial.number)
    assert not service.report(uid, first.number, first.token, 1, {"loss": 0.1}).stop
    assert service.report(uid, second.number, second.token, 1, {"loss": 5.0}).stop

    result = run.resume()

    assert result.status == "succeeded"
    counts = {str(state): n for state, n in result.summary.counts.items()}
    assert (counts["succeeded"], counts["pruned"]) == (1, 1)
    assert result.summary.allocated == 2  # nothing new was asked for
    assert "re-run after an interrupted run" in run.paths.log(first.number).read_text()
    assert not run.paths.log(second.number).exists()  # pruned without running again
    assert result.summary.best is not None and result.summary.best.number == first.number


def test_resume_runs_trials_asked_for_but_never_started(
    interrupted: Callable[..., Interrupted],
) -> None:
    # Every ask allocates new trials: one a run asked for and died before
    # starting is the resumed run's to start, or the experiment never ends.
    run = interrupted("asked")
    (pending,) = run.service.ask(run.uid, 1).trials

    result = run.resume()

    assert result.status == "succeeded", result
    counts = {str(state): n for state, n in result.summary.counts.items()}
    assert counts.get("succeeded") == 2 and counts.get("pending", 0) == 0, counts
    assert run.paths.log(pending.number).exists()
