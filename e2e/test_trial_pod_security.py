"""Trial Pods are safe to run in a shared cluster (the security issue's acceptance).

kubetune runs from its Helm chart (:class:`~e2e.operator_helpers.ChartStack`)
and trials are real containers on the real node, as in ``test_operator.py``:

- the per-trial token is in a Secret mounted into the collector only, never
  in the Pod spec (which the built-in ``view`` role reads), and the trial
  Pod mounts no ServiceAccount token; the reports still arrive;
- in a namespace that enforces the ``restricted`` Pod Security profile, a
  compliant template runs (so the collector sidecar is compliant too), and a
  template the profile refuses ends with the Experiment saying why
  (``TrialPodsAdmitted`` False, reason ``TrialPodForbidden``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.helpers import Kube, Obj
from e2e.host_stack import HostStack
from e2e.operator_helpers import (
    ChartStack,
    make_stack,
    synthetic_experiment,
    trials_of,
    wait_condition,
)

TOKEN_VOLUME = "kubetune-trial-token"
COLLECTOR = "kubetune-collector"


@pytest.fixture(scope="module")
def stack(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostStack | ChartStack]:
    s = make_stack(kube, Path(tmp_path_factory.mktemp("kubetune-stack")))
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def restricted(kube: Kube, namespace: str) -> str:
    """The test's namespace, enforcing the ``restricted`` Pod Security profile."""
    kube.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    return namespace


def condition(exp: Obj, kind: str) -> Obj:
    return next(c for c in exp["status"]["conditions"] if c["type"] == kind)


def restricted_template(body: Obj) -> Obj:
    """``body`` with a template the ``restricted`` profile admits (the trial image is non-root)."""
    spec = body["spec"]["template"]["spec"]
    spec["securityContext"] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    for container in spec["containers"]:
        container["securityContext"] = {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        }
    return body


def test_a_trial_pod_holds_no_token_and_its_reports_arrive(
    kube: Kube, namespace: str, stack: HostStack | ChartStack
) -> None:
    body = synthetic_experiment("tok", max_trials=1, parallelism=1, epochs=3, sleep=0.5)
    # The trainer as root: the collector (a non-root uid) still reads what it writes.
    body["spec"]["template"]["spec"]["containers"][0]["securityContext"] = {"runAsUser": 0}
    kube.apply(body, namespace=namespace)
    wait_condition(kube, namespace, "tok", "Succeeded", 300)

    (trial,) = trials_of(kube, namespace, "tok")
    assert trial["status"]["phase"] == "Succeeded", trial["status"]
    assert trial["status"]["objective"] is not None  # the collector's reports arrived
    pod = kube.get("pod", "-n", namespace, trial["status"]["podName"])
    spec = pod["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == TOKEN_VOLUME]
    secret = kube.get("secret", "-n", namespace, volume["secret"]["secretName"])
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert len(token) >= 16

    # Whoever reads the Pod (the view role does) does not read the token.
    assert token not in json.dumps(pod)
    # No ServiceAccount token either: no projected kube-api-access volume.
    assert spec["automountServiceAccountToken"] is False
    assert not [v for v in spec["volumes"] if v["name"].startswith("kube-api-access")]
    for container in spec["containers"]:
        assert TOKEN_VOLUME not in [m["name"] for m in container.get("volumeMounts") or []]
        assert not [e for e in container.get("env") or [] if "TOKEN" in e["name"]]
    (collector,) = [c for c in spec["initContainers"] if c["name"] == COLLECTOR]
    (mount,) = [m for m in collector["volumeMounts"] if m["name"] == TOKEN_VOLUME]
    env = {e["name"]: e.get("value") for e in collector["env"]}
    assert env["KUBETUNE_TRIAL_TOKEN_FILE"].startswith(mount["mountPath"] + "/")

    # The Secret goes with its Trial (garbage collection).
    (owner,) = secret["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"]) == ("Trial", trial["metadata"]["uid"])


def test_a_restricted_namespace_runs_a_compliant_template(
    kube: Kube, restricted: str, stack: HostStack | ChartStack
) -> None:
    body = restricted_template(
        synthetic_experiment("ok", max_trials=2, parallelism=2, epochs=2, sleep=0.3)
    )
    kube.apply(body, namespace=restricted)
    wait_condition(kube, restricted, "ok", "Succeeded", 300)
    trials = trials_of(kube, restricted, "ok")
    assert {t["status"]["phase"] for t in trials} == {"Succeeded"}, [t["status"] for t in trials]
    exp = kube.get("experiment", "-n", restricted, "ok")
    assert condition(exp, "TrialPodsAdmitted")["status"] == "True"


@pytest.mark.parametrize(
    ("what", "refusal"),
    [
        ("hostPath", "hostPath"),
        ("privileged", "privileged"),
    ],
)
def test_a_restricted_namespace_refuses_a_template_and_the_experiment_says_why(
    kube: Kube, restricted: str, stack: HostStack | ChartStack, what: str, refusal: str
) -> None:
    body = restricted_template(
        synthetic_experiment("bad", max_trials=3, parallelism=1, maxFailedTrials=0)
    )
    spec = body["spec"]["template"]["spec"]
    train = spec["containers"][0]
    if what == "hostPath":
        spec["volumes"] = [{"name": "host", "hostPath": {"path": "/tmp"}}]
        train["volumeMounts"] = [{"name": "host", "mountPath": "/host"}]
    else:
        train["securityContext"] = {**train["securityContext"], "privileged": True}
        del train["securityContext"]["allowPrivilegeEscalation"]
    kube.apply(body, namespace=restricted)
    wait_condition(kube, restricted, "bad", "Failed", 180)

    exp = kube.get("experiment", "-n", restricted, "bad")
    admitted = condition(exp, "TrialPodsAdmitted")
    assert (admitted["status"], admitted["reason"]) == ("False", "TrialPodForbidden"), admitted
    assert 'violates PodSecurity "restricted' in admitted["message"], admitted
    assert refusal in admitted["message"], admitted
    (trial,) = trials_of(kube, restricted, "bad")
    assert trial["status"]["phase"] == "Failed"
    assert trial["status"]["conditions"][0]["reason"] == "TrialPodForbidden"
    assert not kube.get("pods", "-n", restricted)["items"]
    events = kube.kubectl("get", "events", "-n", restricted, "-o", "json")
    assert "TrialPodForbidden" in events
