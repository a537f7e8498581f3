"""Who may call the service: every route refuses callers without the right credentials.

The Authenticator alone (API key, reviewed ServiceAccount tokens, trial
tokens), then every route of the real HTTP service tried without
credentials, with a trial's token and with a client's: refused calls change
nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kubetune_suggestion.env_settings import SettingsError
from kubetune_suggestion.service.app import create_app
from kubetune_suggestion.service.auth import REVIEW_SECONDS, Authenticator, Review
from kubetune_suggestion.service.core import TuningService
from kubetune_suggestion.service.errors import Forbidden, Unauthorized
from kubetune_suggestion.service.settings import ServiceSettings
from kubetune_suggestion.service.testing import (
    API_KEY,
    CLIENT_HEADERS,
    example_spec,
    serve_in_thread,
)

OPERATOR = "system:serviceaccount:kubetune-system:kt-kubetune-operator"
JWT = "eyJhbGciOi.eyJpc3MiOi.c2lnbmF0dXJl"  # the shape of a ServiceAccount token


class FakeReviews:
    """The API server's TokenReviews: which token authenticates whom; counts the calls."""

    def __init__(self, users: dict[str, str]) -> None:
        self.users = users
        self.calls = 0

    def __call__(self, token: str) -> Review:
        self.calls += 1
        user = self.users.get(token)
        return Review(user) if user else Review(None, "invalid bearer token")


def _authenticator(reviews: FakeReviews, now: list[float]) -> Authenticator:
    return Authenticator(
        api_key="key",
        reviewer=reviews,
        allowed_users=frozenset({OPERATOR}),
        clock=lambda: now[0],
    )


def test_clients_are_the_api_key_and_the_allowed_service_accounts() -> None:
    reviews = FakeReviews({JWT: OPERATOR, JWT + "x": "system:serviceaccount:team-a:default"})
    auth = _authenticator(reviews, [0.0])
    assert auth.client("Bearer key").client
    assert auth.client(f"Bearer {JWT}").client
    with pytest.raises(Forbidden, match="team-a:default may not call"):
        auth.client(f"Bearer {JWT}x")
    with pytest.raises(Unauthorized, match="invalid bearer token"):
        auth.client("Bearer a.b.c")
    with pytest.raises(Unauthorized, match="needs credentials"):
        auth.client(None)
    with pytest.raises(Forbidden, match="a trial's token may only"):
        auth.client("Bearer 0123abcd")  # a trial token: not a client's
    with pytest.raises(Unauthorized, match="'Bearer <token>'"):
        auth.client("Basic dXNlcjpwYXNz")
    # Anyone else is a caller whose token the trial routes check.
    assert auth.caller("Bearer 0123abcd").token == "0123abcd"
    assert not auth.caller(None).client


def test_a_review_is_kept_for_a_minute_not_made_per_call() -> None:
    reviews, now = FakeReviews({JWT: OPERATOR}), [100.0]
    auth = _authenticator(reviews, now)
    for _ in range(50):
        auth.client(f"Bearer {JWT}")
    assert reviews.calls == 1
    now[0] += REVIEW_SECONDS + 1
    auth.client(f"Bearer {JWT}")
    assert reviews.calls == 2
    # A revoked token is refused once its review has expired.
    del reviews.users[JWT]
    now[0] += REVIEW_SECONDS + 1
    with pytest.raises(Unauthorized):
        auth.client(f"Bearer {JWT}")


def test_without_auth_anyone_is_a_client_but_a_shown_token_is_still_a_trials() -> None:
    auth = Authenticator(no_auth=True)
    assert auth.client(None).client and auth.client("Bearer whatever").client
    assert auth.caller(None).client
    assert auth.caller("Bearer 0123abcd") == auth.caller("Bearer 0123abcd")
    assert not auth.caller("Bearer 0123abcd").client


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        (ServiceSettings(), "KUBETUNE_API_KEY"),
        (ServiceSettings(token_audience="kubetune"), "KUBETUNE_ALLOWED_USERS"),
    ],
)
def test_settings_that_authenticate_nobody_are_refused(
    settings: ServiceSettings, words: str, tmp_path: Path
) -> None:
    svc = TuningService.open(f"sqlite:///{tmp_path}/x.db")
    with pytest.raises(SettingsError, match=words):
        create_app(settings, svc, reviewer=lambda: FakeReviews({}))


# -- every route of the real HTTP service ------------------------------------------

UID = "auth-uid"
OTHER = "other-uid"


@pytest.fixture
def served(db_url: str) -> Iterator[tuple[httpx.Client, TuningService]]:
    svc = TuningService.open(db_url)
    reviews = FakeReviews({JWT: OPERATOR, JWT + "x": "system:serviceaccount:team-a:default"})
    settings = ServiceSettings(
        db_url=db_url,
        api_key=API_KEY,
        token_audience="kubetune-suggestion",
        allowed_users=frozenset({OPERATOR}),
    )
    app = create_app(settings, svc, reviewer=lambda: reviews)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        for uid in (UID, OTHER):
            body = {"name": uid, "namespace": "team-a", "spec": example_spec(maxTrials=6)}
            assert http.put(f"/v1/experiments/{uid}", json=body, headers=CLIENT_HEADERS).is_success
        asked = http.post(f"/v1/experiments/{UID}/ask", json={"count": 2}, headers=CLIENT_HEADERS)
        assert [t["number"] for t in asked.json()["trials"]] == [0, 1]
        yield http, svc
    svc.close()


