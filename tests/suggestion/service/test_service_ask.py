"""Ask allocates: ask ids, leases, and what two workers asking at once get."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import httpx
import pytest

from kubetune_suggestion.service import asking, core
from kubetune_suggestion.service.app import create_app
from kubetune_suggestion.service.core import TuningService
from kubetune_suggestion.service.errors import Conflict, InvalidInput
from kubetune_suggestion.service.models import TrialState
from kubetune_suggestion.service.settings import ServiceSettings
from kubetune_suggestion.service.testing import (
    API_KEY,
    CLIENT_HEADERS,
    example_spec,
    serve_in_thread,
)
from kubetune_suggestion.store import writes

UID = "exp-ask"
GRID = {"name": "grid"}
GRID_PARAMETERS = [{"name": "opt", "type": "categorical", "values": ["adam", "sgd"]}]


class _Clock:
    """A settable ``time`` module for the service and the store (leases read ``time.time``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1_000_000.0
        fake = SimpleNamespace(time=lambda: self.now)
        for module in (asking, core, writes):
            monkeypatch.setattr(module, "time", fake)

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _register(svc: TuningService, **overrides: object) -> None:
    svc.register(UID, "exp", "ns", example_spec(**overrides))


def test_two_workers_asking_at_once_never_get_the_same_trial(
    replicas: tuple[TuningService, TuningService],
) -> None:
    a, b = replicas
    _register(a, maxTrials=40)
    got: list[list[int]] = [[], [], [], []]
    barrier = threading.Barrier(4)

    def worker(i: int) -> None:
        svc = (a, b)[i % 2]
        barrier.wait()
        for _ in range(10):
            got[i] += [t.number for t in svc.ask(UID, 1).trials]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    numbers = sorted(n for g in got for n in g)
    assert numbers == list(range(40))  # each trial to exactly one worker
    assert a.ask(UID, 1).trials == [] and b.ask(UID, 1).exhausted


def test_the_readme_flow_hands_each_trial_out_once(
    replicas: tuple[TuningService, TuningService],
) -> None:
    a, b = replicas
    _register(a)
    (first,) = a.ask(UID, 1).trials
    (second,) = b.ask(UID, 1).trials
    (third,) = a.ask(UID, 1).trials
    assert (first.number, second.number, third.number) == (0, 1, 2)
    assert first.token != second.token and first.params != second.params


def test_an_exhausted_grid_stays_exhausted(svc: TuningService) -> None:
    _register(svc, algorithm=GRID, parameters=GRID_PARAMETERS, maxTrials=10)
    assert [t.number for t in svc.ask(UID, 2).trials] == [0, 1]
    for _ in range(3):
        answer = svc.ask(UID, 1)
        assert answer.trials == [] and answer.exhausted
        assert answer.reason == "the search space is exhausted"
    # So it stays with an ask id (nothing of its own pending) or with parallelism.
    assert svc.ask(UID, 1, ask_id="w").exhausted
    assert svc.ask(UID, 1, parallelism=5, ask_id="w").exhausted


def test_a_repeated_ask_with_the_same_ask_id_returns_the_same_trials(svc: TuningService) -> None:
    _register(svc, maxTrials=20)
    first = svc.ask(UID, 3, parallelism=4, ask_id="operator").trials
    assert svc.ask(UID, 3, parallelism=4, ask_id="operator").trials == first
    svc.start(UID, first[0].number)
    # Started: not handed out again; one new trial fills the freed count.
    again = svc.ask(UID, 3, parallelism=4, ask_id="operator").trials
    assert again[:2] == first[1:] and again[2].number == 3
    # Another asker never gets them, and is capped by the same parallelism.
    assert svc.ask(UID, 3, parallelism=5, ask_id="other").trials[0].number == 4


def test_an_expired_lease_fails_the_trial_and_frees_its_slot(
    svc: TuningService, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = _Clock(monkeypatch)
    _register(svc, maxTrials=10)
    (trial,) = svc.ask(UID, 1, parallelism=1, lease_seconds=30).trials
    assert svc.ask(UID, 1, parallelism=1, ask_id="other").trials == []  # the only slot is taken
    clock.advance(29)
    assert svc.ask(UID, 1, parallelism=1, ask_id="other").trials == []
    clock.advance(2)
    (fresh,) = svc.ask(UID, 1, parallelism=1, ask_id="other").trials
    assert fresh.number == trial.number + 1
    view = svc.trial(UID, trial.number)
    assert view.state is TrialState.FAILED
    assert view.message is not None
    assert view.message.startswith("lease expired: no start, report or finish within 30 s")
    # Too late now: the abandoned trial's worker is told it is over.
    with pytest.raises(Conflict, match="already finished"):
        svc.report(UID, trial.number, trial.token, 1, {"loss": 0.5})
    with pytest.raises(Conflict, match="already finished"):
        svc.start(UID, trial.number)
    assert svc.summary(UID).counts[TrialState.FAILED] == 1


def test_a_start_or_a_report_renews_the_lease(
    svc: TuningService, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = _Clock(monkeypatch)
    _register(svc, maxTrials=10)
    started, reporting = svc.ask(UID, 2, lease_seconds=10).trials
    clock.advance(8)
    svc.start(UID, started.number)
    svc.report(UID, reporting.number, reporting.token, 1, {"loss": 0.5})
    clock.advance(8)  # 16 s after the ask, 8 s after the renewals
    svc.ask(UID, 1)
    assert svc.trial(UID, started.number).state is TrialState.RUNNING
    assert svc.trial(UID, reporting.number).state is TrialState.RUNNING
    svc.report(UID, reporting.number, reporting.token, 2, {"loss": 0.4})
    clock.advance(8)  # the start is 16 s old now; the last report 8 s
    svc.ask(UID, 1)
    assert svc.trial(UID, started.number).state is TrialState.FAILED
    assert svc.trial(UID, reporting.number).state is TrialState.RUNNING
    assert svc.finish(UID, reporting.number, "succeeded").objective == 0.4


def test_trials_without_a_lease_never_expire(
    svc: TuningService, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = _Clock(monkeypatch)
    _register(svc, maxTrials=10)
    (trial,) = svc.ask(UID, 1, parallelism=2, ask_id="op").trials
    clock.advance(365 * 24 * 3600)
    assert svc.ask(UID, 1, parallelism=2, ask_id="op").trials[0] == trial
    assert svc.trial(UID, trial.number).state is TrialState.PENDING


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"lease_seconds": 0}, "lease_seconds"),
        ({"lease_seconds": 604_801}, "lease_seconds"),
        ({"ask_id": ""}, "ask_id"),
        ({"ask_id": "x" * 129}, "ask_id"),
    ],
)
def test_bad_ask_arguments_are_refused(
    svc: TuningService, kwargs: dict[str, object], field: str
) -> None:
    _register(svc)
    with pytest.raises(InvalidInput) as err:
        svc.ask(UID, 1, **kwargs)  # type: ignore[arg-type]
    assert err.value.field == field


def test_http_ask_without_a_body_asks_for_one_new_trial(svc: TuningService, db_url: str) -> None:
    _register(svc, maxTrials=10)
    app = create_app(ServiceSettings(db_url=db_url, api_key=API_KEY), service=svc)
    with (
        serve_in_thread(app) as base_url,
        httpx.Client(base_url=base_url, timeout=30, headers=CLIENT_HEADERS) as client,
    ):
        url = f"/v1/experiments/{UID}/ask"
        for expected in (0, 1):
            answer = client.post(url)
            assert answer.status_code == 200
            assert [t["number"] for t in answer.json()["trials"]] == [expected]
        keyed = {"count": 1, "ask_id": "w", "lease_seconds": 60}
        first = client.post(url, json=keyed).json()["trials"]
        assert client.post(url, json=keyed).json()["trials"] == first
        bad = client.post(url, json={"count": 1, "lease_seconds": 0})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "lease_seconds"
        # Other routes still need their body, and say so.
        finish = client.post(f"/v1/experiments/{UID}/trials/0/finish")
        assert finish.status_code == 422
        assert finish.json()["error"]["message"] == "a JSON request body is required"
