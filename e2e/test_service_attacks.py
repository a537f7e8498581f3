"""Attacks on the suggestion service from inside the cluster, each refused (the security issue).

The chart is installed as users install it. Two teams' experiments run to
the end; then a Pod in team A's namespace (labelled as a trial Pod, holding
the token of team A's trial 0, and a ServiceAccount token issued for the
service's audience) tries to change or read what it may not: other trials,
the other team's experiment, the stop list. Every attempt must be refused
with 401 or 403, and neither experiment's data may change. A Pod that is
neither a trial nor the operator does not get a connection at all: the
chart's NetworkPolicy, which the local cluster enforces (kube-router).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from e2e.helpers import REPO, Kube, Obj, python_pod
from e2e.operator_helpers import (
    SERVICE_AUDIENCE,
    ChartStack,
    make_stack,
    synthetic_experiment,
    wait_condition,
)
from kubetune_suggestion.service.tokens import trial_token

# The attacker: every call as (name, method, path, body, credential), the
# credential one of "none", "own" (its trial's token), "forged", "account"
# (its Pod's ServiceAccount token for the service's audience). It prints one
# JSON line per call: [name, status, error code].
ATTACKER = r"""
import json, os, socket, time, urllib.parse, urllib.request
base = os.environ["SERVICE"]
# Where NetworkPolicy is enforced (kube-router), a new Pod's first packets can
# be refused until the firewall knows its IP: connect first, for up to 60 s.
url = urllib.parse.urlsplit(base)
deadline = time.monotonic() + 60
while True:
    try:
        socket.create_connection((url.hostname, url.port), timeout=2).close()
        break
    except OSError as exc:
        if time.monotonic() > deadline:
            print("unreachable", exc, flush=True)
            raise SystemExit(3)
        time.sleep(1)
creds = {
    "none": None,
    "own": os.environ["OWN_TOKEN"],
    "forged": "f" * 64,
    "account": open("/var/run/secrets/attack/token").read().strip(),
}
for name, method, path, body, cred in json.loads(os.environ["ATTACKS"]):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if creds[cred]:
        req.add_header("Authorization", "Bearer " + creds[cred])
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            status, answer = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, answer = err.code, err.read()
    try:
        code = json.loads(answer)["error"]["code"]
    except Exception:
        code = ""
    print(json.dumps([name, status, code]), flush=True)
print("done", flush=True)
"""


@pytest.fixture(scope="module")
def stack(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChartStack]:
    s = make_stack(kube, Path(tmp_path_factory.mktemp("kubetune-stack")))
    if not isinstance(s, ChartStack):
        pytest.skip("the attacks are made on the chart's installation (KUBETUNE_E2E_STACK=chart)")
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def other_namespace(kube: Kube) -> Iterator[str]:
    name = "team-b-attacks"
    kube.kubectl("create", "namespace", name)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")


def _attacks(a: str, b: str) -> list[tuple[str, str, str, Any, str]]:
    """Every attempt: what it would do if it were let through."""
    spec_b = {"name": "b", "namespace": "x", "spec": {"maxTrials": 100}}
    trial_b = f"/v1/experiments/{b}/trials/0"
    out: list[tuple[str, str, str, Any, str]] = []
    for cred in ("none", "own", "forged", "account"):
        out += [
            (f"{cred}: fail team A's trial 1", "POST", f"/v1/experiments/{a}/trials/1/finish",
             {"state": "failed", "message": "x"}, cred),
            (f"{cred}: fail team B's trial 0", "POST", f"{trial_b}/finish",
             {"state": "failed", "message": "x"}, cred),
            (f"{cred}: start team A's trial 1", "POST", f"/v1/experiments/{a}/trials/1/start",
             None, cred),
            (f"{cred}: report for team B's trial 0", "POST", f"{trial_b}/observations",
             {"step": 99, "metrics": {"val_loss": -1.0}}, cred),
            (f"{cred}: read team B's trial 0", "GET", trial_b, None, cred),
            (f"{cred}: ask on team A's experiment", "POST", f"/v1/experiments/{a}/ask",
             {"count": 1}, cred),
            (f"{cred}: change team B's budget", "PUT", f"/v1/experiments/{b}", spec_b, cred),
            (f"{cred}: delete team B's history", "DELETE", f"/v1/experiments/{b}", None, cred),
            (f"{cred}: delete team A's history", "DELETE", f"/v1/experiments/{a}", None, cred),
            (f"{cred}: put trials back into team B", "POST", f"/v1/experiments/{b}/restore",
             {"trials": []}, cred),
            (f"{cred}: retry team A's trial 1", "POST", f"/v1/experiments/{a}/trials/1/retry",
             None, cred),
            (f"{cred}: list team B's trials", "GET", f"/v1/experiments/{b}/trials", None, cred),
            (f"{cred}: read team B's summary", "GET", f"/v1/experiments/{b}", None, cred),
            (f"{cred}: list every experiment's stops", "GET", "/v1/stops", None, cred),
        ]  # fmt: skip
    return out


def _held(stack: ChartStack, uids: list[str]) -> Any:
    """Everything the service holds of the experiments, read as the operator."""
    with httpx.Client(
        base_url=stack.service_url, headers=stack.service_headers, timeout=20
    ) as client:
        return [
            client.get(path, params={"observations": True}).json()
            for uid in uids
            for path in (f"/v1/experiments/{uid}", f"/v1/experiments/{uid}/trials")
        ]


# A Pod the NetworkPolicy does not let in: it tries for 40 s and prints
# "refused" if no connection to the service's API port ever opened.
OUTSIDER = r"""
import os, socket, time, urllib.parse
url = urllib.parse.urlsplit(os.environ["SERVICE"])
deadline = time.monotonic() + 40
while time.monotonic() < deadline:
    try:
        socket.create_connection((url.hostname, url.port), timeout=2).close()
        print("connected", flush=True)
        raise SystemExit(0)
    except OSError:
        time.sleep(1)
