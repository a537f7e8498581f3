"""The rendered Trial and Pod, checked without a cluster."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from kubetune_controller.model import label_value
from kubetune_controller.pods import (
    COLLECTOR_NAME,
    COLLECTOR_UID,
    METRICS_VOLUME,
    TOKEN_VOLUME,
    TemplateError,
    build_event,
    build_token_secret,
    build_trial,
    build_trial_pod,
)
from kubetune_controller.settings import OperatorSettings
from tests.controller.factories import NOW, experiment, spec_dict

SETTINGS = OperatorSettings(
    service_url="http://svc:8000",
    collector_image="kubetune:test",
    metrics_dir="/kubetune",
)
SGD = {"lr": 0.001, "layers": 3, "optimizer": "sgd", "momentum": 0.9}
ADAM = {"lr": 1e-05, "layers": 2, "optimizer": "adam"}


def render(params=SGD, **spec):
    return build_trial_pod(experiment(**spec), "trial-uid", 7, params, SETTINGS)


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_names_labels_and_owner_are_deterministic():
    pod = render()
    meta = pod["metadata"]
    assert (meta["name"], meta["namespace"]) == ("exp-7", "ns")
    assert meta["labels"] == {
        "team": "ml",
        "kubetune.io/experiment": "exp",
        "kubetune.io/trial": "exp-7",
        "kubetune.io/trial-number": "7",
    }
    (owner,) = meta["ownerReferences"]
    assert owner == {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "Trial",
        "name": "exp-7",
        "uid": "trial-uid",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert render() == pod


def test_params_substituted_and_command_not_wrapped():
    (train,) = render()["spec"]["containers"]
    assert train["command"] == ["python", "-m", "kubetune_trials.synthetic"]
    assert train["args"] == ["--lr=0.001", "--layers=3", "--momentum=0.9"]
    assert env_of(train)["OPT"] == "sgd"


def test_inactive_conditional_param_is_left_out():
    (train,) = render(ADAM)["spec"]["containers"]
    assert train["args"] == ["--lr=1e-05", "--layers=2"]


def test_gpu_request_kept_and_restart_never():
    spec = render()["spec"]
    assert spec["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    assert spec["restartPolicy"] == "Never"


def test_trial_timeout_is_the_pods_active_deadline():
    assert "activeDeadlineSeconds" not in render()["spec"]
    assert render(trialTimeoutSeconds=600)["spec"]["activeDeadlineSeconds"] == 600
    # The template's own deadline, when shorter, still holds.
    template = spec_dict()["template"]
    template["spec"]["activeDeadlineSeconds"] = 60
    pod = render(trialTimeoutSeconds=600, template=template)
    assert pod["spec"]["activeDeadlineSeconds"] == 60


def test_metrics_file_shared_between_trial_and_native_sidecar():
    spec = render()["spec"]
    (train,) = spec["containers"]
    sidecar = spec["initContainers"][0]
    assert sidecar["name"] == COLLECTOR_NAME
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar
    assert sidecar["image"] == "kubetune:test"
    assert sidecar["command"] == ["python", "-m", "kubetune_suggestion.collector"]
    assert {"name": METRICS_VOLUME, "emptyDir": {}} in spec["volumes"]
    mount = {"name": METRICS_VOLUME, "mountPath": "/kubetune"}
    assert mount in train["volumeMounts"] and mount in sidecar["volumeMounts"]
    assert env_of(train)["KUBETUNE_METRICS_FILE"] == env_of(sidecar)["KUBETUNE_METRICS_FILE"]
    assert env_of(train)["KUBETUNE_METRICS_FILE"].startswith("/kubetune/")


def test_sidecar_identity_in_its_env():
    side = env_of(render()["spec"]["initContainers"][0])
    assert side["KUBETUNE_SERVICE_URL"] == "http://svc:8000"
    assert side["KUBETUNE_EXPERIMENT_UID"] == "uid-1"
    assert side["KUBETUNE_TRIAL_NUMBER"] == "7"


def test_token_is_a_secret_volume_of_the_sidecar_only():
    pod = render()
    spec = pod["spec"]
    secret = build_token_secret(experiment(), 7, "trial-uid", "tok-7")
    # Nowhere in the Pod: not an env value, not an annotation.
    assert "tok-7" not in json.dumps(pod)
    (volume,) = [v for v in spec["volumes"] if v["name"] == TOKEN_VOLUME]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    (item,) = volume["secret"]["items"]
    assert secret["stringData"][item["key"]] == "tok-7"
    # Readable by the collector's uid without the Pod's fsGroup.
    assert volume["secret"]["defaultMode"] & 0o004
    side = spec["initContainers"][0]
    (mount,) = [m for m in side["volumeMounts"] if m["name"] == TOKEN_VOLUME]
    assert mount["readOnly"] is True
    token_file = env_of(side)["KUBETUNE_TRIAL_TOKEN_FILE"]
    assert token_file == f"{mount['mountPath']}/{item['path']}"
    for container in spec["containers"]:
        assert TOKEN_VOLUME not in [m["name"] for m in container["volumeMounts"]]
        assert not any("TOKEN" in name for name in env_of(container))


def test_token_secret_is_owned_by_the_trial_and_labelled_like_it():
    secret = build_token_secret(experiment(), 7, "trial-uid", "tok-7")
    meta = secret["metadata"]
    trial = build_trial(experiment(), 7, SGD)
    assert meta["namespace"] == "ns"
    assert meta["name"].startswith("exp-7-token-")
    assert meta["labels"] == trial["metadata"]["labels"]
    (owner,) = meta["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("Trial", "exp-7", "trial-uid")
    assert secret["immutable"] is True
    # Another Trial of the same name (its Experiment re-created) has a Secret of its own.
    other = build_token_secret(experiment(), 7, "other-uid", "tok-7")
    assert other["metadata"]["name"] != meta["name"]


def test_a_retry_mounts_the_trials_secret():
    first = render()
    retry = build_trial_pod(experiment(), "trial-uid", 7, SGD, SETTINGS, "exp-7-retry1")
    assert retry["metadata"]["name"] == "exp-7-retry1"
    volumes = [v for v in first["spec"]["volumes"] if v["name"] == TOKEN_VOLUME]
    assert [v for v in retry["spec"]["volumes"] if v["name"] == TOKEN_VOLUME] == volumes


def test_service_account_token_not_mounted_unless_the_template_asks():
    assert render()["spec"]["automountServiceAccountToken"] is False
    template = spec_dict()["template"]
    template["spec"]["automountServiceAccountToken"] = True
    assert render(template=template)["spec"]["automountServiceAccountToken"] is True


def test_sidecar_meets_the_restricted_pod_security_profile():
    side = render()["spec"]["initContainers"][0]
    ctx = side["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["runAsUser"] == COLLECTOR_UID and COLLECTOR_UID != 0
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["readOnlyRootFilesystem"] is True
    # Only the volumes the restricted profile allows: emptyDir and secret.
    pod_volumes = {v["name"]: v for v in render()["spec"]["volumes"]}
    for mount in side["volumeMounts"]:
        assert set(pod_volumes[mount["name"]]) - {"name"} <= {"emptyDir", "secret"}


def test_trial_identity_in_the_trial_env():
    train = env_of(render()["spec"]["containers"][0])
    assert train["KUBETUNE_TRIAL_NAME"] == "exp-7"
    assert json.loads(train["KUBETUNE_PARAMS"]) == SGD


def test_collector_url_override_for_out_of_cluster_operators():
    settings = OperatorSettings(
        service_url="http://127.0.0.1:1", collector_service_url="http://svc:80"
    )
    pod = build_trial_pod(experiment(), "u", 0, SGD, settings)
    assert env_of(pod["spec"]["initContainers"][0])["KUBETUNE_SERVICE_URL"] == "http://svc:80"


def test_user_init_containers_and_volumes_kept_after_sidecar():
    spec_ = experiment().spec["template"]["spec"]
    template = {
        "spec": {
            **spec_,
            "initContainers": [{"name": "fetch", "image": "busybox", "command": ["true"]}],
            "volumes": [{"name": "data", "emptyDir": {}}],
        }
    }
    spec = render(template=template)["spec"]
    assert [c["name"] for c in spec["initContainers"]] == [COLLECTOR_NAME, "fetch"]
    assert [v["name"] for v in spec["volumes"]] == ["data", METRICS_VOLUME, TOKEN_VOLUME]


def test_unknown_parameter_names_the_field():
    template = {"spec": {"containers": [{"name": "t", "image": "i", "args": ["${params.nope}"]}]}}
    with pytest.raises(TemplateError) as err:
        render(template=template)
    assert err.value.field == "template.spec.containers[0].args[0]"


@pytest.mark.parametrize("name", [METRICS_VOLUME, TOKEN_VOLUME])
def test_reserved_volume_name_refused(name):
    template = {
        "spec": {
            "containers": [{"name": "t", "image": "i"}],
            "volumes": [{"name": name, "emptyDir": {}}],
        }
    }
    with pytest.raises(TemplateError, match=name):
        render(template=template)


def test_template_not_mutated():
    exp = experiment()
    before = json.dumps(exp.spec, sort_keys=True)
    build_trial_pod(exp, "u", 1, SGD, SETTINGS)
    assert json.dumps(exp.spec, sort_keys=True) == before


def test_trial_owned_by_experiment():
    t = build_trial(experiment(), 3, SGD)
    assert t["metadata"]["name"] == "exp-3"
    assert t["metadata"]["ownerReferences"][0]["kind"] == "Experiment"
    assert t["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert t["spec"] == {"experiment": "exp", "number": 3, "params": SGD, "podName": "exp-3"}


def test_long_names_give_valid_distinct_labels():
    a, b = "x" * 70 + "a", "x" * 70 + "b"
    assert len(label_value(a)) <= 63
    assert label_value(a) != label_value(b)
    assert label_value("short") == "short"


def test_event_shape():
    obj = {"apiVersion": "v1", "kind": "Pod", "name": "p", "namespace": "ns", "uid": "u"}
    ev = build_event(obj, "TrialPruned", "m" * 2000, NOW, warning=True, instance="op-0")
    assert ev["type"] == "Warning"
    assert ev["involvedObject"] == obj
    assert len(ev["message"]) == 1024
    assert ev["metadata"]["name"].startswith("p.")


def test_an_event_standing_for_several_says_how_many_and_over_what_time():
    obj = {"apiVersion": "v1", "kind": "Pod", "name": "p", "namespace": "ns", "uid": "u"}
    ev = build_event(obj, "TrialCreated", "m", NOW, first=NOW - timedelta(seconds=4), count=6)
    assert (ev["firstTimestamp"], ev["lastTimestamp"], ev["count"]) == (
        "2026-01-01T11:59:56Z",
        "2026-01-01T12:00:00Z",
        6,
    )
    single = build_event(obj, "TrialCreated", "m", NOW)
    assert single["firstTimestamp"] == single["lastTimestamp"] and single["count"] == 1


def test_a_retrys_pod_is_owned_by_the_trial_not_by_a_trial_named_after_itself():
    """The garbage collector deletes a Pod whose owner reference names no existing object."""
    retry = build_trial_pod(experiment(), "trial-uid", 7, SGD, SETTINGS, "exp-7-retry1")
    (owner,) = retry["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("Trial", "exp-7", "trial-uid")
    assert render()["metadata"]["ownerReferences"] == [owner]
