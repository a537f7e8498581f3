"""Reconcile decisions, without a cluster or a service."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from kubetune_controller import reconcile as rc
from kubetune_controller.model import ExperimentPhase, PodView, TrialPhase
from kubetune_suggestion.spec import parse_experiment
from tests.controller.factories import NOW, experiment, pod, progress, spec_dict, trial


def plan(trials, pods, stops=None, ending=None, grace=15.0):
    return rc.plan_trials(trials, {p.name: p for p in pods}, stops or {}, ending, NOW, grace)


# ---------------------------------------------------------------- a lost service database


def test_trials_numbered_past_what_the_service_allocated_mean_it_lost_them():
    trials = [trial(0), trial(1)]
    assert not rc.service_lost_trials(trials, allocated=2)
    assert not rc.service_lost_trials(trials, allocated=3)  # asked, Trial not yet created
    assert rc.service_lost_trials(trials, allocated=0)  # a fresh, empty database
    assert rc.service_lost_trials(trials, allocated=1)
    assert not rc.service_lost_trials([], allocated=0)


def test_restore_records_carry_params_state_and_result_by_number():
    done = replace(trial(1, TrialPhase.SUCCEEDED), objective=0.25, params={"lr": 0.1})
    pruned = replace(
        trial(0, TrialPhase.PRUNED, stop_reason="asha: rung 1"), objective=0.9, last_step=3
    )
    failed = trial(2, TrialPhase.FAILED, message="exit code 3")
    new = trial(3, None)
    running = replace(trial(4, TrialPhase.RUNNING), last_step=7)
    records = rc.restore_records([running, done, failed, new, pruned])
    assert [r["number"] for r in records] == [0, 1, 2, 3, 4]
    assert records[0] == {
        "number": 0,
        "params": {},
        "state": "pruned",
        "objective": 0.9,
        "step": 3,
        "stop_reason": "asha: rung 1",
    }
    assert records[1] == {
        "number": 1,
        "params": {"lr": 0.1},
        "state": "succeeded",
        "objective": 0.25,
    }
    assert records[2] == {"number": 2, "params": {}, "state": "failed", "message": "exit code 3"}
    # A Trial whose Pod is being created, or runs, is started to the service.
    assert records[3]["state"] == records[4]["state"] == "running"
    assert "objective" not in records[4]


# ---------------------------------------------------------------- trials


def test_running_pod_marks_trial_running_once():
    p = plan([trial(0, TrialPhase.PENDING)], [pod(0, "Running")])
    assert p.progress == [rc.TrialProgress("exp-0", TrialPhase.RUNNING, None)]
    assert plan([trial(0, TrialPhase.RUNNING)], [pod(0, "Running")]) == rc.TrialPlan()


def test_running_is_written_once_the_pod_has_run_a_second_so_short_trials_write_once():
    def started(seconds_ago: float) -> PodView:
        return replace(pod(0, "Running"), started=NOW - timedelta(seconds=seconds_ago))

    def plan_with_delay(p: PodView) -> rc.TrialPlan:
        return rc.plan_trials([trial(0, TrialPhase.PENDING)], {p.name: p}, {}, None, NOW, 15, 1.0)

    # startTime has whole seconds, so the second it names counts as not yet run.
    young = plan_with_delay(started(1.25))
    assert young.progress == [] and young.recheck_after == pytest.approx(0.75)
    old = plan_with_delay(started(2.0))
    assert old.progress == [rc.TrialProgress("exp-0", TrialPhase.RUNNING, None)]
    assert old.recheck_after is None
    # No start time, or one ahead of our clock: written at once, never held forever.
    assert plan_with_delay(pod(0, "Running")).progress != []
    assert plan_with_delay(started(-5)).progress != []
    # A trial that ended within the second is finished directly.
    done = replace(started(1.5), phase="Succeeded")
    assert [f.state for f in plan_with_delay(done).finish] == ["succeeded"]


def test_succeeded_pod_is_finished_once_its_collector_has_delivered_the_last_reports():
    # The kubelet marks the Pod Succeeded as the training exits and only then
    # stops the collector, which sends what it has not sent yet: a finish
    # before that would miss the final objective (MetricsUnavailable).
    body = {
        "metadata": {"name": "exp-0", "namespace": "ns", "uid": "p-0"},
        "status": {
            "phase": "Succeeded",
            "initContainerStatuses": [
                {"name": "kubetune-collector", "state": {"running": {}}},
            ],
            "containerStatuses": [
                {"name": "train", "state": {"terminated": {"exitCode": 0}}},
            ],
        },
    }
    draining = PodView.from_body(body)
    assert draining.sidecar_running
    assert plan([trial(0)], [draining]).finish == []
    assert plan([trial(0)], [draining], stops={0: "asha"}) == rc.TrialPlan()
    body["status"]["initContainerStatuses"][0]["state"] = {"terminated": {"exitCode": 0}}
    done = PodView.from_body(body)
    assert not done.sidecar_running
    assert [f.state for f in plan([trial(0)], [done]).finish] == ["succeeded"]


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


def test_a_pod_past_its_deadline_fails_the_trial_as_timed_out():
    late = replace(pod(0, "Failed", exit_code=137), reason="DeadlineExceeded")
    (finish,) = plan([trial(0)], [late]).finish
    assert (finish.state, finish.reason) == ("failed", "TimedOut")
    assert "spec.trialTimeoutSeconds" in finish.message


def test_pending_pod_shows_why_it_waits():
    why = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    p = plan([trial(0, None)], [pod(0, "Pending", waiting=why)])
    assert p.progress == [rc.TrialProgress("exp-0", TrialPhase.PENDING, why)]


def test_succeeded_pod_finishes_trial_as_succeeded():
    p = plan([trial(0)], [pod(0, "Succeeded", exit_code=0)])
    assert [(f.number, f.state) for f in p.finish] == [(0, "succeeded")]


def test_failed_pod_finishes_with_exit_code_and_asks_for_logs():
    p = plan([trial(0)], [pod(0, "Failed", exit_code=3)])
    (f,) = p.finish
    assert f.state == "failed"
    assert "container train exited with code 3" in f.message
    assert f.wants_logs


def test_stop_order_deletes_live_pod_then_prunes_once_it_is_going():
    (d,) = plan([trial(2)], [pod(2)], stops={2: "asha rung 1"}).delete_pods
    assert (d.name, d.reason) == ("exp-2", "asha rung 1")
    p = plan([trial(2)], [pod(2, deleting=True)], stops={2: "asha rung 1"})
    assert [(f.state, f.reason) for f in p.finish] == [("pruned", "asha rung 1")]
    assert not p.delete_pods
    p = plan([trial(2)], [], stops={2: "asha rung 1"})
    assert [f.state for f in p.finish] == ["pruned"]


def test_stop_after_success_keeps_the_result():
    p = plan([trial(2)], [pod(2, "Succeeded", exit_code=0)], stops={2: "asha"})
    assert [f.state for f in p.finish] == ["succeeded"]


def test_experiment_ending_stops_every_live_trial_but_not_finished_ones():
    trials = [trial(0), trial(1, TrialPhase.SUCCEEDED), trial(2, TrialPhase.PENDING)]
    pods = [pod(0), pod(1, "Succeeded", exit_code=0), pod(2, "Pending")]
    p = plan(trials, pods, ending="GoalReached")
    assert sorted(d.name for d in p.delete_pods) == ["exp-0", "exp-2"]
    assert not p.finish


def test_final_trial_with_live_pod_gets_its_pod_deleted():
    p = plan([trial(0, TrialPhase.PRUNED, stop_reason="asha")], [pod(0)])
    assert [d.name for d in p.delete_pods] == ["exp-0"]


def test_missing_pod_is_only_suspected_after_grace():
    assert plan([trial(0, age=3)], []).maybe_lost == []
    assert [t.name for t in plan([trial(0, age=30)], []).maybe_lost] == ["exp-0"]


def test_deleting_pod_without_stop_waits():
    assert plan([trial(0)], [pod(0, deleting=True)]) == rc.TrialPlan()


def test_plan_is_idempotent_on_final_trials():
    trials = [trial(i, TrialPhase.SUCCEEDED) for i in range(3)]
    pods = [pod(i, "Succeeded", exit_code=0) for i in range(3)]
    assert plan(trials, pods) == rc.TrialPlan()


def test_lost_trial_decisions():
    t = trial(4)
    assert rc.lost_trial(t, "pending", None) is None
    assert rc.lost_trial(t, "running", "asha").state == "pruned"
    lost = rc.lost_trial(t, "running", None)
    assert lost is not None
    assert (lost.state, lost.reason) == ("failed", "PodLost")


# ----------------------------------------------------------- experiment


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
    assert rc.goal_reached(spec, 0.95)
    assert not rc.goal_reached(spec, 0.85)
    assert not rc.goal_reached(spec, None)


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


# ---------------------------------------------------------------- status


def test_conditions_keep_transition_time_when_unchanged():
    d = rc.Decision(ExperimentPhase.RUNNING, rc.REASON_RUNNING, "1 running")
    first = rc.render_conditions(rc.desired_conditions(d, True, "ok"), [], NOW, 1)
    later = NOW + timedelta(minutes=5)
    again = rc.render_conditions(rc.desired_conditions(d, True, "ok"), first, later, 1)
    assert [c["lastTransitionTime"] for c in again] == [c["lastTransitionTime"] for c in first]
    done = rc.Decision(ExperimentPhase.SUCCEEDED, rc.REASON_MAX_TRIALS, "done")
    ended = rc.render_conditions(rc.desired_conditions(done, True, "ok"), first, later, 1)
    by_type = {c["type"]: c for c in ended}
    assert by_type["Succeeded"]["status"] == "True"
    assert by_type["Succeeded"]["reason"] == rc.REASON_MAX_TRIALS
    assert by_type["Succeeded"]["lastTransitionTime"] == "2026-01-01T12:05:00Z"
    assert by_type["Running"]["status"] == "False"
    assert by_type["ServiceAvailable"]["lastTransitionTime"] == "2026-01-01T12:00:00Z"


def test_service_down_condition_is_actionable():
    d = rc.Decision(ExperimentPhase.RUNNING, "ServiceUnavailable", "waiting")
    conds = rc.desired_conditions(d, False, "GET http://svc/v1/x: ConnectError")
    svc = next(c for c in conds if c.type == rc.COND_SERVICE)
    assert (svc.status, svc.reason) == (False, "ServiceUnavailable")
    assert "http://svc" in svc.message


def test_status_has_printer_column_fields():
    d = rc.Decision(ExperimentPhase.RUNNING, rc.REASON_RUNNING, "m")
    prog = progress(done=4, pruned=2, succeeded=2, started=2, best_number=1, best_objective=0.5)
    trials = [trial(0, TrialPhase.RUNNING), trial(5, TrialPhase.PENDING)]
    status = rc.experiment_status(experiment(), 10, d, prog, trials, [], {1: "exp-1"})
    assert status["trialsSummary"] == "4/10"
    assert (status["running"], status["pending"], status["pruned"]) == (1, 1, 2)
    assert status["bestObjective"] == 0.5
    assert status["bestTrial"]["name"] == "exp-1"
    assert not rc.status_changed(status, dict(status))


@pytest.mark.parametrize("field", ["phase", "trialsSummary", "bestObjective"])
def test_status_changed_notices_printer_fields(field):
    old = {"phase": "Running", "trialsSummary": "1/2", "bestObjective": 1.0}
    new = {**old, field: "x"}
    assert rc.status_changed(old, new)


def _running_status(**extra: object) -> dict[str, object]:
    status: dict[str, object] = {
        "phase": "Running",
        "observedGeneration": 1,
        "trialsDone": 3,
        "running": 4,
        "bestObjective": 0.5,
        "bestTrial": {"name": "e-1", "number": 1, "objective": 0.5, "params": {}},
        "conditions": [{"type": "Running", "status": "True", "reason": "TrialsRunning"}],
    }
    status.update(extra)
    return status


def test_progress_alone_is_not_urgent_so_it_can_wait_for_the_next_write():
    old = _running_status()
    new = _running_status(trialsDone=9, running=2, bestObjective=0.1)
    new["conditions"] = [
        {"type": "Running", "status": "True", "reason": "TrialsRunning", "message": "9 done"}
    ]
    assert rc.status_changed(old, new)
    assert not rc.status_change_urgent(old, new)


@pytest.mark.parametrize(
    "change",
    [
        {"phase": "Succeeded"},
        {"observedGeneration": 2},
        {"conditions": [{"type": "Running", "status": "False", "reason": "Suspended"}]},
    ],
)
def test_phase_generation_and_condition_changes_are_written_at_once(change):
    assert rc.status_change_urgent(_running_status(), _running_status(**change))


def test_the_first_best_trial_is_written_at_once():
    old = _running_status()
    del old["bestTrial"]
    assert rc.status_change_urgent(old, _running_status())
