"""The sampler interface: history and JSON state in, suggestions and new state out."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from kubetune_suggestion.engine.history import Direction, TrialRecord
from kubetune_suggestion.engine.space import Config, SearchSpace, SpaceError

JsonState = dict[str, Any]


@dataclass(frozen=True)
class Suggestions:
    """The result of one :meth:`Sampler.suggest` call.

    Attributes:
        configs: Up to ``n`` new configurations, pairwise distinct where the
            space allows it.
        state: The sampler's new state, JSON-serialisable; pass it to the next
            call (after a restart too) to continue with the same behaviour.
        exhausted: True when the sampler can never suggest anything new (a
            finished grid); ``configs`` may then be shorter than asked.
        notes: Human-readable remarks worth surfacing (e.g. a fallback).
    """

    configs: list[Config]
    state: JsonState
    exhausted: bool = False
    notes: list[str] = field(default_factory=list)


class Sampler(abc.ABC):
    """Proposes configurations from the history of an experiment.

    A sampler is configured once (space, direction, seed, options) and then
    called as a pure function: the same ``history``, ``n`` and ``state`` give
    the same suggestions in any process. It keeps nothing between calls that
    is not in the returned state.
    """

    name: ClassVar[str]
    # The keys ``spec.algorithm.settings`` may hold for this sampler.
    settings_names: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self,
        space: SearchSpace,
        direction: Direction = Direction.MINIMIZE,
        seed: int | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self.space = space
        self.direction = direction
        self.seed = 0 if seed is None else int(seed)
        self.options = dict(options or {})
        self._refuse_unknown_settings()

    def _refuse_unknown_settings(self) -> None:
        """Refuse a setting this sampler does not read: a typo must not pass silently.

        Raises:
            SpaceError: Naming the first unknown setting and the known ones.
        """
        for key in self.options:
            if key in self.settings_names:
                continue
            known = ", ".join(sorted(self.settings_names)) or "none"
            hint = "; the seed is algorithm.seed" if key == "seed" else ""
            raise SpaceError(
                f"algorithm.settings.{key}",
                f"unknown setting for {self.name} (known: {known}){hint}",
            )

    @abc.abstractmethod
    def suggest(
        self, history: Sequence[TrialRecord], n: int, state: JsonState | None = None
    ) -> Suggestions:
        """Propose up to ``n`` new configurations.

        Args:
            history: Every trial of the experiment so far, running ones included
                (they are pending evaluations that a batch must spread around).
            n: How many configurations to propose.
            state: The state returned by the previous call, or None at first.
        """

    def rng(self, state: JsonState | None, salt: int = 0) -> np.random.Generator:
        """A generator determined by the seed and how many calls came before.

        Deriving the stream from (seed, call count) instead of pickling a
        generator keeps the state small, readable JSON.
        """
        calls = int((state or {}).get("calls", 0))
        return np.random.default_rng([self.seed, calls, salt])

    @staticmethod
    def next_state(state: JsonState | None, **extra: Any) -> JsonState:
        """The state after one more call, with ``extra`` fields merged in."""
        new = dict(state or {})
        new["calls"] = int(new.get("calls", 0)) + 1
        new.update(extra)
        return new
