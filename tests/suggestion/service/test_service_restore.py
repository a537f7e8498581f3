"""Restore: re-seeding a service that lost its database with the trials the cluster holds.

After a restore, trial numbers are never handed out twice, parallelism counts
the restored running trials, the summary and the samplers see the restored
results, and a restored running trial takes reports with its usual token.
Caches of this process and of another replica must not hide any of that.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest

from kubetune_suggestion.engine.history import RecordState, TrialRecord
from kubetune_suggestion.engine.samplers.tpe import TPESampler
from kubetune_suggestion.service.app import create_app
from kubetune_suggestion.service.core import TuningService
from kubetune_suggestion.service.errors import Conflict, InvalidInput, NotFound
from kubetune_suggestion.service.models import TrialState
from kubetune_suggestion.service.settings import ServiceSettings
from kubetune_suggestion.service.testing import (
    API_KEY,
    CLIENT_HEADERS,
    example_spec,
    serve_in_thread,
)
from tests.suggestion.service.spies import record_calls

UID = "restore-uid"


@pytest.fixture
def svc(replicas: tuple[TuningService, TuningService]) -> TuningService:
    return replicas[0]


def _register(svc: TuningService, **overrides: Any) -> None:
    svc.register(UID, "exp", "ns", example_spec(**{"maxTrials": 50, **overrides}))


def _params(i: int) -> dict[str, Any]:
    """A valid configuration of ``example_spec``'s space, different for each ``i``."""
    return {"lr": 10 ** (-1 - 3 * ((i * 7) % 10) / 10), "layers": 1 + i % 4, "opt": "adam"}


def _trial(number: int, state: str = "running", **fields: Any) -> dict[str, Any]:
    return {"number": number, "params": _params(number), "state": state, **fields}


def _history_version(svc: TuningService) -> int:
    row = svc.store.experiment(UID)
    assert row is not None
    return row.history_version


def test_an_ask_after_a_restore_never_hands_out_a_restored_number(svc: TuningService) -> None:
    _register(svc)
    result = svc.restore(
        UID,
        [
            _trial(0),
            _trial(1, "succeeded", objective=0.5),
            _trial(3, "failed", message="exit code 1"),
        ],
    )
    assert (result.restored, result.next_number) == (3, 4)
    # One restored trial runs: with parallelism 2 there is room for one more.
    asked = svc.ask(UID, 5, parallelism=2).trials
    assert [t.number for t in asked] == [4]
    assert svc.ask(UID, 5, parallelism=2).trials == []
    # The gap (2) stays unused.
    assert [t.number for t in svc.trials(UID)] == [0, 1, 3, 4]


def test_caches_of_this_process_and_of_another_replica_see_the_restore(
    replicas: tuple[TuningService, TuningService],
) -> None:
    """Both replicas asked before the restore (their caches hold the old history)."""
    a, b = replicas
    _register(a)
    first = a.ask(UID, 1).trials[0]
    a.finish(UID, first.number, "failed")
    second = b.ask(UID, 1).trials[0]
    b.finish(UID, second.number, "failed")
    a.ask(UID, 1)  # a's cache now holds the history as of trial 2's allocation
    trials = [_trial(n) for n in range(3, 6)]
    trials += [_trial(n, "succeeded", objective=0.1 * n) for n in range(6, 9)]
    assert a.restore(UID, trials).next_number == 9
    # Three restored trials run, with trial 2 pending: no room at parallelism 4.
    assert a.ask(UID, 3, parallelism=4).trials == []
    assert b.ask(UID, 3, parallelism=4).trials == []
    for svc, expected in ((a, 9), (b, 10), (a, 11)):
        (trial,) = svc.ask(UID, 1).trials
        assert trial.number == expected
    numbers = [t.number for t in a.trials(UID)]
    assert numbers == list(range(12))


def test_the_cached_history_takes_the_restore_in(svc: TuningService) -> None:
    """An ask after a restore keeps to parallelism and numbers after the restored trials."""
    _register(svc)
    (first,) = svc.ask(UID, 1).trials
    svc.finish(UID, first.number, "failed")
    svc.restore(UID, [_trial(1), _trial(2), _trial(3, "succeeded", objective=0.2)])
    assert svc.ask(UID, 5, parallelism=2).trials == []
    assert [t.number for t in svc.ask(UID, 1, parallelism=3).trials] == [4]


