"""Pure status building: the Experiment's and the Trials' status, conditions and messages.

No I/O here. The controller decides (:mod:`~kubetune_controller.reconcile`,
:mod:`~kubetune_controller.trial_plan`), builds the status to write with these
functions, and patches it (:mod:`~kubetune_controller.recorder`,
:mod:`~kubetune_controller.trials`). What a status says is what ``kubectl
get``, ``kubectl describe`` and ``kubectl wait`` show.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubetune_controller.model import (
    ExperimentPhase,
    ExperimentResource,
    PodResource,
    TrialPhase,
    TrialResource,
    format_time,
)
from kubetune_controller.reconcile import (
    COND_FAILED,
    COND_PODS_ADMITTED,
    COND_RUNNING,
    COND_SERVICE,
    COND_SUCCEEDED,
    COND_SUSPENDED,
    REASON_INVALID_PARAMS,
    REASON_INVALID_TEMPLATE,
    REASON_POD_FORBIDDEN,
    Decision,
    Progress,
)
from kubetune_controller.trial_plan import TrialFinish, TrialProgress, TrialRetry
from kubetune_suggestion.service.models import TrialView as ServiceTrial

# ---------------------------------------------------------------------- experiment


@dataclass(frozen=True)
class DesiredCondition:
    """One desired condition (its transition time is carried over when unchanged)."""

    type: str
    status: bool
    reason: str
    message: str


def desired_conditions(
    decision: Decision, service_ok: bool, service_message: str
) -> list[DesiredCondition]:
    """The Experiment's conditions for a decision and the service's health."""
    phase = decision.phase
    return [
        DesiredCondition(
            COND_RUNNING,
            phase is ExperimentPhase.RUNNING,
            decision.reason,
            decision.message,
        ),
        DesiredCondition(
            COND_SUCCEEDED,
            phase is ExperimentPhase.SUCCEEDED,
            decision.reason if phase is ExperimentPhase.SUCCEEDED else "NotFinished",
            decision.message if phase is ExperimentPhase.SUCCEEDED else "",
        ),
        DesiredCondition(
            COND_FAILED,
            phase is ExperimentPhase.FAILED,
            decision.reason if phase is ExperimentPhase.FAILED else "NotFailed",
            decision.message if phase is ExperimentPhase.FAILED else "",
        ),
        DesiredCondition(
            COND_SUSPENDED,
            phase is ExperimentPhase.SUSPENDED,
            decision.reason if phase is ExperimentPhase.SUSPENDED else "NotSuspended",
            decision.message if phase is ExperimentPhase.SUSPENDED else "",
        ),
        DesiredCondition(
            COND_SERVICE,
            service_ok,
            "ServiceReachable" if service_ok else "ServiceUnavailable",
            service_message,
        ),
    ]


# Failures before a Pod was created (or tried): they say nothing about admission.
_NO_POD_REASONS = frozenset({REASON_INVALID_PARAMS, REASON_INVALID_TEMPLATE})


def pod_admission(trials: Iterable[TrialResource]) -> DesiredCondition:
    """Whether the API server admits trial Pods, judged by the newest trial that tried.

    False (``TrialPodForbidden``, the API server's message) when the newest
    trial whose Pod was created or refused was refused; True once a later
    trial's Pod runs (the namespace's policy or the template was changed).
    Built from the Trials, so an operator restart keeps it.
    """
    tried = [
        t
        for t in trials
        if (t.phase is TrialPhase.RUNNING or (t.phase is not None and t.phase.final))
        and t.failure_reason not in _NO_POD_REASONS
    ]
    if not tried:
        return DesiredCondition(COND_PODS_ADMITTED, True, "NoTrialPodYet", "")
    newest = max(tried, key=lambda t: t.number)
    if newest.failure_reason == REASON_POD_FORBIDDEN:
        return DesiredCondition(
            COND_PODS_ADMITTED,
            False,
            REASON_POD_FORBIDDEN,
            f"trial {newest.name}: {newest.message or 'its Pod was refused'}",
        )
    return DesiredCondition(COND_PODS_ADMITTED, True, "TrialPodsAdmitted", "")


def render_conditions(
    desired: Iterable[DesiredCondition],
    previous: Iterable[Mapping[str, Any]],
    now: datetime,
    generation: int,
) -> list[dict[str, Any]]:
    """Kubernetes condition dicts, keeping ``lastTransitionTime`` when status is unchanged."""
    before = {c.get("type"): c for c in previous}
    out = []
    for cond in desired:
        status = "True" if cond.status else "False"
        old = before.get(cond.type)
        since = (
            old.get("lastTransitionTime")
            if old is not None and old.get("status") == status and old.get("lastTransitionTime")
            else format_time(now)
        )
        out.append(
            {
                "type": cond.type,
                "status": status,
                "reason": cond.reason,
                "message": cond.message,
                "lastTransitionTime": since,
                "observedGeneration": generation,
            }
        )
    return out


def experiment_status(
    experiment: ExperimentResource,
    spec_max_trials: int,
    decision: Decision,
    progress: Progress | None,
    trials: Iterable[TrialResource],
    conditions: list[dict[str, Any]],
    trial_name_of: Mapping[int, str],
) -> dict[str, Any]:
    """The full ``status`` of an Experiment (what printer columns show).

    ``progress`` is ``None`` while the service is unreachable: the counts then
    come from the cluster's Trials and the last recorded best is kept.
    """
    trial_list = list(trials)
    by_phase: dict[TrialPhase, int] = {}
    for t in trial_list:
        if t.phase is not None:
            by_phase[t.phase] = by_phase.get(t.phase, 0) + 1
    status: dict[str, Any] = {
        "phase": decision.phase.value,
        "message": decision.message,
        "observedGeneration": experiment.generation,
        "trialsMax": spec_max_trials,
        "running": by_phase.get(TrialPhase.RUNNING, 0),
        "pending": by_phase.get(TrialPhase.PENDING, 0),
        "serviceUID": experiment.uid,
        "conditions": conditions,
    }
    if progress is not None:
        status.update(
            trialsDone=progress.done,
            succeeded=progress.succeeded,
            failed=progress.failed,
            pruned=progress.pruned,
            metricsUnavailable=progress.metrics_unavailable,
        )
        if progress.best_number is not None and progress.best_objective is not None:
            status["bestObjective"] = progress.best_objective
            status["bestTrial"] = {
                "name": trial_name_of.get(progress.best_number, ""),
                "number": progress.best_number,
                "objective": progress.best_objective,
                "params": dict(progress.best_params or {}),
            }
    else:
        status.update(
            trialsDone=sum(1 for t in trial_list if t.final),
            succeeded=by_phase.get(TrialPhase.SUCCEEDED, 0),
            failed=by_phase.get(TrialPhase.FAILED, 0),
            pruned=by_phase.get(TrialPhase.PRUNED, 0),
            metricsUnavailable=by_phase.get(TrialPhase.METRICS_UNAVAILABLE, 0),
        )
    status["trialsSummary"] = f"{status['trialsDone']}/{spec_max_trials}"
    return status


def status_changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether writing ``new`` would change anything a reader sees."""
    return any(old.get(k) != v for k, v in new.items())


