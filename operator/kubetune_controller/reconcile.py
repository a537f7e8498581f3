"""Pure reconcile decisions: what to do, given what the cluster and service say.

No I/O here. :mod:`kubetune_controller.controller` gathers the inputs (the
cached Trials and Pods, the service's stop orders and summary), calls these
functions, and carries out what they return. Every decision is safe to repeat:
the controller may have crashed after doing half of a plan, and the next
reconcile must finish the job without duplicating anything.

The split of authority:

- The suggestion service is authoritative for *how many* trials exist and are
  started (its ``ask`` is idempotent and never exceeds ``maxTrials``), so the
  number of new trials to ask for never depends on a cache that may lag.
- The cluster is authoritative for *how a trial ended* (its Pod's phase).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from kubetune_controller.model import (
    ExperimentPhase,
    ExperimentView,
    PodView,
    TrialPhase,
    TrialView,
    format_time,
)
from kubetune_suggestion.spec import ExperimentSpec

# Condition types, usable with ``kubectl wait --for=condition=<type>``.
COND_RUNNING = "Running"
COND_SUCCEEDED = "Succeeded"
COND_FAILED = "Failed"
COND_SUSPENDED = "Suspended"
COND_SERVICE = "ServiceAvailable"

# Condition reasons (CamelCase, as Kubernetes conventions ask).
REASON_GOAL = "GoalReached"
REASON_MAX_TRIALS = "MaxTrialsReached"
REASON_EXHAUSTED = "SearchSpaceExhausted"
REASON_TOO_MANY_FAILED = "TooManyFailedTrials"
REASON_NO_SUCCESS = "NoTrialSucceeded"
REASON_INVALID = "InvalidSpec"
REASON_RUNNING = "TrialsRunning"
REASON_SUSPENDED = "Suspended"

# Reasons that end an experiment for good: a later spec edit does not revive it.
# ``MaxTrialsReached`` is not one of them (raising maxTrials continues the
# experiment) and neither is ``InvalidSpec`` (fixing the spec starts it).
_STICKY_REASONS = frozenset(
    {REASON_GOAL, REASON_TOO_MANY_FAILED, REASON_NO_SUCCESS, REASON_EXHAUSTED}
)


# --------------------------------------------------------------------------- trials


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
    maybe_lost: list[TrialView] = field(default_factory=list)
    # Seconds until a held-back Running write is due (plan again then).
    recheck_after: float | None = None


def plan_trials(
    trials: Iterable[TrialView],
    pods: Mapping[str, PodView],
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
            failed = _failed(trial, pod)
            if _disrupted(pod):
                retry = _retry_or_finish(trial, failed.reason, failed.message, max_retries)
                if isinstance(retry, TrialRetry):
                    plan.retry.append(retry)
                else:
                    plan.finish.append(replace(retry, wants_logs=True))
            else:
                plan.finish.append(failed)
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


def _running_wait(pod: PodView, phase: TrialPhase, now: datetime, delay: float) -> float:
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


def _disrupted(pod: PodView) -> bool:
    """Whether a failed Pod ended through no fault of its trial (worth a retry).

    OOMKilled, exit codes, timeouts and image errors are the trial's own: a
    new Pod would fail the same way.
    """
    # OutOfcpu, OutOfmemory...: the kubelet refused the Pod at admission.
    reason = pod.reason or ""
    return pod.disruption is not None or reason in _DISRUPTION_REASONS or reason.startswith("OutOf")


def _retry_or_finish(
    trial: TrialView, reason: str, message: str, max_retries: int
) -> TrialRetry | TrialFinish:
    """Run a disrupted trial again while ``spec.maxRetries`` allows, else fail it."""
    if trial.attempt <= max_retries:
        return TrialRetry(trial.number, trial.name, reason, message)
    if max_retries:
        message += f"; not retried: it ran {trial.attempt} times (spec.maxRetries {max_retries})"
    return TrialFinish(trial.number, trial.name, "failed", reason, message)


def _failed(trial: TrialView, pod: PodView) -> TrialFinish:
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
    trial: TrialView, service_state: str | None, stop_reason: str | None, max_retries: int = 0
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


def service_lost_trials(trials: Iterable[TrialView], allocated: int) -> bool:
    """Whether the service has forgotten trials the cluster holds.

    The service allocates a number before its Trial is created, so a Trial
    numbered at or past the service's count of allocated trials means the
    service lost them (its database was reset, e.g. an emptyDir).
    """
    return any(t.number >= allocated for t in trials)


def restore_records(trials: Iterable[TrialView]) -> list[dict[str, Any]]:
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


# ---------------------------------------------------------------------- experiment


@dataclass(frozen=True)
class Progress:
    """The service's counts for one experiment (its ``summary``)."""

    done: int
    started: int
    pending: int
    succeeded: int
    failed: int
    pruned: int
    metrics_unavailable: int
    best_number: int | None
    best_objective: float | None
    best_params: Mapping[str, Any] | None = None

    @property
    def failures(self) -> int:
        """Trials that count against ``maxFailedTrials`` (no usable result)."""
        return self.failed + self.metrics_unavailable


