"""Reading learning curves and rule options: what every early-stopping rule shares."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from kubetune_suggestion.engine.space import SpaceError


def value_at(steps: Mapping[int, float], step: int) -> float | None:
    """A trial's objective at ``step``: the value reported there or at the latest step before.

    Trials may report sparsely (every few steps), so a trial that has passed
    ``step`` without reporting exactly there is judged by its latest value at
    or before it; one whose first report already lies beyond ``step`` by that
    first value. None when the trial has reported nothing.
    """
    if not steps:
        return None
    at_or_before = [s for s in steps if s <= step]
    chosen = max(at_or_before) if at_or_before else min(steps)
    return float(steps[chosen])


def last_step(steps: Mapping[int, float]) -> int | None:
    """The furthest step a trial has reported, or None."""
    return max(steps) if steps else None


def previous_step(steps: Mapping[int, float]) -> float:
    """The step of the report before the latest one (-inf for a first report)."""
    ordered = sorted(steps)
    return ordered[-2] if len(ordered) > 1 else -math.inf


def fmt(value: float) -> str:
    """A value as a person reads it in a reason: 4 significant digits."""
    return f"{value:.4g}"


def int_option(options: Mapping[str, Any], key: str, default: int | None, minimum: int) -> int:
    """An integer option of ``spec.earlyStopping``, validated.

    Raises:
        SpaceError: Naming ``earlyStopping.<key>`` when it is missing or invalid.
    """
    value = options.get(key, default)
    where = f"earlyStopping.{key}"
    if value is None:
        raise SpaceError(where, f"`{key}` is required for this rule")
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise SpaceError(where, f"`{key}` must be a whole number, got {value!r}")
    if value < minimum:
        raise SpaceError(where, f"`{key}` must be at least {minimum}, got {value!r}")
    return int(value)


def resources(options: Mapping[str, Any]) -> tuple[int, int, int]:
    """``(minResource, maxResource, reductionFactor)`` for successive-halving rules.

    Raises:
        SpaceError: Naming the option that is missing or inconsistent.
    """
    min_resource = int_option(options, "minResource", 1, 1)
    max_resource = int_option(options, "maxResource", None, 1)
    eta = int_option(options, "reductionFactor", 3, 2)
    if max_resource <= min_resource:
        raise SpaceError(
            "earlyStopping.maxResource",
            f"maxResource ({max_resource}) must be greater than minResource ({min_resource})",
        )
    return min_resource, max_resource, eta


def rung_steps(first: int, eta: int, max_resource: int) -> list[int]:
    """Rungs ``first * eta**k`` below ``max_resource`` (a trial there is finished anyway)."""
    rungs: list[int] = []
    r = first
    while r < max_resource:
        rungs.append(r)
        r *= eta
    return rungs
