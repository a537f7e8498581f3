"""Pure decisions of the local runner: how a trial ended, and whether the experiment did.

Kept apart from process and store I/O so each rule is tested on plain values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from kubetune_suggestion.engine.samplers.grid import GridSampler
from kubetune_suggestion.experiment_end import (
    EndReason,
    ExperimentEnd,
    TrialCounts,
    experiment_end,
)
from kubetune_suggestion.runner.process import describe_exit
from kubetune_suggestion.spec import ExperimentSpec

__all__ = [
    "EXPERIMENT_ENDED",
    "FAILED_STATES",
    "FAILURE_STREAK_LIMIT",
    "ExperimentOutcome",
    "TrialEnd",
    "experiment_outcome",
    "failure_streak",
    "grid_exhausted",
    "next_streak",
    "shown_counts",
    "shown_state",
    "timed_out",
    "trial_end",
]

# A trial that produced no result (what the failure streak counts).
FAILED_STATES: Final = ("failed", "metrics_unavailable")
# With maxFailedTrials unset, kubetune run ends the experiment after this many
# failures in a row: a broken command or script fails every trial, and would
# otherwise "run" all of maxTrials. (The operator keeps no such limit.)
FAILURE_STREAK_LIMIT: Final = 5
# How the message of a trial stopped because the experiment ended begins.
EXPERIMENT_ENDED: Final = "the experiment ended"


@dataclass(frozen=True)
class TrialEnd:
    """The state to record for a trial whose process ended, and why.

    Attributes:
        state: ``succeeded``, ``failed``, ``pruned`` or ``metrics_unavailable``.
        message: For users (shown by ``kubetune trials`` and in the trial's
            record); includes the last lines of its log when it went wrong.
    """

    state: str
    message: str | None = None


def trial_end(
    exit_code: int,
    *,
    stop_reason: str | None,
    saw_objective: bool,
    metric: str,
    log_tail: Sequence[str],
    metrics_tail: Sequence[str],
    timed_out_after: int | None = None,
) -> TrialEnd:
    """Classify a finished trial process.

    Args:
        exit_code: The process's exit status (negative: killed by that signal).
        stop_reason: Set when kubetune stopped it (early stopping).
        saw_objective: Whether any delivered report carried the objective metric.
        metric: The objective metric's name.
        log_tail: The last lines of its stdout/stderr.
        metrics_tail: The last lines of its metrics file.
        timed_out_after: Set (to ``spec.trialTimeoutSeconds``) when kubetune
            stopped it for running longer than that: it failed, however it
            exited, as a Pod past its ``activeDeadlineSeconds`` does.
    """
    if timed_out_after is not None:
        return timed_out(timed_out_after, log_tail, exit_code)
    if stop_reason is not None:
        return TrialEnd("pruned", stop_reason)
    if exit_code != 0:
        return TrialEnd("failed", _with_tail(f"the trial {describe_exit(exit_code)}", log_tail))
    if not saw_objective:
        wrote = (
            "its metrics file's last lines:\n" + "\n".join(f"  {line}" for line in metrics_tail)
            if metrics_tail
            else "its metrics file is empty or missing"
        )
        return TrialEnd(
            "metrics_unavailable",
            _with_tail(f"the trial exited 0 but never reported {metric!r}; {wrote}", log_tail),
        )
    return TrialEnd("succeeded")


def timed_out(seconds: int, log_tail: Sequence[str], exit_code: int | None = None) -> TrialEnd:
    """The end of a trial stopped for running longer than ``spec.trialTimeoutSeconds``.

    Worded after the operator's ``TimedOut`` message, which a trial whose Pod
    ran past its ``activeDeadlineSeconds`` gets in a cluster.

    Args:
        seconds: The limit, ``spec.trialTimeoutSeconds``.
        log_tail: The last lines of its stdout/stderr.
        exit_code: How its process ended once stopped; None when the run that
            stopped it ended first (the next run records it).
    """
    how = "" if exit_code is None else f" ({describe_exit(exit_code)})"
    message = (
        f"the trial timed out after {seconds} s: it ran longer than "
        f"spec.trialTimeoutSeconds (TimedOut) and was stopped{how}"
    )
    return TrialEnd("failed", _with_tail(message, log_tail))


def _with_tail(message: str, log_tail: Sequence[str]) -> str:
    if not log_tail:
        return message + "\n(its log is empty)"
    # After lines of the metrics file, a heading line of its own.
    glue = "\n" if "\n" in message else "; "
    return message + glue + "last lines of its log:\n" + "\n".join(f"  {line}" for line in log_tail)


@dataclass(frozen=True)
class ExperimentOutcome:
    """How an experiment ended.

    Attributes:
        succeeded: False when it failed (too many failed trials, no result).
        reason: In words, for the final report.
    """

    succeeded: bool
    reason: str


def experiment_outcome(
    spec: ExperimentSpec,
    counts: Mapping[str, int],
    best_objective: float | None,
    *,
    exhausted: bool = False,
    streak: int = 0,
) -> ExperimentOutcome | None:
    """Whether the experiment has ended, from its trial counts and best objective.

    The rule is :func:`~kubetune_suggestion.experiment_end.experiment_end`'s,
    with one of ``kubetune run``'s own first: :data:`FAILURE_STREAK_LIMIT`.

    Args:
        spec: The experiment's spec.
        counts: Trials by state (states absent count 0).
        best_objective: The best finished trial's objective, if any.
        exhausted: Nothing runs and the service will hand out no new trial
            although fewer than ``maxTrials`` were allocated (a finished grid).
        streak: The latest trials to finish that failed, in a row (see
            :func:`failure_streak`).

    Returns:
        None while it should go on.
    """
    if spec.maxFailedTrials is None and streak >= FAILURE_STREAK_LIMIT:
        return ExperimentOutcome(
            False,
            f"{streak} trials failed in a row (with maxFailedTrials unset, kubetune run stops "
            f"after {FAILURE_STREAK_LIMIT}; set it to go on after failures)",
        )
    end = experiment_end(spec, TrialCounts.from_states(counts), best_objective, exhausted=exhausted)
    if end is None:
        return None
    return ExperimentOutcome(end.succeeded, _reason(spec, end))


def _reason(spec: ExperimentSpec, end: ExperimentEnd) -> str:
    """How a run's final line words the end."""
    if end.reason is EndReason.GOAL_REACHED:
        return f"objective target {spec.objective.target:g} reached"
    if end.reason is EndReason.TOO_MANY_FAILED_TRIALS:
        return (
            f"{end.counts.failures} trials failed, more than maxFailedTrials "
            f"({spec.maxFailedTrials})"
        )
    why = (
        f"maxTrials ({spec.maxTrials}) reached"
        if end.counts.done >= spec.maxTrials
        else "search space exhausted"
    )
    if end.reason is EndReason.NO_TRIAL_SUCCEEDED:
        return f"{why}, but no trial produced the objective"
    return why


