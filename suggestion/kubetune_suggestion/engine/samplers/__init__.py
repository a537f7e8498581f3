"""Samplers by the name users write in ``spec.algorithm.name``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubetune_suggestion.engine.history import Direction
from kubetune_suggestion.engine.samplers.base import Sampler, Suggestions
from kubetune_suggestion.engine.samplers.cmaes import CMAESSampler
from kubetune_suggestion.engine.samplers.grid import GridSampler
from kubetune_suggestion.engine.samplers.random import RandomSampler
from kubetune_suggestion.engine.samplers.sobol import SobolSampler
from kubetune_suggestion.engine.samplers.tpe import TPESampler
from kubetune_suggestion.engine.space import SearchSpace, SpaceError

__all__ = ["SAMPLERS", "Sampler", "Suggestions", "make_sampler"]

# Filled in as samplers land; the order is the order the docs list them.
SAMPLERS: dict[str, type[Sampler]] = {
    RandomSampler.name: RandomSampler,
    GridSampler.name: GridSampler,
    SobolSampler.name: SobolSampler,
    TPESampler.name: TPESampler,
    CMAESSampler.name: CMAESSampler,
}


def make_sampler(
    name: str,
    space: SearchSpace,
    direction: Direction | str = Direction.MINIMIZE,
    seed: int | None = None,
    options: Mapping[str, Any] | None = None,
) -> Sampler:
    """The sampler called ``name``, configured for ``space``.

    Raises:
        SpaceError: For an unknown algorithm (field ``algorithm.name``) or a
            space the algorithm cannot search (e.g. a grid over a continuous float).
    """
    cls = SAMPLERS.get(name)
    if cls is None:
        raise SpaceError(
            "algorithm.name", f"unknown algorithm {name!r}; choose one of {sorted(SAMPLERS)}"
        )
    return cls(space, Direction(direction), seed, options)
