"""Early-stopping rules by the name users write in ``spec.earlyStopping.name``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubetune_suggestion.engine.history import Direction
from kubetune_suggestion.engine.space import SpaceError
from kubetune_suggestion.engine.stopping.asha import ASHARule
from kubetune_suggestion.engine.stopping.base import CONTINUE, StopDecision, StoppingRule
from kubetune_suggestion.engine.stopping.hyperband import HyperbandRule
from kubetune_suggestion.engine.stopping.median import MedianRule

__all__ = ["CONTINUE", "RULES", "StopDecision", "StoppingRule", "make_rule"]

RULES: dict[str, type[StoppingRule]] = {
    ASHARule.name: ASHARule,
    MedianRule.name: MedianRule,
    HyperbandRule.name: HyperbandRule,
}


def make_rule(
    name: str, direction: Direction | str, options: Mapping[str, Any] | None = None
) -> StoppingRule | None:
    """The rule called ``name`` (None for ``none``).

    Raises:
        SpaceError: For an unknown rule (field ``earlyStopping.name``) or bad options.
    """
    if name in ("none", ""):
        return None
    cls = RULES.get(name)
    if cls is None:
        raise SpaceError(
            "earlyStopping.name",
            f"unknown early-stopping rule {name!r}; choose one of {['none', *sorted(RULES)]}",
        )
    return cls(Direction(direction), options)
