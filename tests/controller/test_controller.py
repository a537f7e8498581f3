"""The controller end to end in one process: real service, in-memory cluster.

The suggestion service is the real HTTP app over SQLite (through an ASGI
transport); the cluster is :class:`FakeCluster`. These tests cover what the
pure tests cannot: the order of service calls and Kubernetes writes, and that
a controller killed at any point and started afresh neither loses nor
duplicates a trial.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from kubetune_controller.cache import ClusterCache
from kubetune_controller.controller import Controller
from kubetune_controller.metrics import OperatorMetrics
from kubetune_controller.service_client import ServiceClient
from kubetune_controller.settings import OperatorSettings
from kubetune_suggestion.service.app import create_app
from kubetune_suggestion.service.core import TuningService
from kubetune_suggestion.service.settings import ServiceSettings
from kubetune_suggestion.service.testing import API_KEY, CLIENT_HEADERS
from tests.controller.factories import spec_dict
from tests.controller.fake_cluster import FakeCluster, curve, kubelet
from tests.controller.httpx_sender import HttpxSender

SETTINGS = OperatorSettings(
    service_url="http://svc",
    workers=4,
    resync_seconds=0.5,
    stops_wait_seconds=0.2,
    lost_pod_grace_seconds=1.0,
    service_retries=1,
    step_refresh_seconds=0.1,
)


def simple_spec(**kw: Any) -> dict[str, Any]:
    spec = spec_dict(
        parameters=[{"name": "lr", "type": "float", "min": 1e-4, "max": 1.0, "log": True}],
        algorithm={"name": "random", "seed": 3},
        template={
            "spec": {"containers": [{"name": "train", "image": "t", "args": ["${params.lr}"]}]}
        },
    )
    spec.update(kw)
    return spec


# The trial-token key: the chart keeps it in a Secret, so a service that
# loses its database still accepts the running trials' tokens.
SECRET = "test-secret"


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.databases = 0
        self.cluster = FakeCluster()
        self.controller: Controller | None = None
        self.lose_database()

    def lose_database(self) -> None:
        """Start the service afresh on an empty database (an emptyDir lost with its Pod)."""
        self.databases += 1
        service = TuningService.open(f"sqlite:///{self.tmp}/svc{self.databases}.db", secret=SECRET)
        self.app = create_app(
            ServiceSettings(db_url="unused", stop_poll_seconds=0.02, api_key=API_KEY), service
        )

    async def _app(self, scope: Any, receive: Any, send: Any) -> None:
        # Clients reach whichever service is current, as through a Service.
        await self.app(scope, receive, send)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self._app),
            base_url="http://svc",
            headers=CLIENT_HEADERS,
        )

    def start_controller(self, settings: OperatorSettings = SETTINGS) -> Controller:
        cache = ClusterCache()
        service = ServiceClient(
            settings.service_url,
            settings.service_retries,
            sender=HttpxSender(settings.service_url, httpx.ASGITransport(app=self._app)),
            credentials=lambda: API_KEY,
        )
        controller = Controller(
            settings, self.cluster, service, cache, OperatorMetrics(cache.snapshot)
        )
        controller.start()
        self.cluster.attach(controller)
        self.controller = controller
        return controller

    async def kill_controller(self) -> None:
        assert self.controller is not None
        self.cluster.controller = None
        await self.controller.stop()
        self.controller = None

    def experiment(self, name: str = "exp") -> dict[str, Any]:
        return self.cluster.objects[("Experiment", "ns", name)]

    async def wait(self, what: Callable[[], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out; experiment status: {self.experiment().get('status')}"
                )
            await asyncio.sleep(0.02)


def all_trials_final(h: Harness) -> bool:
    return all(
        (t.get("status") or {}).get("phase")
        in ("Succeeded", "Failed", "Pruned", "MetricsUnavailable")
        for t in h.cluster.of_kind("Trial")
    )


def phase(h: Harness) -> str | None:
    return (h.experiment().get("status") or {}).get("phase")


def condition(h: Harness, kind: str) -> dict[str, Any]:
    conds = (h.experiment().get("status") or {}).get("conditions") or []
    return next(c for c in conds if c["type"] == kind)


async def run_experiment(
    h: Harness, spec: dict[str, Any], steps: int = 3, kill_every: float | None = None
) -> None:
    h.start_controller()
    h.cluster.apply_experiment("exp", spec)
    stop = asyncio.Event()
    async with h.client() as svc:
        task = asyncio.create_task(kubelet(h.cluster, svc, steps, stop))
        try:
            if kill_every is None:
                await h.wait(lambda: phase(h) in ("Succeeded", "Failed"))
            else:
                for _ in range(3):
                    await asyncio.sleep(kill_every)
                    await h.kill_controller()
                    h.start_controller()
                await h.wait(lambda: phase(h) in ("Succeeded", "Failed"))
            # An ended experiment shows no trial running: the trials it stopped
            # (and those whose status was being written) ended before it did.
            status = h.experiment()["status"]
            assert all_trials_final(h), [t.get("status") for t in h.cluster.of_kind("Trial")]
            assert status["running"] == status["pending"] == 0, status
        finally:
            stop.set()
            await task
            if h.controller is not None:
                await h.kill_controller()
    assert h.cluster.peak_live_pods <= spec["parallelism"]


def test_slow_creations_overlapping_asks_create_each_trial_once(tmp_path: Path) -> None:
    """Trials finish, and asks go out, while others are still being created."""
    h = Harness(tmp_path)
    h.cluster.create_delay = 0.03
    asyncio.run(run_experiment(h, simple_spec(maxTrials=24, parallelism=4), steps=1))
    assert len(h.cluster.of_kind("Trial")) == 24
    assert max(h.cluster.pod_creates.values()) == 1
    assert max(h.cluster.trial_creates.values()) == 1
    # run_experiment also checked that no more than 4 trial Pods were ever live.


def test_runs_max_trials_and_records_the_best(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.cluster.status_delay = 0.05
    asyncio.run(run_experiment(h, simple_spec(maxTrials=6, parallelism=2)))
    status = h.experiment()["status"]
    trials = h.cluster.of_kind("Trial")
    assert status["phase"] == "Succeeded"
    assert condition(h, "Succeeded")["reason"] == "MaxTrialsReached"
    assert len(trials) == 6
    assert {t["status"]["phase"] for t in trials} == {"Succeeded"}
    assert max(h.cluster.pod_creates.values()) == 1
    finals = {t["metadata"]["name"]: t["status"]["objective"] for t in trials}
    best_name = min(finals, key=finals.__getitem__)
    assert status["bestObjective"] == pytest.approx(finals[best_name])
    assert status["bestTrial"]["name"] == best_name
    assert status["trialsSummary"] == "6/6"
    for t in trials:
        assert t["status"]["objective"] == pytest.approx(curve(t["spec"]["params"], 3))
    reasons = [e["reason"] for e in h.cluster.events]
    assert {"TrialCreated", "ExperimentSucceeded"} <= set(reasons)
    # Trial creations held for combining were written before the end.
    created = [i for i, r in enumerate(reasons) if r == "TrialCreated"]
    assert max(created) < reasons.index("ExperimentSucceeded")
    assert sum(e["message"].count("created trial") for e in h.cluster.events) == 6


def test_killed_controller_neither_loses_nor_duplicates(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    asyncio.run(
        run_experiment(h, simple_spec(maxTrials=12, parallelism=3), steps=5, kill_every=0.15)
    )
    trials = h.cluster.of_kind("Trial")
    assert phase(h) == "Succeeded"
    assert len(trials) == 12
    assert sorted(t["spec"]["number"] for t in trials) == list(range(12))
    assert len(h.cluster.pods_ever) == len(set(h.cluster.pods_ever)) == 12
    assert all(t["status"]["phase"] == "Succeeded" for t in trials)


def test_a_service_that_loses_its_database_is_restored_from_the_trials(tmp_path: Path) -> None:
    """Three database losses mid-experiment: still exactly maxTrials, none twice, Succeeded."""

    async def scenario() -> None:
        h.start_controller()
        h.cluster.apply_experiment("exp", simple_spec(maxTrials=12, parallelism=3))
        stop = asyncio.Event()
        async with h.client() as svc:
            task = asyncio.create_task(kubelet(h.cluster, svc, 5, stop))
            try:
                for losses in (2, 5, 8):
                    await h.wait(lambda n=losses: len(h.cluster.of_kind("Trial")) >= n)
                    h.lose_database()
                await h.wait(lambda: phase(h) in ("Succeeded", "Failed"))
                await h.wait(lambda: all_trials_final(h))
            finally:
                stop.set()
                await task
                await h.kill_controller()

    h = Harness(tmp_path)
    asyncio.run(scenario())
    trials = h.cluster.of_kind("Trial")
    assert phase(h) == "Succeeded", h.experiment()["status"]
    assert sorted(t["spec"]["number"] for t in trials) == list(range(12))
    assert len(h.cluster.pods_ever) == len(set(h.cluster.pods_ever)) == 12
    # A running trial's reports come back from its collector, so its result is
    # whole. Only a trial whose Pod had ended, collector gone, just as the
    # database went loses its reports (at most one window per loss).
    succeeded = [t for t in trials if t["status"]["phase"] == "Succeeded"]
    assert len(succeeded) >= 12 - 3, [t["status"] for t in trials]
    assert {t["status"]["phase"] for t in trials} <= {"Succeeded", "MetricsUnavailable"}
    for t in succeeded:
        assert t["status"]["objective"] == pytest.approx(curve(t["spec"]["params"], 5))
    assert h.experiment()["status"]["trialsSummary"] == "12/12"
    restored = [e for e in h.cluster.events if e["reason"] == "Restored"]
    assert len(restored) == 3, [e["message"] for e in restored]
    assert "had lost this experiment" in restored[0]["message"]

    # The last service holds every trial: the finished ones were put back.
    async def service_trials() -> list[dict[str, Any]]:
        async with h.client() as svc:
            uid = h.experiment()["metadata"]["uid"]
            return list((await svc.get(f"/v1/experiments/{uid}/trials")).json())

    held = asyncio.run(service_trials())
    assert sorted(t["number"] for t in held) == list(range(12))


def test_goal_reached_stops_running_trials(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    spec = simple_spec(
        maxTrials=30,
        parallelism=3,
        objective={"metric": "val_loss", "direction": "minimize", "target": 10.0},
    )
    asyncio.run(run_experiment(h, spec, steps=2))
    assert phase(h) == "Succeeded"
    assert condition(h, "Succeeded")["reason"] == "GoalReached"
    assert len(h.cluster.of_kind("Trial")) < 30
    assert all(t["status"]["phase"] in ("Succeeded", "Pruned") for t in h.cluster.of_kind("Trial"))
    assert not [p for p in h.cluster.of_kind("Pod") if p["status"]["phase"] == "Running"]
    assert "GoalReached" in {e["reason"] for e in h.cluster.events}


def test_asha_prunes_and_records_reason(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    spec = simple_spec(
        maxTrials=12,
        parallelism=4,
        earlyStopping={"name": "asha", "minResource": 1, "maxResource": 9, "reductionFactor": 3},
    )
    asyncio.run(run_experiment(h, spec, steps=9))
    trials = h.cluster.of_kind("Trial")
    pruned = [t for t in trials if t["status"]["phase"] == "Pruned"]
    assert phase(h) == "Succeeded"
    assert len(trials) == 12
    assert pruned, "ASHA pruned nothing"
    assert all(t["status"].get("stopReason") for t in pruned)
    assert h.experiment()["status"]["pruned"] == len(pruned)
    assert "TrialPruned" in {e["reason"] for e in h.cluster.events}


def test_suspend_then_resume(tmp_path: Path) -> None:
    async def scenario() -> None:
        h.start_controller()
        h.cluster.apply_experiment("exp", simple_spec(maxTrials=4, parallelism=2, suspend=True))
        await h.wait(lambda: phase(h) == "Suspended")
        await asyncio.sleep(0.3)
        assert h.cluster.of_kind("Trial") == []
        assert condition(h, "Suspended")["status"] == "True"
        h.cluster.apply_experiment("exp", simple_spec(maxTrials=4, parallelism=2, suspend=False))
        await h.wait(lambda: len(h.cluster.of_kind("Trial")) == 2)
        await h.kill_controller()

    h = Harness(tmp_path)
    asyncio.run(scenario())


def test_failed_pod_records_exit_code_and_logs(tmp_path: Path) -> None:
    async def scenario() -> None:
        h.start_controller()
        h.cluster.apply_experiment(
            "exp", simple_spec(maxTrials=2, parallelism=1, maxFailedTrials=0)
        )
        await h.wait(lambda: len(h.cluster.of_kind("Pod")) == 1)
        (pod,) = h.cluster.of_kind("Pod")
        h.cluster.set_pod_phase(pod, "Failed", exit_code=3)
        await h.wait(lambda: phase(h) == "Failed")
        await h.kill_controller()

    h = Harness(tmp_path)
    asyncio.run(scenario())
    (trial,) = h.cluster.of_kind("Trial")
    assert trial["status"]["phase"] == "Failed"
    assert "exited with code 3" in trial["status"]["message"]
    assert "done" in trial["status"]["message"]  # the log tail
    assert condition(h, "Failed")["reason"] == "TooManyFailedTrials"


def test_no_metrics_ends_metrics_unavailable_with_log_tail(tmp_path: Path) -> None:
    async def scenario() -> None:
        h.start_controller()
        h.cluster.apply_experiment("exp", simple_spec(maxTrials=1, parallelism=1))
        await h.wait(lambda: len(h.cluster.of_kind("Pod")) == 1)
        (pod,) = h.cluster.of_kind("Pod")
        h.cluster.set_pod_phase(pod, "Succeeded", exit_code=0)
        await h.wait(lambda: phase(h) in ("Succeeded", "Failed"))
        await h.kill_controller()

    h = Harness(tmp_path)
    asyncio.run(scenario())
    (trial,) = h.cluster.of_kind("Trial")
    assert trial["status"]["phase"] == "MetricsUnavailable"
    assert "val_loss" in trial["status"]["message"] and "epoch 2" in trial["status"]["message"]
    assert condition(h, "Failed")["reason"] == "NoTrialSucceeded"


def test_service_down_sets_condition(tmp_path: Path) -> None:
    async def scenario() -> None:
        settings = OperatorSettings(service_url="http://127.0.0.1:9", service_retries=0, workers=1)
        cache = ClusterCache()
        controller = Controller(
            settings,
            h.cluster,
            ServiceClient(settings.service_url, 0, timeout=1.0),
            cache,
            OperatorMetrics(cache.snapshot),
        )
        controller.start()
        h.cluster.attach(controller)
        h.cluster.apply_experiment("exp", simple_spec())
        await h.wait(lambda: bool((h.experiment().get("status") or {}).get("conditions")))
        await controller.stop()

    h = Harness(tmp_path)
    asyncio.run(scenario())
    svc = condition(h, "ServiceAvailable")
    assert (svc["status"], svc["reason"]) == ("False", "ServiceUnavailable")
    assert "127.0.0.1:9" in svc["message"]


def test_running_trials_show_their_last_step(tmp_path: Path) -> None:
    seen: list[int] = []

    async def scenario() -> None:
        h.start_controller()
        h.cluster.apply_experiment("exp", simple_spec(maxTrials=1, parallelism=1))
        stop = asyncio.Event()
        async with h.client() as svc:
            task = asyncio.create_task(kubelet(h.cluster, svc, 300, stop))
            try:

                def running_step() -> bool:
                    for t in h.cluster.of_kind("Trial"):
                        status = t.get("status") or {}
                        if status.get("phase") == "Running" and status.get("lastStep"):
                            seen.append(status["lastStep"])
                    return bool(seen)

                await h.wait(running_step)
            finally:
                stop.set()
                await task
                await h.kill_controller()

    h = Harness(tmp_path)
    asyncio.run(scenario())
    assert 0 < seen[0] < 300


def test_no_reconcile_before_the_watch_streams_have_listed(tmp_path: Path) -> None:
    """After a restart the caches are empty until the streams list: nothing may act on that."""
    h = Harness(tmp_path)

    async def scenario() -> None:
        controller = h.start_controller()
        listed = asyncio.Event()
        controller.adopt(asyncio.Event().wait(), "a stream that never ends", listed)
        h.cluster.apply_experiment("exp", simple_spec(maxTrials=2, parallelism=2))
        await asyncio.sleep(0.5)
        assert h.cluster.of_kind("Trial") == []
        assert (h.experiment().get("status") or {}).get("phase") is None
        listed.set()
        await h.wait(lambda: len(h.cluster.of_kind("Trial")) == 2)
        await h.kill_controller()

    asyncio.run(scenario())


def test_an_experiment_says_why_while_a_watch_stream_cannot_list(tmp_path: Path) -> None:
    """E.g. RBAC that forbids listing Pods: no trial starts, and the Experiment says why."""
    h = Harness(tmp_path)

    async def go() -> None:
        controller = h.start_controller(replace(SETTINGS, watch_grace_seconds=0.1))
        listed = asyncio.Event()
        why: list[str | None] = ["listing /api/v1/pods failed: 403 Forbidden: pods is forbidden"]
        controller.adopt(listed.wait(), "watch pods", listed, lambda: why[0])
        h.cluster.apply_experiment("exp", simple_spec(maxTrials=2, parallelism=2))

        def blind() -> bool:
            conds = (h.experiment().get("status") or {}).get("conditions") or []
            return any(c["type"] == "Running" and c["reason"] == "CannotWatch" for c in conds)

        await h.wait(blind)
        running = condition(h, "Running")
        assert "403 Forbidden: pods is forbidden" in running["message"]
        assert "list and watch trials and pods" in running["message"]
        assert h.cluster.of_kind("Trial") == []  # nothing started blind
        # The stream lists at last: trials start, and the condition moves on.
        why[0] = None
        listed.set()
        await h.wait(lambda: len(h.cluster.of_kind("Trial")) == 2)
        await h.wait(lambda: condition(h, "Running")["reason"] != "CannotWatch")
        await h.kill_controller()

    asyncio.run(go())


def test_a_trial_whose_pod_ends_is_finished_at_once_not_at_the_next_reconcile(
    tmp_path: Path,
) -> None:
    """The refill of a slot waits for this finish: it must not wait for a reconcile too."""
    h = Harness(tmp_path)

    async def go() -> None:
        # Reconciles at least 3 s apart: a finish left to the next one would take that long.
        h.start_controller(replace(SETTINGS, reconcile_interval_seconds=3.0, resync_seconds=60))
        h.cluster.apply_experiment("exp", simple_spec(maxTrials=2, parallelism=1))
        await h.wait(lambda: len(h.cluster.of_kind("Pod")) == 1)
        (pod,) = h.cluster.of_kind("Pod")
        env = {e["name"]: e["value"] for e in pod["spec"]["initContainers"][0]["env"]}
        h.cluster.set_pod_phase(pod, "Running")
        async with h.client() as svc:
            resp = await svc.post(
                f"/v1/experiments/{env['KUBETUNE_EXPERIMENT_UID']}/trials/0/observations",
                json={"step": 1, "metrics": {"val_loss": 0.25}},
                headers={"Authorization": f"Bearer {h.cluster.mounted_token(pod)}"},
            )
            assert resp.status_code == 200
        ended = time.monotonic()
        h.cluster.set_pod_phase(pod, "Succeeded", exit_code=0)

        def finished() -> bool:
            trial = h.cluster.objects[("Trial", "ns", "exp-0")]
            return (trial.get("status") or {}).get("phase") == "Succeeded"

        await h.wait(finished, timeout=1.5)
        assert time.monotonic() - ended < 1.5
        assert h.cluster.objects[("Trial", "ns", "exp-0")]["status"]["objective"] == 0.25
        await h.kill_controller()

    asyncio.run(go())


def _running_pod(h: Harness, name: str) -> dict[str, Any] | None:
    pod = h.cluster.objects.get(("Pod", "ns", name))
    return pod if pod is not None and (pod.get("status") or {}).get("phase") == "Running" else None


def _disrupt(h: Harness, pod: dict[str, Any], how: str) -> None:
    """End a running trial Pod the way Kubernetes does when it is not the trial's fault."""
    if how == "lost":  # its node went away: the Pod object is deleted
        del h.cluster.objects[("Pod", "ns", pod["metadata"]["name"])]
        h.cluster._notify("Pod", pod, True)
        return
    pod["status"]["reason"] = how  # Evicted, or OOMKilled for a container of its own
    if how == "OOMKilled":
        pod["status"].pop("reason")
        pod["status"]["containerStatuses"] = [
            {"name": "train", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}
        ]
    h.cluster.set_pod_phase(pod, "Failed")


