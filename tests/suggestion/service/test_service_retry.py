"""Retry: a new attempt of a pending or running trial, under the same number and params.

The lost attempt's reports and its stop are forgotten, so the new attempt's
reports start over from step 0 and its result is its own; the caches of this
process (and of another replica) must not take a new report for a repeat.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from kubetune_suggestion.service.app import create_app
from kubetune_suggestion.service.core import TuningService
from kubetune_suggestion.service.errors import Conflict, NotFound
from kubetune_suggestion.service.models import StopAnswer, TrialState
from kubetune_suggestion.service.reporting import Report
from kubetune_suggestion.service.settings import ServiceSettings
from kubetune_suggestion.service.testing import (
    API_KEY,
    CLIENT_HEADERS,
    example_spec,
    serve_in_thread,
)

UID = "retry-uid"
# The median rule against a single other trial: easy to steer.
MEDIAN = {"name": "median", "minTrials": 1}


@pytest.fixture
def svc(replicas: tuple[TuningService, TuningService]) -> TuningService:
    return replicas[0]


def _register(svc: TuningService, **overrides: Any) -> None:
    svc.register(UID, "exp", "ns", example_spec(**overrides))


def _steps(svc: TuningService, number: int) -> list[tuple[int, float]]:
    (trial,) = (t for t in svc.trials(UID, observations=True) if t.number == number)
    return [(o.step, o.metrics["loss"]) for o in trial.observations or []]


def _history_version(svc: TuningService) -> int:
    row = svc.store.experiment(UID)
    assert row is not None
    return row.history_version


def test_a_retry_forgets_the_lost_attempts_reports(svc: TuningService) -> None:
    _register(svc)
    (trial,) = svc.ask(UID, 1).trials
    for step, loss in enumerate([0.9, 0.8, 0.7]):
        svc.report(UID, trial.number, trial.token, step, {"loss": loss})
    version = _history_version(svc)
    view = svc.retry(UID, trial.number)
    assert view.state is TrialState.RUNNING and view.last_step is None
    assert view.params == trial.params and view.started_at is not None
    assert _steps(svc, trial.number) == []
    # Samplers see a running trial either way: the history did not move.
    assert _history_version(svc) == version
    # The new attempt starts over from step 0, with the same token.
    svc.report(UID, trial.number, trial.token, 0, {"loss": 0.5})
    svc.report(UID, trial.number, trial.token, 1, {"loss": 0.4})
    assert _steps(svc, trial.number) == [(0, 0.5), (1, 0.4)]
    done = svc.finish(UID, trial.number, "succeeded")
    assert done.objective == 0.4 and done.last_step == 1


def test_a_pending_trial_is_retried_as_running(svc: TuningService) -> None:
    _register(svc)
    (trial,) = svc.ask(UID, 1, ask_id="op").trials
    assert svc.retry(UID, trial.number).state is TrialState.RUNNING
    assert svc.trial(UID, trial.number).state is TrialState.RUNNING
    # Running, it is no longer handed back to its ask id, and counts against parallelism.
    assert svc.ask(UID, 1, parallelism=1, ask_id="op").trials == []
    assert [t.number for t in svc.ask(UID, 1, parallelism=2, ask_id="op").trials] == [1]


def test_a_retry_with_an_ask_id_hands_the_trial_back_to_that_ask(
    replicas: tuple[TuningService, TuningService],
) -> None:
    """The operator's retry: pending under its ask id, so its next ask makes the new Pod."""
    a, b = replicas
    _register(a)
    (trial,) = a.ask(UID, 1, parallelism=2, ask_id="operator").trials
    a.start(UID, trial.number)
    a.report(UID, trial.number, trial.token, 0, {"loss": 0.9})
    # Both replicas have asked (their caches hold the experiment's head).
    assert [t.number for t in b.ask(UID, 1, parallelism=2, ask_id="operator").trials] == [1]
    b.start(UID, 1)
    view = a.retry(UID, trial.number, ask_id="operator")
    assert view.state is TrialState.PENDING and view.started_at is None
    assert _steps(a, trial.number) == []
    # Another id gets nothing (the slots are full); the operator's id gets it back,
    # same params and token, from either replica.
    assert b.ask(UID, 1, parallelism=2, ask_id="someone").trials == []
    (again,) = b.ask(UID, 1, parallelism=2, ask_id="operator").trials
    assert (again.number, again.params, again.token) == (trial.number, trial.params, trial.token)
    a.start(UID, trial.number)
    a.report(UID, trial.number, trial.token, 0, {"loss": 0.3})
    assert a.finish(UID, trial.number, "succeeded").objective == 0.3


