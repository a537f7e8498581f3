"""Pure trial decisions: what each trial's Pod implies, and what a lost service gets back.

No I/O here. The controller gathers the experiment's cached Trials and Pods
and the service's stop orders, calls :func:`plan_trials`, and carries out the
plan, one task per trial (:mod:`kubetune_controller.trials`). Every decision
is safe to repeat: the controller may have crashed after doing half of a plan,
and the next reconcile must finish the job without duplicating anything.

The cluster is authoritative for *how a trial ended* (its Pod's phase); the
service for whether it should stop (its stop orders).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from kubetune_controller.model import PodResource, TrialPhase, TrialResource

# 403 answers to a Pod create that pass: the Pod may be admitted later.
_TRANSIENT_FORBIDDEN = (
    "exceeded quota",  # ResourceQuota: admitted once other Pods end
    "because it is being terminated",  # the namespace goes, and the trial with it
)


def pod_forbidden(status: int, message: str) -> bool:
    """Whether a Pod create's error answer means the trial's Pod will never be admitted.

    403 Forbidden from an admission plugin (Pod Security admission's
    ``violates PodSecurity "restricted:latest": ...``, a webhook, a
    LimitRange) refuses the same Pod every time: the trial fails with that
    reason, rather than being retried unseen. A quota that is used up is
    not such a refusal: the create is retried.
    """
    return status == 403 and not any(t in message for t in _TRANSIENT_FORBIDDEN)


@dataclass(frozen=True)
class TrialFinish:
    """A trial whose run is over: tell the service, then record it on the Trial."""

    number: int
    name: str
    # The service state to finish with (CONTRACT.md): succeeded | failed | pruned.
    state: str
    # Machine-readable reason (a stop reason for pruned trials).
    reason: str
    message: str
    # Whether the container's last log lines should be appended to the message.
    wants_logs: bool = False


@dataclass(frozen=True)
class TrialRetry:
    """A trial whose Pod was lost through no fault of its own: run it again."""

    number: int
    name: str
    # What happened to the Pod, machine-readable (Evicted, PodLost...).
    reason: str
    message: str


@dataclass(frozen=True)
class TrialProgress:
    """A live trial whose phase or waiting message changed."""

    name: str
    phase: TrialPhase
    message: str | None


@dataclass(frozen=True)
class PodDeletion:
    """A trial Pod to delete (stop the trial), and why."""

    name: str
    number: int
    reason: str


@dataclass(frozen=True)
class TrialPlan:
    """What to do with the trials of one experiment."""

    finish: list[TrialFinish] = field(default_factory=list)
    retry: list[TrialRetry] = field(default_factory=list)
    progress: list[TrialProgress] = field(default_factory=list)
    delete_pods: list[PodDeletion] = field(default_factory=list)
    # Trials whose Pod is missing from the cache for a while: the controller
    # confirms with a direct read (and the service's view) before failing them.
    maybe_lost: list[TrialResource] = field(default_factory=list)
    # Seconds until a held-back Running write is due (plan again then).
    recheck_after: float | None = None


def plan_trials(
    trials: Iterable[TrialResource],
    pods: Mapping[str, PodResource],
    stops: Mapping[int, str],
    ending: str | None,
    now: datetime,
    lost_grace_seconds: float,
    running_delay_seconds: float = 0.0,
    max_retries: int = 0,
) -> TrialPlan:
    """Decide, for every trial of an experiment, what its Pod's state implies.

    Args:
        trials: The experiment's Trials.
        pods: Its trial Pods by name.
        stops: Stop orders from the service (trial number -> reason).
        ending: When the experiment has ended, why; every live trial is stopped.
        now: The current time.
        lost_grace_seconds: How old a live Trial must be before a missing Pod
            counts as possibly lost.
        running_delay_seconds: A Trial is marked Running once its Pod has
            run this long (by the Pod's ``startTime``). A trial that ends
            sooner gets one status write, its final one, instead of two: the
            Job controller batches Pod updates for the same reason.
        max_retries: ``spec.maxRetries``: how often a trial whose Pod was
            disrupted (evicted, preempted, its node lost) runs again.

    Returns:
        The plan; it only names actions, the controller performs them.
    """
    plan = TrialPlan()
    recheck: list[float] = []
    for trial in sorted(trials, key=lambda t: t.number):
        pod = pods.get(trial.pod_name)
        if trial.final:
            # A final Trial whose Pod still runs (a stop that crashed halfway).
            if pod is not None and not pod.ended and not pod.deleting:
                plan.delete_pods.append(
                    PodDeletion(pod.name, trial.number, trial.stop_reason or "TrialFinished")
                )
            continue
        stop = stops.get(trial.number) or ending or trial.stop_reason
        if pod is not None and pod.phase == "Succeeded":
            # Finished on its own before (or while) the stop arrived: a result,
            # once the collector has delivered the last reports (it drains
            # when the kubelet stops it, just after the training exits).
            if not pod.sidecar_running:
                plan.finish.append(
                    TrialFinish(trial.number, trial.name, "succeeded", "Completed", "")
                )
        elif stop:
            if pod is None or pod.ended or pod.deleting:
                plan.finish.append(
                    TrialFinish(trial.number, trial.name, "pruned", stop, f"stopped: {stop}")
                )
            else:
                plan.delete_pods.append(PodDeletion(pod.name, trial.number, stop))
        elif pod is None:
            age = (now - trial.created).total_seconds() if trial.created else math.inf
            if age >= lost_grace_seconds:
                plan.maybe_lost.append(trial)
        elif pod.phase == "Failed":
            _plan_failed(plan, trial, pod, max_retries)
        elif not pod.deleting:
            phase = TrialPhase.RUNNING if pod.phase == "Running" else TrialPhase.PENDING
            message = pod.waiting_message if phase is TrialPhase.PENDING else None
            if phase == trial.phase and message == trial.message:
                continue
            wait = _running_wait(pod, phase, now, running_delay_seconds)
            if wait > 0:
                recheck.append(wait)
            else:
                plan.progress.append(TrialProgress(trial.name, phase, message))
    return replace(plan, recheck_after=min(recheck)) if recheck else plan


def _plan_failed(plan: TrialPlan, trial: TrialResource, pod: PodResource, max_retries: int) -> None:
    """A failed Pod: its trial fails, or runs again when Kubernetes ended it."""
    failed = _failed(trial, pod)
    if not _disrupted(pod):
        plan.finish.append(failed)
        return
    retry = _retry_or_finish(trial, failed.reason, failed.message, max_retries)
    if isinstance(retry, TrialRetry):
        plan.retry.append(retry)
    else:
        plan.finish.append(replace(retry, wants_logs=True))


def _running_wait(pod: PodResource, phase: TrialPhase, now: datetime, delay: float) -> float:
    """Seconds to hold back a Running write; 0 to write now.

    Without a start time, or with one in the future (a node's clock ahead of
    ours), the write is not held back: a wait that might never end is worse
    than an extra write.
    """
    if phase is not TrialPhase.RUNNING or delay <= 0 or pod.started is None:
        return 0.0
    ran = (now - pod.started).total_seconds()
    if ran < 0:
        return 0.0
    # startTime has whole seconds: the Pod may have started up to a second
    # after it says, so count from the end of that second.
    ran -= 1.0
    if ran >= delay:
        return 0.0
    return delay - ran


# Pod-level reasons the kubelet gives a Pod it ended for reasons of its node,
# not of the trial: out of a resource, preempted, the node shutting down.
_DISRUPTION_REASONS = frozenset(
    {
        "Evicted",
        "Preempting",
        "Terminated",
        "Shutdown",
        "NodeShutdown",
        "NodeLost",
        "UnexpectedAdmissionError",
    }
)


def _disrupted(pod: PodResource) -> bool:
    """Whether a failed Pod ended through no fault of its trial (worth a retry).

    OOMKilled, exit codes, timeouts and image errors are the trial's own: a
    new Pod would fail the same way.
    """
    # OutOfcpu, OutOfmemory...: the kubelet refused the Pod at admission.
    reason = pod.reason or ""
    return pod.disruption is not None or reason in _DISRUPTION_REASONS or reason.startswith("OutOf")


def _retry_or_finish(
    trial: TrialResource, reason: str, message: str, max_retries: int
) -> TrialRetry | TrialFinish:
    """Run a disrupted trial again while ``spec.maxRetries`` allows, else fail it."""
    if trial.attempt <= max_retries:
        return TrialRetry(trial.number, trial.name, reason, message)
    if max_retries:
        message += f"; not retried: it ran {trial.attempt} times (spec.maxRetries {max_retries})"
    return TrialFinish(trial.number, trial.name, "failed", reason, message)


def _failed(trial: TrialResource, pod: PodResource) -> TrialFinish:
    if _disrupted(pod):
        reason = pod.disruption or pod.reason or "Disrupted"
        what = f"its Pod was stopped by Kubernetes ({reason})"
        return TrialFinish(trial.number, trial.name, "failed", reason, what, wants_logs=True)
    if pod.reason == "DeadlineExceeded":
        what = "ran longer than spec.trialTimeoutSeconds (its Pod's activeDeadlineSeconds)"
        return TrialFinish(trial.number, trial.name, "failed", "TimedOut", what, wants_logs=True)
    ends = [c for c in pod.ended_containers if c.exit_code != 0] or list(pod.ended_containers)
    if ends:
        end = ends[0]
        what = f"container {end.name} exited with code {end.exit_code}"
        if end.reason and end.reason not in ("Error", "Completed"):
            what += f" ({end.reason})"
        reason = end.reason or "Error"
    else:
        what, reason = "the Pod failed", pod.reason or "PodFailed"
        if pod.reason:
            what += f" ({pod.reason})"
    return TrialFinish(trial.number, trial.name, "failed", reason, what, wants_logs=True)


def lost_trial(
    trial: TrialResource, service_state: str | None, stop_reason: str | None, max_retries: int = 0
) -> TrialFinish | TrialRetry | None:
    """Decide about a Trial whose Pod is confirmed absent from the API server.

    Args:
        trial: The Trial.
        service_state: The trial's state in the service (``None`` if unknown there).
        stop_reason: The service's recorded stop reason, if any.
        max_retries: ``spec.maxRetries``: a lost Pod (its node lost, or
            evicted and deleted) is a disruption, retried like one.

    Returns:
        The finish or retry to perform, or ``None`` when the trial is simply
        not started yet (``pending`` in the service: the next ``ask``
        re-returns it and the controller creates its Pod).
    """
    if service_state == "pending":
        return None
    if stop_reason:
        return TrialFinish(
            trial.number, trial.name, "pruned", stop_reason, f"stopped: {stop_reason}"
        )
    return _retry_or_finish(
        trial,
        "PodLost",
        f"Pod {trial.pod_name} disappeared before the trial finished "
        "(deleted by someone, evicted, or its node was lost)",
        max_retries,
    )


# What each Trial phase is in the service (a Pending Trial's Pod exists or is
# being made: to the service it is started, like a Running one).
_SERVICE_STATES = {
    TrialPhase.PENDING: "running",
    TrialPhase.RUNNING: "running",
    TrialPhase.SUCCEEDED: "succeeded",
    TrialPhase.FAILED: "failed",
    TrialPhase.PRUNED: "pruned",
    TrialPhase.METRICS_UNAVAILABLE: "metrics_unavailable",
}


def service_lost_trials(trials: Iterable[TrialResource], allocated: int) -> bool:
    """Whether the service has forgotten trials the cluster holds.

    The service allocates a number before its Trial is created, so a Trial
    numbered at or past the service's count of allocated trials means the
    service lost them (its database was reset, e.g. an emptyDir).
    """
    return any(t.number >= allocated for t in trials)


def restore_records(trials: Iterable[TrialResource]) -> list[dict[str, Any]]:
    """The Trials as the service's ``restore`` takes them, by number.

    A Trial without a phase yet is new (its Pod is being created): it is
    restored as started, as are Pending and Running ones, so the service counts
    it against parallelism and takes its reports (tokens do not depend on the
    database). Only the final value is known for ended trials: their
    intermediate reports were in the lost database.
    """
    records = []
    for t in sorted(trials, key=lambda t: t.number):
        state = _SERVICE_STATES[t.phase] if t.phase is not None else "running"
        record: dict[str, Any] = {"number": t.number, "params": dict(t.params), "state": state}
        if state in ("succeeded", "pruned") and t.objective is not None:
            record["objective"] = t.objective
        if state == "pruned":
            record["step"] = t.last_step
            record["stop_reason"] = t.stop_reason
        if t.message and state != "running":
            record["message"] = t.message
        records.append(record)
    return records