def test_the_summary_counts_restored_trials_and_their_best(svc: TuningService) -> None:
    _register(svc, maxTrials=6)
    svc.restore(
        UID,
        [
            _trial(0, "succeeded", objective=0.3),
            _trial(1, "succeeded", objective=0.2),
            _trial(2, "pruned", objective=0.05, step=3, stop_reason="median"),
            _trial(3, "failed", message="OOMKilled"),
            _trial(4, "metrics_unavailable"),
            _trial(5),
        ],
    )
    summary = svc.summary(UID)
    assert summary.counts == {
        TrialState.PENDING: 0,
        TrialState.RUNNING: 1,
        TrialState.SUCCEEDED: 2,
        TrialState.FAILED: 1,
        TrialState.PRUNED: 1,
        TrialState.METRICS_UNAVAILABLE: 1,
    }
    assert summary.best is not None
    assert (summary.best.number, summary.best.objective) == (1, 0.2)
    assert summary.best.params == _params(1)
    assert (summary.allocated, summary.done, summary.complete) == (6, 5, False)
    views = {t.number: t for t in svc.trials(UID)}
    assert views[2].stop_reason == "median" and views[2].objective == 0.05
    assert views[3].message == "OOMKilled" and views[3].objective is None
    assert views[5].finished_at is None and views[5].started_at is not None
    assert all(v.finished_at is not None for n, v in views.items() if n != 5)
    # The running one ends normally: the experiment is complete.
    svc.finish(UID, 5, "failed")
    assert svc.summary(UID).complete_reason == "maxTrials (6) reached"


def test_the_sampler_sees_the_restored_trials(
    svc: TuningService, monkeypatch: pytest.MonkeyPatch
) -> None:
    _register(svc, algorithm={"name": "tpe", "seed": 3, "settings": {"n_startup_trials": 5}})
    trials = [_trial(n, "succeeded", objective=math.log10(_params(n)["lr"])) for n in range(40)]
    trials.append(_trial(40, "pruned", objective=-1.0, step=2))
    trials.append(_trial(41))
    svc.restore(UID, trials)
    seen = record_calls(monkeypatch, TPESampler, "suggest")
    asked = svc.ask(UID, 2).trials
    assert [t.number for t in asked] == [42, 43]
    ((history, _, _),) = seen
    records: Sequence[TrialRecord] = history
    by_number = {r.number: r for r in records}
    assert set(by_number) == set(range(42))
    assert by_number[7].state is RecordState.SUCCEEDED
    assert by_number[7].value == pytest.approx(trials[7]["objective"])
    assert by_number[40].state is RecordState.PRUNED and dict(by_number[40].steps) == {2: -1.0}
    assert by_number[41].state is RecordState.RUNNING
    # TPE learnt from them: it proposes small learning rates (low loss here).
    assert all(t.params["lr"] < 0.01 for t in asked)


def test_a_repeated_restore_changes_nothing(svc: TuningService) -> None:
    _register(svc)
    trials = [_trial(0), _trial(1, "succeeded", objective=0.4), _trial(2, "pruned", step=1)]
    assert svc.restore(UID, trials).restored == 3
    version = _history_version(svc)
    before = svc.trials(UID)
    again = svc.restore(UID, trials)
    assert (again.restored, again.next_number) == (0, 3)
    assert _history_version(svc) == version
    assert svc.trials(UID) == before
    # A repeat that knows one more trial (or a later state of one) adds only that one.
    later = [_trial(0, "succeeded", objective=0.1), *trials[1:], _trial(3)]
    assert svc.restore(UID, later).restored == 1
    assert svc.trial(UID, 0).state is TrialState.RUNNING
    assert _history_version(svc) == version + 1


def test_a_number_stored_with_other_params_is_a_conflict(svc: TuningService) -> None:
    _register(svc)
    (asked,) = svc.ask(UID, 1).trials
    other = dict(asked.params, layers=asked.params["layers"] % 4 + 1)
    with pytest.raises(Conflict) as caught:
        svc.restore(UID, [_trial(5), {"number": 0, "params": other, "state": "running"}])
    assert caught.value.field == "trials[1].params"
    assert "trial 0 is stored with params" in caught.value.message
    assert str(asked.params["layers"]) in caught.value.message
    # Nothing was written: trial 5 is not there either.
    assert [t.number for t in svc.trials(UID)] == [0]
    assert svc.summary(UID).allocated == 1


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        (_trial(0, "pending"), "trials[0].state"),
        (_trial(0, "succeeded"), "trials[0].objective"),
        (_trial(0, "succeeded", objective=math.nan), "trials[0].objective"),
        (_trial(0, "pruned", objective=math.inf), "trials[0].objective"),
        ({**_trial(0), "params": {**_params(0), "lr": 5.0}}, "trials[0].params.lr"),
        ({**_trial(0), "params": {**_params(0), "depth": 3}}, "trials[0].params.depth"),
        ({**_trial(0), "params": {"lr": 0.01, "opt": "adam"}}, "trials[0].params.layers"),
        ({**_trial(0), "number": -1}, "trials[0].number"),
        ({**_trial(0), "stopReason": "x"}, "trials[0].stopReason"),
    ],
)
def test_invalid_entries_are_refused_naming_the_field(
    svc: TuningService, entry: dict[str, Any], field: str
) -> None:
    _register(svc)
    with pytest.raises(InvalidInput) as caught:
        svc.restore(UID, [entry])
    assert caught.value.field == field
    assert svc.trials(UID) == []


