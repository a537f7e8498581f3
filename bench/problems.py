"""Benchmark problems for the samplers: classic test functions and one HPO-shaped space.

Each problem is a search space in the manifest's form plus an objective to
minimise over configurations. Domains and optima follow the Virtual Library of
Simulation Experiments (Surjanovic & Bingham, sfu.ca/~ssurjano).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
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


MLP_PARAMS: list[dict[str, Any]] = [
    {"name": "lr", "type": "float", "min": 1e-4, "max": 1.0, "log": True},
    {"name": "momentum", "type": "float", "min": 0.0, "max": 0.99},
    {"name": "hidden", "type": "int", "min": 4, "max": 128, "log": True},
    {"name": "batch_size", "type": "int", "min": 16, "max": 256, "log": True},
    {"name": "weight_decay", "type": "float", "min": 1e-6, "max": 1e-1, "log": True},
]

# A diverged network reports this loss (ten times an untrained one's) rather
# than NaN, so that every method sees a finite, very bad value.
MLP_DIVERGED = 10 * math.log(4)


@dataclass(frozen=True)
class MLPData:
    """A 4-class problem from a random teacher network, with label noise.

    Attributes:
        x_train, y_train: The training set (inputs, class indices).
        x_val, y_val: The held-out validation set.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def mlp_data(seed: int, n_train: int = 600, n_val: int = 400, d: int = 12) -> MLPData:
    """Inputs from a standard normal, labels from a tanh teacher, 15% of them flipped.

    The noise puts a floor under the validation loss that only a well-tuned
    network (enough capacity, a learning rate that neither crawls nor
    diverges, enough weight decay not to memorise the noise) gets near.
    """
    rng = np.random.default_rng([seed, 0x3A1])
    classes, teacher_hidden = 4, 16
    w1 = rng.standard_normal((d, teacher_hidden)) / math.sqrt(d)
    w2 = rng.standard_normal((teacher_hidden, classes)) * 1.5
    x = rng.standard_normal((n_train + n_val, d))
    y = np.argmax(np.tanh(x @ w1) @ w2, axis=1)
    flip = rng.random(len(y)) < 0.15
    y[flip] = rng.integers(0, classes, flip.sum())
    return MLPData(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def train_mlp(data: MLPData, config: Mapping[str, Any], epochs: int) -> Iterator[float]:
    """Train a one-hidden-layer ReLU network with SGD and momentum, epoch by epoch.

    Yields the validation cross-entropy after each epoch. Deterministic in
    (data, config): the initial weights and each epoch's shuffle come from
    fixed seeds, so a configuration learns the same curve in every method.
    """
    d = data.x_train.shape[1]
    classes = int(max(data.y_train.max(), data.y_val.max())) + 1
    hidden, batch = int(config["hidden"]), int(config["batch_size"])
    lr, momentum, decay = config["lr"], config["momentum"], config["weight_decay"]
    init = np.random.default_rng([hidden, 0x1717])
    params = [
        init.standard_normal((d, hidden)) * math.sqrt(2.0 / d),
        np.zeros(hidden),
        init.standard_normal((hidden, classes)) * math.sqrt(1.0 / hidden),
        np.zeros(classes),
    ]
    velocity = [np.zeros_like(p) for p in params]
    n = len(data.y_train)
    diverged = False
    for epoch in range(epochs):
        order = np.random.default_rng([epoch, 0x5EED]).permutation(n)
        for start in range(0, n, batch):
            if diverged:
                break
            idx = order[start : start + batch]
            grads = _mlp_grads(params, data.x_train[idx], data.y_train[idx])
            for p, v, g in zip(params, velocity, grads, strict=True):
                v *= momentum
                v -= lr * (g + decay * p)
                p += v
            diverged = not all(np.isfinite(p).all() for p in params)
        loss = MLP_DIVERGED if diverged else _cross_entropy(params, data.x_val, data.y_val)
        yield min(loss, MLP_DIVERGED)


def _mlp_logits(params: list[np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w1, b1, w2, b2 = params
    h = np.maximum(x @ w1 + b1, 0.0)
    return h, h @ w2 + b2


def _log_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=1, keepdims=True)
    out: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return out


def _cross_entropy(params: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    with np.errstate(all="ignore"):
        _, z = _mlp_logits(params, x)
        loss = float(-_log_softmax(z)[np.arange(len(y)), y].mean())
    return loss if math.isfinite(loss) else MLP_DIVERGED


def _mlp_grads(params: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    _, _, w2, _ = params
    with np.errstate(all="ignore"):
        h, z = _mlp_logits(params, x)
        dz = np.exp(_log_softmax(z))
        dz[np.arange(len(y)), y] -= 1.0
        dz /= len(y)
        dh = (dz @ w2.T) * (h > 0)
        return [x.T @ dh, dh.sum(axis=0), h.T @ dz, dz.sum(axis=0)]
