"""A seeded experiment with early stopping, run twice through the engine, suggests the same.

The engine is a pure function of (seed, history, sampler state): these runs
vary everything else the service may vary between two runs of one manifest at
parallelism 1 (a sampler and rule rebuilt for every call, as after a restart
or on another replica; the state through JSON, as stored; new record objects
in another order, as a history re-read from the database gives).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from kubetune_suggestion.engine.history import Direction, RecordState, TrialRecord
from kubetune_suggestion.engine.samplers import make_sampler
from kubetune_suggestion.engine.samplers.base import JsonState
from kubetune_suggestion.engine.space import SearchSpace
from kubetune_suggestion.engine.stopping import make_rule

SPACE: list[dict[str, Any]] = [
    {"name": "lr", "type": "float", "min": 1e-4, "max": 1.0, "log": True},
    {"name": "hidden", "type": "int", "min": 4, "max": 128, "log": True},
    {"name": "optimizer", "type": "categorical", "values": ["adam", "sgd"]},
    {"name": "momentum", "type": "float", "min": 0.5, "max": 0.99, "when": {"optimizer": "sgd"}},
]
MAX_STEP = 27
TRIALS = 30


def curve(config: Mapping[str, Any], step: int) -> float:
    """A falling validation loss whose floor and speed depend on the configuration."""
    x = math.log10(config["lr"]) + 2.0
    floor = 0.2 + 0.1 * x**2 + 0.05 * abs(math.log2(config["hidden"]) - 6)
    floor += 0.05 * (config["optimizer"] == "sgd") * (0.99 - config.get("momentum", 0.0))
    tau = 0.5 + 3.0 / (1.0 + 10 ** (x + 1))
    return float(floor + 2.0 * math.exp(-step / tau))


def run(algorithm: str, rule_name: str, fresh: bool) -> list[dict[str, Any]]:
    """Trials one at a time; ``fresh``: rebuild everything the service may rebuild."""
    space = SearchSpace.from_spec(SPACE)
    options = {"minResource": 1, "maxResource": MAX_STEP, "reductionFactor": 3}
    if rule_name == "median":
        options = {"warmupSteps": 0, "minTrials": 3}

    def sampler() -> Any:
        return make_sampler(algorithm, space, Direction.MINIMIZE, seed=7)

    def rule() -> Any:
        return make_rule(rule_name, Direction.MINIMIZE, options)

    kept_sampler, kept_rule = sampler(), rule()
    history: list[TrialRecord] = []
    state: JsonState | None = None
    shuffle = np.random.default_rng(0)
    for number in range(TRIALS):
        seen = history
        if fresh:
            seen = [TrialRecord(t.number, dict(t.params), t.state, t.value) for t in history]
            seen = [seen[i] for i in shuffle.permutation(len(seen))]
        # The sampler sees what the service gives it: no curves.
        out = (sampler() if fresh else kept_sampler).suggest(
            [TrialRecord(t.number, t.params, t.state, t.value) for t in seen], 1, state
        )
        state = json.loads(json.dumps(out.state)) if fresh else out.state
        config = out.configs[0]
        steps: dict[int, float] = {}
        end = RecordState.SUCCEEDED
        for step in range(1, MAX_STEP + 1):
            steps[step] = curve(config, step)
            me = TrialRecord(number, config, RecordState.RUNNING, None, dict(steps))
            others = [*history, me]
            if fresh:
                others = [others[i] for i in shuffle.permutation(len(others))]
            if step < MAX_STEP and (rule() if fresh else kept_rule).decide(me, others).stop:
                end = RecordState.PRUNED
                break
        history.append(TrialRecord(number, config, end, steps[max(steps)], steps))
    assert any(t.state is RecordState.PRUNED for t in history)
    return [dict(t.params) for t in history]


@pytest.mark.parametrize("rule_name", ["asha", "median", "hyperband"])
@pytest.mark.parametrize("algorithm", ["tpe", "random", "sobol", "cmaes"])
def test_a_seeded_run_with_early_stopping_repeats_exactly(algorithm: str, rule_name: str) -> None:
    first = run(algorithm, rule_name, fresh=False)
    assert run(algorithm, rule_name, fresh=False) == first
    assert run(algorithm, rule_name, fresh=True) == first
