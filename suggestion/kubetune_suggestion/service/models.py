"""Request and response models of the suggestion service (HTTP and in-process alike).

Wire names are snake_case; the Experiment ``spec`` inside a registration keeps
the manifest's camelCase names (it is the user's document).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class TrialState(StrEnum):
    """A trial's state in the store (the engine sees pending and running as running)."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    PRUNED = "pruned"
    METRICS_UNAVAILABLE = "metrics_unavailable"

    @property
    def finished(self) -> bool:
        """Whether the trial has ended."""
        return self not in (TrialState.PENDING, TrialState.RUNNING)


FinishState = Literal["succeeded", "failed", "pruned", "metrics_unavailable"]
RestoreState = Literal["running", "succeeded", "failed", "pruned", "metrics_unavailable"]
# Trial numbers fit the store's 32-bit column, with room for the next one.
MAX_TRIAL_NUMBER = 2**31 - 2


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Response(BaseModel):
    model_config = ConfigDict(frozen=True)


class RegisterRequest(_Request):
    """Body of ``PUT /v1/experiments/{uid}``."""

    name: str = Field(min_length=1, max_length=253, description="The Experiment's metadata.name.")
    namespace: str = Field(default="default", min_length=1, max_length=253)
    spec: dict[str, Any] = Field(description="The Experiment's spec, as in the manifest.")


class AskRequest(_Request):
    """Body of ``POST /v1/experiments/{uid}/ask`` (no body at all: every field's default)."""

    count: int = Field(
        default=1, ge=1, le=1000, strict=True, description="How many trials at most."
    )
    parallelism: int | None = Field(
        default=None,
        ge=1,
        le=10_000,
        strict=True,
        description="If set, hand out no new trial while this many are pending or running "
        "(checked with the allocation, so asks may overlap trial starts).",
    )
    ask_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="Idempotency key: an ask with the same id first gets back the trials "
        "earlier asks with it handed out that nobody started. Without one, every ask gets "
        "new trials only.",
    )
    lease_seconds: int | None = Field(
        default=None,
        ge=1,
        le=604_800,
        strict=True,
        description="Each new trial must start, report or finish within this many seconds "
        "of the ask and of each start or report, or it is failed as abandoned and its slot "
        "freed. Without it, trials never expire.",
    )


class StartRequest(_Request):
    """Body of ``POST /v1/experiments/{uid}/start``."""

    numbers: list[int] = Field(
        min_length=1, max_length=1000, description="Trials handed out by ask that now run."
    )


class ObservationRequest(_Request):
    """Body of ``POST .../trials/{n}/observations``: one report of a running trial."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    step: int = Field(ge=0, description="The training step (resource units of early stopping).")
    metrics: dict[str, float] = Field(min_length=1, description="Finite numbers by metric name.")


class FinishRequest(_Request):
    """Body of ``POST .../trials/{n}/finish``.

    With ``metrics``, the finish also stores the trial's final report (what
    Optuna calls ``tell``), which must then carry the trial's token like any
    report; ``step`` defaults to one past the last reported step.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    state: FinishState
    message: str | None = Field(default=None, max_length=8192)
    metrics: dict[str, float] | None = Field(
        default=None,
        min_length=1,
        description="The final report's metrics (finite numbers by name); needs the token.",
    )
    step: int | None = Field(
        default=None,
        ge=0,
        strict=True,
        description="The final report's step (only with metrics); default: last step + 1.",
    )


class RestoreTrial(_Request):
    """One trial of ``POST /v1/experiments/{uid}/restore``, as the cluster still holds it."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    number: int = Field(ge=0, le=MAX_TRIAL_NUMBER, strict=True)
    params: dict[str, Any] = Field(description="Its configuration (checked against the space).")
    state: RestoreState
    objective: float | None = Field(
        default=None,
        description="Its result: required for succeeded, kept for pruned, ignored otherwise.",
    )
    step: int | None = Field(
        default=None,
        ge=0,
        strict=True,
        description="For pruned: the step it was stopped at (its stop step); ignored otherwise.",
    )
    message: str | None = Field(default=None, max_length=8192)
    stop_reason: str | None = Field(
        default=None, max_length=8192, description="Why it was stopped (finished trials only)."
    )


class RetryRequest(_Request):
    """Body of ``POST /v1/experiments/{uid}/trials/{n}/retry`` (optional)."""

    ask_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="Hand the new attempt back, pending, to the next ask with this id "
        "(without one: it is running at once).",
    )


class RestoreRequest(_Request):
    """Body of ``POST /v1/experiments/{uid}/restore``."""

    trials: list[RestoreTrial] = Field(max_length=100_000)


class ExperimentView(_Response):
    """A registered experiment."""

    uid: str
    name: str
    namespace: str
    spec: dict[str, Any]
    spec_version: int = Field(description="Bumped on every spec change.")
    created: bool = Field(description="Whether this registration created the experiment.")


class RestoreResult(_Response):
    """Answer to ``restore``."""

    restored: int = Field(description="Trials inserted now (those already stored are not).")
    next_number: int = Field(description="The number the next allocated trial gets.")


class TrialAssignment(_Response):
    """A configuration to run, with the token its reports must carry."""

    number: int
    params: dict[str, Any]
    token: str


class AskResult(_Response):
    """Answer to ``ask``: the ask id's pending trials first, then new ones."""

    trials: list[TrialAssignment]
    exhausted: bool = Field(description="No trial will ever be allocated again.")
    reason: str | None = Field(default=None, description="Why fewer trials than asked, if so.")


class StopAnswer(_Response):
    """Answer to a report: whether the trial should stop now."""

    stop: bool
    reason: str = ""


class ObservationView(_Response):
    """One stored report."""

    step: int
    metrics: dict[str, float]


class TrialView(_Response):
    """One trial, as the operator and users see it."""

    number: int
    state: TrialState
    params: dict[str, Any]
    objective: float | None
    last_step: int | None
    stop_reason: str | None
    message: str | None
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    observations: list[ObservationView] | None = Field(
        default=None, description="Every report, when asked for (?observations=true)."
    )


class BestTrial(_Response):
    """The best succeeded trial so far."""

    number: int
    params: dict[str, Any]
    objective: float


class ExperimentSummary(_Response):
    """Counts by state and the best trial."""

    uid: str
    name: str
    namespace: str
    counts: dict[TrialState, int]
    best: BestTrial | None
    allocated: int = Field(description="Trials handed out so far.")
    done: int = Field(description="Finished trials, whatever their state.")
    max_trials: int
    complete: bool = Field(description="No trial will be started any more.")
    complete_reason: str | None


class StopOrder(_Response):
    """A running trial of one experiment that should stop."""

    number: int
    reason: str


class StartRefusal(_Response):
    """A trial that could not be marked started, and why."""

    number: int
    status: int
    code: str
    message: str


class StartResult(_Response):
    """Answer to ``POST /v1/experiments/{uid}/start``."""

    started: list[int]
    refused: list[StartRefusal]


class StopListItem(_Response):
    """A running trial that should stop."""

    experiment: str
    number: int
    reason: str


class StopList(_Response):
    """Answer to ``GET /v1/stops``."""

    stops: list[StopListItem]


class ErrorDetail(_Response):
    """What went wrong."""

    code: str = Field(description="Machine-readable: not_found, invalid, unauthorized, ...")
    message: str
    field: str | None = Field(
        default=None, description="The offending field, when one is to blame."
    )


class ErrorBody(_Response):
    """Every 4xx/5xx answer."""

    error: ErrorDetail
