"""What samplers and early-stopping rules see of past and running trials."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Direction(StrEnum):
    """Whether a larger or a smaller objective is better."""

    MINIMIZE = "minimize"
    MAXIMIZE = "maximize"

    def loss(self, value: float) -> float:
        """The value as a loss (smaller is better); NaN and inf become +inf."""
        if value is None or not math.isfinite(value):
            return math.inf
        return value if self is Direction.MINIMIZE else -value

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b``."""
        return self.loss(a) < self.loss(b)


class RecordState(StrEnum):
    """The life of a trial, as the engine needs it."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    PRUNED = "pruned"


@dataclass(frozen=True)
class TrialRecord:
    """One trial as samplers see it.

    Attributes:
        number: The trial's number within its experiment, from 0.
        params: The configuration it ran (only active parameters).
        state: Where it is in its life.
        value: Its objective for a succeeded trial; for a pruned one, its last
            reported objective (samplers may use it as a weak signal); None
            otherwise. May be NaN or inf, which every sampler treats as worst.
        steps: Intermediate objective values by step (for early-stopping rules
            and samplers that use curves); empty when unknown.
    """

    number: int
    params: Mapping[str, Any]
    state: RecordState
    value: float | None = None
    steps: Mapping[int, float] = field(default_factory=dict)

    @property
    def has_finite_value(self) -> bool:
        """Whether the trial has a usable objective value."""
        return self.value is not None and math.isfinite(self.value)


def completed(history: Sequence[TrialRecord]) -> list[TrialRecord]:
    """Succeeded trials with a finite objective: what model-based samplers learn from."""
    return [t for t in history if t.state is RecordState.SUCCEEDED and t.has_finite_value]


def running(history: Sequence[TrialRecord]) -> list[TrialRecord]:
    """Trials still running (pending evaluations, for parallel-aware sampling)."""
    return [t for t in history if t.state is RecordState.RUNNING]
