"""The service layer's pure decisions."""

from __future__ import annotations

import math

import pytest

from kubetune_suggestion.engine.history import RecordState
from kubetune_suggestion.service import logic
from kubetune_suggestion.service.errors import InvalidInput
from kubetune_suggestion.service.testing import example_spec as make_spec
from kubetune_suggestion.spec import Strategy, parse_experiment


@pytest.mark.parametrize(
    ("strategy", "expected"), [(Strategy.LAST, 0.3), (Strategy.MIN, 0.1), (Strategy.MAX, 0.9)]
)
def test_final_objective_by_strategy(strategy: Strategy, expected: float) -> None:
    # Given out of order: "last" means the highest step, not the last row.
    values = [(2, 0.1), (1, 0.9), (3, 0.3)]
    assert logic.final_objective(values, strategy) == expected


def test_no_values_no_objective() -> None:
    assert logic.final_objective([], Strategy.LAST) is None


@pytest.mark.parametrize(
    ("metrics", "field", "words"),
    [
        ({"loss": math.nan}, "metrics.loss", "only finite numbers"),
        ({"loss": math.inf}, "metrics.loss", "only finite numbers"),
        ({"loss": "0.5"}, "metrics.loss", "not a number"),
        ({"loss": True}, "metrics.loss", "not a number"),
        ({"loss": None}, "metrics.loss", "not a number"),
        ({}, "metrics", "non-empty"),
        ([1, 2], "metrics", "non-empty"),
        ({"": 1.0}, "metrics", "characters"),
    ],
)
def test_bad_metrics_are_refused_naming_the_metric(metrics: object, field: str, words: str) -> None:
    with pytest.raises(InvalidInput) as err:
        logic.check_metrics(metrics)
    assert err.value.field == field
    assert words in err.value.message


def test_good_metrics_become_floats() -> None:
    assert logic.check_metrics({"loss": 1, "acc": 0.5}) == {"loss": 1.0, "acc": 0.5}


@pytest.mark.parametrize("step", [-1, 1.5, "3", True, None])
def test_bad_steps_are_refused(step: object) -> None:
    with pytest.raises(InvalidInput) as err:
        logic.check_step(step)
    assert err.value.field == "step"


def test_engine_sees_pending_as_running_and_metrics_unavailable_as_failed() -> None:
    assert logic.engine_state("pending") is RecordState.RUNNING
    assert logic.engine_state("metrics_unavailable") is RecordState.FAILED
    record = logic.trial_record(3, {"x": 1}, "failed", 0.5)
    assert record.value is None  # a failed trial's value is never a signal


def test_completion_reasons() -> None:
    spec = parse_experiment(
        make_spec(
            objective={"metric": "loss", "direction": "minimize", "target": 0.1}, maxFailedTrials=1
        )
    )
    assert logic.completion_reason(spec, {"running": 1}, 1, 0.5) is None
    assert "target" in (logic.completion_reason(spec, {}, 1, 0.05) or "")
    reason = logic.completion_reason(spec, {"failed": 1, "metrics_unavailable": 1}, 2, None)
    assert reason is not None and "2 trials failed" in reason
    assert logic.completion_reason(spec, {"succeeded": 9, "running": 1}, 10, 0.5) is None
    assert "maxTrials" in (logic.completion_reason(spec, {"succeeded": 10}, 10, 0.5) or "")
