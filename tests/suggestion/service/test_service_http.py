"""The HTTP API over a real socket (uvicorn in a thread), on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kubetune_suggestion.service.app import create_app
from kubetune_suggestion.service.core import TuningService
from kubetune_suggestion.service.settings import ServiceSettings
from kubetune_suggestion.service.testing import (
    API_KEY,
    CLIENT_HEADERS,
    EXAMPLE_ASHA,
    example_spec,
    serve_in_thread,
)

UID = "7c1e-uid"


@pytest.fixture
def service(db_url: str) -> Iterator[TuningService]:
    svc = TuningService.open(db_url)
    yield svc
    svc.close()


@pytest.fixture
def client(service: TuningService, db_url: str) -> Iterator[httpx.Client]:
    app = create_app(
        ServiceSettings(db_url=db_url, stop_poll_seconds=0.05, api_key=API_KEY), service
    )
    with (
        serve_in_thread(app) as base_url,
        httpx.Client(base_url=base_url, timeout=30, headers=CLIENT_HEADERS) as http,
    ):
        yield http


def _register(client: httpx.Client, **overrides: Any) -> httpx.Response:
    body = {"name": "exp", "namespace": "team-a", "spec": example_spec(**overrides)}
    return client.put(f"/v1/experiments/{UID}", json=body)


def _report(
    client: httpx.Client, number: int, token: str | None, body: Any, raw: bool = False
) -> httpx.Response:
    url = f"/v1/experiments/{UID}/trials/{number}/observations"
    if raw:
        return _as_trial(client, token, url, content=body, headers={"Content-Type": JSON})
    return _as_trial(client, token, url, json=body)


JSON = "application/json"


def _as_trial(client: httpx.Client, token: str | None, url: str, **kwargs: Any) -> httpx.Response:
    """POST ``url`` with the trial's ``token``, or no credentials at all (not the client's key)."""
    request = client.build_request("POST", url, **kwargs)
    del request.headers["Authorization"]
    if token:
        request.headers["Authorization"] = f"Bearer {token}"
    return client.send(request)


def _state(client: httpx.Client) -> tuple[Any, ...]:
    """Everything a request could have changed."""
    summary = client.get(f"/v1/experiments/{UID}").json()
    trials = client.get(f"/v1/experiments/{UID}/trials", params={"observations": True}).json()
    stops = client.get("/v1/stops").json()
    return summary, trials, stops


def _metric(client: httpx.Client, name: str, **labels: str) -> float:
    # The service serves in this process: its registry is this one (the
    # /metrics port itself is tested with a real process, test_service_settings).
    for family in text_string_to_metric_families(generate_latest().decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def test_register_ask_report_finish_summary_history(client: httpx.Client) -> None:
    created = _register(client, maxTrials=3)
    assert created.status_code == 201 and created.json()["created"] is True
    assert _register(client, maxTrials=3).status_code == 200
    asked = client.post(f"/v1/experiments/{UID}/ask", json={"count": 2})
    assert asked.status_code == 200
    trials = asked.json()["trials"]
    assert [t["number"] for t in trials] == [0, 1]
    t0 = trials[0]
    assert client.post(f"/v1/experiments/{UID}/trials/0/start").status_code == 204
    for step, loss in [(1, 0.5), (2, 0.25)]:
        answer = _report(client, 0, t0["token"], {"step": step, "metrics": {"loss": loss}})
        assert answer.status_code == 200 and answer.json() == {"stop": False, "reason": ""}
    finished = client.post(f"/v1/experiments/{UID}/trials/0/finish", json={"state": "succeeded"})
    assert finished.status_code == 200
    assert finished.json()["objective"] == 0.25 and finished.json()["state"] == "succeeded"
    summary = client.get(f"/v1/experiments/{UID}").json()
    assert summary["counts"]["succeeded"] == 1 and summary["counts"]["pending"] == 1
    assert summary["best"] == {"number": 0, "params": t0["params"], "objective": 0.25}
    assert summary["allocated"] == 2 and summary["done"] == 1 and summary["max_trials"] == 3
    history = client.get(f"/v1/experiments/{UID}/trials", params={"observations": True}).json()
    assert [h["number"] for h in history] == [0, 1]
    assert history[0]["observations"] == [
        {"step": 1, "metrics": {"loss": 0.5}},
        {"step": 2, "metrics": {"loss": 0.25}},
    ]
    assert client.get(f"/v1/experiments/{UID}/trials/1").json()["state"] == "pending"
    # Only new trials: the last one maxTrials allows (trial 1 stays with its asker).
    again = client.post(f"/v1/experiments/{UID}/ask", json={"count": 5}).json()
    assert [t["number"] for t in again["trials"]] == [2] and again["exhausted"] is True
    assert client.delete(f"/v1/experiments/{UID}").status_code == 204
    assert client.get(f"/v1/experiments/{UID}").status_code == 404


BAD_REPORTS = [
    # (description, token: "own" | "other" | None, raw body, status, code, field, words)
    (
        "malformed JSON",
        "own",
        '{"step": 1, "metrics": {"loss": 0.5}',
        400,
        "malformed_json",
        None,
        "not valid JSON",
    ),
    (
        "NaN",
        "own",
        '{"step": 1, "metrics": {"loss": NaN}}',
        422,
        "invalid",
        "metrics.loss",
        "finite",
    ),
    (
        "Infinity",
        "own",
        '{"step": 1, "metrics": {"loss": Infinity}}',
        422,
        "invalid",
        "metrics.loss",
        "finite",
    ),
    (
        "a string",
        "own",
        '{"step": 1, "metrics": {"loss": "low"}}',
        422,
        "invalid",
        "metrics.loss",
        "number",
    ),
    ("no metrics", "own", '{"step": 1}', 422, "invalid", "metrics", "required"),
    (
        "fractional step",
        "own",
        '{"step": 1.5, "metrics": {"loss": 1}}',
        422,
        "invalid",
        "step",
        "integer",
    ),
    (
        "negative step",
        "own",
        '{"step": -1, "metrics": {"loss": 1}}',
        422,
        "invalid",
        "step",
        "greater than or equal to 0",
    ),
    (
        "unknown field",
        "own",
        '{"step": 1, "metrics": {"loss": 1}, "x": 1}',
        422,
        "invalid",
        "x",
        "Extra inputs",
    ),
    (
        "no token",
        None,
        '{"step": 1, "metrics": {"loss": 1}}',
        401,
        "unauthorized",
        "token",
        "token is required",
    ),
    (
        "another trial's token",
        "other",
        '{"step": 1, "metrics": {"loss": 1}}',
        403,
        "forbidden",
        "token",
        "not trial 0's token",
    ),
]


@pytest.mark.parametrize(
    ("token", "body", "status", "code", "field", "words"),
    [case[1:] for case in BAD_REPORTS],
    ids=[case[0] for case in BAD_REPORTS],
)
def test_bad_reports_get_a_clear_4xx_and_change_nothing(
    client: httpx.Client,
    token: str | None,
    body: str,
    status: int,
    code: str,
    field: str | None,
    words: str,
) -> None:
    _register(client)
    t0, t1 = client.post(f"/v1/experiments/{UID}/ask", json={"count": 2}).json()["trials"]
    before = _state(client)
    errors_before = _metric(client, "kubetune_service_errors_total", code=code)
    tokens = {"own": t0["token"], "other": t1["token"], None: None}
    response = _report(client, 0, tokens[token], body, raw=True)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["field"] == field
    assert words in error["message"]
    assert _state(client) == before
    assert _metric(client, "kubetune_service_errors_total", code=code) == errors_before + 1


def test_unknown_experiment_and_trial_are_404_naming_them(
    client: httpx.Client, service: TuningService
) -> None:
    _register(client)
    client.post(f"/v1/experiments/{UID}/ask", json={"count": 1})
    before = _state(client)
    observation = {"step": 1, "metrics": {"loss": 1.0}}
    for method, url, body, words in [
        ("post", "/v1/experiments/nope/ask", {"count": 1}, "no experiment 'nope'"),
        ("get", "/v1/experiments/nope", None, "no experiment 'nope'"),
        ("get", "/v1/experiments/nope/trials", None, "no experiment 'nope'"),
        ("delete", "/v1/experiments/nope", None, "no experiment 'nope'"),
        ("post", f"/v1/experiments/{UID}/trials/9/start", None, "has no trial 9"),
        ("post", f"/v1/experiments/{UID}/trials/9/finish", {"state": "failed"}, "has no trial 9"),
        ("get", f"/v1/experiments/{UID}/trials/9", None, "has no trial 9"),
        ("get", "/v1/stops?experiment=nope", None, "no experiment 'nope'"),
        ("get", "/v1/nothing-here", None, "Not Found"),
    ]:
        response = client.request(method.upper(), url, json=body)
        assert response.status_code == 404, url
        assert words in response.json()["error"]["message"], url
    # Reports with tokens the server made, for a trial or experiment that does not exist.
    response = _report(client, 9, service.token(UID, 9), observation)
    assert response.status_code == 404 and response.json()["error"]["field"] == "number"
    nope = client.post(
        "/v1/experiments/nope/trials/0/observations",
        json=observation,
        headers={"Authorization": f"Bearer {service.token('nope', 0)}"},
    )
    assert nope.status_code == 404 and nope.json()["error"]["field"] == "uid"
    assert _state(client) == before


def test_a_report_after_finish_is_409_and_changes_nothing(client: httpx.Client) -> None:
    _register(client)
    t0 = client.post(f"/v1/experiments/{UID}/ask", json={"count": 1}).json()["trials"][0]
    _report(client, 0, t0["token"], {"step": 1, "metrics": {"loss": 0.3}})
    client.post(f"/v1/experiments/{UID}/trials/0/finish", json={"state": "succeeded"})
    before = _state(client)
    response = _report(client, 0, t0["token"], {"step": 2, "metrics": {"loss": 0.1}})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "conflict"
    assert "already finished (succeeded)" in response.json()["error"]["message"]
    assert _state(client) == before
    other_state = client.post(f"/v1/experiments/{UID}/trials/0/finish", json={"state": "failed"})
    assert other_state.status_code == 409


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        (
            {"parameters": [{"name": "x", "type": "float", "min": 2, "max": 1}]},
            "spec.parameters[0].min",
            "less than max",
        ),
        (
            {"parameters": [{"name": "x", "type": "categorical", "values": []}]},
            "spec.parameters[0].values",
            "",
        ),
        ({"algorithm": {"name": "annealing"}}, "spec.algorithm.name", ""),
        ({"algorithm": {"name": "grid"}}, "spec.parameters[0].step", "grid"),
        (
            {"earlyStopping": {"name": "asha", "maxResource": 1}},
            "spec.earlyStopping",
            "maxResource",
        ),
        ({"template": {"spec": {"containers": []}}}, "spec.template.spec.containers", "container"),
    ],
)
def test_a_search_space_the_engine_rejects_is_422_naming_the_field(
    client: httpx.Client, spec: dict[str, Any], field: str, words: str
) -> None:
    response = _register(client, **spec)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid" and error["field"] == field
    assert words in error["message"]
    assert client.get(f"/v1/experiments/{UID}").status_code == 404


@pytest.mark.parametrize(
    ("method", "url", "body", "status", "field"),
    [
        ("put", f"/v1/experiments/{UID}", '{"name": "x"', 400, None),
        ("put", f"/v1/experiments/{UID}", '{"name": "x"}', 422, "spec"),
        ("post", f"/v1/experiments/{UID}/ask", '{"count": 0}', 422, "count"),
        ("post", f"/v1/experiments/{UID}/ask", '{"count": "2"}', 422, "count"),
        ("post", f"/v1/experiments/{UID}/trials/0/finish", '{"state": "done"}', 422, "state"),
        ("post", f"/v1/experiments/{UID}/trials/x/finish", '{"state": "failed"}', 422, "n"),
        ("get", "/v1/stops?wait=-1", None, 422, "wait"),
    ],
)
def test_other_bad_requests_are_4xx_naming_the_field(
    client: httpx.Client, method: str, url: str, body: str | None, status: int, field: str | None
) -> None:
    _register(client)
    client.post(f"/v1/experiments/{UID}/ask", json={"count": 1})
    before = _state(client)
    headers = {"Content-Type": "application/json"}
    response = client.request(method.upper(), url, content=body, headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["error"]["field"] == field
    assert _state(client) == before


def test_the_stop_long_poll_answers_as_soon_as_a_trial_is_stopped(client: httpx.Client) -> None:
    _register(client, earlyStopping=EXAMPLE_ASHA)
    t0, t1 = client.post(f"/v1/experiments/{UID}/ask", json={"count": 2}).json()["trials"]
    _report(client, 0, t0["token"], {"step": 1, "metrics": {"loss": 0.1}})

    started = time.monotonic()
    empty = client.get("/v1/stops", params={"experiment": UID, "wait": 0.3})
    assert empty.json() == {"stops": []} and 0.3 <= time.monotonic() - started < 2

    def stop_trial_1() -> None:
        time.sleep(0.5)
        answer = _report(client, 1, t1["token"], {"step": 1, "metrics": {"loss": 0.9}})
        assert answer.json()["stop"] is True

    reporter = threading.Thread(target=stop_trial_1)
    started = time.monotonic()
    reporter.start()
    polled = client.get("/v1/stops", params={"wait": 20})
    waited = time.monotonic() - started
    reporter.join()
    stops = polled.json()["stops"]
    assert [(s["experiment"], s["number"]) for s in stops] == [(UID, 1)]
    assert "ASHA" in stops[0]["reason"]
    assert 0.5 <= waited < 2.0
    assert client.get(f"/v1/experiments/{UID}/stops").json() == [
        {"number": 1, "reason": stops[0]["reason"]}
    ]
    client.post(f"/v1/experiments/{UID}/trials/1/finish", json={"state": "pruned"})
    assert client.get("/v1/stops").json() == {"stops": []}


def test_health_readiness_openapi(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    paths = client.get("/openapi.json").json()["paths"]
    for path in [
        "/v1/experiments/{uid}",
        "/v1/experiments/{uid}/ask",
        "/v1/experiments/{uid}/trials",
        "/v1/experiments/{uid}/trials/{n}/start",
        "/v1/experiments/{uid}/trials/{n}/observations",
        "/v1/experiments/{uid}/trials/{n}/finish",
        "/v1/stops",
    ]:
        assert path in paths
    observation = paths["/v1/experiments/{uid}/trials/{n}/observations"]["post"]
    assert "403" in observation["responses"] and "422" in observation["responses"]


def test_readiness_fails_when_the_database_is_unreachable(
    service: TuningService, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable() -> None:
        raise ConnectionRefusedError("database down")

    monkeypatch.setattr(service.store, "ping", unreachable)
    with serve_in_thread(
        create_app(ServiceSettings(db_url=db_url, api_key=API_KEY), service)
    ) as url:
        response = httpx.get(f"{url}/readyz")
        assert httpx.get(f"{url}/healthz").status_code == 200
    assert response.status_code == 503
    assert response.json()["error"] == {
        "code": "unavailable",
        "message": "database unreachable: ConnectionRefusedError",
        "field": None,
    }


def test_metrics_move(client: httpx.Client) -> None:
    suggestions = _metric(client, "kubetune_suggestions_total", algorithm="random")
    observations = _metric(client, "kubetune_observations_total")
    stops = _metric(client, "kubetune_stop_decisions_total", rule="asha")
    route = "/v1/experiments/{uid}/trials/{n}/observations"
    latency = _metric(client, "kubetune_service_request_duration_seconds_count", route=route)
    _register(client, earlyStopping=EXAMPLE_ASHA)
    t0, t1 = client.post(f"/v1/experiments/{UID}/ask", json={"count": 2}).json()["trials"]
    _report(client, 0, t0["token"], {"step": 1, "metrics": {"loss": 0.1}})
    _report(client, 0, t0["token"], {"step": 1, "metrics": {"loss": 0.1}})  # duplicate: not counted
    _report(client, 1, t1["token"], {"step": 1, "metrics": {"loss": 0.9}})  # stopped by ASHA
    assert _metric(client, "kubetune_suggestions_total", algorithm="random") == suggestions + 2
    assert _metric(client, "kubetune_observations_total") == observations + 2
    assert _metric(client, "kubetune_stop_decisions_total", rule="asha") == stops + 1
    assert (
        _metric(client, "kubetune_service_request_duration_seconds_count", route=route)
        == latency + 3
    )


def test_ask_report_and_finish_answer_alike_whatever_the_json_content_type(
    client: httpx.Client,
) -> None:
    """The same answers, errors included, for ``application/json`` with or without parameters."""
    _register(client, maxTrials=4)
    ask = f"/v1/experiments/{UID}/ask"

    def post(url: str, body: Any, plain: bool, token: str | None = None) -> httpx.Response:
        headers = {"Content-Type": "application/json" if plain else "application/json; x=1"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return client.post(url, content=json.dumps(body), headers=headers)

    keyed = {"count": 1, "ask_id": "w"}
    plain_trial = post(ask, keyed, True).json()["trials"][0]
    # Idempotent either way with an ask id: the pending trial again, until it starts.
    assert post(ask, keyed, False).json()["trials"][0] == plain_trial
    assert client.post(f"/v1/experiments/{UID}/trials/0/start").status_code == 204
    other_trial = post(ask, keyed, False).json()["trials"][0]
    assert (plain_trial["number"], other_trial["number"]) == (0, 1)
    for trial, plain in [(plain_trial, True), (other_trial, False)]:
        n = trial["number"]
        obs = f"/v1/experiments/{UID}/trials/{n}/observations"
        answer = post(obs, {"step": 1, "metrics": {"loss": 0.5}}, plain, trial["token"])
        assert answer.status_code == 200 and answer.json() == {"stop": False, "reason": ""}
        # Errors: the same status and body either way.
        ct = {"Content-Type": "application/json" if plain else "application/json; x=1"}
        no_token = _as_trial(
            client, None, obs, json={"step": 2, "metrics": {"loss": 0.5}}, headers=ct
        )
        assert no_token.status_code == 401 and no_token.json()["error"]["code"] == "unauthorized"
        other = post(obs, {"step": 2, "metrics": {"loss": 0.5}}, plain, plain_trial["token"] + "0")
        assert other.status_code == 403
        bad = post(obs, {"step": -1, "metrics": {"loss": 0.5}}, plain, trial["token"])
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "step"
        finish = f"/v1/experiments/{UID}/trials/{n}/finish"
        assert post(finish, {"state": "nope"}, plain).status_code == 422
        done = post(finish, {"state": "succeeded"}, plain)
        assert done.status_code == 200 and done.json()["objective"] == 0.5
        again = post(finish, {"state": "failed"}, plain)
        assert again.status_code == 409 and again.json()["error"]["field"] == "state"
    for plain in (True, False):
        missing = post("/v1/experiments/nope/ask", {"count": 1}, plain)
        assert missing.status_code == 404 and missing.json()["error"]["field"] == "uid"
        assert post(ask, {"count": 0}, plain).json()["error"]["field"] == "count"
        malformed = client.post(
            ask,
            content=b"{",
            headers={"Content-Type": "application/json" if plain else "application/json; x=1"},
        )
        assert malformed.status_code == 400
        assert malformed.json()["error"]["code"] == "malformed_json"
    # Timed under the route's template, like every route.
    name, route = "kubetune_service_request_duration_seconds_count", "/v1/experiments/{uid}/ask"
    before = _metric(client, name, method="POST", route=route)
    assert post(ask, {"count": 1}, True).status_code == 200
    assert _metric(client, name, method="POST", route=route) == before + 1


def test_ask_and_tell_over_http_alike_on_the_fast_path_and_through_fastapi(
    client: httpx.Client,
) -> None:
    """A finish with the final metrics (as Optuna's tell), and its errors, either way."""
    _register(client, maxTrials=4)
    trials = client.post(f"/v1/experiments/{UID}/ask", json={"count": 2}).json()["trials"]
    for i, fast in enumerate((True, False)):
        trial, other = trials[i], trials[1 - i]
        content_type = "application/json" if fast else "application/json; x=1"
        finish = f"/v1/experiments/{UID}/trials/{trial['number']}/finish"

        def tell(body: str, token: str | None, url: str = finish, ct: str = content_type) -> Any:
            return _as_trial(client, token, url, content=body, headers={"Content-Type": ct})

        before = _state(client)
        metrics = '"metrics": {"loss": 0.25}'
        for body, token, status, field in [
            ('{"state": "succeeded", ' + metrics + "}", None, 401, "token"),
            ('{"state": "succeeded", ' + metrics + "}", other["token"], 403, "token"),
            ('{"state": "succeeded", "metrics": {"loss": NaN}}', trial["token"], 422, None),
            ('{"state": "succeeded", "step": 2}', trial["token"], 422, "step"),
            ('{"state": "succeeded", "step": -1, ' + metrics + "}", trial["token"], 422, "step"),
        ]:
            response = tell(body, token)
            assert response.status_code == status, (body, response.text)
            error = response.json()["error"]
            if field is not None:
                assert error["field"] == field, body
            else:
                assert error["field"] == "metrics.loss" and "finite" in error["message"], error
        assert _state(client) == before
        told = tell('{"state": "succeeded", "step": 3, ' + metrics + "}", trial["token"])
        assert told.status_code == 200, told.text
        assert told.json()["objective"] == 0.25 and told.json()["last_step"] == 3
    history = client.get(f"/v1/experiments/{UID}/trials", params={"observations": True}).json()
    assert [[o["step"] for o in t["observations"]] for t in history] == [[3], [3]]
    paths = client.get("/openapi.json").json()["paths"]
    finish_doc = paths["/v1/experiments/{uid}/trials/{n}/finish"]["post"]
    assert any(p["name"].lower() == "authorization" for p in finish_doc["parameters"])


def test_finish_answers_409_for_other_content_and_422_for_a_result_without_objective(
    client: httpx.Client,
) -> None:
    _register(client)
    (trial,) = client.post(f"/v1/experiments/{UID}/ask", json={"count": 1}).json()["trials"]
    url = f"/v1/experiments/{UID}/trials/{trial['number']}/finish"
    auth = {"Authorization": f"Bearer {trial['token']}"}
    typo = client.post(url, json={"state": "succeeded", "metrics": {"los": 0.5}}, headers=auth)
    assert typo.status_code == 422
    assert typo.json()["error"]["field"] == "metrics.loss"
    assert "'loss'" in typo.json()["error"]["message"]
    body = {"state": "succeeded", "metrics": {"loss": 0.5}}
    assert client.post(url, json=body, headers=auth).status_code == 200
    assert client.post(url, json=body, headers=auth).status_code == 200
    other = client.post(url, json={"state": "succeeded", "metrics": {"loss": 0.4}}, headers=auth)
    assert other.status_code == 409
    assert "state succeeded, objective 0.5" in other.json()["error"]["message"]
