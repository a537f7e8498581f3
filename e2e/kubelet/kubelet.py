"""The process kubelet: one Node, its Lease, and a worker per bound pod.

It authenticates with the node's client certificate
(``CN=system:node:<name>, O=system:nodes``), so the Node authorizer and the
NodeRestriction admission plugin constrain it exactly as they constrain a
real kubelet: it sees only pods bound to it (``spec.nodeName`` field
selector), and only the secrets, configMaps and tokens those pods reference.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from e2e.kube import Api, ApiError
from e2e.kubelet.logic import GPU_RESOURCE, GpuAllocator
from e2e.kubelet.pod import PodWorker
from e2e.kubelet.volumes import VolumeManager

Obj = dict[str, Any]

LEASE_SECONDS = 40
LEASE_RENEW_SECONDS = 10  # the kubelet renews at a quarter of the duration
STATUS_SECONDS = 30


def detect_node_ip() -> str:
    """The host's first global IPv4 address (``KUBETUNE_E2E_NODE_IP`` overrides).

    Pods run on the host network, so their IP is the node's. A non-loopback
    address is preferred because the API rejects loopback addresses in
    Endpoints/EndpointSlices; without one, 127.0.0.1 is used and Services
    get no endpoints (the proxy then cannot forward).
    """
    override = os.environ.get("KUBETUNE_E2E_NODE_IP")
    if override:
        return override
    try:
        out = subprocess.run(
            ["ip", "-4", "-o", "addr", "show", "scope", "global"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    except OSError:
        out = ""
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            return parts[parts.index("inet") + 1].split("/")[0]
    # Without iproute2: the source address the kernel would use for the
    # default route (a UDP connect sends nothing).
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))
        addr: str = s.getsockname()[0]
        if not addr.startswith("127."):
            return addr
    return "127.0.0.1"


def micro_time() -> str:
    """Now as a ``MicroTime`` (what Lease ``renewTime`` requires)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now_rfc3339() -> str:
    """Now in RFC 3339 with second precision."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Kubelet:
    """A process kubelet for one node.

    Args:
        api: API client with the node's credentials.
        node_name: Node name (must match the certificate's CN).
        root: Directory for pod data and logs.
        gpus: Fake ``nvidia.com/gpu`` devices.
        cpu: CPU capacity.
        memory: Memory capacity.
        max_pods: Pod capacity.
        port: HTTPS port serving container logs.
        node_ip: Address reported for the node and its pods.
        backoff_base: First crash-loop back-off in seconds.
    """

    def __init__(
        self,
        api: Api,
        node_name: str,
        root: Path,
        gpus: int,
        cpu: str,
        memory: str,
        max_pods: int,
        port: int,
        node_ip: str | None = None,
        backoff_base: float = 10.0,
    ) -> None:
        self.api = api
        self.node_name = node_name
        self.root = root
        self.port = port
        self.node_ip = node_ip or detect_node_ip()
        self.backoff_base = backoff_base
        self.capacity = {
            "cpu": cpu,
            "memory": memory,
            "pods": str(max_pods),
            "ephemeral-storage": "100Gi",
            GPU_RESOURCE: str(gpus),
        }
        self.allocatable = dict(self.capacity)
        self.gpus = GpuAllocator(gpus)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.workers: dict[str, PodWorker] = {}
        self.finished_uids: set[str] = set()
        self.volumes = VolumeManager(api, self.allocatable)
        self.services: dict[tuple[str, str], Obj] = {}
        self.services_version = 0
        url = urlparse(api.server)
        self.api_host = url.hostname or "127.0.0.1"
        self.api_port = url.port or 443
        self.shim_dir = root / "bin"
        self.started = now_rfc3339()

    def log(self, msg: str) -> None:
        """Log a line to stderr (the process log file)."""
        ts = dt.datetime.now(dt.UTC).strftime("%H:%M:%S.%f")[:-3]
        print(f"{ts} kubelet[{self.node_name}] {msg}", file=sys.stderr, flush=True)

    def event(self, pod: Obj, etype: str, reason: str, message: str) -> None:
        """Record a core/v1 Event about a pod (``kubectl describe`` shows it).

        Failures are ignored: events are best effort, as in the kubelet.
        """
        meta = pod["metadata"]
        now = now_rfc3339()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "generateName": f"{meta['name']}.",
                "namespace": meta["namespace"],
            },
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": etype,
            "reason": reason,
            "message": message,
            "source": {"component": "kubelet", "host": self.node_name},
            "reportingComponent": "kubelet",
            "reportingInstance": self.node_name,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.api.create(f"/api/v1/namespaces/{meta['namespace']}/events", body)
        except (ApiError, httpx.HTTPError) as exc:
            self.log(f"event {reason} not recorded: {exc}")

    def record_mountpoints(self, paths: list[Path]) -> None:
        """Remember host paths created as mount points, for ``down`` to remove."""
        if not paths:
            return
        with self.lock, (self.root / "created-mountpoints").open("a") as f:
            f.writelines(f"{p}\n" for p in paths)

    # --- environment -------------------------------------------------------------
    def write_shims(self) -> None:
        """Make ``python``/``python3`` in containers resolve to this interpreter.

        A shell script (not a symlink) so a virtual environment's interpreter
        still finds its ``pyvenv.cfg``.
        """
        self.shim_dir.mkdir(parents=True, exist_ok=True)
        for name in ("python", "python3"):
            shim = self.shim_dir / name
            shim.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
            shim.chmod(0o755)

    def base_env(self, pod: Obj) -> dict[str, str]:
        """Variables every container gets before its own ``env``."""
        path = os.pathsep.join(
            [
                str(self.shim_dir),
                str(Path(sys.executable).parent),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            ]
        )
        env = {
            "PATH": path,
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "HOSTNAME": pod["spec"].get("hostname") or pod["metadata"]["name"],
            "KUBERNETES_SERVICE_HOST": self.api_host,
            "KUBERNETES_SERVICE_PORT": str(self.api_port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(self.api_port),
            "KUBERNETES_PORT": f"tcp://{self.api_host}:{self.api_port}",
        }
        # The project's packages: pods run with the same Python environment.
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        if pod["spec"].get("enableServiceLinks", True):
            env.update(self._service_links(pod["metadata"]["namespace"]))
        return env

    def _service_links(self, namespace: str) -> dict[str, str]:
        # Docker-links style variables for the namespace's Services; the host
        # is 127.0.0.1 because ClusterIPs are not routable here (see proxy.py).
        env: dict[str, str] = {}
        with self.lock:
            services = [s for (ns, _), s in self.services.items() if ns == namespace]
        for svc in services:
            spec = svc.get("spec", {})
            if spec.get("clusterIP") in (None, "", "None") or not spec.get("ports"):
                continue
            prefix = svc["metadata"]["name"].upper().replace("-", "_")
            env[f"{prefix}_SERVICE_HOST"] = "127.0.0.1"
            env[f"{prefix}_SERVICE_PORT"] = str(spec["ports"][0]["port"])
            for p in spec["ports"]:
                if p.get("name"):
                    env[f"{prefix}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}"] = str(
                        p["port"]
                    )
        return env

    def hosts_file(self, pod: Obj) -> tuple[int, str]:
        """The pod's ``/etc/hosts``: itself, and every Service name -> 127.0.0.1."""
        ns = pod["metadata"]["namespace"]
        hostname = pod["spec"].get("hostname") or pod["metadata"]["name"]
        lines = [
            "# Kubernetes-managed hosts file (process kubelet).",
            "127.0.0.1\tlocalhost",
            "::1\tlocalhost ip6-localhost ip6-loopback",
            f"{self.node_ip}\t{hostname}",
        ]
        lines += [
            f"# Entries added by HostAliases.\n{a['ip']}\t{' '.join(a.get('hostnames', []))}"
            for a in pod["spec"].get("hostAliases", []) or []
        ]
        with self.lock:
            version = self.services_version
            keys = sorted(self.services)
        for svc_ns, name in keys:
            names = [
                f"{name}.{svc_ns}",
                f"{name}.{svc_ns}.svc",
                f"{name}.{svc_ns}.svc.cluster.local",
            ]
            if svc_ns == ns:
                names.insert(0, name)
            lines.append("127.0.0.1\t" + " ".join(names))
        return version, "\n".join(lines) + "\n"

    # --- node ----------------------------------------------------------------------
    def node_status(self) -> Obj:
        """The node status: capacity, conditions, addresses, kubelet endpoint."""
        now = now_rfc3339()

        def cond(ctype: str, status: str, reason: str, message: str) -> Obj:
            return {
                "type": ctype,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": now,
                "lastTransitionTime": self.started,
            }

        return {
            "capacity": self.capacity,
            "allocatable": self.allocatable,
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "ok"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "ok"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "ok"),
                cond("Ready", "True", "KubeletReady", "process kubelet is posting ready status"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": self.node_ip},
                {"type": "Hostname", "address": self.node_name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.port}},
            "nodeInfo": {
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
                "kernelVersion": platform.release(),
                "osImage": "kubetune e2e process kubelet",
                "containerRuntimeVersion": "process://local",
                "kubeletVersion": os.environ.get("KUBETUNE_E2E_K8S_VERSION", "v1.36.3"),
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }

    def register(self) -> None:
        """Create the Node (or refresh it after a restart)."""
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node_name,
                "labels": {
                    "kubernetes.io/hostname": self.node_name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "node.kubernetes.io/instance-type": "process-kubelet",
                    "kubetune.io/e2e-node": "process-kubelet",
                },
            },
            # New nodes start tainted not-ready, like the kubelet registers
            # them; the node-lifecycle controller lifts it once Ready.
            "spec": {"taints": [{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}]},
            "status": self.node_status(),
        }
        try:
            self.api.create("/api/v1/nodes", node)
            self.log(f"registered node (ip {self.node_ip}, port {self.port}, {self.capacity})")
        except ApiError as exc:
            if exc.status != 409:
                raise
            self.api.strategic_patch(
                f"/api/v1/nodes/{self.node_name}/status", {"status": self.node_status()}
            )
            self.log("node existed; status refreshed")

    def heartbeat_loop(self) -> None:
        """Renew the node Lease every 10 s and post status every 30 s."""
        lease_path = (
            f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node_name}"
        )
        last_status = time.monotonic()
        while not self.stopping.is_set():
            try:
                self._renew_lease(lease_path)
                if time.monotonic() - last_status >= STATUS_SECONDS:
                    self.api.strategic_patch(
                        f"/api/v1/nodes/{self.node_name}/status", {"status": self.node_status()}
                    )
                    last_status = time.monotonic()
            except (ApiError, httpx.HTTPError) as exc:
                self.log(f"heartbeat failed: {exc}")
            self.stopping.wait(LEASE_RENEW_SECONDS)

    def _renew_lease(self, path: str) -> None:
        try:
            lease = self.api.get(path)
        except ApiError as exc:
            if exc.status != 404:
                raise
            node = self.api.get(f"/api/v1/nodes/{self.node_name}")
            self.api.create(
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {
                        "name": self.node_name,
                        "namespace": "kube-node-lease",
                        "ownerReferences": [
                            {
                                "apiVersion": "v1",
                                "kind": "Node",
                                "name": self.node_name,
                                "uid": node["metadata"]["uid"],
                            }
                        ],
                    },
                    "spec": {
                        "holderIdentity": self.node_name,
                        "leaseDurationSeconds": LEASE_SECONDS,
                        "renewTime": micro_time(),
                    },
                },
            )
            return
        lease["spec"]["renewTime"] = micro_time()
        lease["spec"]["holderIdentity"] = self.node_name
        self.api.put(path, lease)

    # --- pods ------------------------------------------------------------------------
    def forget(self, worker: PodWorker, finished: bool = True) -> None:
        """Drop a finished worker from the table.

        Its UID is remembered: watch events still in flight for a pod we
        already removed must not start a new worker for it.
        """
        with self.lock:
            if self.workers.get(worker.uid) is worker:
                del self.workers[worker.uid]
            if finished and not self.stopping.is_set():
                self.finished_uids.add(worker.uid)

    def _handle(self, etype: str, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        with self.lock:
            worker = self.workers.get(uid)
        if etype == "DELETED":
            if worker:
                worker.gone()
            with self.lock:
                self.finished_uids.discard(uid)
            return
        if uid in self.finished_uids:
            return
        if worker is None:
            # A pod already being deleted still gets a worker: it finishes the
            # deletion (status, then delete with grace 0) on the node's behalf.
            worker = PodWorker(self, pod)
            with self.lock:
                self.workers[uid] = worker
            worker.start()
        else:
            worker.update(pod)

    def pod_loop(self) -> None:
        """List+watch this node's pods forever, re-listing after any error."""
        path = "/api/v1/pods"
        selector = f"spec.nodeName={self.node_name}"
        while not self.stopping.is_set():
            try:
                lst = self.api.get(path, fieldSelector=selector)
                seen = set()
                for pod in lst["items"]:
                    seen.add(pod["metadata"]["uid"])
                    self._handle("MODIFIED", pod)
                with self.lock:
                    stale = [w for uid, w in self.workers.items() if uid not in seen]
                for w in stale:
                    w.gone()
                rv = lst["metadata"]["resourceVersion"]
                for event in self.api.watch(path, rv, fieldSelector=selector):
                    if self.stopping.is_set():
                        return
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self._handle(event["type"], event["object"])
                    elif event["type"] == "ERROR":
                        break
            except (ApiError, httpx.HTTPError, KeyError, ValueError) as exc:
                self.log(f"pod watch restarting: {exc}")
                self.stopping.wait(1.0)
            except Exception:
                self.log(f"pod watch crashed, restarting:\n{traceback.format_exc()}")
                self.stopping.wait(1.0)

    def service_loop(self) -> None:
        """Keep the Service set for hosts files and service-link variables."""
        path = "/api/v1/services"
        while not self.stopping.is_set():
            try:
                lst = self.api.get(path)
                with self.lock:
                    self.services = {
                        (s["metadata"]["namespace"], s["metadata"]["name"]): s for s in lst["items"]
                    }
                    self.services_version += 1
                self._wake_workers()
                for event in self.api.watch(path, lst["metadata"]["resourceVersion"]):
                    if self.stopping.is_set():
                        return
                    obj = event["object"]
                    if event["type"] == "ERROR":
                        break
                    if event["type"] == "BOOKMARK":
                        continue
                    key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
                    with self.lock:
                        if event["type"] == "DELETED":
                            self.services.pop(key, None)
                        else:
                            self.services[key] = obj
                        self.services_version += 1
                    self._wake_workers()
            except (ApiError, httpx.HTTPError, KeyError, ValueError) as exc:
                self.log(f"service watch restarting: {exc}")
                self.stopping.wait(1.0)

    def _wake_workers(self) -> None:
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            w.wake.set()

    def find_worker(self, namespace: str, name: str) -> PodWorker | None:
        """The worker of a pod by namespace and name (for the log server)."""
        with self.lock:
            for w in self.workers.values():
                if w.namespace == namespace and w.pod_name == name:
                    return w
        return None

    # --- run -----------------------------------------------------------------------------
    def run(self) -> None:
        """Register, then serve until ``stop`` (blocks)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.write_shims()
        self.register()
        threads = [
            threading.Thread(target=self.heartbeat_loop, name="heartbeat", daemon=True),
            threading.Thread(target=self.service_loop, name="services", daemon=True),
            threading.Thread(target=self.pod_loop, name="pods", daemon=True),
        ]
        for t in threads:
            t.start()
        self.stopping.wait()

    def stop(self) -> None:
        """Stop every pod's processes (the node goes away) and return."""
        self.stopping.set()
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            w.wake.set()
        for w in workers:
            w.join(timeout=10)
