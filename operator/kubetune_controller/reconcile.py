"""Pure experiment decisions: its phase, why, and how many trials to ask for.

No I/O here. :mod:`kubetune_controller.controller` gathers the inputs (the
experiment as last recorded, the service's summary), calls :func:`decide`,
and carries out what it returns; what each trial's Pod implies is
:mod:`~kubetune_controller.trial_plan`'s, and the status written from a
decision :mod:`~kubetune_controller.status`'s.

The split of authority:

- The suggestion service is authoritative for *how many* trials exist and are
  started (its ``ask`` is idempotent and never exceeds ``maxTrials``), so the
  number of new trials to ask for never depends on a cache that may lag.
- The cluster is authoritative for *how a trial ended* (its Pod's phase).
- Whether the experiment has ended is the rule every component shares
  (:func:`kubetune_suggestion.experiment_end.experiment_end`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from kubetune_controller.model import (
    ExperimentPhase,
    ExperimentResource,
    PodResource,
    TrialResource,
)
from kubetune_suggestion.experiment_end import EndReason, TrialCounts, experiment_end
from kubetune_suggestion.service.models import ExperimentSummary
from kubetune_suggestion.spec import ExperimentSpec

# Condition types, usable with ``kubectl wait --for=condition=<type>``.
COND_RUNNING = "Running"
COND_SUCCEEDED = "Succeeded"
COND_FAILED = "Failed"
COND_SUSPENDED = "Suspended"
COND_SERVICE = "ServiceAvailable"
# False while the API server refuses the newest trial's Pod (Pod Security
# admission, another admission webhook): kubectl wait --for=condition=... works.
COND_PODS_ADMITTED = "TrialPodsAdmitted"

# Condition reasons (CamelCase, as Kubernetes conventions ask); those of an
# end are the shared rule's (kubetune_suggestion.experiment_end).
REASON_GOAL = EndReason.GOAL_REACHED.value
REASON_MAX_TRIALS = EndReason.MAX_TRIALS_REACHED.value
REASON_EXHAUSTED = EndReason.SEARCH_SPACE_EXHAUSTED.value
REASON_TOO_MANY_FAILED = EndReason.TOO_MANY_FAILED_TRIALS.value
REASON_NO_SUCCESS = EndReason.NO_TRIAL_SUCCEEDED.value
REASON_INVALID = "InvalidSpec"
REASON_RUNNING = "TrialsRunning"
REASON_SUSPENDED = "Suspended"
# Why a trial failed before its Pod existed (its Trial's Failed condition).
REASON_POD_FORBIDDEN = "TrialPodForbidden"
REASON_INVALID_PARAMS = "InvalidParams"
REASON_INVALID_TEMPLATE = "InvalidTemplate"

# Reasons that end an experiment for good: a later spec edit does not revive it.
# ``MaxTrialsReached`` is not one of them (raising maxTrials continues the
# experiment) and neither is ``InvalidSpec`` (fixing the spec starts it).
_STICKY_REASONS = frozenset(
    {REASON_GOAL, REASON_TOO_MANY_FAILED, REASON_NO_SUCCESS, REASON_EXHAUSTED}
)


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

    @classmethod
    def from_summary(cls, summary: ExperimentSummary) -> Progress:
        """The counts of the service's summary."""
        counts = {str(k): v for k, v in summary.counts.items()}
        best = summary.best
        return cls(
            done=summary.done,
            started=counts.get("running", 0),
            pending=counts.get("pending", 0),
            succeeded=counts.get("succeeded", 0),
            failed=counts.get("failed", 0),
            pruned=counts.get("pruned", 0),
            metrics_unavailable=counts.get("metrics_unavailable", 0),
            best_number=best.number if best is not None else None,
            best_objective=best.objective if best is not None else None,
            best_params=best.params if best is not None else None,
        )

    @property
    def counts(self) -> TrialCounts:
        """The counts as the shared end rule takes them."""
        return TrialCounts(
            done=self.done,
            succeeded=self.succeeded,
            failed=self.failed,
            pruned=self.pruned,
            metrics_unavailable=self.metrics_unavailable,
            running=self.started,
            pending=self.pending,
        )


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


def hold_until_trials_end(decision: Decision, trials: Iterable[TrialResource]) -> Decision:
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


def decide(
    spec: ExperimentSpec,
    previous: ExperimentResource,
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

    end = experiment_end(spec, progress.counts, progress.best_objective, exhausted=exhausted)
    if end is not None:
        phase = ExperimentPhase.SUCCEEDED if end.succeeded else ExperimentPhase.FAILED
        message = end.message + _end_detail(end.reason, best, previous.name)
        return Decision(phase, end.reason.value, message, ending=end.reason.value)
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


def _end_detail(reason: EndReason, best: str, experiment: str) -> str:
    """What an Experiment's end message adds to the shared rule's: the best, where to look."""
    if reason is EndReason.GOAL_REACHED:
        return f": {best}"
    if reason is EndReason.TOO_MANY_FAILED_TRIALS:
        return (
            f"; see `kubectl get trials -l kubetune.io/experiment={experiment}` "
            "and the failed trials' messages"
        )
    if reason is EndReason.NO_TRIAL_SUCCEEDED:
        return "; check the trials' messages"
    return f"; {best}"


def _condition(status: Mapping[str, Any], *types: str) -> tuple[str, str] | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") in types and cond.get("status") == "True":
            return str(cond.get("reason", "")), str(cond.get("message", ""))
    return None


def unchanged(experiment: ExperimentResource, why: str) -> Decision:
    """The experiment's recorded phase, kept while the service cannot be asked."""
    phase = experiment.phase or ExperimentPhase.PENDING
    if phase.final:
        for cond in experiment.status.get("conditions") or []:
            if cond.get("type") in (COND_SUCCEEDED, COND_FAILED) and cond.get("status") == "True":
                return Decision(phase, str(cond.get("reason")), str(cond.get("message")))
    return Decision(phase, "ServiceUnavailable", why)


def settled(
    experiment: ExperimentResource,
    trials: Mapping[str, TrialResource],
    pods: Mapping[str, PodResource],
) -> bool:
    """Whether an experiment has ended with nothing left to clean up."""
    if experiment.phase is None or not experiment.phase.final:
        return False
    # The status written at the end may have counted a trial whose own status
    # was still being written; rewrite it until it shows nothing running.
    if experiment.status.get("running") or experiment.status.get("pending"):
        return False
    if any(not t.final for t in trials.values()):
        return False
    return all(p.ended or p.deleting for p in pods.values())
