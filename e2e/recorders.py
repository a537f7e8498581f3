"""What happens while an experiment runs, recorded as it happens, for tests to check after.

Each recorder is a context manager with a background thread: :class:`PodWatch`
keeps every trial Pod event, :class:`TaskExits` containerd's exit times of
the containers, :class:`StopRecorder` when the service first showed each
stop order.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from e2e.cluster import Cluster
from e2e.helpers import Kube, Obj
from e2e.kube import Api, ApiError

if TYPE_CHECKING:
    from e2e.host_stack import HostStack
    from e2e.operator_helpers import ChartStack


class PodWatch:
    """Records every trial Pod event of a namespace with its arrival time.

    Runs a watch in a thread so tests can check what happened between polls:
    how many Pods ran at once, whether a Pod name was ever created twice, and
    when each Pod disappeared.
    """

    def __init__(self, kube: Kube, namespace: str) -> None:
        self.api = Api.from_kubeconfig(kube.kubeconfig)
        self.namespace = namespace
        self.events: list[tuple[float, str, Obj]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PodWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def _run(self) -> None:
        path = f"/api/v1/namespaces/{self.namespace}/pods"
        rv = self.api.get(path)["metadata"]["resourceVersion"]
        while not self._stop.is_set():
            try:
                for event in self.api.watch(
                    path, rv, timeout_seconds=30, labelSelector="kubetune.io/experiment"
                ):
                    obj = event["object"]
                    rv = obj["metadata"].get("resourceVersion", rv)
                    if event["type"] != "BOOKMARK":
                        self.events.append((time.time(), event["type"], obj))
                    if self._stop.is_set():
                        return
            except ApiError:
                rv = self.api.get(path)["metadata"]["resourceVersion"]

    def added(self) -> list[str]:
        """Pod names in the order they were created (a name twice = a duplicate)."""
        return [o["metadata"]["name"] for _, t, o in self.events if t == "ADDED"]

    def deleted_at(self) -> dict[str, float]:
        """When each Pod disappeared."""
        return {o["metadata"]["name"]: ts for ts, t, o in self.events if t == "DELETED"}

    def stopped_at(self, container: str) -> dict[str, float]:
        """When each Pod's ``container`` was first seen terminated (or the Pod gone)."""
        seen: dict[str, float] = {}
        for ts, kind, obj in self.events:
            name = obj["metadata"]["name"]
            statuses = (obj.get("status") or {}).get("containerStatuses") or []
            ended = any(
                c["name"] == container and "terminated" in (c.get("state") or {}) for c in statuses
            )
            if name not in seen and (ended or kind == "DELETED"):
                seen[name] = ts
        return seen

    def container_ids(self, container: str) -> dict[str, str]:
        """The runtime's ID of each Pod's ``container`` (``containerd://`` and the like cut)."""
        ids: dict[str, str] = {}
        for _, _, obj in self.events:
            for c in (obj.get("status") or {}).get("containerStatuses") or []:
                if c["name"] == container and c.get("containerID"):
                    ids[obj["metadata"]["name"]] = c["containerID"].split("://", 1)[-1]
        return ids

    def max_concurrent(self, resource: str | None = None) -> int:
        """Most Pods (requesting ``resource``, if given) in phase Running at one time."""
        running: set[str] = set()
        peak = 0
        for _, kind, obj in self.events:
            name = obj["metadata"]["name"]
            if resource and not _requests(obj, resource):
                continue
            if kind != "DELETED" and (obj.get("status") or {}).get("phase") == "Running":
                running.add(name)
            else:
                running.discard(name)
            peak = max(peak, len(running))
        return peak


def _requests(pod: Obj, resource: str) -> int:
    total = 0
    for c in pod["spec"].get("containers", []):
        res = c.get("resources") or {}
        total += int(
            (res.get("limits") or {}).get(resource, 0)
            or (res.get("requests") or {}).get(resource, 0)
        )
    return total


class TaskExits:
    """When each container's process exited, as containerd reports it (``ctr events``).

    The kubelet reports a container's end only at its next relist (every
    second), so a Pod's status says late when the process stopped; containerd's
    exit event carries the exit time itself, to the nanosecond, on this
    machine's clock. Only for the local cluster, whose containerd is ours.
    """

    def __init__(self, ctr: Path, socket: Path) -> None:
        self.exited: dict[str, float] = {}
        self._proc = subprocess.Popen(
            [str(ctr), "--address", str(socket), "events"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TaskExits:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._proc.terminate()
        self._proc.wait(10)
        self._thread.join(10)

    def _run(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            # "<date> <time> +0000 UTC <namespace> /tasks/exit {json}"
            _, _, payload = line.partition(" /tasks/exit ")
            if not payload:
                continue
            event = json.loads(payload)
            at = event["exited_at"]
            # The container's own process (its id is the container's); exec'd
            # processes exit with ids of their own.
            if event["id"] == event["container_id"]:
                self.exited[event["container_id"]] = at["seconds"] + at.get("nanos", 0) / 1e9


def task_exits(kube: Kube) -> contextlib.AbstractContextManager[TaskExits | None]:
    """The local node's containerd exit events (``None`` on other clusters)."""
    if not kube.local or kube.bin_dir is None:
        return contextlib.nullcontext()
    return TaskExits(kube.bin_dir / "ctr", Cluster().node().containerd_socket)


class StopRecorder:
    """Polls the service's open stop orders and notes when each first appeared."""

    def __init__(self, stack: HostStack | ChartStack, uid: str) -> None:
        self.stack = stack
        self.uid = uid
        self.first_seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StopRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def _run(self) -> None:
        with httpx.Client(
            base_url=self.stack.service_url, timeout=10, headers=self.stack.service_headers
        ) as client:
            while not self._stop.is_set():
                try:
                    resp = client.get(f"/v1/experiments/{self.uid}/stops")
                    now = time.time()
                    if resp.status_code == 200:
                        for order in resp.json():
                            self.first_seen.setdefault(int(order["number"]), now)
                except httpx.HTTPError:
                    pass
                time.sleep(0.02)