REPORT = {"step": 1, "metrics": {"loss": 0.5}}
FINISH = {"state": "failed", "message": "x"}

# Every route: (method, path, body). Trial routes act on trial 0 of UID.
CLIENT_ROUTES: list[tuple[str, str, Any]] = [
    ("PUT", f"/v1/experiments/{UID}", {"name": "e", "namespace": "n", "spec": example_spec()}),
    ("GET", f"/v1/experiments/{UID}", None),
    ("DELETE", f"/v1/experiments/{UID}", None),
    ("POST", f"/v1/experiments/{UID}/restore", {"trials": []}),
    ("POST", f"/v1/experiments/{UID}/ask", {"count": 1}),
    ("GET", f"/v1/experiments/{UID}/trials", None),
    ("POST", f"/v1/experiments/{UID}/start", {"numbers": [0]}),
    ("POST", f"/v1/experiments/{UID}/trials/0/retry", None),
    ("GET", f"/v1/experiments/{UID}/stops", None),
    ("GET", "/v1/stops", None),
]
TRIAL_ROUTES: list[tuple[str, str, Any]] = [
    ("GET", f"/v1/experiments/{UID}/trials/0", None),
    ("POST", f"/v1/experiments/{UID}/trials/0/start", None),
    ("POST", f"/v1/experiments/{UID}/trials/0/observations", REPORT),
    ("POST", f"/v1/experiments/{UID}/trials/0/finish", FINISH),
]
OPEN_ROUTES = ["/healthz", "/readyz"]


def _template(path: str) -> str:
    return path.replace(UID, "{uid}").replace("/trials/0", "/trials/{n}").replace("/0/", "/{n}/")


def test_the_tables_name_every_route_of_the_api(db_url: str) -> None:
    app = create_app(ServiceSettings(db_url=db_url, api_key=API_KEY), TuningService.open(db_url))
    served = {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    }
    tabled = {(m, _template(p)) for m, p, _ in CLIENT_ROUTES + TRIAL_ROUTES}
    tabled |= {("GET", p) for p in OPEN_ROUTES}
    assert served == tabled


def _state(http: httpx.Client) -> Any:
    """Everything a call could have changed, read with a client's credentials."""
    return [
        http.get(path, headers=CLIENT_HEADERS, params={"observations": True}).json()
        for uid in (UID, OTHER)
        for path in (f"/v1/experiments/{uid}", f"/v1/experiments/{uid}/trials")
    ]


def _call(http: httpx.Client, route: tuple[str, str, Any], token: str | None) -> httpx.Response:
    method, path, body = route
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return http.request(method, path, json=body, headers=headers)


def test_without_credentials_every_route_but_health_is_refused(
    served: tuple[httpx.Client, TuningService],
) -> None:
    http, _ = served
    before = _state(http)
    for route in CLIENT_ROUTES + TRIAL_ROUTES:
        answer = _call(http, route, None)
        assert answer.status_code == 401, (route, answer.text)
        assert answer.json()["error"]["code"] == "unauthorized"
    assert _state(http) == before
    for path in OPEN_ROUTES:
        assert http.get(path).status_code == 200


def test_a_trials_token_acts_on_its_own_trial_and_nothing_else(
    served: tuple[httpx.Client, TuningService],
) -> None:
    http, svc = served
    own, other_trial, other_experiment = (
        svc.token(UID, 0),
        svc.token(UID, 1),
        svc.token(OTHER, 0),
    )
    before = _state(http)
    for route in CLIENT_ROUTES:
        answer = _call(http, route, own)
        assert answer.status_code == 403, (route, answer.text)
        assert "a trial's token may only" in answer.json()["error"]["message"]
    for route in TRIAL_ROUTES:
        for token in (other_trial, other_experiment, "f" * 64):
            answer = _call(http, route, token)
            assert answer.status_code == 403, (route, answer.text)
            assert answer.json()["error"]["field"] == "token"
    assert _state(http) == before
    # Its own trial: read, start, report and finish it.
    for route in TRIAL_ROUTES:
        answer = _call(http, route, own)
        assert answer.is_success, (route, answer.text)
    assert http.get(f"/v1/experiments/{UID}/trials/0", headers=CLIENT_HEADERS).json()["state"] == (
        "failed"
    )


def test_service_account_tokens_other_than_the_allowed_ones_are_refused(
    served: tuple[httpx.Client, TuningService],
) -> None:
    http, _ = served
    before = _state(http)
    for token, status in ((JWT + "x", 403), ("a.b.c", 401)):
        for route in CLIENT_ROUTES:
            assert _call(http, route, token).status_code == status, route
    assert _state(http) == before
    # The operator's: every call.
    ask = CLIENT_ROUTES[4]
    assert _call(http, ask, JWT).json()["trials"][0]["number"] == 2
