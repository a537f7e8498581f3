"""TuningService in-process (what `kubetune run` uses), on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune_suggestion.service.core import TuningService
from kubetune_suggestion.service.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    Unauthorized,
)
from kubetune_suggestion.service.models import StopAnswer, TrialState
from kubetune_suggestion.service.reporting import Report
from kubetune_suggestion.service.testing import EXAMPLE_ASHA, example_spec

UID = "0b6f-uid"


def _register(svc: TuningService, uid: str = UID, **overrides: Any) -> None:
    svc.register(uid, "exp", "team-a", example_spec(**overrides))


def _snapshot(svc: TuningService, uid: str = UID) -> tuple[Any, ...]:
    return (svc.summary(uid), svc.trials(uid, observations=True), svc.stops(uid))


def test_ask_hands_out_dense_numbers_never_beyond_max_trials(svc: TuningService) -> None:
    _register(svc, maxTrials=5)
    first = svc.ask(UID, 3)
    assert [t.number for t in first.trials] == [0, 1, 2]
    assert not first.exhausted
    for t in first.trials:
        svc.start(UID, t.number)
    rest = svc.ask(UID, 10)
    assert [t.number for t in rest.trials] == [3, 4]
    assert rest.exhausted and rest.reason == "maxTrials (5) reached"
    for t in rest.trials:
        svc.start(UID, t.number)
    assert svc.ask(UID, 1).trials == []
    summary = svc.summary(UID)
    assert summary.allocated == 5 and summary.counts[TrialState.RUNNING] == 5


def test_ask_with_an_ask_id_returns_its_pending_trials_again_after_a_crash(db_url: str) -> None:
    before = TuningService.open(db_url)
    _register(before)
    handed_out = before.ask(UID, 3, ask_id="worker-1").trials
    before.start(UID, handed_out[0].number)
    before.close()  # the process dies; its caches die with it
    after = TuningService.open(db_url)
    again = after.ask(UID, 2, ask_id="worker-1").trials
    # Pending ones first, same numbers, same params, same tokens.
    assert again == handed_out[1:3]
    more = after.ask(UID, 4, ask_id="worker-1").trials
    assert [t.number for t in more] == [1, 2, 3, 4]
    # Another ask id, or none, never gets them.
    assert [t.number for t in after.ask(UID, 1, ask_id="worker-2").trials] == [5]
    assert [t.number for t in after.ask(UID, 1).trials] == [6]
    after.close()


def test_ask_with_parallelism_counts_pending_and_running_trials(db_url: str) -> None:
    svc = TuningService.open(db_url)
    _register(svc, maxTrials=20)
    first = svc.ask(UID, 5, parallelism=5, ask_id="op").trials
    assert [t.number for t in first] == [0, 1, 2, 3, 4]
    svc.start(UID, 0)
    svc.start(UID, 1)
    # 2 running + 3 pending fill 5 slots: a retry gets the pending ones, no more.
    again = svc.ask(UID, 10, parallelism=5, ask_id="op").trials
    assert [t.number for t in again] == [2, 3, 4]
    svc.finish(UID, 0, "failed")
    # One slot freed: one new trial, after the still-pending ones.
    assert [t.number for t in svc.ask(UID, 10, parallelism=5, ask_id="op").trials] == [2, 3, 4, 5]
    # Parallelism lowered below what is active: pending ones come back, nothing new.
    assert [t.number for t in svc.ask(UID, 10, parallelism=2, ask_id="op").trials] == [2, 3, 4, 5]
    svc.close()
    # A fresh process (no caches) counts the same from the store.
    svc = TuningService.open(db_url)
    for n in (2, 3, 4, 5):
        svc.start(UID, n)
    assert svc.ask(UID, 10, parallelism=5, ask_id="op").trials == []
    svc.finish(UID, 1, "succeeded")
    svc.finish(UID, 2, "failed")
    assert [t.number for t in svc.ask(UID, 10, parallelism=5, ask_id="op").trials] == [6, 7]
    # Without parallelism (nor an ask id) the caller's count alone limits, as
    # `kubetune run` uses it, and every ask gets new trials.
    assert [t.number for t in svc.ask(UID, 2).trials] == [8, 9]
    assert [t.number for t in svc.ask(UID, 3).trials] == [10, 11, 12]
    # An asker's pending trials come back to the same ask id only.
    assert [t.number for t in svc.ask(UID, 2, ask_id="op").trials] == [6, 7]
    svc.close()


@pytest.mark.parametrize("algorithm", ["random", "tpe"])
def test_a_restart_continues_the_sampler_identically(db_url: str, algorithm: str) -> None:
    """One experiment with restarts between calls suggests what one without restarts does."""
    spec = {"algorithm": {"name": algorithm, "seed": 3, "settings": {"n_startup_trials": 3}}}
    if algorithm == "random":
        spec["algorithm"].pop("settings")
    steady = TuningService.open(db_url)
    _register(steady, "steady", maxTrials=12, **spec)
    _register(steady, "restarted", maxTrials=12, **spec)
    params: dict[str, list[dict[str, Any]]] = {"steady": [], "restarted": []}
    restarted: TuningService | None = None
    for round_ in range(4):
        for uid in ("steady", "restarted"):
            svc = steady
            if uid == "restarted":
                if restarted is not None:
                    restarted.close()
                svc = restarted = TuningService.open(db_url)
            for t in svc.ask(uid, 3).trials:
                params[uid].append(t.params)
                svc.report(uid, t.number, t.token, 1, {"loss": _loss(t.params) + round_})
                svc.finish(uid, t.number, "succeeded")
    assert len(params["steady"]) == 12
    assert params["restarted"] == params["steady"]
    assert restarted is not None
    restarted.close()
    steady.close()


def _loss(params: dict[str, Any]) -> float:
    return abs(params["lr"] - 0.01) * 10 + params["layers"] * 0.1 + (params["opt"] == "sgd") * 0.05


@pytest.mark.parametrize(("strategy", "objective"), [("last", 0.4), ("min", 0.2), ("max", 0.9)])
def test_finish_computes_the_objective_by_strategy(
    svc: TuningService, strategy: str, objective: float
) -> None:
    _register(svc, objective={"metric": "loss", "direction": "minimize", "strategy": strategy})
    t = svc.ask(UID, 1).trials[0]
    for step, value in [(1, 0.9), (2, 0.2), (3, 0.4)]:
        assert not svc.report(UID, t.number, t.token, step, {"loss": value, "acc": 0.5}).stop
    view = svc.finish(UID, t.number, "succeeded")
    assert view.state is TrialState.SUCCEEDED
    assert view.objective == objective and view.last_step == 3
    best = svc.summary(UID).best
    assert best is not None and best.number == 0 and best.objective == objective


def test_succeeded_without_the_objective_becomes_metrics_unavailable(svc: TuningService) -> None:
    _register(svc)
    t = svc.ask(UID, 1).trials[0]
    svc.report(UID, t.number, t.token, 1, {"accuracy": 0.5})
    view = svc.finish(UID, t.number, "succeeded")
    assert view.state is TrialState.METRICS_UNAVAILABLE
    assert view.objective is None and "never reported its objective 'loss'" in (view.message or "")
    # Finishing again is a no-op, in the same state or as the "succeeded" it was reported as.
    assert svc.finish(UID, t.number, "succeeded").state is TrialState.METRICS_UNAVAILABLE
    with pytest.raises(Conflict, match="already finished"):
        svc.finish(UID, t.number, "failed")


def test_reports_are_idempotent_per_step_and_mark_the_trial_running(svc: TuningService) -> None:
    _register(svc)
    t = svc.ask(UID, 1).trials[0]
    svc.report(UID, t.number, t.token, 5, {"loss": 1.0})
    svc.report(UID, t.number, t.token, 5, {"loss": 2.0})  # a retried report
    view = svc.trials(UID, observations=True)[0]
    assert view.state is TrialState.RUNNING and view.started_at is not None
    assert [(o.step, o.metrics) for o in view.observations or []] == [(5, {"loss": 1.0})]


def test_reports_are_refused_without_changing_anything(svc: TuningService) -> None:
    _register(svc)
    t0, t1 = svc.ask(UID, 2).trials
    svc.report(UID, t0.number, t0.token, 1, {"loss": 1.0})
    before = _snapshot(svc)
    with pytest.raises(Unauthorized):
        svc.report(UID, 0, None, 2, {"loss": 1.0})
    with pytest.raises(Forbidden, match="not trial 0's token"):
        svc.report(UID, 0, t1.token, 2, {"loss": 1.0})
    with pytest.raises(InvalidInput) as bad:
        svc.report(UID, 0, t0.token, 2, {"loss": float("nan")})
    assert bad.value.field == "metrics.loss"
    with pytest.raises(InvalidInput):
        svc.report(UID, 0, t0.token, 2, {"loss": "low"})
    with pytest.raises(NotFound, match="has no trial 7"):
        svc.report(UID, 7, svc.token(UID, 7), 2, {"loss": 1.0})
    with pytest.raises(NotFound, match="no experiment 'nope'"):
        svc.report("nope", 0, svc.token("nope", 0), 2, {"loss": 1.0})
    assert _snapshot(svc) == before
    svc.finish(UID, 0, "failed", "OOMKilled")
    after_finish = _snapshot(svc)
    with pytest.raises(Conflict, match="already finished"):
        svc.report(UID, 0, t0.token, 3, {"loss": 1.0})
    assert _snapshot(svc) == after_finish


def test_asha_stops_a_losing_trial_and_lists_it_until_it_finishes(svc: TuningService) -> None:
    _register(svc, earlyStopping=EXAMPLE_ASHA)
    t0, t1, t2 = svc.ask(UID, 3).trials
    assert not svc.report(UID, t0.number, t0.token, 1, {"loss": 0.1}).stop
    # Fewer than reductionFactor trials at the rung: only the best continues.
    answer = svc.report(UID, t1.number, t1.token, 1, {"loss": 0.5})
    assert answer.stop and "ASHA rung 1" in answer.reason and "loss" in answer.reason
    assert not svc.report(UID, t2.number, t2.token, 1, {"loss": 0.05}).stop
    assert [(s.number, s.reason) for s in svc.stops(UID)] == [(1, answer.reason)]
    assert [(s.experiment, s.number) for s in svc.all_stops()] == [(UID, 1)]
    # A later report of the stopped trial hears the same answer.
    assert svc.report(UID, t1.number, t1.token, 2, {"loss": 0.4}) == answer
    view = svc.finish(UID, t1.number, "pruned")
    assert view.state is TrialState.PRUNED and view.stop_reason == answer.reason
    # What it reported at the step its stop was decided on (1), not later (see CONTRACT.md).
    assert view.objective == 0.5
    assert svc.stops(UID) == []


def test_target_reached_ends_the_experiment(svc: TuningService) -> None:
    _register(svc, objective={"metric": "loss", "direction": "maximize", "target": 0.9})
    t = svc.ask(UID, 2).trials[0]
    svc.report(UID, t.number, t.token, 1, {"loss": 0.95})
    svc.finish(UID, t.number, "succeeded")
    result = svc.ask(UID, 2)
    assert (
        result.trials == [] and result.exhausted and "target 0.9 reached" in (result.reason or "")
    )
    summary = svc.summary(UID)
    assert summary.complete and summary.best is not None and summary.best.objective == 0.95


def test_too_many_failures_end_the_experiment(svc: TuningService) -> None:
    _register(svc, maxFailedTrials=1)
    for t in svc.ask(UID, 2).trials:
        svc.finish(UID, t.number, "failed", "exit code 1")
    result = svc.ask(UID, 1)
    assert result.trials == [] and "2 trials failed" in (result.reason or "")
    assert svc.summary(UID).counts[TrialState.FAILED] == 2


def test_suspended_experiments_hand_out_nothing(svc: TuningService) -> None:
    _register(svc, suspend=True)
    result = svc.ask(UID, 2)
    assert result.trials == [] and not result.exhausted and "suspended" in (result.reason or "")


def test_register_is_an_upsert_and_spec_edits_take_effect(svc: TuningService) -> None:
    _register(svc, maxTrials=2)
    assert [t.number for t in svc.ask(UID, 5).trials] == [0, 1]
    view = svc.register(UID, "exp", "team-a", example_spec(maxTrials=4))
    assert not view.created and view.spec_version == 2
    assert [t.number for t in svc.ask(UID, 5).trials] == [2, 3]
    # Same spec again: nothing changes.
    assert svc.register(UID, "exp", "team-a", example_spec(maxTrials=4)).spec_version == 2
    with pytest.raises(Conflict) as err:
        svc.register(UID, "exp", "team-a", example_spec(maxTrials=4, algorithm={"name": "tpe"}))
    assert err.value.field == "spec.algorithm"
    assert svc.experiment_spec(UID).algorithm.name == "random"


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        (
            {"parameters": [{"name": "x", "type": "float", "min": 2, "max": 1}]},
            "spec.parameters[0].min",
            "less than max",
        ),
        ({"algorithm": {"name": "grid"}}, "spec.parameters[0].step", "grid"),
        ({"maxTrials": 0}, "spec.maxTrials", "greater than or equal to 1"),
        ({"earlyStopping": {"name": "asha"}}, "spec.earlyStopping", "maxResource"),
    ],
)
def test_specs_the_engine_rejects_are_refused_naming_the_field(
    svc: TuningService, overrides: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(InvalidInput) as err:
        svc.register(UID, "exp", "ns", example_spec(**overrides))
    assert err.value.field == field and words in err.value.message
    with pytest.raises(NotFound):
        svc.summary(UID)


def test_trials_history_and_delete(svc: TuningService) -> None:
    _register(svc)
    t0, t1 = svc.ask(UID, 2).trials
    svc.report(UID, 0, t0.token, 1, {"loss": 0.3})
    svc.finish(UID, 0, "succeeded")
    views = svc.trials(UID)
    assert [(v.number, v.state, v.objective) for v in views] == [
        (0, TrialState.SUCCEEDED, 0.3),
        (1, TrialState.PENDING, None),
    ]
    assert views[0].params == t0.params and views[0].observations is None
    assert svc.trial(UID, 1).params == t1.params
    svc.delete(UID)
    with pytest.raises(NotFound):
        svc.trials(UID)
    with pytest.raises(NotFound):
        svc.delete(UID)


def test_a_second_service_on_the_database_shares_the_token_secret(db_url: str) -> None:
    a = TuningService.open(db_url)
    b = TuningService.open(db_url, migrate=False)
    assert a.secret == b.secret and len(a.secret) == 64
    assert TuningService.open(db_url, secret="given").secret == "given"
    a.close()
    b.close()


def test_a_batch_answers_each_report_and_refuses_only_the_bad_ones(svc: TuningService) -> None:
    _register(svc, "a", earlyStopping=EXAMPLE_ASHA)
    _register(svc, "b")
    a0, a1 = svc.ask("a", 2).trials
    (b0,) = svc.ask("b", 1).trials
    svc.finish("b", 0, "failed")
    results = svc.report_batch(
        [
            Report("a", 0, a0.token, 1, {"loss": 0.1}),
            Report("b", 0, b0.token, 1, {"loss": 0.1}),  # finished: 409
            Report("a", 1, a1.token, 1, {"loss": 0.9}),  # ASHA stops it, seeing report 1
            Report("a", 1, a0.token, 2, {"loss": 0.9}),  # another trial's token: 403
            Report("a", 7, svc.token("a", 7), 1, {"loss": 0.9}),  # no such trial: 404
            Report("a", 0, a0.token, 1, {"loss": 0.5}),  # the same step again: kept once
        ]
    )
    assert results[0] == StopAnswer(stop=False)
    assert isinstance(results[1], Conflict)
    assert isinstance(results[2], StopAnswer) and results[2].stop
    assert isinstance(results[3], Forbidden)
    assert isinstance(results[4], NotFound)
    assert results[5] == StopAnswer(stop=False)
    stored = {
        (v.number, o.step, o.metrics["loss"])
        for v in svc.trials("a", observations=True)
        for o in v.observations or []
    }
    assert stored == {(0, 1, 0.1), (1, 1, 0.9)}
    assert svc.trials("b", observations=True)[0].observations == []


def test_start_many_starts_the_pending_and_refuses_each_bad_trial_alone(
    svc: TuningService,
) -> None:
    _register(svc, maxTrials=6)
    handed = svc.ask(UID, 4, ask_id="w").trials
    svc.finish(UID, handed[3].number, "failed", "exit 1")
    result = svc.start_many(UID, [handed[0].number, handed[1].number, handed[3].number, 99])
    assert result.started == [handed[0].number, handed[1].number]
    assert [(r.number, r.status, r.code) for r in result.refused] == [
        (handed[3].number, 409, "conflict"),
        (99, 404, "not_found"),
    ]
    # Started trials are no longer handed out again; the one left pending is.
    again = svc.ask(UID, 2, ask_id="w").trials
    assert again[0].number == handed[2].number
    assert svc.summary(UID).counts[TrialState.RUNNING] == 2
    # Idempotent: starting running trials again changes nothing.
    assert svc.start_many(UID, [handed[0].number]).started == [handed[0].number]
    assert svc.summary(UID).counts[TrialState.RUNNING] == 2


def test_start_many_refuses_an_unknown_experiment_and_an_empty_list(svc: TuningService) -> None:
    with pytest.raises(NotFound, match="no experiment"):
        svc.start_many("nope", [0])
    _register(svc)
    with pytest.raises(InvalidInput, match="numbers must list"):
        svc.start_many(UID, [])
