"""Trial plans: what each trial's Pod implies, without a cluster or a service."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from kubetune_controller import trial_plan as tp
from kubetune_controller.model import PodResource, TrialPhase
from tests.controller.factories import NOW, pod, trial


def plan(trials, pods, stops=None, ending=None, grace=15.0):
    return tp.plan_trials(trials, {p.name: p for p in pods}, stops or {}, ending, NOW, grace)


# ---------------------------------------------------------------- a lost service database


def test_trials_numbered_past_what_the_service_allocated_mean_it_lost_them():
    trials = [trial(0), trial(1)]
    assert not tp.service_lost_trials(trials, allocated=2)
    assert not tp.service_lost_trials(trials, allocated=3)  # asked, Trial not yet created
    assert tp.service_lost_trials(trials, allocated=0)  # a fresh, empty database
    assert tp.service_lost_trials(trials, allocated=1)
    assert not tp.service_lost_trials([], allocated=0)


def test_restore_records_carry_params_state_and_result_by_number():
    done = replace(trial(1, TrialPhase.SUCCEEDED), objective=0.25, params={"lr": 0.1})
    pruned = replace(
        trial(0, TrialPhase.PRUNED, stop_reason="asha: rung 1"), objective=0.9, last_step=3
    )
    failed = trial(2, TrialPhase.FAILED, message="exit code 3")
    new = trial(3, None)
    running = replace(trial(4, TrialPhase.RUNNING), last_step=7)
    records = tp.restore_records([running, done, failed, new, pruned])
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
    assert p.progress == [tp.TrialProgress("exp-0", TrialPhase.RUNNING, None)]
    assert plan([trial(0, TrialPhase.RUNNING)], [pod(0, "Running")]) == tp.TrialPlan()


def test_running_is_written_once_the_pod_has_run_a_second_so_short_trials_write_once():
    def started(seconds_ago: float) -> PodResource:
        return replace(pod(0, "Running"), started=NOW - timedelta(seconds=seconds_ago))

    def plan_with_delay(p: PodResource) -> tp.TrialPlan:
        return tp.plan_trials([trial(0, TrialPhase.PENDING)], {p.name: p}, {}, None, NOW, 15, 1.0)

    # startTime has whole seconds, so the second it names counts as not yet run.
    young = plan_with_delay(started(1.25))
    assert young.progress == [] and young.recheck_after == pytest.approx(0.75)
    old = plan_with_delay(started(2.0))
    assert old.progress == [tp.TrialProgress("exp-0", TrialPhase.RUNNING, None)]
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
    draining = PodResource.from_body(body)
    assert draining.sidecar_running
    assert plan([trial(0)], [draining]).finish == []
    assert plan([trial(0)], [draining], stops={0: "asha"}) == tp.TrialPlan()
    body["status"]["initContainerStatuses"][0]["state"] = {"terminated": {"exitCode": 0}}
    done = PodResource.from_body(body)
    assert not done.sidecar_running
    assert [f.state for f in plan([trial(0)], [done]).finish] == ["succeeded"]


def test_a_pod_past_its_deadline_fails_the_trial_as_timed_out():
    late = replace(pod(0, "Failed", exit_code=137), reason="DeadlineExceeded")
    (finish,) = plan([trial(0)], [late]).finish
    assert (finish.state, finish.reason) == ("failed", "TimedOut")
    assert "spec.trialTimeoutSeconds" in finish.message


def test_pending_pod_shows_why_it_waits():
    why = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    p = plan([trial(0, None)], [pod(0, "Pending", waiting=why)])
    assert p.progress == [tp.TrialProgress("exp-0", TrialPhase.PENDING, why)]


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
    assert plan([trial(0)], [pod(0, deleting=True)]) == tp.TrialPlan()


def test_plan_is_idempotent_on_final_trials():
    trials = [trial(i, TrialPhase.SUCCEEDED) for i in range(3)]
    pods = [pod(i, "Succeeded", exit_code=0) for i in range(3)]
    assert plan(trials, pods) == tp.TrialPlan()


def test_lost_trial_decisions():
    t = trial(4)
    assert tp.lost_trial(t, "pending", None) is None
    assert tp.lost_trial(t, "running", "asha").state == "pruned"
    lost = tp.lost_trial(t, "running", None)
    assert lost is not None
    assert (lost.state, lost.reason) == ("failed", "PodLost")


@pytest.mark.parametrize(
    ("status", "message", "forbidden"),
    [
        (403, 'violates PodSecurity "restricted:latest": privileged (container "t")', True),
        (403, 'admission webhook "policy.example.com" denied the request', True),
        (403, "exceeded quota: compute, requested: nvidia.com/gpu=1", False),
        (403, "unable to create new content in namespace ns because it is being terminated", False),
        (422, "spec.containers[0].image: Required value", False),
        (500, "etcdserver: request timed out", False),
    ],
)
def test_which_pod_create_errors_refuse_the_trial_for_good(status, message, forbidden):
    assert tp.pod_forbidden(status, message) is forbidden
