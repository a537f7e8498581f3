"""A finish that carries the trial's final metrics (ask + tell), on SQLite and PostgreSQL.

The final report is stored with the trial's end, by the same rules as any
report (the trial's token, finite numbers, a repeated step kept as first
stored); bad input is refused before anything is written.
"""

from __future__ import annotations

from typing import Any

import pytest

from kubetune_suggestion.service.core import TuningService
from kubetune_suggestion.service.errors import Conflict, Forbidden, InvalidInput, Unauthorized
from kubetune_suggestion.service.models import TrialAssignment, TrialState, TrialView
from kubetune_suggestion.service.testing import EXAMPLE_ASHA, example_spec

UID = "tell-uid"


def _register(svc: TuningService, strategy: str = "last", **overrides: Any) -> None:
    objective = {"metric": "loss", "direction": "minimize", "strategy": strategy}
    spec = {"algorithm": {"name": "tpe", "seed": 1}, "objective": objective, "maxTrials": 20}
    svc.register(UID, "exp", "ns", example_spec(**{**spec, **overrides}))


def _observations(svc: TuningService, number: int) -> list[tuple[int, dict[str, float]]]:
    trial = next(t for t in svc.trials(UID, observations=True) if t.number == number)
    assert trial.observations is not None
    return [(o.step, dict(o.metrics)) for o in trial.observations]


def _tell(svc: TuningService, trial: TrialAssignment, **kwargs: Any) -> TrialView:
    kwargs.setdefault("token", trial.token)
    return svc.finish(UID, trial.number, kwargs.pop("state", "succeeded"), **kwargs)


def test_a_finish_with_metrics_stores_them_and_ends_the_trial(svc: TuningService) -> None:
    _register(svc)
    trial = svc.ask(UID, 1).trials[0]
    view = _tell(svc, trial, metrics={"loss": 0.25, "accuracy": 0.9})
    assert view.state is TrialState.SUCCEEDED and view.objective == 0.25 and view.last_step == 0
    assert _observations(svc, trial.number) == [(0, {"loss": 0.25, "accuracy": 0.9})]
    summary = svc.summary(UID)
    assert summary.best is not None and summary.best.number == trial.number
    # The next ask builds on it: a fresh trial, not the told one again.
    assert [t.number for t in svc.ask(UID, 1).trials] == [trial.number + 1]


@pytest.mark.parametrize(
    ("strategy", "expected"), [("last", 0.1), ("min", 0.1), ("max", 0.5)], ids=str
)
def test_the_final_report_comes_after_the_last_step_and_counts_by_the_strategy(
    svc: TuningService, strategy: str, expected: float
) -> None:
    _register(svc, strategy)
    trial = svc.ask(UID, 1).trials[0]
    for step, loss in [(1, 0.5), (2, 0.3)]:
        svc.report(UID, trial.number, trial.token, step, {"loss": loss})
    view = _tell(svc, trial, metrics={"loss": 0.1})
    assert view.last_step == 3 and view.objective == expected
    assert [s for s, _ in _observations(svc, trial.number)] == [1, 2, 3]


def test_a_final_report_at_a_step_already_reported_keeps_the_first(svc: TuningService) -> None:
    _register(svc)
    trial = svc.ask(UID, 1).trials[0]
    svc.report(UID, trial.number, trial.token, 4, {"loss": 0.4})
    view = _tell(svc, trial, metrics={"loss": 0.01}, step=4)
    assert view.objective == 0.4 and view.last_step == 4
    assert _observations(svc, trial.number) == [(4, {"loss": 0.4})]


