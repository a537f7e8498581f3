"""The Experiment spec users write: one pydantic model shared by every component.

This is the single source of truth for the ``Experiment`` contract: the
operator reads CR bodies with it, the service validates registrations with it,
``kubetune run`` reads manifests with it, and the CRD schema is generated from
it. Field names are the manifest's camelCase names.

:func:`parse_experiment` turns any problem into a :class:`SpecError` naming
the field (``spec.parameters[2].min``) and the problem.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kubetune_suggestion.engine.history import Direction
from kubetune_suggestion.engine.space import (
    CategoricalParam,
    IntParam,
    Param,
    SearchSpace,
    SpaceError,
)

API_GROUP = "kubetune.io"
API_VERSION = "v1alpha1"

# Bounds shared with the CRD schema (the API server needs them to bound the
# cost of CEL rules over these lists); generous for any real search space.
MAX_PARAMETERS = 64
MAX_VALUES = 1024
MAX_WHEN = 16


class SpecError(ValueError):
    """An Experiment spec that kubetune rejects.

    Attributes:
        field: The path of the offending field, e.g. ``spec.parameters[0].min``.
        problem: What is wrong with it, in words.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class Strategy(StrEnum):
    """Which reported value of the objective metric is the trial's result."""

    LAST = "last"
    MIN = "min"
    MAX = "max"


class Objective(_Model):
    """What to optimise."""

    metric: str = Field(
        min_length=1, max_length=128, description="Name of the reported metric to optimise."
    )
    direction: Direction = Field(description="minimize or maximize.")
    target: float | None = Field(
        default=None, description="Reaching this value ends the experiment."
    )
    strategy: Strategy = Field(
        default=Strategy.LAST, description="Which reported value is the trial's result."
    )
    additionalMetrics: list[str] = Field(
        default_factory=list, description="Other metrics to record."
    )