def test_a_number_listed_twice_is_refused(svc: TuningService) -> None:
    _register(svc)
    with pytest.raises(InvalidInput) as caught:
        svc.restore(UID, [_trial(0), _trial(1), _trial(0)])
    assert caught.value.field == "trials[2].number"
    assert "trials[0]" in caught.value.message


def test_an_unknown_experiment_is_not_found(svc: TuningService) -> None:
    with pytest.raises(NotFound):
        svc.restore("nobody", [_trial(0)])


def test_a_restored_running_trial_takes_reports_with_its_token_and_finishes(
    replicas: tuple[TuningService, TuningService],
) -> None:
    a, b = replicas
    _register(a)
    a.restore(UID, [_trial(0, "succeeded", objective=0.9), _trial(1)])
    token = a.token(UID, 1)
    assert not a.report(UID, 1, token, 0, {"loss": 0.7}).stop
    # Again, now with the experiment's spec cached.
    assert not a.report(UID, 1, token, 1, {"loss": 0.4}).stop
    assert not b.report(UID, 1, token, 2, {"loss": 0.6}).stop
    view = a.finish(UID, 1, "succeeded")
    assert view.state is TrialState.SUCCEEDED and view.objective == 0.6
    assert view.last_step == 2
    best = a.summary(UID).best
    assert best is not None and (best.number, best.objective) == (1, 0.6)


# -- over HTTP ----------------------------------------------------------------------------


@pytest.fixture
def client(svc: TuningService, db_url: str) -> Iterator[httpx.Client]:
    app = create_app(ServiceSettings(db_url=db_url, api_key=API_KEY), svc)
    with (
        serve_in_thread(app) as base_url,
        httpx.Client(base_url=base_url, timeout=30, headers=CLIENT_HEADERS) as http,
    ):
        yield http


def test_restore_over_http(client: httpx.Client, svc: TuningService) -> None:
    body = {"name": "exp", "namespace": "ns", "spec": example_spec(maxTrials=50)}
    url = f"/v1/experiments/{UID}/restore"
    assert client.post(url, json={"trials": []}).status_code == 404
    # The database was lost: the operator registers again (created), then restores.
    assert client.put(f"/v1/experiments/{UID}", json=body).json()["created"] is True
    trials = [
        _trial(0, "pruned", objective=0.8, step=2, stop_reason="asha: rung 1"),
        _trial(1, "succeeded", objective=0.3),
        _trial(2),
    ]
    answer = client.post(url, json={"trials": trials})
    assert answer.status_code == 200
    assert answer.json() == {"restored": 3, "next_number": 3}
    assert client.post(url, json={"trials": trials}).json() == {"restored": 0, "next_number": 3}
    # Validation and conflicts answer with the field to blame.
    refused = client.post(url, json={"trials": [_trial(3, "pending")]})
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "trials[0].state"
    refused = client.post(url, json={"trials": [_trial(3, "succeeded")]})
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "trials[0].objective"
    bad_lr = {**_trial(3), "params": {**_params(3), "lr": 2.0}}
    refused = client.post(url, json={"trials": [bad_lr]})
    assert refused.status_code == 422
    assert refused.json()["error"]["field"] == "trials[0].params.lr"
    moved = {**_trial(2), "params": _params(9)}
    conflict = client.post(url, json={"trials": [_trial(4), moved]})
    assert conflict.status_code == 409
    assert conflict.json()["error"]["field"] == "trials[1].params"
    # The restored running trial reports with its token and finishes.
    token = svc.token(UID, 2)
    report = client.post(
        f"/v1/experiments/{UID}/trials/2/observations",
        json={"step": 0, "metrics": {"loss": 0.25}},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert report.status_code == 200 and report.json()["stop"] is False
    done = client.post(f"/v1/experiments/{UID}/trials/2/finish", json={"state": "succeeded"})
    assert done.status_code == 200 and done.json()["objective"] == 0.25
    asked = client.post(f"/v1/experiments/{UID}/ask", json={"count": 2}).json()["trials"]
    assert [t["number"] for t in asked] == [3, 4]
    summary = client.get(f"/v1/experiments/{UID}").json()
    assert summary["best"]["number"] == 2 and summary["counts"]["pruned"] == 1
