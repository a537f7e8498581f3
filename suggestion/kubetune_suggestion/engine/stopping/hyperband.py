"""Hyperband as brackets of ASHA (Li et al., JMLR 2018; Optuna's HyperbandPruner).

ASHA's one risky choice is how early the first rung sits: a configuration that
starts slowly and ends well is stopped at a low rung. Hyperband hedges by
running several brackets side by side. Bracket ``b`` is ASHA whose first rung
is ``minResource * reductionFactor**b``, so bracket 0 is the most aggressive
and the last bracket stops late or never. A trial competes only with the trials
of its own bracket.

Brackets get trials in Hyperband's proportions: bracket ``b`` of ``B`` is
weighted ``eta**(B-1-b) / (B-b)``, since aggressive brackets can afford to
start more trials for the same budget. The bracket is a deterministic function
of the trial number alone (a golden-ratio sequence over the cumulative
weights), so any replica, before or after a restart, puts a trial in the same
bracket, and consecutive trials spread over the brackets instead of filling
one after the other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from kubetune_suggestion.engine.history import Direction, TrialRecord
from kubetune_suggestion.engine.stopping.asha import successive_halving
from kubetune_suggestion.engine.stopping.base import StopDecision, StoppingRule
from kubetune_suggestion.engine.stopping.curves import int_option, resources, rung_steps

# 1/phi: multiples of it modulo 1 are the most evenly spread sequence there is.
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


class HyperbandRule(StoppingRule):
    """ASHA within brackets of different minimum resources.

    Options (from ``spec.earlyStopping``): ``minResource`` (default 1),
    ``maxResource`` (required), ``reductionFactor`` (default 3), ``brackets``
    (default: every bracket Hyperband would run, ``floor(log_eta(max/min)) + 1``;
    a larger number is capped to that), and ``metric`` for reasons.

    Raises:
        SpaceError: From the constructor, naming a missing or inconsistent option.
    """

    name = "hyperband"

    def __init__(self, direction: Direction, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(direction, options)
        self.min_resource, self.max_resource, self.reduction_factor = resources(self.options)
        self.metric = str(self.options.get("metric") or "objective")
        eta = self.reduction_factor
        most = 1
        while self.min_resource * eta**most <= self.max_resource:
            most += 1
        self.n_brackets = min(most, int_option(self.options, "brackets", most, 1))
        self.bracket_rungs = [
            rung_steps(self.min_resource * eta**b, eta, self.max_resource)
            for b in range(self.n_brackets)
        ]
        last = self.n_brackets - 1
        weights = [eta ** (last - b) / (last - b + 1) for b in range(self.n_brackets)]
        total = sum(weights)
        self._cumulative = [sum(weights[: b + 1]) / total for b in range(self.n_brackets)]

    def bracket_of(self, number: int) -> int:
        """The bracket of the trial numbered ``number`` (0 is the most aggressive)."""
        u = (number * _GOLDEN) % 1.0
        for b, edge in enumerate(self._cumulative):
            if u < edge:
                return b
        return self.n_brackets - 1

    def decide(self, trial: TrialRecord, history: Sequence[TrialRecord]) -> StopDecision:
        """ASHA for ``trial`` against the other trials of its bracket."""
        bracket = self.bracket_of(trial.number)
        others = [
            t for t in history if t.number != trial.number and self.bracket_of(t.number) == bracket
        ]
        return successive_halving(
            trial,
            others,
            self.bracket_rungs[bracket],
            self.reduction_factor,
            self.direction,
            self.metric,
            label=f"Hyperband bracket {bracket + 1} of {self.n_brackets},",
        )