class Parameter(_Model):
    """One search-space parameter (see :mod:`kubetune_suggestion.engine.space`)."""

    name: str = Field(min_length=1, max_length=63, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")
    type: Literal["float", "int", "categorical"]
    min: float | None = None
    max: float | None = None
    log: bool = False
    step: float | None = None
    values: list[str | int | float | bool] | None = Field(default=None, max_length=MAX_VALUES)
    when: dict[str, str | int | float | bool | list[str | int | float | bool]] | None = Field(
        default=None, max_length=MAX_WHEN
    )


class Algorithm(_Model):
    """The sampler and its settings."""

    name: Literal["random", "grid", "sobol", "tpe", "cmaes"] = "tpe"
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    settings: dict[str, Any] = Field(default_factory=dict, description="Sampler-specific options.")


class EarlyStopping(_Model):
    """The early-stopping rule and its resource units (the reported ``step``)."""

    name: Literal["none", "asha", "median", "hyperband"] = "none"
    minResource: int = Field(default=1, ge=1)
    maxResource: int | None = Field(default=None, ge=1)
    reductionFactor: int = Field(default=3, ge=2)
    warmupSteps: int = Field(
        default=0, ge=0, description="median: steps before a trial can be stopped."
    )
    minTrials: int = Field(
        default=5, ge=1, description="median: trials needed at a step before comparing."
    )
    brackets: int | None = Field(default=None, ge=1, description="hyperband: number of brackets.")

    @model_validator(mode="after")
    def _resources(self) -> EarlyStopping:
        if self.name in ("asha", "hyperband") and self.maxResource is None:
            raise ValueError(f"{self.name} needs maxResource (the last step a trial reports)")
        if self.maxResource is not None and self.maxResource <= self.minResource:
            raise ValueError(
                f"maxResource ({self.maxResource}) must be greater than "
                f"minResource ({self.minResource})"
            )
        return self

    def options(self) -> dict[str, Any]:
        """The options dict the engine's rules take."""
        return self.model_dump(exclude={"name"}, exclude_none=True)


class ExperimentSpec(_Model):
    """The ``spec`` of an Experiment."""

    objective: Objective
    parameters: list[Parameter] = Field(min_length=1, max_length=MAX_PARAMETERS)
    algorithm: Algorithm = Field(default_factory=Algorithm)
    earlyStopping: EarlyStopping = Field(default_factory=EarlyStopping)
    maxTrials: int = Field(default=10, ge=1, le=100_000)
    parallelism: int = Field(default=1, ge=1, le=10_000)
    maxFailedTrials: int | None = Field(default=None, ge=0)
    trialTimeoutSeconds: int | None = Field(default=None, ge=1)
    maxRetries: int = Field(default=0, ge=0, le=10)
    suspend: bool = False
    template: dict[str, Any] = Field(description="A Pod template; ${params.NAME} is substituted.")

    @model_validator(mode="after")
    def _space(self) -> ExperimentSpec:
        space = self.search_space()
        if self.algorithm.name == "grid":
            space.check_grid()
        containers = (self.template.get("spec") or {}).get("containers")
        if not isinstance(containers, list) or not containers:
            raise SpaceError(
                "template.spec.containers", "the Pod template needs at least one container"
            )
        return self

    def search_space(self) -> SearchSpace:
        """The validated engine search space."""
        return SearchSpace.from_spec(
            [
                p.model_dump(exclude_none=True, exclude_defaults=True)
                | {"name": p.name, "type": p.type}
                for p in self.parameters
            ]
        )


def param_problems(space: SearchSpace, params: Mapping[str, Any]) -> list[str]:
    """What is wrong with a configuration for a search space, one line per parameter.

    The operator checks what the service hands out before it renders it into a
    Pod: a configuration outside the declared space (a service bug, or a
    service that is not the one it should be) must not reach a command line.

    Returns:
        ``"name: problem"`` for each parameter that is unknown, missing while
        active, given while its ``when`` condition does not hold, or has an
        invalid value; empty when the configuration is valid.
    """
    problems = [
        f"{name}: not a parameter of the search space" for name in params if name not in space
    ]
    for param in space:
        active = space.is_active(param, params)
        if active and param.name not in params:
            problems.append(f"{param.name}: missing")
        elif not active and param.name in params:
            problems.append(f"{param.name}: given although its `when` condition does not hold")
        elif active:
            problem = _value_problem(param, params[param.name])
            if problem:
                problems.append(f"{param.name}: {problem}")
    return problems


def _value_problem(param: Param, value: Any) -> str | None:
    """What is wrong with one value of a parameter, or ``None`` (the engine's ``contains``)."""
    if param.contains(value):
        return None
    if isinstance(param, CategoricalParam):
        return f"{value!r} is not one of {list(param.choices)}"
    if isinstance(param, IntParam) and (isinstance(value, bool) or not isinstance(value, int)):
        return f"{value!r} is not an integer"
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return f"{value!r} is not a number"
    if value < param.low:
        return f"{value!r} is below its min {param.low!r}"
    if value > param.high:
        return f"{value!r} is above its max {param.high!r}"
    return f"{value!r} is not on its step grid ({param.low!r} + k * {param.step!r})"


def parse_experiment(spec: Mapping[str, Any], prefix: str = "spec") -> ExperimentSpec:
    """Validate a spec mapping.

    Raises:
        SpecError: Naming the first offending field under ``prefix``.
    """
    try:
        return ExperimentSpec.model_validate(dict(spec))
    except ValidationError as exc:
        err = exc.errors()[0]
        ctx = err.get("ctx") or {}
        inner = ctx.get("error")
        if isinstance(inner, SpaceError):
            raise SpecError(f"{prefix}.{inner.field}", inner.problem) from None
        loc = _format_loc(err["loc"])
        raise SpecError(f"{prefix}.{loc}" if loc else prefix, _message(err)) from None


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and not part.startswith(
            ("function-", "literal[", "str", "int", "float", "bool", "list[")
        ):
            out += f".{part}" if out else part
    return out


def _message(err: Mapping[str, Any]) -> str:
    msg = str(err.get("msg", "invalid"))
    # pydantic prefixes messages from our validators with "Value error, ".
    return msg.removeprefix("Value error, ")
