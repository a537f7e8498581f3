"""Simulated learning curves: the problems of the early-stopping benchmark.

A configuration has a learning-rate-like position ``x`` in [0, 1] and an
architecture quality ``q``; its validation loss falls from ``start`` towards
``floor + spread_lr * (x - x_best)**2 + spread_quality * q`` as
``exp(-t / tau)``, ``tau`` shrinking as ``x`` grows, so the curves cross (see
``bench/early_stopping.py`` for the whole design). A :class:`Scenario` sets
how; :func:`population` draws the configurations, their noisy reports and
their time per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Scenario:
    """A family of learning curves."""

    name: str
    # Asymptote: floor + spread_lr * (x - x_best)**2 + spread_quality * q.
    floor: float
    spread_lr: float
    spread_quality: float
    x_best: float
    # tau = tau_fast * (tau_slow / tau_fast) ** (1 - x), in steps.
    tau_fast: float
    tau_slow: float
    noise: float
    start: float = 2.3  # ln(10): an untrained 10-class classifier


SCENARIOS = {
    "typical": Scenario(
        "typical",
        floor=0.25,
        spread_lr=0.6,
        spread_quality=0.3,
        x_best=0.5,
        tau_fast=0.25,
        tau_slow=2.0,
        noise=0.005,
    ),
    "late-crossing": Scenario(
        "late-crossing",
        floor=0.25,
        spread_lr=0.3,
        spread_quality=0.10,
        x_best=0.35,
        tau_fast=0.8,
        tau_slow=10.0,
        noise=0.005,
    ),
}


@dataclass(frozen=True)
class Population:
    """Observed curves (trials x steps), their noise-free finals, and step durations."""

    observed: np.ndarray
    final: np.ndarray
    duration: np.ndarray


def population(scenario: Scenario, trials: int, seed: int, steps: int) -> Population:
    """``trials`` configurations' curves over ``steps`` steps; the same for the same seed."""
    rng = np.random.default_rng([seed, 2026])
    x = rng.random(trials)
    q = rng.random(trials)
    asymptote = scenario.floor + scenario.spread_lr * (x - scenario.x_best) ** 2
    asymptote += scenario.spread_quality * q
    tau = scenario.tau_fast * (scenario.tau_slow / scenario.tau_fast) ** (1.0 - x)
    t = np.arange(1, steps + 1)
    clean = asymptote[:, None] + (scenario.start - asymptote[:, None]) * np.exp(
        -t[None, :] / tau[:, None]
    )
    observed = clean + scenario.noise * rng.standard_normal(clean.shape)
    # Better architectures (lower q) are bigger and slower per step.
    duration = (1.5 - q) * rng.lognormal(0.0, 0.2, trials)
    return Population(observed=observed, final=clean[:, -1], duration=duration)