@dataclass(frozen=True)
class Decision:
    """The experiment's phase and what it implies."""

    phase: ExperimentPhase
    reason: str
    message: str
    # How many trials to ask the service for (0 when none should start).
    ask: int = 0
    # Set when the experiment has ended: live trials are stopped with it.
    ending: str | None = None


def hold_until_trials_end(decision: Decision, trials: Iterable[TrialView]) -> Decision:
    """A decision to end, held at ``Running`` until every Trial shows its own end.

    The service counts a trial done as soon as it is finished there; its
    Trial's status is written just after (and a stopped trial's Pod goes a
    little later). ``Succeeded`` or ``Failed`` written before that would show
    trials still running under an ended experiment, to ``kubectl wait`` too.
    """
    live = sum(1 for t in trials if not t.final)
    if not decision.phase.final or live == 0:
        return decision
    return replace(
        decision,
        phase=ExperimentPhase.RUNNING,
        reason="Ending",
        message=f"{decision.message}; waiting for {live} trial{'s' if live > 1 else ''} to end",
    )


def goal_reached(spec: ExperimentSpec, best: float | None) -> bool:
    """Whether ``best`` meets ``spec.objective.target``."""
    target = spec.objective.target
    if target is None or best is None:
        return False
    if spec.objective.direction == "minimize":
        return best <= target
    return best >= target


