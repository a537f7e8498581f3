"""The one rule for whether an experiment has ended, and why (operator, service, runner)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from kubetune_suggestion.experiment_end import (
    EndReason,
    TrialCounts,
    experiment_end,
    goal_reached,
)
from kubetune_suggestion.spec import ExperimentSpec, parse_experiment


def _spec(direction: str = "minimize", target: float | None = None, **extra: Any) -> ExperimentSpec:
    return parse_experiment(
        {
            "objective": {"metric": "loss", "direction": direction, "target": target},
            "parameters": [{"name": "x", "type": "float", "min": 0.0, "max": 1.0}],
            "template": {"spec": {"containers": [{"name": "t", "command": ["python", "t.py"]}]}},
            **extra,
        }
    )


def _counts(**states: int) -> TrialCounts:
    return TrialCounts.from_states(states)


def test_counts_from_stored_states() -> None:
    counts = _counts(succeeded=2, failed=1, metrics_unavailable=1, pruned=3, running=2, pending=1)
    assert (counts.done, counts.failures, counts.unfinished) == (7, 2, 3)
    assert TrialCounts.from_states({}) == TrialCounts()


def test_an_experiment_goes_on_below_every_limit() -> None:
    spec = _spec(target=0.1, maxTrials=4, maxFailedTrials=1)
    assert experiment_end(spec, _counts(succeeded=2, failed=1, running=1), 0.5) is None


@pytest.mark.parametrize(
    ("direction", "best", "reached"),
    [
        ("minimize", 0.1, True),  # meeting the target is enough
        ("minimize", 0.05, True),
        ("minimize", 0.2, False),
        ("maximize", 0.1, True),
        ("maximize", 0.2, True),
        ("maximize", 0.05, False),
        ("minimize", None, False),
        # Never a goal: the service refuses such values, a runner's store may not.
        ("minimize", -math.inf, False),
        ("maximize", math.inf, False),
        ("minimize", math.nan, False),
    ],
)
def test_goal_by_direction(direction: str, best: float | None, reached: bool) -> None:
    spec = _spec(direction, target=0.1)
    assert goal_reached(spec, best) is reached
    end = experiment_end(spec, _counts(succeeded=1), best)
    assert (end is not None and end.reason is EndReason.GOAL_REACHED) is reached


def test_no_target_no_goal() -> None:
    assert not goal_reached(_spec(), 0.0)
    assert experiment_end(_spec(), _counts(succeeded=1), 0.0) is None


def test_goal_reached_ends_with_trials_running() -> None:
    end = experiment_end(_spec(target=0.02), _counts(succeeded=2, running=3), 0.01)
    assert end is not None and end.succeeded and end.reason.halts
    assert end.message == "objective target loss=0.02 reached"


def test_too_many_failures_counts_trials_without_a_result() -> None:
    spec = _spec(maxFailedTrials=2)
    at_limit = _counts(failed=1, metrics_unavailable=1, succeeded=1)
    assert experiment_end(spec, at_limit, 0.5) is None
    end = experiment_end(spec, _counts(failed=2, metrics_unavailable=1, running=2), 0.5)
    assert end is not None and end.reason is EndReason.TOO_MANY_FAILED_TRIALS
    assert not end.succeeded and end.reason.halts
    assert end.message == "3 trials failed or reported no loss, more than maxFailedTrials=2"
    # Unset: no limit at all; zero: the first failure ends it.
    assert experiment_end(_spec(), _counts(failed=9), None) is None
    zero = experiment_end(_spec(maxFailedTrials=0), _counts(metrics_unavailable=1), None)
    assert zero is not None and zero.reason is EndReason.TOO_MANY_FAILED_TRIALS


def test_a_goal_reached_wins_over_failures_past_the_limit() -> None:
    spec = _spec(target=0.1, maxFailedTrials=0)
    end = experiment_end(spec, _counts(failed=1, succeeded=1), 0.05)
    assert end is not None and end.reason is EndReason.GOAL_REACHED


def test_failures_past_the_limit_win_over_max_trials() -> None:
    spec = _spec(maxTrials=3, maxFailedTrials=1)
    end = experiment_end(spec, _counts(failed=2, succeeded=1), 0.5)
    assert end is not None and end.reason is EndReason.TOO_MANY_FAILED_TRIALS


def test_max_trials_done() -> None:
    spec = _spec(maxTrials=4)
    assert experiment_end(spec, _counts(succeeded=3, running=1), 0.5) is None
    end = experiment_end(spec, _counts(succeeded=3, pruned=1), 0.5)
    assert end is not None and end.reason is EndReason.MAX_TRIALS_REACHED and end.succeeded
    assert not end.reason.halts
    assert end.message == "4 of 4 trials done"
    # maxTrials lowered below what is already done.
    lowered = experiment_end(_spec(maxTrials=2), _counts(succeeded=3, running=2), 0.5)
    assert lowered is not None and lowered.reason is EndReason.MAX_TRIALS_REACHED


def test_max_trials_done_without_a_result_fails() -> None:
    end = experiment_end(
        _spec(maxTrials=4), _counts(pruned=2, failed=1, metrics_unavailable=1), None
    )
    assert end is not None and end.reason is EndReason.NO_TRIAL_SUCCEEDED and not end.succeeded
    assert end.message == (
        "all 4 trials ended without a loss result (1 failed, 1 reported no loss, 2 pruned)"
    )


def test_an_exhausted_search_space_ends_once_nothing_is_unfinished() -> None:
    spec = _spec(maxTrials=10)
    assert experiment_end(spec, _counts(succeeded=4, running=2), 1.0, exhausted=True) is None
    # A trial handed back for a retry (pending) is still to run.
    assert experiment_end(spec, _counts(succeeded=4, pending=1), 1.0, exhausted=True) is None
    end = experiment_end(spec, _counts(succeeded=6), 1.0, exhausted=True)
    assert end is not None and end.reason is EndReason.SEARCH_SPACE_EXHAUSTED and end.succeeded
    assert end.message == "the search space is exhausted after 6 trials"
    nothing = experiment_end(spec, _counts(failed=6), None, exhausted=True)
    assert nothing is not None and nothing.reason is EndReason.NO_TRIAL_SUCCEEDED


def test_max_trials_wins_over_an_exhausted_search_space() -> None:
    end = experiment_end(_spec(maxTrials=4), _counts(succeeded=4), 1.0, exhausted=True)
    assert end is not None and end.reason is EndReason.MAX_TRIALS_REACHED


def test_the_counts_it_ended_with_are_kept() -> None:
    counts = _counts(succeeded=4)
    end = experiment_end(_spec(maxTrials=4), counts, 1.0)
    assert end is not None and end.counts is counts


def test_reasons_are_the_operators_condition_reasons() -> None:
    assert [r.value for r in EndReason] == [
        "GoalReached",
        "TooManyFailedTrials",
        "MaxTrialsReached",
        "SearchSpaceExhausted",
        "NoTrialSucceeded",
    ]
    assert {r for r in EndReason if r.succeeded} == {
        EndReason.GOAL_REACHED,
        EndReason.MAX_TRIALS_REACHED,
        EndReason.SEARCH_SPACE_EXHAUSTED,
    }
