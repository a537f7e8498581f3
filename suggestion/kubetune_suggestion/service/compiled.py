"""An experiment's spec compiled into the engine objects that serve it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune_suggestion.engine.samplers import Sampler, make_sampler
from kubetune_suggestion.engine.space import SpaceError
from kubetune_suggestion.engine.stopping import StoppingRule, make_rule
from kubetune_suggestion.service.errors import InvalidInput
from kubetune_suggestion.spec import ExperimentSpec, parse_experiment


@dataclass(frozen=True)
class Compiled:
    """An experiment's spec with the engine objects built from it."""

    spec: ExperimentSpec
    sampler: Sampler
    rule: StoppingRule | None


def compile_spec(spec: ExperimentSpec) -> Compiled:
    """Build the sampler and rule ``spec`` asks for.

    Raises:
        InvalidInput: If the engine rejects the spec, naming the field.
    """
    try:
        sampler = make_sampler(
            spec.algorithm.name,
            spec.search_space(),
            spec.objective.direction,
            spec.algorithm.seed,
            spec.algorithm.settings,
        )
        # Rules name the objective in the reasons users read.
        options = {"metric": spec.objective.metric, **spec.earlyStopping.options()}
        rule = make_rule(spec.earlyStopping.name, spec.objective.direction, options)
    except SpaceError as exc:
        raise InvalidInput(exc.problem, field=f"spec.{exc.field}") from None
    return Compiled(spec=spec, sampler=sampler, rule=rule)


def compile_stored(spec: dict[str, Any]) -> Compiled:
    """Compile a spec as stored (validated when it was registered)."""
    # Parsing cannot fail unless the engine changed under a stored spec,
    # which is a server error.
    return compile_spec(parse_experiment(spec))
