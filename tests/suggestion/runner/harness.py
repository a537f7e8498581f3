"""What the runner tests share: an Experiment's body, its run state, and running it.

In-process (:func:`run_local`, :func:`local_runner`: a ``LocalRunner`` over a
``TuningService`` on the run's SQLite store) or through the real command line
(:func:`kubetune`).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from kubetune_suggestion.runner.files import RunPaths
from kubetune_suggestion.runner.manifest import Manifest
from kubetune_suggestion.runner.progress import Quiet
from kubetune_suggestion.runner.result import RunResult
from kubetune_suggestion.runner.run import LocalRunner, TuningServiceLike
from kubetune_suggestion.service.core import TuningService


def experiment_body(name: str, container: Mapping[str, Any], **spec: Any) -> dict[str, Any]:
    """An Experiment whose trials run ``container``: ``loss`` minimised over a float ``x``.

    ``x`` lies in ``[0, 1]`` and a random sampler (seed 0) picks it; ``spec``
    entries replace those defaults or add to them.
    """
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "Experiment",
        "metadata": {"name": name},
        "spec": {
            "objective": {"metric": "loss", "direction": "minimize"},
            "parameters": [{"name": "x", "type": "float", "min": 0.0, "max": 1.0}],
            "algorithm": {"name": "random", "seed": 0},
            "template": {"spec": {"containers": [dict(container)]}},
            **spec,
        },
    }


def run_paths(tmp_path: Path, name: str) -> RunPaths:
    """Experiment ``name``'s files in a new state directory, ``tmp_path/state``."""
    paths = RunPaths(tmp_path / "state", name)
    paths.root.mkdir()
    return paths


class ServiceSpy:
    """The service, passed through; a subclass notes what the runner asks of it."""

    def __init__(self, service: TuningService) -> None:
        self.service = service

    def __getattr__(self, name: str) -> Any:
        return getattr(self.service, name)


Spy = TypeVar("Spy", bound=ServiceSpy)


def local_runner(
    manifest: Manifest,
    paths: RunPaths,
    service: TuningService,
    *,
    via: TuningServiceLike | None = None,
    **options: float,
) -> LocalRunner:
    """A runner of ``manifest`` that shows no progress; ``options``: its grace, poll interval.

    It calls ``service``, or ``via`` (a spy over it) where given; the trial
    tokens come from ``service``.
    """
    return LocalRunner(
        manifest,
        service if via is None else via,
        paths,
        Quiet(),
        lambda n: service.token(manifest.uid, n),
        **options,
    )


@dataclass(frozen=True)
class LocalRun(Generic[Spy]):
    """A finished in-process run."""

    result: RunResult
    # Every trial as the service shows it afterwards (JSON), by number.
    trials: dict[int, dict[str, Any]]
    # What the spy over the service noted.
    spy: Spy


def run_local(
    manifest: Manifest, paths: RunPaths, spy: Callable[[TuningService], Spy], **options: float
) -> LocalRun[Spy]:
    """Run ``manifest`` to its end through ``spy(service)``, on a service opened for the run."""
    service = TuningService.open(paths.database_url)
    try:
        watched = spy(service)
        result = local_runner(manifest, paths, service, via=watched, **options).run()
        trials = {t.number: t.model_dump(mode="json") for t in service.trials(manifest.uid)}
    finally:
        service.close()
    return LocalRun(result, trials, watched)


def kubetune(
    *args: str | Path, cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the ``kubetune`` command line in ``cwd`` and wait for it."""
    return subprocess.run(
        [sys.executable, "-m", "kubetune_suggestion.cli", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
