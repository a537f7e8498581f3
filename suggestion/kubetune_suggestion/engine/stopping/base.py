"""The early-stopping interface: a pure decision from the history of intermediate reports."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from kubetune_suggestion.engine.history import Direction, TrialRecord


@dataclass(frozen=True)
class StopDecision:
    """Whether a running trial should stop now, and why (shown to users in events)."""

    stop: bool
    reason: str = ""


CONTINUE = StopDecision(stop=False)


class StoppingRule(abc.ABC):
    """Decides, after a trial reports, whether it should stop.

    Called with the trial that just reported (its ``steps`` hold every
    intermediate objective so far) and the whole history of the experiment
    (running, succeeded and pruned trials, with their ``steps``). Pure: no
    state beyond its options, so any service replica gives the same answer.
    """

    name: ClassVar[str]

    def __init__(self, direction: Direction, options: Mapping[str, Any] | None = None) -> None:
        self.direction = direction
        self.options = dict(options or {})

    @abc.abstractmethod
    def decide(self, trial: TrialRecord, history: Sequence[TrialRecord]) -> StopDecision:
        """Whether ``trial`` should stop given everything reported so far."""
