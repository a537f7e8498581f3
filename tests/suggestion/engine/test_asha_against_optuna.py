"""ASHA decides exactly as Optuna's SuccessiveHalvingPruner on the same report stream.

Both implement asynchronous successive halving with the same rules (top
``floor(n / eta)`` of the trials at a rung, only the best while fewer than
``eta`` got there), so on any interleaving of reports they must agree report
by report. Optuna is a test dependency; the two codebases share nothing.
"""

from __future__ import annotations

import heapq

import numpy as np
import optuna
import pytest

from kubetune_suggestion.engine.history import Direction, RecordState, TrialRecord
from kubetune_suggestion.engine.stopping.asha import ASHARule

MAX_RESOURCE = 27


@pytest.mark.parametrize("direction", list(Direction))
@pytest.mark.parametrize(("min_resource", "eta"), [(1, 3), (2, 2), (3, 3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_same_decisions_as_optuna(
    direction: Direction, min_resource: int, eta: int, seed: int
) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = np.random.default_rng(seed)
    trials, workers = 40, 5
    # Crossing noisy curves, in the metric's own sign.
    final = rng.random(trials)
    speed = rng.uniform(0.3, 5.0, trials)
    t = np.arange(1, MAX_RESOURCE + 1)
    curves = final[:, None] + np.exp(-t[None, :] / speed[:, None])
    curves += 0.02 * rng.standard_normal(curves.shape)
    if direction is Direction.MAXIMIZE:
        curves = -curves
    duration = rng.uniform(0.5, 2.0, trials)

    options = {"minResource": min_resource, "maxResource": MAX_RESOURCE, "reductionFactor": eta}
    rule = ASHARule(direction, options)
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=eta)
    study = optuna.create_study(direction=direction.value, pruner=pruner)
    history: list[TrialRecord] = []
    handles: dict[int, optuna.Trial] = {}
    events: list[tuple[float, int, int]] = []  # (time, trial, step)
    decisions = 0

    def start(now: float) -> None:
        number = len(history)
        if number < trials:
            history.append(TrialRecord(number, {}, RecordState.RUNNING, steps={}))
            handles[number] = study.ask()
            heapq.heappush(events, (now + duration[number], number, 1))

    for _ in range(workers):
        start(0.0)
    while events:
        now, number, step = heapq.heappop(events)
        value = float(curves[number, step - 1])
        steps = {**history[number].steps, step: value}
        history[number] = TrialRecord(number, {}, RecordState.RUNNING, steps=steps)
        ours = rule.decide(history[number], history).stop
        handles[number].report(value, step)
        theirs = handles[number].should_prune()
        # Optuna also judges a rung at the last step; ours does not, since
        # stopping a finished trial saves nothing.
        if step < MAX_RESOURCE:
            assert ours == theirs, (number, step, value)
            decisions += 1
        if ours or step == MAX_RESOURCE:
            state = RecordState.PRUNED if ours else RecordState.SUCCEEDED
            history[number] = TrialRecord(number, {}, state, value, steps)
            if ours:
                study.tell(handles[number], state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(handles[number], value)
            start(now)
        else:
            heapq.heappush(events, (now + duration[number], number, step + 1))
    assert decisions > trials
    assert any(t.state is RecordState.PRUNED for t in history)