def test_a_retry_closes_the_stop_and_the_rule_judges_the_new_attempt(svc: TuningService) -> None:
    _register(svc, earlyStopping=MEDIAN)
    good, bad = svc.ask(UID, 2).trials
    svc.report(UID, good.number, good.token, 0, {"loss": 0.5})
    assert svc.report(UID, bad.number, bad.token, 0, {"loss": 0.9}).stop
    assert [s.number for s in svc.stops(UID)] == [bad.number]
    view = svc.retry(UID, bad.number)
    assert view.stop_reason is None
    assert svc.stops(UID) == []
    # The new attempt does better at step 0: not stopped (the old 0.9 is gone).
    assert svc.report(UID, bad.number, bad.token, 0, {"loss": 0.3}) == StopAnswer(stop=False)
    # ... and a stop of the new attempt is recorded anew.
    svc.report(UID, good.number, good.token, 1, {"loss": 0.2})
    assert svc.report(UID, bad.number, bad.token, 1, {"loss": 0.95}).stop
    assert [s.number for s in svc.stops(UID)] == [bad.number]
    pruned = svc.finish(UID, bad.number, "pruned")
    assert pruned.objective == 0.95 and pruned.state is TrialState.PRUNED


def test_a_finished_trial_cannot_be_retried(svc: TuningService) -> None:
    _register(svc)
    (trial,) = svc.ask(UID, 1).trials
    svc.report(UID, trial.number, trial.token, 0, {"loss": 0.5})
    svc.finish(UID, trial.number, "succeeded")
    with pytest.raises(Conflict) as caught:
        svc.retry(UID, trial.number)
    assert "succeeded" in caught.value.message and caught.value.field == "number"
    assert _steps(svc, trial.number) == [(0, 0.5)]
    with pytest.raises(NotFound) as missing:
        svc.retry(UID, 7)
    assert missing.value.field == "number"
    with pytest.raises(NotFound) as unknown:
        svc.retry("nobody", 0)
    assert unknown.value.field == "uid"


def test_a_repeated_step_after_a_retry_is_a_new_report_on_every_replica(
    replicas: tuple[TuningService, TuningService],
) -> None:
    """A step reported before a retry counts again after it, on the replica that retried or not."""
    a, b = replicas
    _register(a)
    warm = a.ask(UID, 1).trials[0]
    a.report(UID, warm.number, warm.token, 0, {"loss": 0.5})
    a.finish(UID, warm.number, "succeeded")

    (trial,) = a.ask(UID, 1).trials
    a.report(UID, trial.number, trial.token, 0, {"loss": 0.9})
    a.retry(UID, trial.number)
    assert a.report_batch([Report(UID, trial.number, trial.token, 0, {"loss": 0.1})]) == [
        StopAnswer(stop=False)
    ]
    view = a.finish(UID, trial.number, "succeeded")
    assert view.objective == 0.1 and _steps(a, trial.number) == [(0, 0.1)]

    # The retry on another replica: nothing a stored before it counts.
    (other,) = a.ask(UID, 1).trials
    a.report(UID, other.number, other.token, 0, {"loss": 0.9})
    a.report(UID, other.number, other.token, 1, {"loss": 0.8})
    b.retry(UID, other.number)
    a.report(UID, other.number, other.token, 0, {"loss": 0.3})
    view = a.finish(UID, other.number, "succeeded")
    assert view.objective == 0.3 and view.last_step == 0
    assert _steps(b, other.number) == [(0, 0.3)]


# -- over HTTP ----------------------------------------------------------------------------


@pytest.fixture
def client(svc: TuningService, db_url: str) -> Iterator[httpx.Client]:
    app = create_app(ServiceSettings(db_url=db_url, api_key=API_KEY), svc)
    with (
        serve_in_thread(app) as base_url,
        httpx.Client(base_url=base_url, timeout=30, headers=CLIENT_HEADERS) as http,
    ):
        yield http


def test_retry_over_http(client: httpx.Client, svc: TuningService) -> None:
    body = {"name": "exp", "namespace": "ns", "spec": example_spec()}
    assert client.put(f"/v1/experiments/{UID}", json=body).status_code == 201
    (trial,) = client.post(f"/v1/experiments/{UID}/ask", json={"count": 1}).json()["trials"]
    report_url = f"/v1/experiments/{UID}/trials/0/observations"
    headers = {"Authorization": f"Bearer {trial['token']}"}
    client.post(report_url, json={"step": 0, "metrics": {"loss": 0.9}}, headers=headers)
    retried = client.post(f"/v1/experiments/{UID}/trials/0/retry")
    assert retried.status_code == 200
    assert retried.json()["state"] == "running" and retried.json()["last_step"] is None
    again = client.post(report_url, json={"step": 0, "metrics": {"loss": 0.2}}, headers=headers)
    assert again.status_code == 200 and again.json()["stop"] is False
    done = client.post(f"/v1/experiments/{UID}/trials/0/finish", json={"state": "succeeded"})
    assert done.json()["objective"] == 0.2
    refused = client.post(f"/v1/experiments/{UID}/trials/0/retry")
    assert refused.status_code == 409 and "succeeded" in refused.json()["error"]["message"]
    assert client.post(f"/v1/experiments/{UID}/trials/9/retry").status_code == 404
    assert client.post("/v1/experiments/nobody/trials/0/retry").status_code == 404
