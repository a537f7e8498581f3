"""Status building: the Experiment's and the Trials' status, without a cluster."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from kubetune_controller import reconcile as rc
from kubetune_controller import status as st
from kubetune_controller import trial_plan as tp
from kubetune_controller.model import ExperimentPhase, PodResource, TrialPhase, TrialResource
from kubetune_suggestion.service.models import TrialView as ServiceTrial
from tests.controller.factories import NOW, experiment, pod, progress, trial


def test_conditions_keep_transition_time_when_unchanged():
    d = rc.Decision(ExperimentPhase.RUNNING, rc.REASON_RUNNING, "1 running")
    first = st.render_conditions(st.desired_conditions(d, True, "ok"), [], NOW, 1)
    later = NOW + timedelta(minutes=5)
    again = st.render_conditions(st.desired_conditions(d, True, "ok"), first, later, 1)
    assert [c["lastTransitionTime"] for c in again] == [c["lastTransitionTime"] for c in first]
    done = rc.Decision(ExperimentPhase.SUCCEEDED, rc.REASON_MAX_TRIALS, "done")
    ended = st.render_conditions(st.desired_conditions(done, True, "ok"), first, later, 1)
    by_type = {c["type"]: c for c in ended}
    assert by_type["Succeeded"]["status"] == "True"
    assert by_type["Succeeded"]["reason"] == rc.REASON_MAX_TRIALS
    assert by_type["Succeeded"]["lastTransitionTime"] == "2026-01-01T12:05:00Z"
    assert by_type["Running"]["status"] == "False"
    assert by_type["ServiceAvailable"]["lastTransitionTime"] == "2026-01-01T12:00:00Z"


def test_service_down_condition_is_actionable():
    d = rc.Decision(ExperimentPhase.RUNNING, "ServiceUnavailable", "waiting")
    conds = st.desired_conditions(d, False, "GET http://svc/v1/x: ConnectError")
    svc = next(c for c in conds if c.type == rc.COND_SERVICE)
    assert (svc.status, svc.reason) == (False, "ServiceUnavailable")
    assert "http://svc" in svc.message


def test_status_has_printer_column_fields():
    d = rc.Decision(ExperimentPhase.RUNNING, rc.REASON_RUNNING, "m")
    prog = progress(done=4, pruned=2, succeeded=2, started=2, best_number=1, best_objective=0.5)
    trials = [trial(0, TrialPhase.RUNNING), trial(5, TrialPhase.PENDING)]
    status = st.experiment_status(experiment(), 10, d, prog, trials, [], {1: "exp-1"})
    assert status["trialsSummary"] == "4/10"
    assert (status["running"], status["pending"], status["pruned"]) == (1, 1, 2)
    assert status["bestObjective"] == 0.5
    assert status["bestTrial"]["name"] == "exp-1"
    assert not st.status_changed(status, dict(status))


@pytest.mark.parametrize("field", ["phase", "trialsSummary", "bestObjective"])
def test_status_changed_notices_printer_fields(field):
    old = {"phase": "Running", "trialsSummary": "1/2", "bestObjective": 1.0}
    new = {**old, field: "x"}
    assert st.status_changed(old, new)


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
    assert st.status_changed(old, new)
    assert not st.status_change_urgent(old, new)


@pytest.mark.parametrize(
    "change",
    [
        {"phase": "Succeeded"},
        {"observedGeneration": 2},
        {"conditions": [{"type": "Running", "status": "False", "reason": "Suspended"}]},
    ],
)
def test_phase_generation_and_condition_changes_are_written_at_once(change):
    assert st.status_change_urgent(_running_status(), _running_status(**change))


def test_the_first_best_trial_is_written_at_once():
    old = _running_status()
    del old["bestTrial"]
    assert st.status_change_urgent(old, _running_status())


def test_start_and_completion_times_are_written_once():
    pending = experiment()
    assert st.experiment_times(pending, ExperimentPhase.PENDING, NOW) == {}
    assert st.experiment_times(pending, ExperimentPhase.RUNNING, NOW) == {
        "startTime": "2026-01-01T12:00:00Z"
    }
    started = experiment(status={"startTime": "2026-01-01T11:00:00Z"})
    assert st.experiment_times(started, ExperimentPhase.RUNNING, NOW) == {}
    assert st.experiment_times(started, ExperimentPhase.FAILED, NOW) == {
        "completionTime": "2026-01-01T12:00:00Z"
    }
    ended = experiment(status={"startTime": "x", "completionTime": "y"})
    assert st.experiment_times(ended, ExperimentPhase.SUCCEEDED, NOW) == {}


# --------------------------------------------------------------------------- trials


def _service_trial(state: str, **kw: Any) -> ServiceTrial:
    fields: dict[str, Any] = {
        "number": 0,
        "state": state,
        "params": {},
        "objective": None,
        "last_step": None,
        "stop_reason": None,
        "message": None,
        "created_at": None,
        "started_at": None,
        "finished_at": None,
    }
    fields.update(kw)
    return ServiceTrial(**fields)


def _started(p: PodResource) -> PodResource:
    return replace(p, started=NOW - timedelta(seconds=30))


def test_progress_status_carries_the_start_once_running():
    running = tp.TrialProgress("exp-0", TrialPhase.RUNNING, None)
    status = st.progress_status(trial(0, TrialPhase.PENDING), running, _started(pod(0)))
    assert status == {
        "phase": "Running",
        "message": None,
        "podName": "exp-0",
        "startTime": "2026-01-01T11:59:30Z",
    }
    waiting = tp.TrialProgress("exp-0", TrialPhase.PENDING, "Insufficient nvidia.com/gpu")
    assert st.progress_status(trial(0, None), waiting, _started(pod(0))) == {
        "phase": "Pending",
        "message": "Insufficient nvidia.com/gpu",
        "podName": "exp-0",
    }
    assert "startTime" not in st.progress_status(trial(0), running, None)


def test_a_retry_is_pending_again_in_a_pod_named_for_its_attempt():
    retry = tp.TrialRetry(0, "exp-0", "Evicted", "its Pod was stopped by Kubernetes (Evicted)")
    status = st.retry_status(replace(trial(0), attempt=2), retry, max_retries=3)
    assert status == {
        "phase": "Pending",
        "attempt": 3,
        "podName": "exp-0-retry2",
        "message": "attempt 3 of 4: its Pod was stopped by Kubernetes (Evicted)",
        "startTime": None,
        "lastStep": None,
    }


def test_messages_take_the_last_log_lines_when_there_are_any():
    assert st.with_logs("exit 1", "train", "boom\nbang") == (
        "exit 1; last lines of train:\nboom\nbang"
    )
    assert st.with_logs("exit 1", "train", None) == "exit 1"
    assert st.with_logs("exit 1", "train", "") == "exit 1"


def test_finished_messages_by_phase():
    finish = tp.TrialFinish(0, "exp-0", "failed", "Error", "container train exited with code 1")
    sent = "container train exited with code 1; last lines of train:\nboom"

    def message(phase: TrialPhase, view: ServiceTrial, sent: str = sent) -> str:
        return st.finished_message(phase, finish, view, sent, "val_loss", "train", "boom")

    done = _service_trial("succeeded", objective=0.123456789)
    assert message(TrialPhase.SUCCEEDED, done) == "val_loss=0.123457"
    assert message(TrialPhase.SUCCEEDED, _service_trial("succeeded")) == ""
    pruned = _service_trial("pruned", stop_reason="asha: rung 1")
    assert message(TrialPhase.PRUNED, pruned) == "stopped early: asha: rung 1"
    assert message(TrialPhase.PRUNED, _service_trial("pruned")) == "stopped early: Error"
    silent = message(TrialPhase.METRICS_UNAVAILABLE, _service_trial("metrics_unavailable"))
    assert silent.startswith("the trial ended without reporting 'val_loss'")
    assert silent.endswith("; last lines of train:\nboom")
    # A failure keeps what was sent, or the service's message when none was.
    failed = _service_trial("failed", message="lease expired")
    assert message(TrialPhase.FAILED, failed) == sent
    assert message(TrialPhase.FAILED, failed, sent="") == "lease expired"


def test_finished_status_records_the_result_and_a_condition():
    finish = tp.TrialFinish(0, "exp-0", "succeeded", "Completed", "")
    view = _service_trial("succeeded", objective=0.5, last_step=9)
    short = _started(pod(0, "Succeeded", exit_code=0))
    status = st.finished_status(trial(0, None), short, TrialPhase.SUCCEEDED, finish, view, "m", NOW)
    assert status == {
        "phase": "Succeeded",
        "objective": 0.5,
        "lastStep": 9,
        "message": "m",
        "completionTime": "2026-01-01T12:00:00Z",
        "conditions": [
            {
                "type": "Succeeded",
                "status": "True",
                "reason": "Completed",
                "message": "m",
                "lastTransitionTime": "2026-01-01T12:00:00Z",
            }
        ],
        "podName": "exp-0",
        # Never seen running: its start comes from the Pod.
        "startTime": "2026-01-01T11:59:30Z",
    }
    seen_running = replace(trial(0), started=NOW - timedelta(seconds=5))
    assert "startTime" not in st.finished_status(
        seen_running, short, TrialPhase.SUCCEEDED, finish, view, "m", NOW
    )


@pytest.mark.parametrize(
    ("state", "phase", "kind", "reason"),
    [
        ("failed", TrialPhase.FAILED, "Failed", "OOMKilled"),
        ("metrics_unavailable", TrialPhase.METRICS_UNAVAILABLE, "Failed", "OOMKilled"),
        ("pruned", TrialPhase.PRUNED, "Pruned", "Pruned"),
    ],
)
def test_finished_status_condition_by_phase(
    state: str, phase: TrialPhase, kind: str, reason: str
) -> None:
    finish = tp.TrialFinish(0, "exp-0", "failed", "OOMKilled", "")
    view = _service_trial(state)
    long = "x" * 40000
    status = st.finished_status(trial(0), None, phase, finish, view, long, NOW)
    (cond,) = status["conditions"]
    assert (cond["type"], cond["reason"], len(cond["message"])) == (kind, reason, 32000)
    assert status["message"] == long
    assert ("stopReason" in status) is (phase is TrialPhase.PRUNED)
    if phase is TrialPhase.PRUNED:
        assert status["stopReason"] == "OOMKilled"  # the service's reason, else the plan's


def _refused(number: int, reason: str, message: str) -> TrialResource:
    body = {
        "metadata": {"name": f"exp-{number}", "namespace": "ns", "uid": f"t-{number}"},
        "spec": {"experiment": "exp", "number": number},
        "status": st.refused_status(trial(number, TrialPhase.PENDING), reason, message, NOW),
    }
    return TrialResource.from_body(body)


def test_a_refused_trial_fails_with_its_reason_in_a_condition():
    view = _refused(3, rc.REASON_POD_FORBIDDEN, "violates PodSecurity")
    assert view.phase is TrialPhase.FAILED
    assert view.failure_reason == rc.REASON_POD_FORBIDDEN
    assert view.message == "violates PodSecurity"


def test_pod_admission_follows_the_newest_trial_that_tried_a_pod():
    forbidden = _refused(2, rc.REASON_POD_FORBIDDEN, "violates PodSecurity")
    ran = trial(1, TrialPhase.SUCCEEDED)
    assert st.pod_admission([]).status is True
    assert st.pod_admission([ran]).status is True
    cond = st.pod_admission([ran, forbidden])
    assert (cond.type, cond.status, cond.reason) == (
        rc.COND_PODS_ADMITTED,
        False,
        rc.REASON_POD_FORBIDDEN,
    )
    assert cond.message == "trial exp-2: violates PodSecurity"
    # Neither a trial still waiting nor one refused before any Pod changes it...
    waiting = trial(5, TrialPhase.PENDING)
    invalid = _refused(6, rc.REASON_INVALID_PARAMS, "lr: 5.0 is above its max 1.0")
    assert st.pod_admission([ran, forbidden, waiting, invalid]).status is False
    # ...a later trial whose Pod runs (the namespace's policy changed) does.
    assert st.pod_admission([ran, forbidden, trial(7, TrialPhase.RUNNING)]).status is True
