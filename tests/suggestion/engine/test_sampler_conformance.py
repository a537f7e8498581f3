"""What every sampler in SAMPLERS must do, checked the same way for each.

The suite is parametrised over the registry, so a sampler is covered as soon
as it is registered. Histories come from simulating a few rounds of an
experiment (batches, failures, NaN/inf results, trials left running) on a small
mixed conditional space. Grid search gets the same space with a step on every
float, since it cannot enumerate a continuous one.

Run as a script (``python test_sampler_conformance.py``), the module prints the
simulated suggestions of every sampler as JSON; the reproducibility test
compares that fresh process's output with its own.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from kubetune_suggestion.engine.history import Direction, RecordState, TrialRecord
from kubetune_suggestion.engine.samplers import SAMPLERS, Sampler, make_sampler
from kubetune_suggestion.engine.samplers.base import JsonState
from kubetune_suggestion.engine.space import (
    CategoricalParam,
    FloatParam,
    IntParam,
    SearchSpace,
    SpaceError,
)

CONDITIONAL_TAIL: list[dict[str, Any]] = [
    {"name": "optimizer", "type": "categorical", "values": ["adam", "sgd", "rmsprop"]},
    {
        "name": "schedule",
        "type": "categorical",
        "values": ["constant", "cosine"],
        "when": {"optimizer": "sgd"},
    },
    # A chain: warmup exists only for sgd with a cosine schedule.
    {
        "name": "warmup",
        "type": "int",
        "min": 0,
        "max": 10,
        "step": 2,
        "when": {"schedule": "cosine"},
    },
    {"name": "batch_norm", "type": "categorical", "values": [True, False]},
    {"name": "batch", "type": "categorical", "values": [32, 64, 128]},
]

MIXED_SPACE: list[dict[str, Any]] = [
    {"name": "lr", "type": "float", "min": 1e-5, "max": 1e-1, "log": True},
    {"name": "layers", "type": "int", "min": 1, "max": 6},
    {"name": "units", "type": "int", "min": 16, "max": 512, "log": True},
    {"name": "dropout", "type": "float", "min": 0.0, "max": 0.5, "step": 0.05},
    *CONDITIONAL_TAIL[:1],
    {
        "name": "momentum",
        "type": "float",
        "min": 0.5,
        "max": 0.99,
        "when": {"optimizer": ["sgd", "rmsprop"]},
    },
    *CONDITIONAL_TAIL[1:],
]

GRID_SPACE: list[dict[str, Any]] = [
    {"name": "lr", "type": "float", "min": 0.001, "max": 0.01, "step": 0.003},
    {"name": "layers", "type": "int", "min": 1, "max": 3},
    {"name": "units", "type": "int", "min": 16, "max": 64, "step": 16},
    {"name": "dropout", "type": "float", "min": 0.0, "max": 0.5, "step": 0.25},
    *CONDITIONAL_TAIL[:1],
    {
        "name": "momentum",
        "type": "float",
        "min": 0.5,
        "max": 0.9,
        "step": 0.2,
        "when": {"optimizer": ["sgd", "rmsprop"]},
    },
    *CONDITIONAL_TAIL[1:],
]

CONDITIONAL = ("momentum", "schedule", "warmup")
NAMES = sorted(SAMPLERS)
SEED = 7


def space_for(name: str) -> SearchSpace:
    return SearchSpace.from_spec(GRID_SPACE if name == "grid" else MIXED_SPACE)


def objective(config: Mapping[str, Any]) -> float:
    """A smooth HPO-shaped loss, so model-based samplers have something to learn."""
    loss = (math.log10(float(config["lr"])) + 2.5) ** 2
    loss += 0.1 * (int(config["layers"]) - 3) ** 2 + 0.3 * float(config["dropout"])
    loss += {"adam": 0.0, "sgd": 0.2, "rmsprop": 0.4}[str(config["optimizer"])]
    loss += 0.5 * (float(config.get("momentum", 0.9)) - 0.9) ** 2
    return loss + 0.01 * int(config.get("warmup", 0))


def simulate(
    sampler: Sampler, rounds: int = 5, batch: int = 4
) -> tuple[list[TrialRecord], JsonState | None, list[list[dict[str, Any]]]]:
    """Run ``rounds`` batches; the last batch stays running.

    Every fifth trial fails, every seventh reports NaN and every eleventh +inf,
    as real experiments do.
    """
    history: list[TrialRecord] = []
    state: JsonState | None = None
    batches: list[list[dict[str, Any]]] = []
    for r in range(rounds):
        out = sampler.suggest(history, batch, state)
        state = out.state
        batches.append([dict(c) for c in out.configs])
        for config in out.configs:
            number = len(history)
            if r == rounds - 1:
                history.append(TrialRecord(number, config, RecordState.RUNNING))
            elif number % 5 == 4:
                history.append(TrialRecord(number, config, RecordState.FAILED))
            elif number % 7 == 6:
                history.append(TrialRecord(number, config, RecordState.SUCCEEDED, math.nan))
            elif number % 11 == 10:
                history.append(TrialRecord(number, config, RecordState.SUCCEEDED, math.inf))
            else:
                history.append(
                    TrialRecord(number, config, RecordState.SUCCEEDED, objective(config))
                )
    return history, state, batches


def assert_valid(space: SearchSpace, config: Mapping[str, Any]) -> None:
    # check_config covers presence exactly when active, bounds, steps and
    # int-ness; the types of floats and categoricals are checked here.
    space.check_config(config)
    for param in space:
        if param.name not in config:
            continue
        value = config[param.name]
        if isinstance(param, FloatParam):
            assert isinstance(value, float) and math.isfinite(value), (param.name, value)
        elif isinstance(param, IntParam):
            assert type(value) is int, (param.name, value)
        else:
            assert isinstance(param, CategoricalParam)
            assert any(type(value) is type(c) and value == c for c in param.choices)


def key(config: Mapping[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


@pytest.fixture(params=NAMES)
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize("direction", list(Direction))
def test_suggestions_are_valid_configurations(name: str, direction: Direction) -> None:
    space = space_for(name)
    sampler = make_sampler(name, space, direction, seed=SEED)
    history, state, _ = simulate(sampler, rounds=6, batch=6)
    configs = [t.params for t in history]
    configs += sampler.suggest(history, 8, state).configs
    for config in configs:
        assert_valid(space, config)
    # Conditional parameters, the chain included, show up and stay away.
    for cond in CONDITIONAL:
        present = sum(cond in c for c in configs)
        assert 0 < present < len(configs), (cond, present)
    for config in configs:
        assert ("schedule" in config) == (config["optimizer"] == "sgd")
        assert ("warmup" in config) == (config.get("schedule") == "cosine")
        assert ("momentum" in config) == (config["optimizer"] in ("sgd", "rmsprop"))


@pytest.mark.parametrize("setting", ["foo", "seed"])
def test_an_unknown_setting_is_refused_naming_it(name: str, setting: str) -> None:
    with pytest.raises(SpaceError) as refused:
        make_sampler(name, space_for(name), seed=SEED, options={setting: 1})
    assert refused.value.field == f"algorithm.settings.{setting}"
    assert f"unknown setting for {name} (known: " in refused.value.problem


def test_log_scale_is_respected(name: str) -> None:
    space = space_for(name)
    log_floats = [p for p in space if isinstance(p, FloatParam) and p.log]
    if not log_floats:
        pytest.skip("the grid space has no continuous log-scale parameter")
    sampler = make_sampler(name, space, seed=SEED)
    configs = sampler.suggest([], 16).configs
    # Uniform on the log scale puts half the draws below the geometric middle
    # of [1e-5, 1e-1]; uniform on the linear scale would put 0.1% there.
    below = sum(float(c["lr"]) < 1e-3 for c in configs)
    assert below >= 4, [c["lr"] for c in configs]
    units = [int(c["units"]) for c in configs]
    assert sum(u < 90 for u in units) >= 4, units


def test_empty_history(name: str) -> None:
    space = space_for(name)
    out = make_sampler(name, space, seed=SEED).suggest([], 8)
    assert len(out.configs) == 8
    for config in out.configs:
        assert_valid(space, config)
    json.dumps(out.state)


@pytest.mark.parametrize("failed_state", [RecordState.FAILED, RecordState.PRUNED])
def test_history_without_a_single_usable_value(name: str, failed_state: RecordState) -> None:
    space = space_for(name)
    sampler = make_sampler(name, space, seed=SEED)
    first = sampler.suggest([], 12)
    history = [TrialRecord(i, c, failed_state) for i, c in enumerate(first.configs)]
    out = sampler.suggest(history, 8, first.state)
    assert len(out.configs) == 8
    for config in out.configs:
        assert_valid(space, config)


@pytest.mark.parametrize("direction", list(Direction))
def test_nan_and_inf_results_do_not_break_sampling(name: str, direction: Direction) -> None:
    space = space_for(name)
    sampler = make_sampler(name, space, direction, seed=SEED)
    first = sampler.suggest([], 12)
    bad = [math.nan, math.inf, -math.inf]
    history = [
        TrialRecord(
            i,
            c,
            RecordState.SUCCEEDED,
            bad[i % 3] if i % 2 == 0 else objective(c),
            steps={1: bad[i % 3]},
        )
        for i, c in enumerate(first.configs)
    ]
    out = sampler.suggest(history, 8, first.state)
    assert len(out.configs) == 8
    for config in out.configs:
        assert_valid(space, config)


def test_a_batch_of_8_has_8_distinct_points(name: str) -> None:
    space = space_for(name)
    sampler = make_sampler(name, space, seed=SEED)
    history, state, _ = simulate(sampler, rounds=4, batch=4)
    out = sampler.suggest(history, 8, state)
    assert len({key(c) for c in out.configs}) == 8
    # Nor should the batch repeat what is running right now.
    running = {key(t.params) for t in history if t.state is RecordState.RUNNING}
    assert not running & {key(c) for c in out.configs}


def test_json_state_round_trip_gives_the_same_next_suggestion(name: str) -> None:
    space = space_for(name)
    sampler = make_sampler(name, space, seed=SEED)
    history, state, _ = simulate(sampler, rounds=4, batch=4)
    restored = json.loads(json.dumps(state))
    assert restored == state
    # A new sampler object, as after a service restart.
    again = make_sampler(name, space, seed=SEED)
    assert again.suggest(history, 4, restored).configs == sampler.suggest(history, 4, state).configs


def test_different_seeds_differ(name: str) -> None:
    if name == "grid":
        pytest.skip("grid order does not depend on the seed")
    space = space_for(name)
    a = make_sampler(name, space, seed=1).suggest([], 4).configs
    b = make_sampler(name, space, seed=2).suggest([], 4).configs
    assert a != b


def runs_by_sampler() -> dict[str, list[list[dict[str, Any]]]]:
    """The simulated batches of every registered sampler (what the script prints)."""
    return {n: simulate(make_sampler(n, space_for(n), seed=SEED))[2] for n in NAMES}


@pytest.fixture(scope="module")
def fresh_process_runs() -> dict[str, list[list[dict[str, Any]]]]:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    runs: dict[str, list[list[dict[str, Any]]]] = json.loads(proc.stdout)
    return runs


def test_same_seed_same_suggestions_in_a_fresh_process(
    name: str, fresh_process_runs: dict[str, list[list[dict[str, Any]]]]
) -> None:
    here = simulate(make_sampler(name, space_for(name), seed=SEED))[2]
    # Through JSON, as the fresh process's output went.
    assert json.loads(json.dumps(here)) == fresh_process_runs[name]


if __name__ == "__main__":
    print(json.dumps(runs_by_sampler()))
