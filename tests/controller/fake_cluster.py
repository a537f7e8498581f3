"""An in-memory stand-in for the API server and kubelet, for controller tests.

It implements :class:`kubetune_controller.kube_api.KubeApi`, the operator's
one interface to the API server, with the semantics the controller relies on
(create-if-absent, merge-patched status, deletion, LIST and WATCH of Trials
and Pods), and delivers Experiment events to the controller the way kopf
would. A small "kubelet" runs trial Pods by posting the metrics a synthetic
learning curve would report, with each Pod's own token, to the real service.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import math
from collections import Counter
from collections.abc import AsyncGenerator, Mapping
from datetime import UTC, datetime
from typing import Any

import httpx

from kubetune_controller.controller import Controller
from kubetune_controller.handlers import watch_streams
from kubetune_controller.kube_api import KubeError
from kubetune_controller.model import ExperimentResource

Obj = dict[str, Any]


# The collections the operator lists and watches, by their last path segment.
_KINDS = {"trials": "Trial", "pods": "Pod"}


def _merge(target: Obj, patch: Mapping[str, Any]) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


class FakeCluster:
    """Experiments, Trials and Pods in dicts; Experiment events go to ``controller``."""

    def __init__(self, create_delay: float = 0.0) -> None:
        # Seconds each Trial and Pod creation takes, so that creations overlap asks.
        self.create_delay = create_delay
        # Seconds each Trial status write takes: a finished trial's Trial
        # shows its end a moment after the service counted it done.
        self.status_delay = 0.0
        self.objects: dict[tuple[str, str, str], Obj] = {}
        self.controller: Controller | None = None
        self.pod_creates: Counter[str] = Counter()
        self.trial_creates: Counter[str] = Counter()
        self.events: list[Obj] = []
        self._uids = itertools.count(1)
        self._rv = itertools.count(1)
        # Pod names ever created, to check there was never a duplicate.
        self.pods_ever: list[str] = []
        # The most trial Pods ever live (not ended, not deleting) right after a creation.
        self.peak_live_pods = 0
        # Collections ("pods", "trials") whose LIST is refused, as RBAC would.
        self.forbidden: set[str] = set()
        # The message of a 403 every Pod create gets, as admission refuses one.
        self.pod_refusal: str | None = None
        # Open watches: the kind, namespace (None: all) and label each follows.
        self._watches: list[tuple[str, str | None, str, asyncio.Queue[Obj]]] = []

    # -- the KubeApi interface ----------------------------------------------------------

    async def create_trial(self, body: Obj) -> tuple[Obj, bool]:
        await asyncio.sleep(self.create_delay)
        self.trial_creates[body["metadata"]["name"]] += 1
        meta = body["metadata"]
        created = ("Trial", meta["namespace"], meta["name"]) not in self.objects
        # As the CRD's default does on the API server.
        return self._create("Trial", {**body, "status": {"phase": "Pending"}}), created

    async def create_pod(self, body: Obj) -> Obj:
        await asyncio.sleep(self.create_delay)
        if self.pod_refusal is not None:
            raise KubeError(403, "Forbidden", self.pod_refusal)
        self.pod_creates[body["metadata"]["name"]] += 1
        key = ("Pod", body["metadata"]["namespace"], body["metadata"]["name"])
        if key not in self.objects:
            self.pods_ever.append(body["metadata"]["name"])
        created = self._create("Pod", body)
        live = [
            p
            for p in self.of_kind("Pod")
            if not p["metadata"].get("deletionTimestamp")
            and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        ]
        self.peak_live_pods = max(self.peak_live_pods, len(live))
        return created

    async def create_secret(self, body: Obj) -> bool:
        meta = body["metadata"]
        if ("Secret", meta["namespace"], meta["name"]) in self.objects:
            return False
        self._create("Secret", body)
        return True

    async def get_pod(self, namespace: str, name: str) -> Obj | None:
        return copy.deepcopy(self.objects.get(("Pod", namespace, name)))

    async def delete_pod(self, namespace: str, name: str, grace_seconds: int) -> bool:
        pod = self.objects.get(("Pod", namespace, name))
        if pod is None:
            return False
        pod["metadata"]["deletionTimestamp"] = _stamp()
        self._notify("Pod", pod, False)
        del self.objects[("Pod", namespace, name)]
        self._notify("Pod", pod, True)
        return True

    async def pod_logs(self, namespace: str, name: str, container: str, lines: int) -> str | None:
        return "epoch 1\nepoch 2\ndone"

    async def patch_trial_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> Obj:
        await asyncio.sleep(self.status_delay)
        return self._patch_status("Trial", namespace, name, status)

    async def patch_experiment_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> Obj:
        return self._patch_status("Experiment", namespace, name, status)

    async def create_event(self, body: Obj) -> None:
        self.events.append(body)

    async def list_page(self, path: str, params: Mapping[str, str]) -> Obj:
        """Every matching object in one page (the fake never pages)."""
        kind, namespace = self._collection(path)
        label = params.get("labelSelector", "")
        items = [
            copy.deepcopy(o)
            for o in self.of_kind(kind)
            if _in_scope(o, namespace) and label in (o["metadata"].get("labels") or {})
        ]
        return {"items": items, "metadata": {"resourceVersion": str(next(self._rv))}}

    async def watch(
        self, path: str, params: Mapping[str, str], read_timeout: float
    ) -> AsyncGenerator[Obj, None]:
        """Every change from now on (the fake ignores the resourceVersion to start from)."""
        kind, namespace = self._collection(path)
        queue: asyncio.Queue[Obj] = asyncio.Queue()
        watch = (kind, namespace, params.get("labelSelector", ""), queue)
        self._watches.append(watch)
        try:
            while True:
                yield await queue.get()
        finally:
            self._watches.remove(watch)

    async def close(self) -> None:
        return None

    # -- test helpers --------------------------------------------------------------------

    def apply_experiment(self, name: str, spec: Obj, namespace: str = "ns") -> Obj:
        key = ("Experiment", namespace, name)
        if key in self.objects:
            obj = self.objects[key]
            obj["spec"] = copy.deepcopy(spec)
            obj["metadata"]["generation"] += 1
            self._notify("Experiment", obj, False)
            return obj
        body = {"metadata": {"name": name, "namespace": namespace, "generation": 1}, "spec": spec}
        return self._create("Experiment", body)

    def of_kind(self, kind: str) -> list[Obj]:
        return [o for (k, _, _), o in self.objects.items() if k == kind]

    def attach(self, controller: Controller) -> None:
        """Feed ``controller`` as the operator's startup does (in its event loop).

        Kopf's listing and events of Experiments are delivered directly; the
        Trials and Pods come from the operator's own streams, listing and
        watching this cluster.
        """
        self.controller = controller
        for obj in self.of_kind("Experiment"):
            self._notify("Experiment", obj, False)
        for stream in watch_streams(self, controller, []):
            controller.adopt(stream.run(), f"watch {stream.path}", stream.synced, stream.failing)

    def mounted_token(self, pod: Obj) -> str:
        """The token a Pod's collector reads: its Secret volume's, as the kubelet mounts it.

        Raises:
            KeyError: If the Pod has no such volume, or its Secret does not exist.
        """
        (volume,) = [v for v in pod["spec"]["volumes"] if "secret" in v]
        name = volume["secret"]["secretName"]
        secret = self.objects[("Secret", pod["metadata"]["namespace"], name)]
        (item,) = volume["secret"]["items"]
        return str(secret["stringData"][item["key"]])

    def set_pod_phase(self, pod: Obj, phase: str, exit_code: int | None = None) -> None:
        status = pod.setdefault("status", {})
        status["phase"] = phase
        if phase == "Running":
            status["startTime"] = _stamp()
        if exit_code is not None:
            status["containerStatuses"] = [
                {"name": "train", "state": {"terminated": {"exitCode": exit_code}}}
            ]
        self._notify("Pod", pod, False)

    # -- plumbing ------------------------------------------------------------------------

    def _create(self, kind: str, body: Obj) -> Obj:
        meta = body["metadata"]
        key = (kind, meta["namespace"], meta["name"])
        if key in self.objects:
            return copy.deepcopy(self.objects[key])
        obj = copy.deepcopy(body)
        obj["metadata"]["uid"] = f"{kind.lower()}-{next(self._uids)}"
        obj["metadata"]["creationTimestamp"] = _stamp()
        obj["metadata"]["resourceVersion"] = str(next(self._rv))
        self.objects[key] = obj
        self._notify(kind, obj, False, added=True)
        return copy.deepcopy(obj)

    def _patch_status(self, kind: str, namespace: str, name: str, status: Mapping[str, Any]) -> Obj:
        obj = self.objects.get((kind, namespace, name))
        if obj is None:
            raise KubeError(404, "NotFound", f"{kind} {name} not found")
        _merge(obj.setdefault("status", {}), status)
        self._notify(kind, obj, False)
        return copy.deepcopy(obj)

    def _collection(self, path: str) -> tuple[str, str | None]:
        """The kind and namespace (None: all) of a collection's path; refused if forbidden."""
        parts = path.strip("/").split("/")
        plural = parts[-1]
        if plural in self.forbidden:
            raise KubeError(
                403, "Forbidden", f'{plural} is forbidden: cannot list resource "{plural}"'
            )
        namespace = parts[parts.index("namespaces") + 1] if "namespaces" in parts else None
        return _KINDS[plural], namespace

    def _notify(self, kind: str, obj: Obj, deleted: bool, added: bool = False) -> None:
        # Every change gets a new resource version, as the API server does.
        obj["metadata"]["resourceVersion"] = str(next(self._rv))
        change = "DELETED" if deleted else "ADDED" if added else "MODIFIED"
        for watched, namespace, label, queue in self._watches:
            labels = obj["metadata"].get("labels") or {}
            if watched == kind and _in_scope(obj, namespace) and label in labels:
                queue.put_nowait({"type": change, "object": copy.deepcopy(obj)})
        if kind == "Experiment" and self.controller is not None:
            resource = ExperimentResource.from_body(copy.deepcopy(obj))
            self.controller.on_experiment(resource, deleted)


