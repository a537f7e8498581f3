"""Every search-space error of issue 2 names the field and the problem, never a traceback.

Each case is checked twice: from the engine (``SearchSpace.from_spec``) and
from a whole manifest (``parse_experiment``), where the field gains ``spec.``.
"""

from __future__ import annotations

from typing import Any

import pytest

from kubetune_suggestion.engine.samplers import make_sampler
from kubetune_suggestion.engine.space import SearchSpace, SpaceError
from kubetune_suggestion.spec import SpecError, parse_experiment

OPT: dict[str, Any] = {"name": "opt", "type": "categorical", "values": ["adam", "sgd"]}

CASES: list[tuple[str, list[dict[str, Any]], str, str]] = [
    (
        "min equal to max",
        [{"name": "lr", "type": "float", "min": 1, "max": 1}],
        "parameters[0].min",
        'parameter "lr": min (1) must be less than max (1)',
    ),
    (
        "min above max",
        [{"name": "layers", "type": "int", "min": 8, "max": 2}],
        "parameters[0].min",
        'parameter "layers": min (8) must be less than max (2)',
    ),
    (
        "log scale with min zero",
        [{"name": "lr", "type": "float", "min": 0, "max": 1, "log": True}],
        "parameters[0].min",
        'parameter "lr": a log-scale parameter needs min > 0, got 0',
    ),
    (
        "log scale with negative min",
        [{"name": "units", "type": "int", "min": -4, "max": 64, "log": True}],
        "parameters[0].min",
        'parameter "units": a log-scale parameter needs min > 0, got -4',
    ),
    (
        "empty categorical",
        [{"name": "opt", "type": "categorical", "values": []}],
        "parameters[0].values",
        'parameter "opt": `values` must be a non-empty list',
    ),
    (
        "duplicate categorical value",
        [{"name": "opt", "type": "categorical", "values": ["adam", "sgd", "adam"]}],
        "parameters[0].values[2]",
        "parameter \"opt\": duplicate value 'adam'",
    ),
    (
        "duplicate numeric categorical value",
        [{"name": "batch", "type": "categorical", "values": [32, 64, 32.0]}],
        "parameters[0].values[2]",
        'parameter "batch": duplicate value 32.0',
    ),
    (
        "duplicate parameter names",
        [OPT, {"name": "opt", "type": "int", "min": 0, "max": 3}],
        "parameters[1].name",
        'duplicate parameter name "opt" (first declared at parameters[0])',
    ),
    (
        "when on an unknown parameter",
        [{"name": "momentum", "type": "float", "min": 0, "max": 1, "when": {"optim": "sgd"}}],
        "parameters[0].when.optim",
        'parameter "momentum" depends on unknown parameter "optim"',
    ),
    (
        "when on a value outside the choices",
        [OPT, {"name": "momentum", "type": "float", "min": 0, "max": 1, "when": {"opt": "rms"}}],
        "parameters[1].when.opt",
        "parameter \"momentum\": 'rms' is not a value of \"opt\" (must be one of ['adam', 'sgd'])",
    ),
    (
        "cyclic conditions",
        [
            {"name": "a", "type": "categorical", "values": ["x", "y"], "when": {"c": "x"}},
            {"name": "b", "type": "categorical", "values": ["x", "y"], "when": {"a": "x"}},
            {"name": "c", "type": "categorical", "values": ["x", "y"], "when": {"b": "y"}},
        ],
        "parameters[0].when",
        'cyclic `when` conditions: "a" -> "c" -> "b" -> "a"',
    ),
    (
        "a parameter conditioned on itself",
        [{"name": "a", "type": "categorical", "values": ["x", "y"], "when": {"a": "x"}}],
        "parameters[0].when.a",
        'parameter "a" cannot depend on itself',
    ),
]


IDS = [c[0] for c in CASES]


def manifest(parameters: list[dict[str, Any]], algorithm: str = "random") -> dict[str, Any]:
    return {
        "objective": {"metric": "val_loss", "direction": "minimize"},
        "parameters": parameters,
        "algorithm": {"name": algorithm},
        "template": {"spec": {"containers": [{"name": "train", "image": "trial:1"}]}},
    }


@pytest.mark.parametrize(("case", "parameters", "field", "problem"), CASES, ids=IDS)
def test_space_error_names_field_and_problem(
    case: str, parameters: list[dict[str, Any]], field: str, problem: str
) -> None:
    with pytest.raises(SpaceError) as info:
        SearchSpace.from_spec(parameters)
    assert (info.value.field, info.value.problem) == (field, problem)
    assert str(info.value) == f"{field}: {problem}"


@pytest.mark.parametrize(("case", "parameters", "field", "problem"), CASES, ids=IDS)
def test_manifest_error_names_field_and_problem(
    case: str, parameters: list[dict[str, Any]], field: str, problem: str
) -> None:
    with pytest.raises(SpecError) as info:
        parse_experiment(manifest(parameters))
    assert (info.value.field, info.value.problem) == (f"spec.{field}", problem)


GRID_PROBLEM = (
    'parameter "lr": the grid algorithm needs a `step` for a continuous float '
    "(or use an int or categorical parameter)"
)
CONTINUOUS: list[dict[str, Any]] = [OPT, {"name": "lr", "type": "float", "min": 0.001, "max": 0.1}]


def test_grid_over_a_continuous_float_in_a_manifest() -> None:
    with pytest.raises(SpecError) as info:
        parse_experiment(manifest(CONTINUOUS, algorithm="grid"))
    assert (info.value.field, info.value.problem) == ("spec.parameters[1].step", GRID_PROBLEM)


def test_grid_over_a_continuous_float_in_the_engine() -> None:
    space = SearchSpace.from_spec(CONTINUOUS)
    with pytest.raises(SpaceError) as info:
        make_sampler("grid", space)
    assert (info.value.field, info.value.problem) == ("parameters[1].step", GRID_PROBLEM)


def test_the_same_space_is_fine_for_other_algorithms() -> None:
    parse_experiment(manifest(CONTINUOUS, algorithm="sobol"))
    stepped: list[dict[str, Any]] = [
        OPT,
        {"name": "lr", "type": "float", "min": 0.001, "max": 0.1, "step": 0.001},
    ]
    parse_experiment(manifest(stepped, algorithm="grid"))


def test_unknown_algorithm_in_the_engine() -> None:
    space = SearchSpace.from_spec([OPT])
    with pytest.raises(SpaceError) as info:
        make_sampler("bayes", space)
    assert info.value.field == "algorithm.name"
    assert "unknown algorithm 'bayes'" in info.value.problem