def test_a_succeeded_final_report_without_the_objective_is_refused(svc: TuningService) -> None:
    _register(svc)
    trial = svc.ask(UID, 1).trials[0]
    with pytest.raises(InvalidInput) as err:
        _tell(svc, trial, metrics={"los": 0.5}, step=7)
    # Not ended metrics_unavailable for good over a typo: nothing stored.
    assert err.value.field == "metrics.loss"
    assert "must include the objective 'loss' (got los)" in err.value.message
    assert svc.trial(UID, trial.number).state is TrialState.PENDING
    assert _observations(svc, trial.number) == []
    assert _tell(svc, trial, metrics={"loss": 0.5}, step=7).objective == 0.5
    # Without metrics at all (the operator's finish) it is no error.
    other = svc.ask(UID, 1).trials[0]
    view = svc.finish(UID, other.number, "succeeded")
    assert view.state is TrialState.METRICS_UNAVAILABLE
    assert "never reported its objective 'loss'" in (view.message or "")


def test_a_failed_trial_keeps_its_final_metrics_without_an_objective(svc: TuningService) -> None:
    _register(svc)
    trial = svc.ask(UID, 1).trials[0]
    view = _tell(svc, trial, state="failed", metrics={"loss": 2.0}, message="OOM at step 9")
    assert view.state is TrialState.FAILED and view.objective is None
    assert view.message == "OOM at step 9"
    assert _observations(svc, trial.number) == [(0, {"loss": 2.0})]


def test_telling_again_is_a_no_op_and_another_state_a_conflict(svc: TuningService) -> None:
    _register(svc)
    trial = svc.ask(UID, 1).trials[0]
    first = _tell(svc, trial, metrics={"loss": 0.3})
    # A retry after a lost answer: the same trial, no second report.
    assert _tell(svc, trial, metrics={"loss": 0.3}) == first
    assert _observations(svc, trial.number) == [(0, {"loss": 0.3})]
    with pytest.raises(Conflict):
        _tell(svc, trial, state="failed", metrics={"loss": 0.3})


@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        ({"metrics": {"loss": 0.1}, "token": None}, Unauthorized, "token"),
        ({"metrics": {"loss": 0.1}, "token": "other"}, Forbidden, "token"),
        ({"metrics": {"loss": float("nan")}}, InvalidInput, "metrics.loss"),
        ({"metrics": {"loss": "low"}}, InvalidInput, "metrics.loss"),
        ({"metrics": {}}, InvalidInput, "metrics"),
        ({"metrics": {"loss": 0.1}, "step": -1}, InvalidInput, "step"),
        ({"step": 3}, InvalidInput, "step"),
    ],
    ids=[
        "no token",
        "another's token",
        "NaN",
        "not a number",
        "empty",
        "negative step",
        "no metrics",
    ],
)
def test_a_bad_final_report_is_refused_and_changes_nothing(
    svc: TuningService, kwargs: dict[str, Any], error: type[Exception], field: str
) -> None:
    _register(svc)
    trial, other = svc.ask(UID, 2).trials
    if kwargs.get("token") == "other":
        kwargs = {**kwargs, "token": other.token}
    before = (svc.summary(UID), svc.trials(UID, observations=True))
    with pytest.raises(error) as refused:
        _tell(svc, trial, **kwargs)
    assert getattr(refused.value, "field", None) == field
    assert (svc.summary(UID), svc.trials(UID, observations=True)) == before


def test_a_told_trial_refuses_later_reports(svc: TuningService) -> None:
    _register(svc)
    trial = svc.ask(UID, 1).trials[0]
    _tell(svc, trial, metrics={"loss": 0.3})
    with pytest.raises(Conflict):
        svc.report(UID, trial.number, trial.token, 5, {"loss": 0.1})


def test_a_tell_counts_the_reports_another_replica_stored_before_it(
    svc: TuningService, db_url: str
) -> None:
    _register(svc)
    _tell(svc, svc.ask(UID, 1).trials[0], metrics={"loss": 0.9})  # this replica's cache is warm
    other = TuningService.open(db_url, migrate=False)
    try:
        trial = svc.ask(UID, 1).trials[0]
        other.report(UID, trial.number, trial.token, 1, {"loss": 0.05})
        view = _tell(svc, trial, metrics={"loss": 0.2})
        assert view.last_step == 2 and view.objective == 0.2
        assert [s for s, _ in _observations(other, trial.number)] == [1, 2]
    finally:
        other.close()
    assert svc.summary(UID).counts[TrialState.SUCCEEDED] == 2