def run_disrupted(h: Harness, max_retries: int, disruptions: list[str]) -> dict[str, Any]:
    """Run a one-trial experiment whose Pods are disrupted in turn; return its Trial."""

    async def scenario() -> None:
        h.start_controller()
        h.cluster.apply_experiment(
            "exp", simple_spec(maxTrials=1, parallelism=1, maxRetries=max_retries)
        )
        stop = asyncio.Event()
        async with h.client() as svc:
            task = asyncio.create_task(kubelet(h.cluster, svc, 40, stop))
            try:
                for attempt, how in enumerate(disruptions):
                    name = "exp-0" if attempt == 0 else f"exp-0-retry{attempt}"
                    await h.wait(lambda n=name: _running_pod(h, n) is not None)
                    pod = _running_pod(h, name)
                    assert pod is not None
                    while pod.get("_step", 0) < 3:  # it has reported a few steps
                        await asyncio.sleep(0.005)
                    _disrupt(h, pod, how)
                await h.wait(lambda: phase(h) in ("Succeeded", "Failed"))
                await h.wait(lambda: all_trials_final(h))
            finally:
                stop.set()
                await task
                await h.kill_controller()

    asyncio.run(scenario())
    (trial,) = h.cluster.of_kind("Trial")
    return trial


@pytest.mark.parametrize("how", ["Evicted", "lost"])
def test_a_disrupted_trial_runs_again_with_its_params_under_its_number(
    tmp_path: Path, how: str
) -> None:
    h = Harness(tmp_path)
    trial = run_disrupted(h, max_retries=2, disruptions=[how])
    status = trial["status"]
    assert status["phase"] == "Succeeded", status
    assert status["attempt"] == 2
    assert status["podName"] == "exp-0-retry1"
    assert h.cluster.pods_ever == ["exp-0", "exp-0-retry1"]
    assert h.cluster.objects.get(("Pod", "ns", "exp-0")) is None  # the disrupted one is gone
    # Its result is the new attempt's: the lost attempt's reports were dropped.
    assert status["objective"] == pytest.approx(curve(trial["spec"]["params"], 40))
    retried = [e for e in h.cluster.events if e["reason"] == "TrialRetried"]
    assert len(retried) == 1 and "attempt 2 of 3" in retried[0]["message"], retried
    assert h.experiment()["status"]["trialsSummary"] == "1/1"


