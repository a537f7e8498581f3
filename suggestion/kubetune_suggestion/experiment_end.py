"""Whether an experiment has ended, and why: one rule for every component.

The operator (an Experiment's phase and conditions), the suggestion service
(its summary's ``complete``) and ``kubetune run`` (a run's final line) all
ask the same question of the same numbers; :func:`experiment_end` answers it.
An experiment ends, in this order of precedence, when:

1. its best objective reaches ``spec.objective.target`` (``GoalReached``);
2. more trials than ``spec.maxFailedTrials`` produced no result: they failed,
   or never reported the objective (``TooManyFailedTrials``);
3. ``maxTrials`` trials are done (``MaxTrialsReached``), or the service will
   hand out no new trial and none is left running (``SearchSpaceExhausted``);
   either is a failure when no trial produced the objective
   (``NoTrialSucceeded``).

The reasons are the operator's condition reasons. Each component words the
end for its own readers from :class:`ExperimentEnd`; its ``message`` is the
operator's wording, without the operator's pointers to ``kubectl``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from kubetune_suggestion.engine.history import Direction
from kubetune_suggestion.spec import ExperimentSpec

__all__ = ["EndReason", "ExperimentEnd", "TrialCounts", "experiment_end", "goal_reached"]


class EndReason(StrEnum):
    """Why an experiment ended (the operator's condition reasons)."""

    GOAL_REACHED = "GoalReached"
    TOO_MANY_FAILED_TRIALS = "TooManyFailedTrials"
    MAX_TRIALS_REACHED = "MaxTrialsReached"
    SEARCH_SPACE_EXHAUSTED = "SearchSpaceExhausted"
    NO_TRIAL_SUCCEEDED = "NoTrialSucceeded"

    @property
    def succeeded(self) -> bool:
        """Whether an experiment that ended so succeeded (it has a best trial)."""
        return self not in (EndReason.TOO_MANY_FAILED_TRIALS, EndReason.NO_TRIAL_SUCCEEDED)

    @property
    def halts(self) -> bool:
        """Whether it ends the experiment at once, with trials still running.

        ``maxTrials`` and an exhausted search space are reached only as the
        last trials finish; a goal or a failure limit cuts the others short.
        """
        return self in (EndReason.GOAL_REACHED, EndReason.TOO_MANY_FAILED_TRIALS)


@dataclass(frozen=True)
class TrialCounts:
    """An experiment's trials by state."""

    # Trials that have ended, in any of the four final states.
    done: int = 0
    succeeded: int = 0
    failed: int = 0
    pruned: int = 0
    # Ended without ever reporting the objective metric.
    metrics_unavailable: int = 0
    # Started and not ended.
    running: int = 0
    # Handed out and not started yet.
    pending: int = 0

    @classmethod
    def from_states(cls, counts: Mapping[str, int]) -> TrialCounts:
        """From trials by stored state name (``succeeded``, ``running``...; absent ones are 0)."""
        succeeded = counts.get("succeeded", 0)
        failed = counts.get("failed", 0)
        pruned = counts.get("pruned", 0)
        metrics_unavailable = counts.get("metrics_unavailable", 0)
        return cls(
            done=succeeded + failed + pruned + metrics_unavailable,
            succeeded=succeeded,
            failed=failed,
            pruned=pruned,
            metrics_unavailable=metrics_unavailable,
            running=counts.get("running", 0),
            pending=counts.get("pending", 0),
        )

    @property
    def failures(self) -> int:
        """Trials that count against ``maxFailedTrials`` (no usable result)."""
        return self.failed + self.metrics_unavailable

    @property
    def unfinished(self) -> int:
        """Trials handed out that have not ended."""
        return self.running + self.pending


@dataclass(frozen=True)
class ExperimentEnd:
    """How an experiment ended."""

    reason: EndReason
    # In words, e.g. "10 of 10 trials done" or "objective target loss=0.1 reached".
    message: str
    # The counts it ended with.
    counts: TrialCounts

    @property
    def succeeded(self) -> bool:
        """False when it failed (too many failed trials, or no result at all)."""
        return self.reason.succeeded


def goal_reached(spec: ExperimentSpec, best: float | None) -> bool:
    """Whether ``best`` meets ``spec.objective.target`` (a non-finite value never does)."""
    target = spec.objective.target
    if target is None or best is None or not math.isfinite(best):
        return False
    if spec.objective.direction is Direction.MINIMIZE:
        return best <= target
    return best >= target


def experiment_end(
    spec: ExperimentSpec,
    counts: TrialCounts,
    best: float | None,
    *,
    exhausted: bool = False,
) -> ExperimentEnd | None:
    """Whether the experiment has ended, and why.

    Args:
        spec: The experiment's spec.
        counts: Its trials by state.
        best: The best objective of a finished trial (succeeded or pruned),
            by the spec's direction; None when no trial produced one.
        exhausted: The service will hand out no new trial although fewer than
            ``maxTrials`` are done (a finished grid). It ends the experiment
            once no trial is unfinished.

    Returns:
        None while the experiment goes on.
    """
    metric = spec.objective.metric
    target = spec.objective.target
    if target is not None and goal_reached(spec, best):
        message = f"objective target {metric}={target:g} reached"
        return ExperimentEnd(EndReason.GOAL_REACHED, message, counts)
    limit = spec.maxFailedTrials
    if limit is not None and counts.failures > limit:
        message = (
            f"{counts.failures} trials failed or reported no {metric}, more than "
            f"maxFailedTrials={limit}"
        )
        return ExperimentEnd(EndReason.TOO_MANY_FAILED_TRIALS, message, counts)
    all_done = counts.done >= spec.maxTrials
    if not all_done and not (exhausted and counts.unfinished == 0):
        return None
    if best is None:
        message = (
            f"all {counts.done} trials ended without a {metric} result "
            f"({counts.failed} failed, {counts.metrics_unavailable} reported no {metric}, "
            f"{counts.pruned} pruned)"
        )
        return ExperimentEnd(EndReason.NO_TRIAL_SUCCEEDED, message, counts)
    if all_done:
        message = f"{counts.done} of {spec.maxTrials} trials done"
        return ExperimentEnd(EndReason.MAX_TRIALS_REACHED, message, counts)
    message = f"the search space is exhausted after {counts.done} trials"
    return ExperimentEnd(EndReason.SEARCH_SPACE_EXHAUSTED, message, counts)
