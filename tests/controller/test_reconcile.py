"""Experiment decisions, without a cluster or a service."""

from __future__ import annotations

from kubetune_controller import reconcile as rc
from kubetune_controller.model import ExperimentPhase, TrialPhase
from kubetune_suggestion.experiment_end import goal_reached
from kubetune_suggestion.service.models import BestTrial, ExperimentSummary, TrialState
from kubetune_suggestion.spec import parse_experiment
from tests.controller.factories import experiment, pod, progress, spec_dict, trial


def test_an_ending_experiment_stays_running_until_its_trials_show_their_end():
    done = rc.Decision(ExperimentPhase.SUCCEEDED, "MaxTrialsReached", "6 of 6 done", ending="x")
    held = rc.hold_until_trials_end(done, [trial(0, TrialPhase.SUCCEEDED), trial(1)])
    assert held.phase is ExperimentPhase.RUNNING
    assert held.message == "6 of 6 done; waiting for 1 trial to end"
    assert held.ending == "x"
    final = [trial(0, TrialPhase.SUCCEEDED), trial(1, TrialPhase.PRUNED)]
    assert rc.hold_until_trials_end(done, final) is done
    running = rc.Decision(ExperimentPhase.RUNNING, "Running", "2 running")
    assert rc.hold_until_trials_end(running, [trial(1)]) is running


def decide(prog, exhausted=False, exp=None, **spec):
    e = exp or experiment(**spec)
    return rc.decide(parse_experiment(e.spec), e, prog, exhausted, {1: "exp-1"})


def test_fills_parallelism_from_service_counts():
    d = decide(progress(started=1), parallelism=3)
    assert (d.phase, d.ask) == (ExperimentPhase.RUNNING, 2)
    assert decide(progress(started=3), parallelism=3).ask == 0


def test_pending_trials_fill_slots_before_new_ones():
    # Two handed out before a crash, never started: ask re-returns them.
    d = decide(progress(started=1, pending=2), parallelism=3)
    assert d.ask == 2


def test_never_asks_beyond_max_trials():
    d = decide(progress(done=8, started=1), parallelism=3, maxTrials=10)
    assert d.ask == 1


def test_raised_parallelism_takes_effect():
    assert decide(progress(started=3), parallelism=5).ask == 2


def test_lowered_parallelism_asks_nothing_and_kills_nothing():
    d = decide(progress(started=5), parallelism=2)
    assert (d.ask, d.ending) == (0, None)


def test_suspend_pauses_new_trials():
    d = decide(progress(started=1), suspend=True)
    assert (d.phase, d.ask, d.ending) == (ExperimentPhase.SUSPENDED, 0, None)
    assert "suspend" in d.message


def test_max_trials_reached_succeeds_with_best_in_message():
    d = decide(progress(done=10, succeeded=10, best_number=1, best_objective=0.125))
    assert (d.phase, d.reason) == (ExperimentPhase.SUCCEEDED, rc.REASON_MAX_TRIALS)
    assert "val_loss=0.125" in d.message and "exp-1" in d.message


def test_goal_reached_ends_early_and_stops_trials():
    d = decide(
        progress(done=2, started=3, succeeded=2, best_number=1, best_objective=0.01),
        objective={"metric": "val_loss", "direction": "minimize", "target": 0.02},
    )
    assert (d.phase, d.reason, d.ending) == (
        ExperimentPhase.SUCCEEDED,
        rc.REASON_GOAL,
        rc.REASON_GOAL,
    )


def test_goal_direction_maximize():
    spec = parse_experiment(
        spec_dict(objective={"metric": "acc", "direction": "maximize", "target": 0.9})
    )
    assert goal_reached(spec, 0.95)
    assert not goal_reached(spec, 0.85)
    assert not goal_reached(spec, None)


def test_too_many_failures_fails_the_experiment():
    d = decide(progress(done=3, failed=2, metrics_unavailable=1), maxFailedTrials=2)
    assert (d.phase, d.reason) == (ExperimentPhase.FAILED, rc.REASON_TOO_MANY_FAILED)
    assert "maxFailedTrials=2" in d.message
    assert decide(progress(done=2, failed=2), maxFailedTrials=2).phase is ExperimentPhase.RUNNING


def test_all_done_without_result_fails():
    d = decide(progress(done=10, failed=10))
    assert (d.phase, d.reason) == (ExperimentPhase.FAILED, rc.REASON_NO_SUCCESS)


