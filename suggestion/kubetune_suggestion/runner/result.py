"""How a run ended, or where a stored experiment stands: ``kubetune run`` and ``kubetune status``.

Both decide an experiment's end by the same rule (:mod:`.outcome`) and print
the same document (:meth:`RunResult.to_json`, the README's schema).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kubetune_suggestion.runner.files import RunPaths, runner_of
from kubetune_suggestion.runner.outcome import (
    experiment_outcome,
    failure_streak,
    grid_exhausted,
    shown_counts,
)
from kubetune_suggestion.service.models import ExperimentSummary, TrialView
from kubetune_suggestion.spec import ExperimentSpec

__all__ = ["RunResult", "stored_result", "streak_of"]


@dataclass(frozen=True)
class RunResult:
    """How a run ended, or where a stored experiment stands (``kubetune status``).

    Attributes:
        name: The experiment's name.
        uid: Its UID in the store.
        status: ``succeeded``, ``failed``, ``interrupted`` (it has not ended
            and no run is going: run the manifest again to continue) or
            ``running`` (a ``kubetune run`` is running it now).
        reason: In words.
        summary: The store's summary at the end.
        metric: The objective metric's name.
        direction: ``minimize`` or ``maximize``.
        paths: Where its files are.
        elapsed: Seconds this run took (None from ``kubetune status``).
    """

    name: str
    uid: str
    status: str
    reason: str
    summary: ExperimentSummary
    metric: str
    direction: str
    paths: RunPaths
    elapsed: float | None

    @property
    def exit_code(self) -> int:
        """0 succeeded, 1 failed, 130 interrupted (the shell's code for Ctrl-C)."""
        return {"succeeded": 0, "failed": 1}.get(self.status, 130)

    @property
    def counts(self) -> dict[str, int]:
        """Trials by state (``interrupted`` for those an ended run left ``running``)."""
        stored = {str(state): n for state, n in self.summary.counts.items()}
        return shown_counts(stored, runner_alive=self.status == "running")

    def to_json(self) -> dict[str, Any]:
        """The ``-o json`` document of ``run`` and ``status`` alike (the README's schema)."""
        best = self.summary.best
        return {
            "experiment": self.name,
            "uid": self.uid,
            "status": self.status,
            "reason": self.reason,
            "objective": {"metric": self.metric, "direction": self.direction},
            "best": None
            if best is None
            else {"trial": best.number, "params": best.params, "objective": best.objective},
            "counts": self.counts,
            "trials": self.summary.done,
            "maxTrials": self.summary.max_trials,
            "store": str(self.paths.database),
            "logs": str(self.paths.trials),
            "elapsedSeconds": None if self.elapsed is None else round(self.elapsed, 3),
        }


def streak_of(trials: Sequence[TrialView]) -> int:
    """How many of the last trials to finish failed in a row."""
    ended = sorted(
        (t.finished_at, t.number, str(t.state), t.message)
        for t in trials
        if t.finished_at is not None
    )
    return failure_streak([(state, message) for _, _, state, message in ended])


def stored_result(
    name: str,
    summary: ExperimentSummary,
    trials: Sequence[TrialView],
    spec: ExperimentSpec,
    paths: RunPaths,
) -> RunResult:
    """Where a stored experiment stands, decided as ``kubetune run`` decides its end."""
    holder = runner_of(paths)
    counts = {str(state): n for state, n in summary.counts.items()}
    best = summary.best.objective if summary.best is not None else None
    unfinished = counts.get("running", 0) + counts.get("pending", 0)
    exhausted = not unfinished and grid_exhausted(spec, summary.allocated)
    outcome = experiment_outcome(spec, counts, best, exhausted=exhausted, streak=streak_of(trials))
    if holder is not None:
        status, reason = "running", f"{holder} is running it"
    elif outcome is None:
        status, reason = "interrupted", "not ended; run its manifest again to continue"
    else:
        status = "succeeded" if outcome.succeeded else "failed"
        reason = outcome.reason
    return RunResult(
        name=name,
        uid=summary.uid,
        status=status,
        reason=reason,
        summary=summary,
        metric=spec.objective.metric,
        direction=str(spec.objective.direction),
        paths=paths,
        elapsed=None,
    )
