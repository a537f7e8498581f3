"""Asynchronous successive halving (ASHA), an early-stopping rule.

From Li et al., "A System for Massively Parallel Hyperparameter Tuning" (MLSys 2020).

Rungs sit at steps ``minResource * reductionFactor**k`` below ``maxResource``.
When a trial's report reaches a rung, it is compared with every trial that
reached that rung before it (running, finished or stopped, whatever became of
them later): it continues only if its value there is among the best
``floor(n / reductionFactor)`` of the ``n`` trials, itself included. With
fewer than ``reductionFactor`` trials at the rung that top share is empty, and
as in Optuna's ``SuccessiveHalvingPruner`` the trial continues only if it is
the best so far; a paused trial that a later promotion could resume does not
exist here, because a stopped Pod is gone.

A trial is judged once per rung, at the report that reaches it; a later report
below the next rung does not re-open the question, so a trial promoted early
keeps its promotion (the asynchronous rule of the paper). The decision is a
pure function of the history, so the rung a trial reached and the competitors
it had are re-derived on every call and nothing is stored.

A value at a rung is the one reported there or, for a trial that reports
sparsely, its latest value before it. NaN and infinite values are the worst
possible: a trial whose rung value is not finite always stops.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from kubetune_suggestion.engine.history import Direction, TrialRecord
from kubetune_suggestion.engine.stopping.base import CONTINUE, StopDecision, StoppingRule
from kubetune_suggestion.engine.stopping.curves import (
    fmt,
    last_step,
    previous_step,
    resources,
    rung_steps,
    value_at,
)


class ASHARule(StoppingRule):
    """Stop a trial that is not in the top ``1/reductionFactor`` at a rung it reaches.

    Options (from ``spec.earlyStopping``): ``minResource`` (default 1),
    ``maxResource`` (required), ``reductionFactor`` (default 3), and
    ``metric``, the objective's name used in reasons (default "objective").

    Raises:
        SpaceError: From the constructor, naming a missing or inconsistent option.
    """

    name = "asha"

    def __init__(self, direction: Direction, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(direction, options)
        self.min_resource, self.max_resource, self.reduction_factor = resources(self.options)
        self.metric = str(self.options.get("metric") or "objective")
        self.rungs = rung_steps(self.min_resource, self.reduction_factor, self.max_resource)

    def decide(self, trial: TrialRecord, history: Sequence[TrialRecord]) -> StopDecision:
        """Judge ``trial`` at any rung its latest report reached."""
        others = [t for t in history if t.number != trial.number]
        return successive_halving(
            trial,
            others,
            self.rungs,
            self.reduction_factor,
            self.direction,
            self.metric,
            label="ASHA",
        )


def successive_halving(
    trial: TrialRecord,
    others: Sequence[TrialRecord],
    rungs: Sequence[int],
    reduction_factor: int,
    direction: Direction,
    metric: str,
    label: str,
) -> StopDecision:
    """The ASHA decision for ``trial`` against ``others`` over ``rungs``.

    Args:
        trial: The trial that just reported.
        others: The trials it competes with (not including itself).
        rungs: Rung steps, ascending.
        reduction_factor: Only the top ``1/reduction_factor`` continue.
        direction: Whether smaller or larger values are better.
        metric: The objective's name, for the reason.
        label: How the reason names the rule (e.g. "ASHA", "Hyperband bracket 2").
    """
    latest = last_step(trial.steps)
    if latest is None:
        return CONTINUE
    before = previous_step(trial.steps)
    for index, rung in enumerate(rungs):
        # Only the rungs this very report crossed: earlier ones were decided
        # by earlier reports. A sparse report can cross several at once.
        if not before < rung <= latest:
            continue
        decision = _judge_at_rung(
            trial, others, index, rung, reduction_factor, direction, metric, label
        )
        if decision.stop:
            return decision
    return CONTINUE


def _judge_at_rung(
    trial: TrialRecord,
    others: Sequence[TrialRecord],
    index: int,
    rung: int,
    reduction_factor: int,
    direction: Direction,
    metric: str,
    label: str,
) -> StopDecision:
    where = f"{label} rung {index + 1} (step {rung})"
    mine = value_at(trial.steps, rung)
    assert mine is not None
    if not math.isfinite(mine):
        return StopDecision(True, f"{where}: {metric} is {mine}, which counts as the worst value")
    # Losses: smaller is better in both directions, NaN/inf are +inf.
    losses = [direction.loss(mine)]
    for other in others:
        reached = last_step(other.steps)
        if reached is not None and reached >= rung:
            value = value_at(other.steps, rung)
            assert value is not None
            losses.append(direction.loss(value))
    n = len(losses)
    keep = n // reduction_factor
    ranked = sorted(losses)
    if keep == 0:
        best = ranked[0]
        if losses[0] <= best:
            return CONTINUE
        return StopDecision(
            True,
            f"{where}: {metric} {fmt(mine)} is not the best of the {n} trials that reached "
            f"this rung so far (best {fmt(_raw(best, direction))}; fewer than "
            f"{reduction_factor} trials, so only the best continues)",
        )
    cutoff = ranked[keep - 1]
    if losses[0] <= cutoff:
        return CONTINUE
    return StopDecision(
        True,
        f"{where}: {metric} {fmt(mine)} is not in the top 1/{reduction_factor} of {n} trials "
        f"(cut-off {fmt(_raw(cutoff, direction))})",
    )


def _raw(loss: float, direction: Direction) -> float:
    """A loss back in the metric's own sign, for messages."""
    return loss if direction is Direction.MINIMIZE else -loss