def test_a_repeated_finish_must_say_the_same_or_is_a_conflict(svc: TuningService) -> None:
    _register(svc)
    reported, told, failed = svc.ask(UID, 3).trials
    svc.report(UID, reported.number, reported.token, 1, {"loss": 0.3})
    first = svc.finish(UID, reported.number, "succeeded")
    assert svc.finish(UID, reported.number, "succeeded") == first  # identical: idempotent
    with pytest.raises(Conflict, match=r"already finished \(state succeeded, objective 0.3\)"):
        svc.finish(UID, reported.number, "failed", "exit 1")
    # A repeated tell: the same value is a retry, another value is refused.
    assert _tell(svc, told, metrics={"loss": 0.2}).objective == 0.2
    assert _tell(svc, told, metrics={"loss": 0.2}).objective == 0.2
    assert _tell(svc, told, metrics={"loss": 0.2}, step=0).objective == 0.2
    with pytest.raises(Conflict) as err:
        _tell(svc, told, metrics={"loss": 0.1})
    assert "objective 0.2" in err.value.message and "loss=0.1" in err.value.message
    assert err.value.field == "metrics"
    assert svc.trial(UID, told.number).objective == 0.2
    # The message too, when the repeat gives one.
    svc.finish(UID, failed.number, "failed", "exit 1")
    assert svc.finish(UID, failed.number, "failed", "exit 1").message == "exit 1"
    assert svc.finish(UID, failed.number, "failed").message == "exit 1"
    with pytest.raises(Conflict, match="message 'exit 1'") as err:
        svc.finish(UID, failed.number, "failed", "exit 2")
    assert err.value.field == "message"


def test_a_pruned_finish_after_the_last_step_ends_succeeded(svc: TuningService) -> None:
    """A stop that arrived after the trial ran all its steps is not applied."""
    svc.register(UID, "exp", "ns", example_spec(earlyStopping=EXAMPLE_ASHA, maxTrials=10))
    good, late, stopped = svc.ask(UID, 3).trials
    assert not svc.report(UID, good.number, good.token, 1, {"loss": 0.1}).stop
    assert svc.report(UID, late.number, late.token, 1, {"loss": 0.9}).stop
    assert svc.report(UID, stopped.number, stopped.token, 1, {"loss": 0.8}).stop
    # The stop reached `late` only after its last step (maxResource 9), as
    # with epochs of a few milliseconds: the runner finishes it pruned.
    for step in range(2, 10):
        svc.report(UID, late.number, late.token, step, {"loss": 0.9 - step / 100})
    reason = svc.trial(UID, late.number).stop_reason
    view = svc.finish(UID, late.number, "pruned", reason)
    assert view.state is TrialState.SUCCEEDED and view.objective == pytest.approx(0.81)
    assert "before its stop" in (view.message or "") and "not applied" in (view.message or "")
    assert late.number not in {s.number for s in svc.stops(UID)}  # the order is withdrawn
    assert svc.finish(UID, late.number, "pruned", reason) == view  # a retry agrees
    # Stopped on time: pruned, and its value does not compete for the best.
    assert svc.finish(UID, stopped.number, "pruned", "asha").state is TrialState.PRUNED
    svc.finish(UID, good.number, "failed", "exit 1")
    best = svc.summary(UID).best
    assert best is not None and best.number == late.number
    # Finished succeeded (its Pod ended on its own) with a stop pending: succeeded.
    (other,) = svc.ask(UID, 1).trials
    svc.report(UID, other.number, other.token, 1, {"loss": 0.95})
    assert svc.report(UID, other.number, other.token, 1, {"loss": 0.95}).stop
    assert svc.finish(UID, other.number, "succeeded").state is TrialState.SUCCEEDED
    assert svc.stops(UID) == []