def test_exhausted_search_space_succeeds_once_nothing_runs():
    running = decide(progress(done=4, started=2, best_number=1, best_objective=1.0), True)
    assert (running.phase, running.ask) == (ExperimentPhase.RUNNING, 0)
    done = decide(progress(done=6, best_number=1, best_objective=1.0), True)
    assert (done.phase, done.reason) == (ExperimentPhase.SUCCEEDED, rc.REASON_EXHAUSTED)


def _ended(reason: str, phase: str = "Succeeded") -> dict:
    return {
        "phase": phase,
        "conditions": [{"type": phase, "status": "True", "reason": reason, "message": "m"}],
    }


def test_goal_reached_is_sticky():
    exp = experiment(status=_ended(rc.REASON_GOAL))
    d = decide(progress(done=3, best_number=1, best_objective=5.0), exp=exp)
    assert (d.phase, d.reason) == (ExperimentPhase.SUCCEEDED, rc.REASON_GOAL)


def test_raising_max_trials_revives_a_finished_experiment():
    status = {**_ended(rc.REASON_MAX_TRIALS), "trialsMax": 10}
    exp = experiment(status=status, maxTrials=20)
    d = decide(progress(done=10, best_number=1, best_objective=1.0), exp=exp)
    assert (d.phase, d.ask) == (ExperimentPhase.RUNNING, 3)


def test_finished_experiment_stays_finished_when_the_service_forgot_it():
    # A replaced service database reports nothing done: no rerun of the experiment.
    status = {**_ended(rc.REASON_MAX_TRIALS), "trialsMax": 10}
    exp = experiment(status=status, maxTrials=10)
    d = decide(progress(), exp=exp)
    assert (d.phase, d.reason, d.ask) == (ExperimentPhase.SUCCEEDED, rc.REASON_MAX_TRIALS, 0)


# ------------------------------------------------------- the service's counts, its absence


def test_progress_from_the_service_summary():
    summary = ExperimentSummary(
        uid="uid-1",
        name="exp",
        namespace="ns",
        counts={TrialState.RUNNING: 2, TrialState.PENDING: 1, TrialState.METRICS_UNAVAILABLE: 1},
        best=BestTrial(number=3, params={"lr": 0.1}, objective=0.25),
        allocated=7,
        done=4,
        max_trials=10,
        complete=False,
        complete_reason=None,
    )
    prog = rc.Progress.from_summary(summary)
    assert (prog.done, prog.started, prog.pending, prog.metrics_unavailable) == (4, 2, 1, 1)
    assert (prog.succeeded, prog.failed, prog.pruned) == (0, 0, 0)
    assert (prog.best_number, prog.best_objective, prog.best_params) == (3, 0.25, {"lr": 0.1})
    assert (prog.counts.failures, prog.counts.unfinished) == (1, 3)
    empty = rc.Progress.from_summary(summary.model_copy(update={"best": None, "counts": {}}))
    assert (empty.best_number, empty.best_objective, empty.started) == (None, None, 0)


def test_while_the_service_is_away_the_recorded_phase_stays():
    running = rc.unchanged(experiment(status={"phase": "Running"}), "waiting for the service")
    assert (running.phase, running.reason, running.message) == (
        ExperimentPhase.RUNNING,
        "ServiceUnavailable",
        "waiting for the service",
    )
    assert rc.unchanged(experiment(), "w").phase is ExperimentPhase.PENDING
    ended = rc.unchanged(experiment(status=_ended(rc.REASON_GOAL)), "w")
    assert (ended.phase, ended.reason, ended.message) == (
        ExperimentPhase.SUCCEEDED,
        rc.REASON_GOAL,
        "m",
    )


def test_settled_once_ended_with_nothing_left_running():
    ended = experiment(status=_ended(rc.REASON_MAX_TRIALS))
    final = {"exp-0": trial(0, TrialPhase.SUCCEEDED)}
    gone = {"exp-0": pod(0, "Succeeded", exit_code=0)}
    assert rc.settled(ended, final, gone)
    assert rc.settled(ended, final, {"exp-0": pod(0, deleting=True)})
    assert not rc.settled(ended, final, {"exp-0": pod(0)})
    assert not rc.settled(ended, {"exp-0": trial(0)}, gone)
    assert not rc.settled(experiment(status={"phase": "Running"}), final, gone)
    counted_running = experiment(status={**_ended(rc.REASON_MAX_TRIALS), "running": 1})
    assert not rc.settled(counted_running, final, gone)
