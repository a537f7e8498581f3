"""CMA-ES: exact replay, batches, integers, restarts and the fallback for non-numeric spaces."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from kubetune_suggestion.engine.history import Direction, RecordState, TrialRecord
from kubetune_suggestion.engine.samplers.cmaes import CMAESSampler
from kubetune_suggestion.engine.space import SearchSpace

BOX = SearchSpace.from_spec(
    [
        {"name": "x", "type": "float", "min": -5.0, "max": 5.0},
        {"name": "y", "type": "float", "min": 0.0, "max": 10.0},
        {"name": "z", "type": "float", "min": 1e-3, "max": 1.0, "log": True},
    ]
)


def sphere(c: dict[str, Any]) -> float:
    return float((c["x"] - 1) ** 2 + (c["y"] - 3) ** 2 + (math.log10(c["z"]) + 2) ** 2)


def run(
    sampler: CMAESSampler, objective: Any, trials: int, batch: int = 1, roundtrip: bool = False
) -> tuple[list[TrialRecord], list[str]]:
    history: list[TrialRecord] = []
    state = None
    notes: list[str] = []
    while len(history) < trials:
        out = sampler.suggest(history, batch, state)
        state = json.loads(json.dumps(out.state)) if roundtrip else out.state
        notes += out.notes
        for config in out.configs:
            history.append(
                TrialRecord(len(history), config, RecordState.SUCCEEDED, objective(config))
            )
    return history, notes


def test_replay_matches_an_uninterrupted_optimizer() -> None:
    sampler = CMAESSampler(BOX, seed=4)
    history, _ = run(sampler, sphere, 60, roundtrip=True)

    # The same optimizer driven directly, never rebuilt.
    opt = sampler._fresh(0)
    expected = []
    while len(expected) < 60:
        generation = [opt.ask() for _ in range(opt.population_size)]
        configs = [
            BOX.decode({p.name: float(v) for p, v in zip(BOX, x, strict=True)}) for x in generation
        ]
        expected += configs
        opt.tell([(x, sphere(c)) for x, c in zip(generation, configs, strict=True)])
    assert [t.params for t in history] == expected[:60]


def test_converges_on_a_sphere_in_both_directions() -> None:
    for direction, sign in ((Direction.MINIMIZE, 1.0), (Direction.MAXIMIZE, -1.0)):
        history, _ = run(CMAESSampler(BOX, direction, seed=1), lambda c, s=sign: s * sphere(c), 150)
        assert min(sphere(t.params) for t in history) < 1e-2


def test_batches_hand_out_distinct_members_and_extras_when_all_run() -> None:
    sampler = CMAESSampler(BOX, seed=0)
    popsize = sampler._fresh(0).population_size
    first = sampler.suggest([], popsize, None)
    history = [TrialRecord(i, c, RecordState.RUNNING) for i, c in enumerate(first.configs)]
    assert len({json.dumps(c, sort_keys=True) for c in first.configs}) == popsize
    # Everything still running: the next request gets extra members of the
    # same generation instead of waiting.
    extra = sampler.suggest(history, 3, first.state)
    assert extra.state["asks"] == [popsize + 3]
    seen = {json.dumps(c, sort_keys=True) for c in first.configs}
    assert all(json.dumps(c, sort_keys=True) not in seen for c in extra.configs)
    # The first popsize members to finish close the generation, whatever their order.
    history += [
        TrialRecord(popsize + i, c, RecordState.RUNNING) for i, c in enumerate(extra.configs)
    ]
    finished = [
        TrialRecord(t.number, t.params, RecordState.SUCCEEDED, sphere(dict(t.params)))
        if t.number != 0
        else t
        for t in history
    ]
    after = sampler.suggest(finished, 2, extra.state)
    assert after.state["asks"] == [popsize + 3, 2]
    assert after.state["told"] == {"0": list(range(1, popsize + 1))}


def test_failed_and_nan_trials_rank_last_without_crashing() -> None:
    sampler = CMAESSampler(BOX, seed=0)
    history: list[TrialRecord] = []
    state = None
    for _ in range(40):
        out = sampler.suggest(history, 1, state)
        state = out.state
        config = out.configs[0]
        n = len(history)
        if n % 3 == 0:
            history.append(TrialRecord(n, config, RecordState.FAILED))
        elif n % 3 == 1:
            history.append(TrialRecord(n, config, RecordState.SUCCEEDED, math.nan))
        else:
            history.append(TrialRecord(n, config, RecordState.SUCCEEDED, sphere(config)))
    assert len(history) == 40


def test_integer_parameters_use_margin_and_stay_integers() -> None:
    space = SearchSpace.from_spec(
        [
            {"name": "k", "type": "int", "min": 0, "max": 3},
            {"name": "m", "type": "int", "min": 1, "max": 64, "log": True},
            {"name": "x", "type": "float", "min": -1.0, "max": 1.0, "step": 0.25},
            {"name": "y", "type": "float", "min": -1.0, "max": 1.0},
        ]
    )

    def objective(c: dict[str, Any]) -> float:
        return float((c["k"] - 2) ** 2 + (math.log2(c["m"]) - 3) ** 2 + c["x"] ** 2 + c["y"] ** 2)

    history, _ = run(CMAESSampler(space, seed=0), objective, 120, batch=4)
    for t in history:
        assert type(t.params["k"]) is int and type(t.params["m"]) is int
        space.check_config(t.params)
    assert {t.params["k"] for t in history} >= {1, 2, 3}
    best = min(history, key=lambda t: objective(dict(t.params)))
    assert (best.params["k"], best.params["m"], best.params["x"]) == (2, 8, 0.0)


def test_categorical_and_conditional_parameters_fall_back_with_a_note() -> None:
    space = SearchSpace.from_spec(
        [
            {"name": "lr", "type": "float", "min": 1e-4, "max": 1.0, "log": True},
            {"name": "wd", "type": "float", "min": 0.0, "max": 0.1},
            {"name": "opt", "type": "categorical", "values": ["adam", "sgd"]},
            {"name": "momentum", "type": "float", "min": 0.0, "max": 1.0, "when": {"opt": "sgd"}},
        ]
    )
    history, notes = run(CMAESSampler(space, seed=0), lambda c: c["lr"] + c["wd"], 30, batch=5)
    for t in history:
        space.check_config(t.params)
    assert any("opt, momentum" in note and "independent tpe sampler" in note for note in notes)


def test_one_numeric_parameter_falls_back_entirely() -> None:
    space = SearchSpace.from_spec([{"name": "x", "type": "float", "min": 0.0, "max": 1.0}])
    out = CMAESSampler(space, seed=0, options={"independent": "random"}).suggest([], 3)
    assert len(out.configs) == 3 and "every parameter" in out.notes[0]


def test_stagnation_restarts_with_a_larger_population() -> None:
    sampler = CMAESSampler(BOX, seed=0, options={"popsize": 4})
    # A flat objective: the optimizer's tolerance on function values fires.
    history, notes = run(sampler, lambda c: 1.0, 240, batch=4)
    restarts = [note for note in notes if "restarted" in note]
    assert restarts and "population 8" in restarts[0]
    # Replaying the same history rebuilds the restart in the same place.
    state: dict[str, Any] | None = None
    replayed: list[TrialRecord] = []
    for i in range(0, 240, 4):
        out = sampler.suggest(replayed, 4, state)
        state = out.state
        replayed += [TrialRecord(len(replayed), c, RecordState.SUCCEEDED, 1.0) for c in out.configs]
        assert [t.params for t in replayed] == [t.params for t in history[: i + 4]]


def test_seeded_runs_are_reproducible_and_seeds_differ() -> None:
    a, _ = run(CMAESSampler(BOX, seed=7), sphere, 20)
    b, _ = run(CMAESSampler(BOX, seed=7), sphere, 20, roundtrip=True)
    c, _ = run(CMAESSampler(BOX, seed=8), sphere, 20)
    assert [t.params for t in a] == [t.params for t in b]
    assert [t.params for t in a] != [t.params for t in c]
    assert np.isfinite([sphere(dict(t.params)) for t in a]).all()


MIXED = SearchSpace.from_spec(
    [
        {"name": "k", "type": "int", "min": 0, "max": 3},
        {"name": "x", "type": "float", "min": -1.0, "max": 1.0, "step": 0.25},
        {"name": "y", "type": "float", "min": -1.0, "max": 1.0},
    ]
)


def _mixed_loss(c: dict[str, Any]) -> float:
    return float((c["k"] - 2) ** 2 + c["x"] ** 2 + c["y"] ** 2)


def _drive(
    space: SearchSpace, objective: Any, sampler_for: Any, failures: bool, calls_n: int = 90
) -> Any:
    """A long run with batches, out-of-order finishes, failures and restarts.

    ``sampler_for(call)`` gives the sampler of each call: the same one every
    time (it keeps its optimizer between calls) or a new one (it replays).
    """
    history: list[TrialRecord] = []
    running: list[TrialRecord] = []
    state = None
    calls = []
    for call in range(calls_n):
        out = sampler_for(call).suggest(history + running, 1 + call % 4, state)
        calls.append((out.configs, out.state, out.notes))
        state = json.loads(json.dumps(out.state))
        base = len(history) + len(running)
        running += [
            TrialRecord(base + i, c, RecordState.RUNNING) for i, c in enumerate(out.configs)
        ]
        # Finish all but the newest two, newest first, one in 7 failing.
        done, running = running[:-2], running[-2:]
        for t in reversed(done):
            if failures and t.number % 7 == 3:
                history.append(TrialRecord(t.number, t.params, RecordState.FAILED))
            else:
                value = objective(dict(t.params))
                history.append(TrialRecord(t.number, t.params, RecordState.SUCCEEDED, value))
        history.sort(key=lambda t: t.number)
    return calls


@pytest.mark.parametrize(
    ("space", "objective", "options", "failures"),
    [
        (BOX, sphere, {}, True),
        (MIXED, _mixed_loss, {}, True),  # integers: CMA with margin
        (BOX, lambda c: 1.0, {"popsize": 4}, False),  # flat: it restarts
    ],
    ids=["continuous", "integers", "restarts"],
)
def test_a_kept_optimizer_suggests_exactly_what_a_full_replay_does(
    space: SearchSpace, objective: Any, options: dict[str, Any], failures: bool
) -> None:
    kept = CMAESSampler(space, seed=3, options=options)
    calls = 90 if failures else 200
    with_checkpoint = _drive(space, objective, lambda _: kept, failures, calls)
    replayed = _drive(
        space, objective, lambda _: CMAESSampler(space, seed=3, options=options), failures, calls
    )
    assert with_checkpoint == replayed
    assert kept._checkpoint is not None and len(kept._checkpoint.asks) > 3
    if not failures:
        assert any("restarted" in n for _, _, notes in with_checkpoint for n in notes)


def test_a_history_that_disagrees_with_the_kept_optimizer_is_replayed() -> None:
    sampler = CMAESSampler(BOX, seed=1)
    history: list[TrialRecord] = []
    state = None
    for _ in range(30):
        out = sampler.suggest(history, 1, state)
        state = out.state
        c = out.configs[0]
        history.append(TrialRecord(len(history), c, RecordState.SUCCEEDED, sphere(c)))
    assert sampler._checkpoint is not None
    # The same state with other objective values (another experiment's, or a
    # corrected history): the kept optimizer does not apply.
    other = [TrialRecord(t.number, t.params, t.state, -(t.value or 0.0)) for t in history]
    fresh = CMAESSampler(BOX, seed=1).suggest(other, 2, state)
    assert sampler.suggest(other, 2, state).configs == fresh.configs
    assert sampler.suggest(history, 2, state).configs != fresh.configs
