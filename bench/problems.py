"""Benchmark problems for the samplers: classic test functions and one HPO-shaped space.

Each problem is a search space in the manifest's form plus an objective to
minimise over configurations. Domains and optima follow the Virtual Library of
Simulation Experiments (Surjanovic & Bingham, sfu.ca/~ssurjano).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Problem:
    """A minimisation problem over a kubetune search space.

    Attributes:
        name: Short name used in tables.
        params: The ``parameters`` list, as a user writes it.
        objective: Value of a configuration (smaller is better).
        optimum: The known global minimum (for reading the tables).
        continuous: True for a box of floats without conditions.
    """

    name: str
    params: list[dict[str, Any]]
    objective: Callable[[Mapping[str, Any]], float]
    optimum: float
    continuous: bool = True


def _box(names: int, low: float, high: float) -> list[dict[str, Any]]:
    return [{"name": f"x{i}", "type": "float", "min": low, "max": high} for i in range(names)]


def _vec(config: Mapping[str, Any], d: int) -> np.ndarray:
    return np.array([config[f"x{i}"] for i in range(d)], dtype=float)


def branin(c: Mapping[str, Any]) -> float:
    x1, x2 = c["x0"], c["x1"]
    b, cc, r, s, t = 5.1 / (4 * math.pi**2), 5 / math.pi, 6.0, 10.0, 1 / (8 * math.pi)
    return float((x2 - b * x1**2 + cc * x1 - r) ** 2 + s * (1 - t) * math.cos(x1) + s)


_H6_A = np.array(
    [
        [10, 3, 17, 3.5, 1.7, 8],
        [0.05, 10, 17, 0.1, 8, 14],
        [3, 3.5, 1.7, 10, 17, 8],
        [17, 8, 0.05, 10, 0.1, 14],
    ]
)
_H6_P = 1e-4 * np.array(
    [
        [1312, 1696, 5569, 124, 8283, 5886],
        [2329, 4135, 8307, 3736, 1004, 9991],
        [2348, 1451, 3522, 2883, 3047, 6650],
        [4047, 8828, 8732, 5743, 1091, 381],
    ]
)
_H6_ALPHA = np.array([1.0, 1.2, 3.0, 3.2])


def hartmann6(c: Mapping[str, Any]) -> float:
    x = _vec(c, 6)
    return float(-np.sum(_H6_ALPHA * np.exp(-np.sum(_H6_A * (x - _H6_P) ** 2, axis=1))))


def rosenbrock4(c: Mapping[str, Any]) -> float:
    x = _vec(c, 4)
    return float(np.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2))


def styblinski_tang8(c: Mapping[str, Any]) -> float:
    x = _vec(c, 8)
    return float(0.5 * np.sum(x**4 - 16 * x**2 + 5 * x))


def ackley5(c: Mapping[str, Any]) -> float:
    x = _vec(c, 5)
    d = len(x)
    return float(
        -20 * math.exp(-0.2 * math.sqrt(np.sum(x**2) / d))
        - math.exp(np.sum(np.cos(2 * math.pi * x)) / d)
        + 20
        + math.e
    )


def levy6(c: Mapping[str, Any]) -> float:
    x = _vec(c, 6)
    w = 1 + (x - 1) / 4
    term = np.sum((w[:-1] - 1) ** 2 * (1 + 10 * np.sin(math.pi * w[:-1] + 1) ** 2))
    last = (w[-1] - 1) ** 2 * (1 + np.sin(2 * math.pi * w[-1]) ** 2)
    return float(np.sin(math.pi * w[0]) ** 2 + term + last)


HPO_PARAMS: list[dict[str, Any]] = [
    {"name": "lr", "type": "float", "min": 1e-5, "max": 1.0, "log": True},
    {"name": "batch_size", "type": "int", "min": 16, "max": 512, "log": True},
    {"name": "layers", "type": "int", "min": 1, "max": 8},
    {"name": "dropout", "type": "float", "min": 0.0, "max": 0.6},
    {"name": "optimizer", "type": "categorical", "values": ["adam", "sgd", "rmsprop"]},
    {"name": "momentum", "type": "float", "min": 0.0, "max": 0.99, "when": {"optimizer": "sgd"}},
    {"name": "weight_decay", "type": "float", "min": 1e-6, "max": 1e-2, "log": True},
]


def hpo_mixed(c: Mapping[str, Any]) -> float:
    """A synthetic validation loss with the usual HPO shape.

    Each optimiser has its own best learning rate; SGD is the best family but
    only with high momentum (its conditional child); depth and dropout
    interact; batch size shifts the best learning rate (the linear-scaling
    rule); weight decay has a shallow optimum.
    """
    log_lr = math.log10(c["lr"])
    log_bs = math.log2(c["batch_size"])
    best_lr = {"adam": -3.2, "rmsprop": -3.6, "sgd": -1.4}[c["optimizer"]] + 0.3 * (log_bs - 7)
    base = {"adam": 0.10, "rmsprop": 0.13, "sgd": 0.07}[c["optimizer"]]
    loss = base + 0.05 * (log_lr - best_lr) ** 2
    if c["optimizer"] == "sgd":
        loss += 0.4 * (0.95 - c["momentum"]) ** 2 + (0.05 if c["momentum"] < 0.5 else 0.0)
    layers, dropout = c["layers"], c["dropout"]
    best_dropout = 0.05 * layers
    loss += 0.01 * (layers - 5) ** 2 + 0.3 * (dropout - best_dropout) ** 2
    loss += 0.004 * (math.log10(c["weight_decay"]) + 4) ** 2
    return float(loss)


_BRANIN: list[dict[str, Any]] = [
    {"name": "x0", "type": "float", "min": -5.0, "max": 10.0},
    {"name": "x1", "type": "float", "min": 0.0, "max": 15.0},
]

PROBLEMS: dict[str, Problem] = {
    p.name: p
    for p in (
        Problem("branin", _BRANIN, branin, 0.397887),
        Problem("hartmann6", _box(6, 0.0, 1.0), hartmann6, -3.32237),
        Problem("rosenbrock4", _box(4, -5.0, 10.0), rosenbrock4, 0.0),
        Problem("styblinski_tang8", _box(8, -5.0, 5.0), styblinski_tang8, -39.16617 * 8),
        Problem("ackley5", _box(5, -32.768, 32.768), ackley5, 0.0),
        Problem("levy6", _box(6, -10.0, 10.0), levy6, 0.0),
        Problem("hpo_mixed", HPO_PARAMS, hpo_mixed, 0.07, continuous=False),
    )
}
