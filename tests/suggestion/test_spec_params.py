"""A configuration checked against the search space it claims to come from."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune_suggestion.spec import param_problems, parse_experiment

SPACE = parse_experiment(
    {
        "objective": {"metric": "val_loss", "direction": "minimize"},
        "parameters": [
            {"name": "lr", "type": "float", "min": 1e-5, "max": 1e-1, "log": True},
            {"name": "dropout", "type": "float", "min": 0.0, "max": 0.5, "step": 0.1},
            {"name": "layers", "type": "int", "min": 1, "max": 6},
            {"name": "optimizer", "type": "categorical", "values": ["adam", "sgd"]},
            {
                "name": "momentum",
                "type": "float",
                "min": 0.5,
                "max": 0.99,
                "when": {"optimizer": "sgd"},
            },
        ],
        "template": {"spec": {"containers": [{"name": "t", "image": "i"}]}},
    }
).search_space()
ADAM = {"lr": 0.001, "dropout": 0.2, "layers": 3, "optimizer": "adam"}
SGD = {**ADAM, "optimizer": "sgd", "momentum": 0.9}


@pytest.mark.parametrize("params", [ADAM, SGD, {**ADAM, "lr": 1e-5, "layers": 6}])
def test_a_configuration_of_the_space_has_no_problem(params: dict[str, Any]) -> None:
    assert param_problems(SPACE, params) == []


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({**ADAM, "batch": 32}, "batch: not a parameter of the search space"),
        ({k: v for k, v in ADAM.items() if k != "layers"}, "layers: missing"),
        # A conditional parameter is required exactly when its condition holds.
        ({k: v for k, v in SGD.items() if k != "momentum"}, "momentum: missing"),
        ({**ADAM, "momentum": 0.9}, "momentum: given although its `when` condition does not hold"),
        ({**ADAM, "lr": 0.5}, "lr: 0.5 is above its max 0.1"),
        ({**ADAM, "lr": 1e-6}, "lr: 1e-06 is below its min 1e-05"),
        ({**ADAM, "layers": 2.5}, "layers: 2.5 is not an integer"),
        ({**ADAM, "layers": 3.0}, "layers: 3.0 is not an integer"),
        ({**ADAM, "layers": True}, "layers: True is not an integer"),
        ({**ADAM, "layers": 7}, "layers: 7 is above its max 6"),
        ({**ADAM, "lr": "0.01; rm -rf /"}, "lr: '0.01; rm -rf /' is not a number"),
        ({**ADAM, "lr": float("nan")}, "lr: nan is not a number"),
        ({**ADAM, "dropout": 0.25}, "dropout: 0.25 is not on its step grid (0.0 + k * 0.1)"),
        ({**ADAM, "optimizer": "rmsprop"}, "optimizer: 'rmsprop' is not one of ['adam', 'sgd']"),
    ],
)
def test_each_problem_names_the_parameter(params: dict[str, Any], problem: str) -> None:
    assert param_problems(SPACE, params) == [problem]


def test_every_problem_is_listed() -> None:
    params = {"lr": 2.0, "optimizer": "sgd", "x": 1}
    assert param_problems(SPACE, params) == [
        "x: not a parameter of the search space",
        "lr: 2.0 is above its max 0.1",
        "dropout: missing",
        "layers: missing",
        "momentum: missing",
    ]