def next_streak(streak: int, state: str, message: str | None) -> int:
    """The count of failures in a row once one more trial ended in ``state``.

    A trial stopped because the experiment ended says nothing about the trials
    (the streak may be what ended it): it leaves the count as it is.
    """
    if state in FAILED_STATES:
        return streak + 1
    if state == "pruned" and (message or "").startswith(EXPERIMENT_ENDED):
        return streak
    return 0


def failure_streak(ends: Sequence[tuple[str, str | None]]) -> int:
    """Failures in a row at the end of ``ends``: (state, message) of trials in finish order."""
    streak = 0
    for state, message in ends:
        streak = next_streak(streak, state, message)
    return streak


def grid_exhausted(spec: ExperimentSpec, allocated: int) -> bool:
    """Whether a grid experiment handed out every configuration before ``maxTrials``.

    What ``ask`` tells a run; ``kubetune status`` works it out from the store.
    """
    if spec.algorithm.name != "grid" or allocated >= spec.maxTrials:
        return False
    return allocated >= GridSampler(spec.search_space()).grid.size


def shown_counts(counts: Mapping[str, int], *, runner_alive: bool) -> dict[str, int]:
    """Trials by state as users see them: ``running`` only while a runner runs them.

    A run that was interrupted (or killed) leaves its trials ``running`` in the
    store, so that the next run re-runs them; they are ``interrupted`` meanwhile.
    """
    shown = dict(counts)
    if not runner_alive:
        shown["interrupted"] = shown.get("interrupted", 0) + shown.pop("running", 0)
    return shown


def shown_state(state: str, *, runner_alive: bool) -> str:
    """One trial's state as users see it: ``interrupted`` for one an ended run left running."""
    return "interrupted" if state == "running" and not runner_alive else state
