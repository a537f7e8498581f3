"""Which failed Pods are retried under spec.maxRetries, without a cluster."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kubetune_controller import trial_plan as tp
from kubetune_controller.model import ContainerEnd, PodResource, TrialPhase
from tests.controller.factories import NOW, pod, trial


def plan(p: PodResource, attempt: int = 1, max_retries: int = 2) -> tp.TrialPlan:
    t = replace(trial(0, TrialPhase.RUNNING), attempt=attempt)
    return tp.plan_trials([t], {p.name: p}, {}, None, NOW, 15.0, 0.0, max_retries)


@pytest.mark.parametrize(
    ("reason", "disruption"),
    [
        (None, "EvictionByEvictionAPI"),  # a drain
        (None, "PreemptionByScheduler"),
        ("Evicted", None),  # the kubelet out of memory or disk
        ("OutOfcpu", None),  # refused at admission: the node was full
        ("Terminated", None),  # graceful node shutdown
    ],
)
def test_a_pod_ended_by_kubernetes_is_retried(reason: str | None, disruption: str | None) -> None:
    failed = replace(pod(0, "Failed", exit_code=143), reason=reason, disruption=disruption)
    (retry,) = plan(failed).retry
    assert retry.number == 0
    assert f"its Pod was stopped by Kubernetes ({disruption or reason})" in retry.message


def test_its_own_failures_are_not_retried() -> None:
    oom = replace(
        pod(0, "Failed"), ended_containers=(ContainerEnd("train", 137, "OOMKilled", None),)
    )
    for failed in (
        pod(0, "Failed", exit_code=1),
        replace(pod(0, "Failed", exit_code=137), reason="DeadlineExceeded"),
        oom,
    ):
        p = plan(failed)
        assert p.retry == [] and [f.state for f in p.finish] == ["failed"]


def test_past_max_retries_it_fails_saying_how_often_it_ran() -> None:
    evicted = replace(pod(0, "Failed"), reason="Evicted")
    (finish,) = plan(evicted, attempt=3, max_retries=2).finish
    assert finish.state == "failed" and finish.reason == "Evicted"
    assert "not retried: it ran 3 times (spec.maxRetries 2)" in finish.message
    (finish,) = plan(evicted, attempt=1, max_retries=0).finish
    assert "not retried" not in finish.message


def test_the_disruption_is_read_from_the_pods_condition() -> None:
    body = {
        "metadata": {
            "name": "exp-0-retry1",
            "namespace": "ns",
            "labels": {"kubetune.io/trial-number": "0"},
        },
        "status": {
            "phase": "Failed",
            "conditions": [
                {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}
            ],
        },
    }
    view = PodResource.from_body(body)
    assert view.disruption == "EvictionByEvictionAPI"
    assert view.number == 0  # a retry's Pod is named apart from its Trial
    assert PodResource.from_body({"metadata": {"name": "x"}}).disruption is None