def decide(
    spec: ExperimentSpec,
    previous: ExperimentView,
    progress: Progress,
    exhausted: bool,
    trial_name_of: Mapping[int, str] | None = None,
) -> Decision:
    """Decide the experiment's phase and how many trials to ask for.

    Args:
        spec: The parsed spec.
        previous: The experiment as last seen (its recorded phase and reason).
        progress: The service's counts.
        exhausted: Whether the service said no more trials can be suggested.
        trial_name_of: Trial names by number, for messages.

    Returns:
        The decision.
    """
    names = trial_name_of or {}
    metric = spec.objective.metric
    best = (
        f"best {metric}={progress.best_objective:.6g} "
        f"(trial {names.get(progress.best_number, progress.best_number)})"
        if progress.best_objective is not None and progress.best_number is not None
        else f"no trial has reported {metric} yet"
    )
    prev_phase = previous.phase
    prev_reason = _condition(previous.status, COND_SUCCEEDED, COND_FAILED)
    if prev_phase is not None and prev_phase.final and prev_reason is not None:
        reason, message = prev_reason
        # Only a user raising maxTrials after the end revives an experiment;
        # never what the service says (its database may have been replaced).
        raised = spec.maxTrials > int(previous.status.get("trialsMax") or spec.maxTrials)
        if reason in _STICKY_REASONS or not (reason == REASON_MAX_TRIALS and raised):
            return Decision(prev_phase, reason, message, ending=reason)

    if goal_reached(spec, progress.best_objective):
        return Decision(
            ExperimentPhase.SUCCEEDED,
            REASON_GOAL,
            f"objective target {metric}={spec.objective.target:g} reached: {best}",
            ending=REASON_GOAL,
        )
    if spec.maxFailedTrials is not None and progress.failures > spec.maxFailedTrials:
        return Decision(
            ExperimentPhase.FAILED,
            REASON_TOO_MANY_FAILED,
            f"{progress.failures} trials failed or reported no {metric}, more than "
            f"maxFailedTrials={spec.maxFailedTrials}; see `kubectl get trials -l "
            f"kubetune.io/experiment={previous.name}` and the failed trials' messages",
            ending=REASON_TOO_MANY_FAILED,
        )
    if progress.done >= spec.maxTrials or (exhausted and progress.started + progress.pending == 0):
        if progress.best_objective is None:
            return Decision(
                ExperimentPhase.FAILED,
                REASON_NO_SUCCESS,
                f"all {progress.done} trials ended without a {metric} result "
                f"({progress.failed} failed, {progress.metrics_unavailable} reported no "
                f"{metric}, {progress.pruned} pruned); check the trials' messages",
                ending=REASON_NO_SUCCESS,
            )
        if progress.done >= spec.maxTrials:
            return Decision(
                ExperimentPhase.SUCCEEDED,
                REASON_MAX_TRIALS,
                f"{progress.done} of {spec.maxTrials} trials done; {best}",
                ending=REASON_MAX_TRIALS,
            )
        return Decision(
            ExperimentPhase.SUCCEEDED,
            REASON_EXHAUSTED,
            f"the search space is exhausted after {progress.done} trials; {best}",
            ending=REASON_EXHAUSTED,
        )
    if spec.suspend:
        return Decision(
            ExperimentPhase.SUSPENDED,
            REASON_SUSPENDED,
            f"spec.suspend is true: no new trials start ({progress.started} still running); "
            "set it to false to continue",
        )
    # Started trials count against parallelism; pending ones (handed out but
    # never started, e.g. the operator crashed before creating them) are what
    # ``ask`` returns first, so they fill these slots before any new trial.
    slots = max(0, spec.parallelism - progress.started)
    slots = min(slots, max(0, spec.maxTrials - progress.done - progress.started))
    return Decision(
        ExperimentPhase.RUNNING,
        REASON_RUNNING,
        f"{progress.started} running, {progress.done} of {spec.maxTrials} done; {best}",
        # Pending ones are still handed out after the sampler ran dry (a retry).
        ask=0 if exhausted and not progress.pending else slots,
    )


def _condition(status: Mapping[str, Any], *types: str) -> tuple[str, str] | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") in types and cond.get("status") == "True":
            return str(cond.get("reason", "")), str(cond.get("message", ""))
    return None


# -------------------------------------------------------------------------- status


@dataclass(frozen=True)
class Condition:
    """One desired condition (its transition time is carried over when unchanged)."""

    type: str
    status: bool
    reason: str
    message: str


def desired_conditions(
    decision: Decision, service_ok: bool, service_message: str
) -> list[Condition]:
    """The Experiment's conditions for a decision and the service's health."""
    phase = decision.phase
    return [
        Condition(
            COND_RUNNING,
            phase is ExperimentPhase.RUNNING,
            decision.reason,
            decision.message,
        ),
        Condition(
            COND_SUCCEEDED,
            phase is ExperimentPhase.SUCCEEDED,
            decision.reason if phase is ExperimentPhase.SUCCEEDED else "NotFinished",
            decision.message if phase is ExperimentPhase.SUCCEEDED else "",
        ),
        Condition(
            COND_FAILED,
            phase is ExperimentPhase.FAILED,
            decision.reason if phase is ExperimentPhase.FAILED else "NotFailed",
            decision.message if phase is ExperimentPhase.FAILED else "",
        ),
        Condition(
            COND_SUSPENDED,
            phase is ExperimentPhase.SUSPENDED,
            decision.reason if phase is ExperimentPhase.SUSPENDED else "NotSuspended",
            decision.message if phase is ExperimentPhase.SUSPENDED else "",
        ),
        Condition(
            COND_SERVICE,
            service_ok,
            "ServiceReachable" if service_ok else "ServiceUnavailable",
            service_message,
        ),
    ]


def render_conditions(
    desired: Iterable[Condition],
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
    experiment: ExperimentView,
    spec_max_trials: int,
    decision: Decision,
    progress: Progress | None,
    trials: Iterable[TrialView],
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
