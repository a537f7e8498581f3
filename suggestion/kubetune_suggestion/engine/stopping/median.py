"""The median stopping rule (Golovin et al., "Google Vizier", KDD 2017).

At each report, at step ``s``, a trial stops when its best value so far is
strictly worse than the median of the other trials' values at step ``s``.

Semantics, chosen to match Optuna's ``MedianPruner``:

- the trial is represented by its best value over steps ``<= s`` (a noisy dip
  does not condemn it), the others by their value at ``s`` itself (or their
  latest before ``s`` when they report sparsely), not by a running average;
- nothing is stopped at steps below ``warmupSteps``, nor while fewer than
  ``minTrials`` other trials have reached step ``s``.

One difference from Optuna, deliberate: the others are every trial that
reached step ``s`` (running, finished or stopped), not finished ones only. In
a parallel experiment the first wave of trials runs side by side, and waiting
for ``minTrials`` of them to finish would let the whole wave train to the end.
NaN and infinite values are the worst possible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kubetune_suggestion.engine.history import Direction, TrialRecord
from kubetune_suggestion.engine.stopping.base import CONTINUE, StopDecision, StoppingRule
from kubetune_suggestion.engine.stopping.curves import fmt, int_option, last_step, value_at


class MedianRule(StoppingRule):
    """Stop a trial whose best so far is worse than the others' median at the same step.

    Options (from ``spec.earlyStopping``): ``warmupSteps`` (default 0),
    ``minTrials`` (default 5), and ``metric``, the objective's name used in
    reasons (default "objective").

    Raises:
        SpaceError: From the constructor, naming an invalid option.
    """

    name = "median"

    def __init__(self, direction: Direction, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(direction, options)
        self.warmup_steps = int_option(self.options, "warmupSteps", 0, 0)
        self.min_trials = int_option(self.options, "minTrials", 5, 1)
        self.metric = str(self.options.get("metric") or "objective")

    def decide(self, trial: TrialRecord, history: Sequence[TrialRecord]) -> StopDecision:
        """Compare ``trial`` at its latest step with the other trials at that step."""
        step = last_step(trial.steps)
        if step is None or step < self.warmup_steps:
            return CONTINUE
        best = min(self.direction.loss(v) for s, v in trial.steps.items() if s <= step)
        others: list[float] = []
        for other in history:
            reached = last_step(other.steps)
            if other.number == trial.number or reached is None or reached < step:
                continue
            value = value_at(other.steps, step)
            assert value is not None
            others.append(self.direction.loss(value))
        if len(others) < self.min_trials:
            return CONTINUE
        median = float(np.median(others))
        if not best > median:
            return CONTINUE
        sign = 1.0 if self.direction is Direction.MINIMIZE else -1.0
        if math.isinf(best):
            what = f"{self.metric} has no finite value so far, which is worse than"
        else:
            what = f"best {self.metric} so far {fmt(sign * best)} is worse than"
        return StopDecision(
            True,
            f"median rule at step {step}: {what} the median {fmt(sign * median)} "
            f"of {len(others)} other trials at this step",
        )
