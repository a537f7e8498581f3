"""Independent uniform sampling in the unit-interval encoding (log-uniform where asked)."""

from __future__ import annotations

from collections.abc import Sequence

from kubetune_suggestion.engine.history import TrialRecord
from kubetune_suggestion.engine.samplers.base import JsonState, Sampler, Suggestions


class RandomSampler(Sampler):
    """Each parameter drawn independently; conditional ones only when active."""

    name = "random"

    def suggest(
        self, history: Sequence[TrialRecord], n: int, state: JsonState | None = None
    ) -> Suggestions:
        """Draw ``n`` independent configurations."""
        rng = self.rng(state)
        configs = []
        for _ in range(n):
            units = {p.name: float(rng.random()) for p in self.space}
            configs.append(self.space.decode(units))
        return Suggestions(configs=configs, state=self.next_state(state))