def _condition_states(status: Mapping[str, Any]) -> set[tuple[Any, Any, Any]]:
    return {
        (c.get("type"), c.get("status"), c.get("reason")) for c in status.get("conditions") or []
    }


def status_change_urgent(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether going from ``old`` to ``new`` is more than progress (counts, best, messages).

    A new phase, a condition turning true or false or changing its reason, a
    newly observed generation, or the first best trial are what
    ``kubectl wait`` and people wait for; they are never deferred.
    """
    return (
        old.get("phase") != new.get("phase")
        or old.get("observedGeneration") != new.get("observedGeneration")
        or _condition_states(old) != _condition_states(new)
        or ("bestTrial" in new and "bestTrial" not in old)
        or bool(new.get("phase") and ExperimentPhase(new["phase"]).final)
    )


def experiment_times(
    experiment: ExperimentResource, phase: ExperimentPhase, now: datetime
) -> dict[str, str]:
    """``startTime`` once the experiment leaves Pending, ``completionTime`` once it ends.

    Each is written once: a time already recorded is kept.
    """
    times = {}
    if not experiment.status.get("startTime") and phase is not ExperimentPhase.PENDING:
        times["startTime"] = format_time(now)
    if phase.final and not experiment.status.get("completionTime"):
        times["completionTime"] = format_time(now)
    return times


# --------------------------------------------------------------------------- trials


def progress_status(
    trial: TrialResource, progress: TrialProgress, pod: PodResource | None
) -> dict[str, Any]:
    """A live trial's phase (and why it waits), with its start once it runs."""
    status: dict[str, Any] = {
        "phase": progress.phase.value,
        "message": progress.message,
        "podName": trial.pod_name,
    }
    if progress.phase is TrialPhase.RUNNING and pod is not None and pod.started:
        status["startTime"] = format_time(pod.started)
    return status


def refused_status(
    trial: TrialResource, reason: str, message: str, now: datetime
) -> dict[str, Any]:
    """A trial failed before its Pod ran: the Pod was not made, or was refused.

    Args:
        trial: The Trial.
        reason: Its Failed condition's reason (``TrialPodForbidden``,
            ``InvalidParams``, ``InvalidTemplate``).
        message: Why, for a person (the API server's message included).
        now: The time of the failure.
    """
    return {
        "phase": TrialPhase.FAILED.value,
        "message": message,
        "podName": trial.pod_name,
        "completionTime": format_time(now),
        "conditions": [
            {
                "type": "Failed",
                "status": "True",
                "reason": reason,
                "message": message[:32000],
                "lastTransitionTime": format_time(now),
            }
        ],
    }


def retry_status(trial: TrialResource, retry: TrialRetry, max_retries: int) -> dict[str, Any]:
    """A disrupted trial's next attempt: Pending again, in a Pod of its own (``<trial>-retryN``)."""
    attempt = trial.attempt + 1
    return {
        "phase": TrialPhase.PENDING.value,
        "attempt": attempt,
        "podName": f"{trial.name}-retry{attempt - 1}",
        "message": f"attempt {attempt} of {max_retries + 1}: {retry.message}",
        "startTime": None,
        "lastStep": None,
    }


def with_logs(message: str, container: str, logs: str | None) -> str:
    """A message followed by a container's last log lines, when there are any."""
    return f"{message}; last lines of {container}:\n{logs}" if logs else message


def finished_message(
    phase: TrialPhase,
    finish: TrialFinish,
    view: ServiceTrial,
    sent: str,
    metric: str,
    container: str,
    logs: str | None,
) -> str:
    """What a finished Trial's status says about its end.

    Args:
        phase: The phase the service's state maps to.
        finish: The finish that was planned.
        view: The trial as the service recorded it.
        sent: The message the service was sent (the plan's, with logs).
        metric: The objective metric.
        container: The trial's main container (whose logs ``logs`` are).
        logs: Its last log lines, if read.
    """
    if phase is TrialPhase.METRICS_UNAVAILABLE:
        message = (
            f"the trial ended without reporting {metric!r} "
            f"(write it to $KUBETUNE_METRICS_FILE or call kubetune.report)"
        )
        return with_logs(message, container, logs)
    if phase is TrialPhase.SUCCEEDED:
        return f"{metric}={view.objective:.6g}" if view.objective is not None else ""
    if phase is TrialPhase.PRUNED:
        return f"stopped early: {view.stop_reason or finish.reason}"
    if view.message and not sent:
        return view.message
    return sent


def finished_status(
    trial: TrialResource,
    pod: PodResource | None,
    phase: TrialPhase,
    finish: TrialFinish,
    view: ServiceTrial,
    message: str,
    now: datetime,
) -> dict[str, Any]:
    """A finished Trial's status: its result, its end and the condition saying so."""
    if phase is TrialPhase.SUCCEEDED:
        kind = "Succeeded"
    elif phase in (TrialPhase.FAILED, TrialPhase.METRICS_UNAVAILABLE):
        kind = "Failed"
    else:
        kind = "Pruned"
    status: dict[str, Any] = {
        "phase": phase.value,
        "objective": view.objective,
        "lastStep": view.last_step,
        "message": message,
        "completionTime": format_time(now),
        "conditions": [
            {
                "type": kind,
                "status": "True",
                "reason": finish.reason if phase is not TrialPhase.PRUNED else "Pruned",
                "message": message[:32000],
                "lastTransitionTime": format_time(now),
            }
        ],
    }
    if phase is TrialPhase.PRUNED:
        status["stopReason"] = view.stop_reason or finish.reason
    status["podName"] = trial.pod_name
    if trial.started is None and pod is not None and pod.started is not None:
        # A trial that ended before it was seen running (a short one, or
        # while the operator was down) still gets its start time.
        status["startTime"] = format_time(pod.started)
    return status
