"""Exhaustive grid search: every combination exactly once, in a fixed order.

The grid is the tree of choices made parameter by parameter in the space's
topological order (parents first). A conditional parameter is a level of the
tree only below the branches where its ``when`` holds, so each distinct
configuration is one leaf and appears once; nothing is expanded for an
inactive parameter. Leaves are numbered in lexicographic order (the first
parameter is the most significant digit), and :class:`_GridIndex` can jump to
the k-th leaf without walking the ones before it, so a long experiment costs
the same per call at its end as at its start.

The state is one cursor (``next_index``). It is only a shortcut: the history
is the source of truth, and a configuration already there (in any state,
running and failed included) is never suggested again. After a lost state the
sampler starts from the first leaf again and skips what it has run; once the
cursor reaches the end it sweeps the whole grid once more for leaves that were
handed out but never became trials, and only then reports ``exhausted``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kubetune_suggestion.engine.history import Direction, TrialRecord
from kubetune_suggestion.engine.samplers.base import JsonState, Sampler, Suggestions
from kubetune_suggestion.engine.space import (
    CategoricalParam,
    Config,
    FloatParam,
    IntParam,
    Param,
    ParamValue,
    SearchSpace,
    SpaceError,
)

# A configuration reduced to the grid positions of its active parameters, so
# that 0.30000000000000004 and 0.3, or 2 and 2.0, count as the same leaf.
_Key = tuple[tuple[str, int], ...]


class _GridIndex:
    """Counts and addresses the leaves of the conditional grid tree."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self.params: tuple[Param, ...] = space.params
        self.values: list[list[ParamValue]] = [list(p.grid()) for p in self.params]
        # Which earlier parameters decide whether parameters i.. are active:
        # the number of leaves below a node depends only on their values, so
        # that tuple is the memo key for subtree sizes.
        parents: set[str] = set()
        self._relevant: list[tuple[str, ...]] = [()] * (len(self.params) + 1)
        for i in range(len(self.params) - 1, -1, -1):
            parents |= {c.parent for c in self.params[i].when}
            earlier = {p.name for p in self.params[:i]}
            self._relevant[i] = tuple(sorted(parents & earlier))
        self._memo: dict[tuple[int, tuple[Any, ...]], int] = {}
        self.size = self._count(0, {})

    def _count(self, i: int, config: Config) -> int:
        if i == len(self.params):
            return 1
        key = (i, tuple(_hashable(config.get(name)) for name in self._relevant[i]))
        cached = self._memo.get(key)
        if cached is not None:
            return cached
        param = self.params[i]
        if not self.space.is_active(param, config):
            total = self._count(i + 1, config)
        else:
            total = 0
            for value in self.values[i]:
                config[param.name] = value
                total += self._count(i + 1, config)
            del config[param.name]
        self._memo[key] = total
        return total

    def leaf(self, k: int) -> Config:
        """The ``k``-th configuration (0-based) in the grid's order."""
        if not 0 <= k < self.size:
            raise IndexError(k)
        config: Config = {}
        for i, param in enumerate(self.params):
            if not self.space.is_active(param, config):
                continue
            for value in self.values[i]:
                config[param.name] = value
                below = self._count(i + 1, config)
                if k < below:
                    break
                k -= below
        return config

    def key(self, config: Mapping[str, Any]) -> _Key | None:
        """The leaf identity of ``config``; None if it is not a point of this grid."""
        out: list[tuple[str, int]] = []
        for param in self.params:
            # Only a configuration with exactly its active parameters is a
            # leaf; anything else (an older space's trial) must not count
            # towards exhaustion.
            if self.space.is_active(param, config) != (param.name in config):
                return None
            if param.name not in config:
                continue
            position = _position(param, config[param.name])
            if position is None:
                return None
            out.append((param.name, position))
        return tuple(out)


def _hashable(value: Any) -> Any:
    # Keep True apart from 1 in memo keys, as the space does for categoricals.
    return (type(value).__name__, value)


def _position(param: Param, value: Any) -> int | None:
    """The index of ``value`` in ``param.grid()``, or None when it is off the grid."""
    if isinstance(param, IntParam) and isinstance(value, float) and value.is_integer():
        # A store may hand an int back as 2.0; it is still the same grid point.
        value = int(value)
    if not param.contains(value):
        return None
    if isinstance(param, CategoricalParam):
        return param.index(value)
    if isinstance(param, IntParam):
        return (int(value) - param.low) // param.step
    assert isinstance(param, FloatParam) and param.step is not None
    return round((float(value) - param.low) / param.step)


class GridSampler(Sampler):
    """Every configuration of a finite space exactly once, in lexicographic order.

    Raises:
        SpaceError: From the constructor, for a continuous float without ``step``.
    """

    name = "grid"

    def __init__(
        self,
        space: SearchSpace,
        direction: Direction = Direction.MINIMIZE,
        seed: int | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(space, direction, seed, options)
        space.check_grid()
        self.grid = _GridIndex(space)

    def suggest(
        self, history: Sequence[TrialRecord], n: int, state: JsonState | None = None
    ) -> Suggestions:
        """The next ``n`` configurations of the grid that the history has not run."""
        seen = {key for t in history if (key := self.grid.key(t.params)) is not None}
        cursor = int((state or {}).get("next_index", 0))
        if not 0 <= cursor <= self.grid.size:
            raise SpaceError(
                "state.next_index", f"{cursor} is outside the grid of {self.grid.size}"
            )
        configs: list[Config] = []
        cursor = self._collect(cursor, self.grid.size, n, seen, configs)
        if len(configs) < n and cursor == self.grid.size:
            # Leaves before the cursor that never reached the history (a
            # suggestion lost between the service and the operator).
            self._collect(0, self.grid.size, n, seen, configs)
        exhausted = len(configs) < n or len(seen) >= self.grid.size
        notes = []
        if exhausted:
            notes.append(f"grid exhausted: all {self.grid.size} configurations suggested")
        return Suggestions(
            configs=configs,
            state=self.next_state(state, next_index=cursor),
            exhausted=exhausted,
            notes=notes,
        )

    def _collect(self, start: int, stop: int, n: int, seen: set[_Key], out: list[Config]) -> int:
        """Append unseen leaves from ``start`` until ``out`` holds ``n``; return the next index."""
        k = start
        while k < stop and len(out) < n:
            config = self.grid.leaf(k)
            k += 1
            key = self.grid.key(config)
            assert key is not None
            if key not in seen:
                seen.add(key)
                out.append(config)
        return k
