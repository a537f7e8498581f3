"""Pruned trials: what their objective is, and what rules and samplers see of them.

Stops are asynchronous, so a stopped trial may report steps after the one its
stop was decided on. Those reports must not change its objective, the
early-stopping rule's view or the sampler's history: otherwise two seeded
runs diverge by timing alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kubetune_suggestion.engine.history import TrialRecord
from kubetune_suggestion.engine.samplers.tpe import TPESampler
from kubetune_suggestion.service.core import TuningService
from kubetune_suggestion.service.models import TrialState
from kubetune_suggestion.service.testing import example_spec

UID = "pruned-uid"
# The median rule against a single other trial: easy to steer step by step.
MEDIAN = {"name": "median", "minTrials": 1}


def _register(svc: TuningService, **overrides: Any) -> None:
    svc.register(UID, "exp", "ns", example_spec(earlyStopping=MEDIAN, **overrides))


def test_reports_after_the_stop_decision_are_ignored(svc: TuningService) -> None:
    """The objective is the value the stop was decided on, and rules never see later ones."""
    _register(svc)
    first, stopped = svc.ask(UID, 2).trials
    assert not svc.report(UID, first.number, first.token, 0, {"loss": 0.5}).stop
    assert svc.report(UID, stopped.number, stopped.token, 0, {"loss": 0.9}).stop
    # The stop has not reached it yet: it reports another step, far better.
    assert svc.report(UID, stopped.number, stopped.token, 1, {"loss": 0.1}).stop
    # Compared with that late 0.1, `first` (0.3 at step 1) would be stopped.
    assert not svc.report(UID, first.number, first.token, 1, {"loss": 0.3}).stop
    view = svc.finish(UID, stopped.number, "pruned", "median")
    assert view.state is TrialState.PRUNED and view.objective == pytest.approx(0.9)
    assert not svc.report(UID, first.number, first.token, 2, {"loss": 0.3}).stop
    # The late report is kept for display.
    (stored,) = (t for t in svc.trials(UID, observations=True) if t.number == stopped.number)
    assert [o.step for o in stored.observations or []] == [0, 1]


def test_a_finish_with_a_final_report_after_the_stop_keeps_the_decided_value(
    svc: TuningService,
) -> None:
    _register(svc)
    first, stopped = svc.ask(UID, 2).trials
    svc.report(UID, first.number, first.token, 0, {"loss": 0.5})
    assert svc.report(UID, stopped.number, stopped.token, 0, {"loss": 0.9}).stop
    view = svc.finish(
        UID, stopped.number, "pruned", metrics={"loss": 0.2}, step=1, token=stopped.token
    )
    assert view.objective == pytest.approx(0.9)
    # A retry agrees with what was stored.
    assert svc.finish(UID, stopped.number, "pruned").objective == pytest.approx(0.9)


def test_the_sampler_ranks_pruned_trials_by_their_stop_step_first(
    svc: TuningService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As Optuna: a trial pruned later ranks above one pruned earlier with a better value."""
    _register(svc, algorithm={"name": "tpe", "seed": 1})
    base, later, earlier = svc.ask(UID, 3).trials
    svc.report(UID, base.number, base.token, 0, {"loss": 0.6})
    svc.report(UID, base.number, base.token, 1, {"loss": 0.1})
    assert not svc.report(UID, later.number, later.token, 0, {"loss": 0.5}).stop
    assert svc.report(UID, later.number, later.token, 1, {"loss": 0.9}).stop
    assert svc.report(UID, earlier.number, earlier.token, 0, {"loss": 0.7}).stop
    svc.finish(UID, base.number, "failed", "exit 1")
    svc.finish(UID, later.number, "pruned", "median")
    svc.finish(UID, earlier.number, "pruned", "median")

    seen: list[tuple[TPESampler, list[TrialRecord]]] = []
    suggest = TPESampler.suggest

    def spy(self: TPESampler, history: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append((self, list(history)))
        return suggest(self, history, *args, **kwargs)

    monkeypatch.setattr(TPESampler, "suggest", spy)
    svc.ask(UID, 1)
    sampler, records = seen[0]
    by_number = {r.number: r for r in records}
    assert dict(by_number[later.number].steps) == {1: pytest.approx(0.9)}
    assert dict(by_number[earlier.number].steps) == {0: pytest.approx(0.7)}
    # The good group (one of the two finished) is the trial pruned later, its value worse.
    below = sampler._observe(records).below
    assert {records[i].number for i in np.flatnonzero(below)} == {later.number}