def _in_scope(obj: Obj, namespace: str | None) -> bool:
    return namespace is None or obj["metadata"].get("namespace") == namespace


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def curve(params: Obj, step: int) -> float:
    """A deterministic learning curve: lower lr distance from 1e-2 is better."""
    quality = abs(math.log10(float(params.get("lr", 0.01))) + 2)
    return 0.05 + quality / 3 + 1.0 / (step + 1)


async def kubelet(
    cluster: FakeCluster, service: httpx.AsyncClient, steps: int, stop: asyncio.Event
) -> None:
    """Run each trial Pod: Pending -> Running -> report ``steps`` steps -> Succeeded."""
    while not stop.is_set():
        for pod in list(cluster.of_kind("Pod")):
            if pod["metadata"].get("deletionTimestamp"):
                continue
            phase = (pod.get("status") or {}).get("phase")
            if phase is None:
                cluster.set_pod_phase(pod, "Running")
                continue
            if phase != "Running":
                continue
            env = {e["name"]: e["value"] for e in pod["spec"]["initContainers"][0]["env"]}
            uid, number = env["KUBETUNE_EXPERIMENT_UID"], env["KUBETUNE_TRIAL_NUMBER"]
            token = cluster.mounted_token(pod)
            params = _params(cluster, pod)
            progress = pod.setdefault("_step", 0)
            stopped = False
            if progress < steps:
                resp = await service.post(
                    f"/v1/experiments/{uid}/trials/{number}/observations",
                    json={
                        "step": progress + 1,
                        "metrics": {"val_loss": curve(params, progress + 1)},
                    },
                    headers={"Authorization": f"Bearer {token}"},
                )
                if resp.status_code == 404:
                    # A service that lost its database: the collector retries
                    # and sends what it had delivered again, from the start.
                    pod["_step"] = 0
                    continue
                pod["_step"] = progress + 1
                stopped = resp.status_code == 200 and resp.json().get("stop", False)
            if not stopped and pod["_step"] >= steps:
                cluster.set_pod_phase(pod, "Succeeded", exit_code=0)
        await asyncio.sleep(0.01)


def _params(cluster: FakeCluster, pod: Obj) -> Obj:
    # By label: a retried trial's Pod is named apart from its Trial.
    name = pod["metadata"]["labels"]["kubetune.io/trial"]
    trial = cluster.objects.get(("Trial", pod["metadata"]["namespace"], name))
    return dict((trial or {}).get("spec", {}).get("params", {}))