def test_retries_end_at_max_retries_with_a_reason(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    trial = run_disrupted(h, max_retries=1, disruptions=["Evicted", "Evicted"])
    status = trial["status"]
    assert status["phase"] == "Failed", status
    assert status["attempt"] == 2
    assert "Evicted" in status["message"]
    assert "not retried: it ran 2 times (spec.maxRetries 1)" in status["message"]


def test_a_trial_that_fails_on_its_own_is_not_retried(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    trial = run_disrupted(h, max_retries=3, disruptions=["OOMKilled"])
    status = trial["status"]
    assert status["phase"] == "Failed", status
    assert status.get("attempt", 1) == 1
    assert "OOMKilled" in status["message"]
    assert h.cluster.pods_ever == ["exp-0"]


def test_without_max_retries_a_lost_pod_fails_its_trial(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    trial = run_disrupted(h, max_retries=0, disruptions=["lost"])
    assert trial["status"]["phase"] == "Failed"
    assert "disappeared" in trial["status"]["message"]
    assert h.cluster.pods_ever == ["exp-0"]


POD_SECURITY = (
    'pods "exp-0" is forbidden: violates PodSecurity "restricted:latest": '
    'hostPath volumes (volume "host")'
)


def test_a_trial_pod_that_admission_refuses_fails_the_trial_and_the_experiment_says_why(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path)
    h.cluster.pod_refusal = POD_SECURITY
    asyncio.run(run_experiment(h, simple_spec(maxTrials=4, parallelism=1, maxFailedTrials=0)))
    assert h.cluster.pods_ever == []
    (trial,) = h.cluster.of_kind("Trial")  # not retried silently, not run again
    assert trial["status"]["phase"] == "Failed"
    (failed,) = trial["status"]["conditions"]
    assert failed["reason"] == "TrialPodForbidden"
    assert POD_SECURITY in failed["message"]
    assert phase(h) == "Failed"
    assert condition(h, "Failed")["reason"] == "TooManyFailedTrials"
    admitted = condition(h, "TrialPodsAdmitted")
    assert (admitted["status"], admitted["reason"]) == ("False", "TrialPodForbidden")
    assert admitted["message"].startswith("trial exp-0: ")
    assert POD_SECURITY in admitted["message"]
    (event,) = [e for e in h.cluster.events if e["reason"] == "TrialPodForbidden"]
    assert event["type"] == "Warning"
    assert POD_SECURITY in event["message"]


def test_a_used_up_quota_delays_a_trial_pod_without_failing_it(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.cluster.pod_refusal = 'pods "exp-0" is forbidden: exceeded quota: compute, requested: cpu=1'

    async def lift() -> None:
        await h.wait(lambda: len(h.cluster.of_kind("Trial")) == 1)
        await asyncio.sleep(0.5)
        h.cluster.pod_refusal = None

    async def go() -> None:
        lifting = asyncio.create_task(lift())
        await run_experiment(h, simple_spec(maxTrials=2, parallelism=1, maxFailedTrials=0))
        await lifting

    asyncio.run(go())
    assert phase(h) == "Succeeded"
    assert {t["status"]["phase"] for t in h.cluster.of_kind("Trial")} == {"Succeeded"}
    assert condition(h, "TrialPodsAdmitted")["status"] == "True"


def test_params_outside_the_search_space_never_reach_a_pod(tmp_path: Path) -> None:
    """A service that hands out lr=5.0 for lr in [1e-4, 1]: that trial fails, unlaunched."""
    h = Harness(tmp_path)

    async def go() -> None:
        controller = h.start_controller()
        asking = controller.service.ask

        async def corrupted(uid: str, count: int, parallelism: int) -> Any:
            answer = await asking(uid, count, parallelism)
            trials = [
                t.model_copy(update={"params": {"lr": 5.0}}) if t.number == 0 else t
                for t in answer.trials
            ]
            return answer.model_copy(update={"trials": trials})

        controller.service.ask = corrupted  # type: ignore[method-assign]
        h.cluster.apply_experiment("exp", simple_spec(maxTrials=3, parallelism=1))
        stop = asyncio.Event()
        async with h.client() as svc:
            task = asyncio.create_task(kubelet(h.cluster, svc, 2, stop))
            try:
                await h.wait(lambda: phase(h) in ("Succeeded", "Failed"))
            finally:
                stop.set()
                await task
                await h.kill_controller()

    asyncio.run(go())
    assert "exp-0" not in h.cluster.pods_ever
    trial = h.cluster.objects[("Trial", "ns", "exp-0")]
    assert trial["status"]["phase"] == "Failed"
    (failed,) = trial["status"]["conditions"]
    assert failed["reason"] == "InvalidParams"
    assert "lr: 5.0 is above its max 1.0" in failed["message"]
    # The others ran; one invalid configuration does not end the experiment.
    assert phase(h) == "Succeeded"
    assert sorted(h.cluster.pods_ever) == ["exp-1", "exp-2"]
    (event,) = [e for e in h.cluster.events if e["reason"] == "InvalidParams"]
    assert event["type"] == "Warning" and "lr: 5.0" in event["message"]
    # A trial that never tried a Pod says nothing about admission.
    assert condition(h, "TrialPodsAdmitted")["status"] == "True"
