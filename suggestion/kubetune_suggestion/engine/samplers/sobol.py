"""Scrambled Sobol' quasi-random search (``scipy.stats.qmc.Sobol``).

One Sobol' dimension per parameter of the space, conditional ones included
(an inactive parameter's coordinate is simply unused), so a parameter keeps
its dimension whatever the others do. The scrambling is seeded from the
sampler's seed alone and the state counts the points drawn, so after a restart
the sequence continues where it stopped instead of starting over.

Integer and categorical parameters can map distinct points to the same
configuration; such points are skipped (a bounded number of times) so that a
batch, and the experiment as a whole, spreads over distinct configurations
while any remain.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import qmc

from kubetune_suggestion.engine.history import TrialRecord
from kubetune_suggestion.engine.samplers.base import JsonState, Sampler, Suggestions
from kubetune_suggestion.engine.space import Config

# How many extra points one call may draw to replace duplicates, per
# configuration asked for: a small discrete space must not make a call spin.
_EXTRA_DRAWS_PER_CONFIG = 8


class SobolSampler(Sampler):
    """Low-discrepancy points decoded through the space."""

    name = "sobol"

    def suggest(
        self, history: Sequence[TrialRecord], n: int, state: JsonState | None = None
    ) -> Suggestions:
        """The next ``n`` points of the seeded, scrambled sequence."""
        drawn = int((state or {}).get("drawn", 0))
        scrambling = np.random.default_rng([self.seed, 1])
        engine = qmc.Sobol(d=len(self.space), scramble=True, rng=scrambling)
        if drawn:
            engine.fast_forward(drawn)
        seen = {_key(t.params) for t in history}
        configs: list[Config] = []
        duplicates = 0
        budget = n * _EXTRA_DRAWS_PER_CONFIG
        while len(configs) < n:
            with warnings.catch_warnings():
                # Sobol' warns when the first draw is not a power of 2; the
                # service asks for whatever parallelism frees up, and the
                # sequence as a whole keeps its balance.
                warnings.simplefilter("ignore", UserWarning)
                point = engine.random(1)[0]
            drawn += 1
            config = self.space.decode(dict(zip(self.space.names, point.tolist(), strict=True)))
            key = _key(config)
            if key in seen and duplicates < budget:
                duplicates += 1
                continue
            seen.add(key)
            configs.append(config)
        notes = []
        if duplicates >= budget > 0:
            notes.append("the space has few distinct configurations left; some suggestions repeat")
        return Suggestions(configs=configs, state=self.next_state(state, drawn=drawn), notes=notes)


def _key(config: Any) -> tuple[tuple[str, str, Any], ...]:
    """A configuration's identity for spotting repeats.

    2 and 2.0 (a store's round trip) are one value; True and 1 are two, since a
    categorical may hold both.
    """
    return tuple(sorted((k, *_value_key(v)) for k, v in dict(config).items()))


def _value_key(value: Any) -> tuple[str, Any]:
    if isinstance(value, bool | str):
        return type(value).__name__, value
    return "number", float(value)
