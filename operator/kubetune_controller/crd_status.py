"""Models for the parts of kubetune's resources that the operator writes.

``Experiment.status``, ``Trial.spec`` and ``Trial.status`` have no user-facing
source of truth the way ``Experiment.spec`` has
:class:`kubetune_suggestion.spec.ExperimentSpec`: these pydantic models are it.
:mod:`kubetune_controller.crdgen` turns them into the CRDs' schemas, so the
operator may use them to build status patches that always fit the CRD.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _StatusModel(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class StatusCondition(_StatusModel):
    """A condition in the shape of ``metav1.Condition``, usable with ``kubectl wait``."""

    type: str = Field(
        max_length=316, description="Condition type, e.g. Running, Succeeded, Failed, Degraded."
    )
    status: str = Field(description="True, False or Unknown.")
    reason: str | None = Field(
        default=None, max_length=1024, description="One CamelCase word a program can match."
    )
    message: str | None = Field(
        default=None, max_length=32768, description="What happened, for a person."
    )
    lastTransitionTime: str | None = Field(
        default=None, description="When status last changed (RFC 3339)."
    )
    observedGeneration: int | None = Field(
        default=None, ge=0, description="The spec generation this describes."
    )


class BestTrialStatus(_StatusModel):
    """The best finished trial so far."""

    name: str | None = Field(default=None, description="Name of the Trial object.")
    number: int | None = Field(
        default=None, ge=0, description="Trial number within the experiment."
    )
    objective: float | None = Field(default=None, description="Its objective value.")
    params: dict[str, Any] = Field(default_factory=dict, description="Its parameter values.")


class ExperimentStatus(_StatusModel):
    """``status`` of an Experiment: what a person needs to see, never the metric history."""

    phase: str | None = Field(
        default=None, description="Pending, Running, Suspended, Succeeded or Failed."
    )
    message: str | None = Field(default=None, description="A one-line explanation of the phase.")
    conditions: list[StatusCondition] = Field(
        default_factory=list,
        description="Running, Succeeded, Failed, Degraded...: `kubectl wait --for=condition=X`.",
    )
    observedGeneration: int | None = Field(
        default=None, ge=0, description="The spec generation last acted on."
    )
    trialsDone: int | None = Field(
        default=None, ge=0, description="Trials that have ended, in any way."
    )
    trialsMax: int | None = Field(
        default=None, ge=0, description="spec.maxTrials as last acted on."
    )
    trialsSummary: str | None = Field(
        default=None, description='Trials done out of the maximum, e.g. "12/60".'
    )
    running: int | None = Field(default=None, ge=0, description="Trials running now.")
    pending: int | None = Field(
        default=None, ge=0, description="Trials created and not yet running."
    )
    succeeded: int | None = Field(
        default=None, ge=0, description="Trials that ended with an objective value."
    )
    failed: int | None = Field(default=None, ge=0, description="Trials whose Pod failed.")
    pruned: int | None = Field(
        default=None, ge=0, description="Trials stopped early by the early-stopping rule."
    )
    metricsUnavailable: int | None = Field(
        default=None, ge=0, description="Trials that ended without reporting the objective metric."
    )
    bestTrial: BestTrialStatus | None = Field(
        default=None, description="The best finished trial so far."
    )
    bestObjective: float | None = Field(
        default=None, description="The best objective value so far."
    )
    startTime: str | None = Field(
        default=None, description="When the first trial was created (RFC 3339)."
    )
    completionTime: str | None = Field(
        default=None, description="When the experiment ended (RFC 3339)."
    )
    serviceUID: str | None = Field(
        default=None, description="The id the suggestion service knows the experiment by."
    )


class TrialSpec(_StatusModel):
    """``spec`` of a Trial, written by the operator, immutable once created."""

    experiment: str = Field(
        min_length=1, max_length=253, description="Name of the owning Experiment."
    )
    number: int = Field(
        ge=0, description="Trial number within the experiment, from 0, never reused."
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="The parameter values of this trial."
    )
    podName: str | None = Field(
        default=None, max_length=253, description="Name of the trial's Pod."
    )


class TrialStatus(_StatusModel):
    """``status`` of a Trial."""

    phase: str | None = Field(
        default=None,
        description="Pending, Running, Succeeded, Failed, Pruned or MetricsUnavailable.",
    )
    objective: float | None = Field(
        default=None, description="The trial's result (per spec.objective.strategy)."
    )
    lastStep: int | None = Field(
        default=None, ge=0, description="The last step the trial reported."
    )
    podName: str | None = Field(default=None, description="Name of the trial's Pod.")
    attempt: int | None = Field(
        default=None,
        ge=1,
        description="Which run of the trial this is: 1, then one more per retry (spec.maxRetries).",
    )
    message: str | None = Field(
        default=None,
        description="Why the trial is in this phase (last lines for MetricsUnavailable).",
    )
    stopReason: str | None = Field(
        default=None, description="Why the early-stopping rule stopped it."
    )
    conditions: list[StatusCondition] = Field(
        default_factory=list, description="Conditions of the trial."
    )
    startTime: str | None = Field(
        default=None, description="When the trial's Pod started (RFC 3339)."
    )
    completionTime: str | None = Field(default=None, description="When the trial ended (RFC 3339).")