print("refused", flush=True)
"""


def _service_address(stack: ChartStack) -> str:
    return f"http://{stack.release}-kubetune-suggestion.{stack.namespace}.svc:8000"


def _attacker_pod(stack: ChartStack, a: str, b: str, own_token: str) -> Obj:
    service = _service_address(stack)
    pod = python_pod(
        "attacker",
        ATTACKER,
        env=[
            {"name": "SERVICE", "value": service},
            {"name": "OWN_TOKEN", "value": own_token},
            {"name": "ATTACKS", "value": json.dumps(_attacks(a, b))},
        ],
        extra={
            "volumes": [
                {
                    "name": "attack",
                    "projected": {
                        "sources": [
                            {
                                "serviceAccountToken": {
                                    "path": "token",
                                    "audience": SERVICE_AUDIENCE,
                                    "expirationSeconds": 3600,
                                }
                            }
                        ]
                    },
                }
            ]
        },
    )
    pod["metadata"]["labels"] = {"kubetune.io/trial": "impostor"}
    pod["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "attack", "mountPath": "/var/run/secrets/attack"}
    ]
    return pod


def test_a_pod_in_the_cluster_can_change_nothing_it_does_not_own(
    kube: Kube, namespace: str, other_namespace: str, stack: ChartStack
) -> None:
    for ns in (namespace, other_namespace):
        kube.apply(synthetic_experiment("team", max_trials=2, parallelism=2), namespace=ns)
    for ns in (namespace, other_namespace):
        wait_condition(kube, ns, "team", "Succeeded", 300)
    a, b = (kube.get("experiment", "-n", ns, "team")["metadata"]["uid"] for ns in
            (namespace, other_namespace))  # fmt: skip
    key = kube.get("secret", "-n", stack.namespace, f"{stack.release}-kubetune-token")
    own_token = trial_token(base64.b64decode(key["data"]["secret"]).decode(), a, 0)
    before = _held(stack, [a, b])

    kube.apply(_attacker_pod(stack, a, b, own_token), namespace=namespace)
    pod = kube.wait_pod_phase(namespace, "attacker", ("Succeeded", "Failed"), timeout=180)
    assert pod["status"]["phase"] == "Succeeded", kube.logs(namespace, "attacker")
    lines = kube.logs(namespace, "attacker").splitlines()
    assert lines[-1] == "done", lines
    results = [json.loads(line) for line in lines[:-1]]

    attacks = _attacks(a, b)
    assert len(results) == len(attacks) == 56
    let_through = [r for r in results if r[1] not in (401, 403)]
    assert let_through == [], let_through
    # No credentials: 401; a token (a trial's, forged, or an account's): 403.
    assert all((r[1] == 401) == r[0].startswith("none:") for r in results), results
    assert _held(stack, [a, b]) == before


def test_the_token_key_outlives_an_upgrade_that_restarts_the_service(
    kube: Kube, stack: ChartStack
) -> None:
    """The key is the service's, not the render's: an upgrade (as a GitOps re-sync) keeps it."""
    name = f"{stack.release}-kubetune-token"
    # Made by the service (or kept from a chart that rendered it, before the
    # service made its own: the service reads it as it is).
    before = kube.get("secret", "-n", stack.namespace, name)
    stack.helm(
        "upgrade",
        stack.release,
        str(REPO / "charts" / "kubetune"),
        "--namespace",
        stack.namespace,
        "--reuse-values",
        "--set",
        "suggestion.podAnnotations.restarted=yes",
    )
    deployment = f"deploy/{stack.release}-kubetune-suggestion"
    kube.kubectl("rollout", "status", "-n", stack.namespace, deployment, "--timeout=180s")
    after = kube.get("secret", "-n", stack.namespace, name)
    assert after["data"] == before["data"]
    assert after["metadata"]["uid"] == before["metadata"]["uid"]


def test_a_pod_the_network_policy_leaves_out_cannot_reach_the_service(
    kube: Kube, namespace: str, stack: ChartStack
) -> None:
    """Neither a trial nor the operator: no connection to the API port opens, in 40 s."""
    service = [{"name": "SERVICE", "value": _service_address(stack)}]
    kube.apply(python_pod("outsider", OUTSIDER, env=service), namespace=namespace)
    pod = kube.wait_pod_phase(namespace, "outsider", ("Succeeded", "Failed"), timeout=180)
    assert pod["status"]["phase"] == "Succeeded"
    assert kube.logs(namespace, "outsider").split() == ["refused"]
