"""Grid and Sobol' specifics beyond the conformance suite: order, exhaustion, restarts."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from kubetune_suggestion.engine.history import RecordState, TrialRecord
from kubetune_suggestion.engine.samplers import make_sampler
from kubetune_suggestion.engine.samplers.grid import GridSampler
from kubetune_suggestion.engine.space import Config, SearchSpace

# 10 configurations: adam x 2 layers, and sgd x 2 layers x (momentum 0.5, or
# momentum 0.9 x 3 nesterov values): a chain of conditions below sgd.
CONDITIONAL = SearchSpace.from_spec(
    [
        {"name": "opt", "type": "categorical", "values": ["adam", "sgd"]},
        {"name": "layers", "type": "int", "min": 1, "max": 2},
        {
            "name": "momentum",
            "type": "float",
            "min": 0.5,
            "max": 0.9,
            "step": 0.4,
            "when": {"opt": "sgd"},
        },
        {
            "name": "nesterov",
            "type": "categorical",
            "values": [True, False, "auto"],
            "when": {"momentum": 0.9},
        },
    ]
)


def key(config: Config) -> str:
    return json.dumps(config, sort_keys=True)


def run_all(sampler: GridSampler, batch: int) -> list[Config]:
    history: list[TrialRecord] = []
    state = None
    while True:
        out = sampler.suggest(history, batch, state)
        state = out.state
        for config in out.configs:
            history.append(TrialRecord(len(history), config, RecordState.SUCCEEDED, 1.0))
        if out.exhausted:
            return [dict(t.params) for t in history]


def test_grid_enumerates_every_combination_once_in_lexicographic_order() -> None:
    configs = run_all(GridSampler(CONDITIONAL), batch=4)
    assert len(configs) == len({key(c) for c in configs}) == 10
    assert configs[:3] == [
        {"opt": "adam", "layers": 1},
        {"opt": "adam", "layers": 2},
        {"opt": "sgd", "layers": 1, "momentum": 0.5},
    ]
    assert configs[3:6] == [
        {"opt": "sgd", "layers": 1, "momentum": 0.9, "nesterov": True},
        {"opt": "sgd", "layers": 1, "momentum": 0.9, "nesterov": False},
        {"opt": "sgd", "layers": 1, "momentum": 0.9, "nesterov": "auto"},
    ]
    for config in configs:
        CONDITIONAL.check_config(config)
    # Same order whatever the batch size or seed.
    assert run_all(GridSampler(CONDITIONAL, seed=9), batch=1) == configs


def test_unconditional_grid_size_is_the_product() -> None:
    space = SearchSpace.from_spec(
        [
            {"name": "a", "type": "int", "min": 0, "max": 9},
            {"name": "b", "type": "float", "min": 0.0, "max": 1.0, "step": 0.1},
            {"name": "c", "type": "categorical", "values": ["x", "y", "z"]},
        ]
    )
    sampler = GridSampler(space)
    assert sampler.grid.size == 10 * 11 * 3
    # Jumping to a late leaf does not walk the ones before it.
    assert sampler.grid.leaf(329) == {"a": 9, "b": 1.0, "c": "z"}
    assert sampler.grid.leaf(33) == {"a": 1, "b": 0.0, "c": "x"}


def test_grid_says_when_it_is_exhausted() -> None:
    sampler = GridSampler(CONDITIONAL)
    first = sampler.suggest([], 10)
    assert len(first.configs) == 10 and first.exhausted
    history = [TrialRecord(i, c, RecordState.RUNNING) for i, c in enumerate(first.configs)]
    again = sampler.suggest(history, 4, first.state)
    assert again.configs == [] and again.exhausted
    assert again.notes == ["grid exhausted: all 10 configurations suggested"]


def test_grid_never_repeats_the_history_after_losing_its_state() -> None:
    sampler = GridSampler(CONDITIONAL)
    out = sampler.suggest([], 7)
    # Trials in every state count: a failed configuration is not retried.
    states = [RecordState.SUCCEEDED, RecordState.FAILED, RecordState.PRUNED, RecordState.RUNNING]
    history = [TrialRecord(i, c, states[i % 4]) for i, c in enumerate(out.configs)]
    rest = sampler.suggest(history, 100, state=None)
    assert {key(c) for c in rest.configs}.isdisjoint(key(c) for c in out.configs)
    assert len(rest.configs) == 3 and rest.exhausted


def test_grid_matches_history_values_that_went_through_a_database() -> None:
    sampler = GridSampler(CONDITIONAL)
    out = sampler.suggest([], 3)
    # Float noise from a database round trip must still match the grid point.
    noisy: list[dict[str, Any]] = [dict(c) for c in out.configs]
    noisy[2]["momentum"] = 0.5 + 1e-13
    history = [TrialRecord(i, c, RecordState.SUCCEEDED, 1.0) for i, c in enumerate(noisy)]
    rest = sampler.suggest(history, 100)
    assert len(rest.configs) == 7


def test_grid_matches_ints_that_came_back_as_floats() -> None:
    sampler = GridSampler(CONDITIONAL)
    out = sampler.suggest([], 4)
    stored = [{k: float(v) if k == "layers" else v for k, v in c.items()} for c in out.configs]
    history = [TrialRecord(i, c, RecordState.SUCCEEDED, 1.0) for i, c in enumerate(stored)]
    rest = sampler.suggest(history, 100, state=None)
    assert len(rest.configs) == 6


def test_grid_finds_suggestions_that_never_became_trials() -> None:
    sampler = GridSampler(CONDITIONAL)
    lost = sampler.suggest([], 5)
    # The service handed out 5, the operator created only the last 3.
    history = [
        TrialRecord(i, c, RecordState.SUCCEEDED, 1.0) for i, c in enumerate(lost.configs[2:])
    ]
    rest = sampler.suggest(history, 100, lost.state)
    assert len(rest.configs) == 7
    assert lost.configs[0] in rest.configs and lost.configs[1] in rest.configs


def test_sobol_continues_its_sequence_after_a_restart() -> None:
    space = SearchSpace.from_spec(
        [
            {"name": "x", "type": "float", "min": 0.0, "max": 1.0},
            {"name": "y", "type": "float", "min": 0.0, "max": 1.0},
        ]
    )
    sampler = make_sampler("sobol", space, seed=3)
    whole = sampler.suggest([], 16).configs
    first = sampler.suggest([], 5)
    state = json.loads(json.dumps(first.state))
    second = make_sampler("sobol", space, seed=3).suggest([], 11, state)
    assert first.configs + second.configs == whole
    # Scrambled Sobol' points: one per cell of a 4x4 grid for the first 16.
    cells = {(int(c["x"] * 4), int(c["y"] * 4)) for c in whole}
    assert len(cells) == 16
    xs = np.array([c["x"] for c in whole])
    assert abs(xs.mean() - 0.5) < 0.05


def test_sobol_skips_configurations_already_tried_in_a_small_space() -> None:
    space = SearchSpace.from_spec(
        [{"name": "c", "type": "categorical", "values": ["a", "b", "c", "d"]}]
    )
    sampler = make_sampler("sobol", space, seed=0)
    out = sampler.suggest([], 4)
    assert sorted(str(c["c"]) for c in out.configs) == ["a", "b", "c", "d"]
    # Nothing new is left: it repeats, says so, and does not spin.
    history = [TrialRecord(i, c, RecordState.SUCCEEDED, 1.0) for i, c in enumerate(out.configs)]
    more = sampler.suggest(history, 2, out.state)
    assert len(more.configs) == 2 and more.notes
