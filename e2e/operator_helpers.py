"""Helpers of the operator's e2e tests: the kubetune stack and experiment manifests.

Two ways to run kubetune, chosen by ``KUBETUNE_E2E_STACK``:

- ``chart`` (:class:`ChartStack`, the default): ``helm install`` of
  ``charts/kubetune`` with the images ``scripts/images.sh`` built; the
  operator and the service run as the chart's Deployments, with its
  ServiceAccounts and RBAC. The user's path.
- ``host`` (:class:`HostStack`): the service and the operator as processes on
  this machine; the operator authenticates as the chart's ServiceAccount (its
  RBAC applied from the chart, a bearer token). The service listens on the
  host's loopback, which trial Pods in their own network namespaces cannot
  reach: it serves the operator benchmark on kwok's fake nodes, where no
  trial runs.

Both serve the same interface to the tests: ``service_url``, ``metrics()``,
``kill_operator()`` / ``start_operator()``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from e2e.cluster import Cluster
from e2e.helpers import TRIAL_IMAGE, Kube, Obj, wait_for
from e2e.kube import Api, ApiError

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free TCP port on loopback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_helm(kube: Kube, *args: str, timeout: float = 300) -> str:
    """Run the pinned helm (else one on PATH) against the cluster; its stdout."""
    local = kube.bin_dir / "helm" if kube.bin_dir else None
    binary = str(local) if local and local.exists() else shutil.which("helm")
    if binary is None:
        raise FileNotFoundError("helm not found: run e2e/cluster/build.sh")
    proc = subprocess.run(
        [binary, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=kube.env(),
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"helm {' '.join(args)}: {proc.stderr}")
    return proc.stdout


# Where the host-mode operator's ServiceAccount lives.
HOST_OPERATOR_NAMESPACE = "kubetune-host"
# The admission policy and its binding, as crds/ and the chart name them.
POLICY_NAME = "experiments.kubetune.io"


def operator_kubeconfig(kube: Kube, path: Path) -> Path:
    """A kubeconfig for the host-mode operator: the chart's ServiceAccount and RBAC.

    The operator then runs with exactly the permissions ``helm install``
    gives it (a missing rule fails the host-mode tests too), and with a
    bearer token, as in a cluster, rather than the admin's client certificate.
    """
    rendered = run_helm(
        kube,
        "template",
        # Not the chart-mode release's name: its cluster-scoped RBAC objects
        # would then block a later `helm install` on the same cluster.
        "host",
        str(REPO / "charts" / "kubetune"),
        "--namespace",
        HOST_OPERATOR_NAMESPACE,
        # Offline rendering assumes an old Kubernetes: the chart's kubeVersion
        # check would refuse it.
        "--kube-version",
        "1.36.3",
        "--show-only",
        "templates/operator-serviceaccount.yaml",
        "--show-only",
        "templates/operator-rbac.yaml",
    )
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    account = next(d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount")
    kube.apply(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": HOST_OPERATOR_NAMESPACE}}
    )
    kube.apply(*docs, namespace=HOST_OPERATOR_NAMESPACE)
    token = kube.kubectl(
        "create", "token", account, "-n", HOST_OPERATOR_NAMESPACE, "--duration=24h"
    ).strip()
    admin = yaml.safe_load(Path(kube.kubeconfig).read_text())
    context = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])
    cluster = next(c for c in admin["clusters"] if c["name"] == context["context"]["cluster"])
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": cluster["cluster"]}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": account, "context": {"cluster": "e2e", "user": account}}],
        "current-context": account,
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


@dataclass
class HostStack:
    """The service and the operator as host processes.

    Attributes:
        kube: The cluster.
        workdir: Where the database and the logs go.
    """

    kube: Kube
    workdir: Path
    service_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    health_port: int = field(default_factory=free_port)
    # The service's database (SQLite in ``workdir`` when empty) and processes.
    db_url: str = ""
    service_workers: int = 1
    service: subprocess.Popen[bytes] | None = None
    operator: subprocess.Popen[bytes] | None = None
    operator_starts: int = 0
    # The operator's kubeconfig (its ServiceAccount's token), made at start.
    operator_config: Path | None = None

    @property
    def service_url(self) -> str:
        """The service's address (also the one trial sidecars use)."""
        return f"http://127.0.0.1:{self.service_port}"

    @property
    def metrics_url(self) -> str:
        """The operator's /metrics."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self) -> None:
        """Apply the CRDs, then start the service and the operator."""
        # KUBETUNE_E2E_CRDS: apply CRDs from another directory (while iterating
        # on the CRDs themselves); the default is the repository's crds/.
        crds = os.environ.get("KUBETUNE_E2E_CRDS") or str(REPO / "crds")
        self.kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", crds)
        for crd in ("experiments.kubetune.io", "trials.kubetune.io"):
            self.kube.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_service()
            self.operator_config = operator_kubeconfig(
                self.kube, self.workdir / "operator.kubeconfig"
            )
            self.start_operator()
        except BaseException:
            # A half-started stack must not outlive the failure (a leaked
            # service kept its port and database for the rest of the session).
            self.stop()
            raise

    def _start_service(self) -> None:
        log = (self.workdir / "service.log").open("ab")
        # The trial-token key is fixed, as the chart's Secret keeps it: a
        # service that loses its database still takes running trials' reports.
        env = {**os.environ, "KUBETUNE_SECRET": "e2e-host-stack"}
        self.service = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kubetune_suggestion.service",
                "--db",
                self.db_url or f"sqlite:///{self.workdir}/kubetune.db",
                "--workers",
                str(self.service_workers),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.service_port),
                "--log-level",
                "warning",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )
        wait_for(self._service_ready, 60, "the suggestion service /readyz", interval=0.2)

    def lose_service_database(self) -> None:
        """SIGKILL the service, delete its SQLite database, and start it afresh."""
        if self.db_url:
            raise RuntimeError("the host stack loses only its own SQLite database")
        assert self.service is not None
        self.service.send_signal(signal.SIGKILL)
        self.service.wait(10)
        for path in self.workdir.glob("kubetune.db*"):
            path.unlink()
        self._start_service()

    def _service_ready(self) -> bool:
        assert self.service is not None
        if self.service.poll() is not None:
            raise RuntimeError(f"the service exited; see {self.workdir / 'service.log'}")
        try:
            return httpx.get(f"{self.service_url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def start_operator(self) -> None:
        """Start (or restart) the operator process."""
        config = str(self.operator_config or self.kube.kubeconfig)
        env = dict(os.environ)
        env.update(
            KUBETUNE_SERVICE_URL=self.service_url,
            KUBETUNE_COLLECTOR_IMAGE="kubetune:e2e",
            KUBECONFIG=config,
            PYTHONUNBUFFERED="1",
        )
        log = (self.workdir / "operator.log").open("ab")
        self.operator = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kubetune_controller",
                "--all-namespaces",
                "--kubeconfig",
                config,
                "--metrics-port",
                str(self.metrics_port),
                "--health-port",
                str(self.health_port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )
        self.operator_starts += 1
        wait_for(self._operator_ready, 60, "the operator's /healthz", interval=0.2)

    def _operator_ready(self) -> bool:
        assert self.operator is not None
        if self.operator.poll() is not None:
            raise RuntimeError(f"the operator exited; see {self.workdir / 'operator.log'}")
        try:
            url = f"http://127.0.0.1:{self.health_port}/healthz"
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill_operator(self) -> None:
        """SIGKILL the operator: no cleanup, as a crash or an OOM kill."""
        assert self.operator is not None
        self.operator.send_signal(signal.SIGKILL)
        self.operator.wait(10)

    def stop(self) -> None:
        """Stop both processes."""
        for proc in (self.operator, self.service):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The operator's samples: (name, sorted labels) -> value."""
        return _samples(httpx.get(self.metrics_url, timeout=5).text)

    def service_get(self, path: str, **params: Any) -> Any:
        """GET from the service's API."""
        resp = httpx.get(f"{self.service_url}{path}", params=params, timeout=10)
        resp.raise_for_status()
        return resp.json()


@dataclass
class ChartStack:
    """kubetune installed with its Helm chart (operator and service as Pods).

    The tests reach the service and the operator's /metrics through their
    Services' cluster IPs, which kube-proxy routes on every node (this
    machine is the local cluster's node).

    Attributes:
        kube: The cluster.
        workdir: Where helm's output goes.
    """

    kube: Kube
    workdir: Path
    release: str = "kt"
    namespace: str = "kubetune-system"
    operator_starts: int = 0

    def _service_address(self, name: str) -> str:
        svc = self.kube.get("service", "-n", self.namespace, name)
        return f"{svc['spec']['clusterIP']}:{svc['spec']['ports'][0]['port']}"

    @property
    def service_url(self) -> str:
        """The suggestion service, through its Service."""
        return f"http://{self._service_address(f'{self.release}-kubetune-suggestion')}"

    @property
    def metrics_url(self) -> str:
        """The operator's /metrics, through its Service."""
        return (
            f"http://{self._service_address(f'{self.release}-kubetune-operator-metrics')}/metrics"
        )

    def helm(self, *args: str, timeout: float = 300) -> str:
        """Run helm against the cluster."""
        return run_helm(self.kube, *args, timeout=timeout)

    def _drop_unmanaged_policy(self) -> None:
        """Delete the admission policy if ``crds/`` put it there (a host-mode run did).

        Helm refuses to install over a cluster-wide object it does not own;
        the chart installs the same policy again (charts/kubetune/README.md).
        """
        policy = self.kube.try_get("validatingadmissionpolicy", POLICY_NAME)
        notes = ((policy or {}).get("metadata") or {}).get("annotations") or {}
        if policy is not None and "meta.helm.sh/release-name" not in notes:
            self.kube.kubectl(
                "delete",
                "validatingadmissionpolicy,validatingadmissionpolicybinding",
                POLICY_NAME,
                "--ignore-not-found",
            )

    def start(self) -> None:
        """Install the chart and wait for both Deployments."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._drop_unmanaged_policy()
        self.helm(
            "upgrade",
            "--install",
            self.release,
            str(REPO / "charts" / "kubetune"),
            "--namespace",
            self.namespace,
            "--create-namespace",
            # An emptyDir database: the test cluster has no volume provisioner.
            "--set",
            "persistence.enabled=false",
        )
        for component in ("suggestion", "operator"):
            self.kube.kubectl(
                "rollout",
                "status",
                "-n",
                self.namespace,
                f"deploy/{self.release}-kubetune-{component}",
                "--timeout=300s",
                timeout=330,
            )
        self.operator_starts += 1

    def kill_operator(self) -> None:
        """Delete the operator's Pod at once (its Deployment starts another)."""
        self.kube.kubectl(
            "delete",
            "pods",
            "-n",
            self.namespace,
            "-l",
            "app.kubernetes.io/component=operator",
            "--grace-period=0",
            "--force",
            "--wait=false",
        )

    def lose_service_database(self) -> None:
        """Delete the service's Pod: its database is on an emptyDir and goes with it."""
        self.kube.kubectl(
            "delete",
            "pods",
            "-n",
            self.namespace,
            "-l",
            "app.kubernetes.io/component=suggestion",
            "--grace-period=0",
            "--force",
        )
        time.sleep(1)
        self.kube.kubectl(
            "rollout",
            "status",
            "-n",
            self.namespace,
            f"deploy/{self.release}-kubetune-suggestion",
            "--timeout=300s",
            timeout=330,
        )

    def start_operator(self) -> None:
        """Wait for the replacement operator Pod to be ready."""
        time.sleep(1)
        self.kube.kubectl(
            "rollout",
            "status",
            "-n",
            self.namespace,
            f"deploy/{self.release}-kubetune-operator",
            "--timeout=300s",
            timeout=330,
        )
        wait_for(self._metrics_up, 120, "the operator's /metrics", interval=0.5)
        self.operator_starts += 1

    def _metrics_up(self) -> bool:
        try:
            return httpx.get(self.metrics_url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        """Uninstall the release (CRDs stay, as Helm keeps them)."""
        with contextlib.suppress(RuntimeError):
            self.helm("uninstall", self.release, "--namespace", self.namespace, "--wait")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The operator's samples: (name, sorted labels) -> value."""
        return _samples(httpx.get(self.metrics_url, timeout=5).text)


def make_stack(kube: Kube, workdir: Path) -> HostStack | ChartStack:
    """The stack ``KUBETUNE_E2E_STACK`` asks for (``chart`` unless ``host``)."""
    if os.environ.get("KUBETUNE_E2E_STACK", "chart") == "host":
        return HostStack(kube, workdir)
    return ChartStack(kube, workdir)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def synthetic_experiment(
    name: str,
    *,
    max_trials: int = 6,
    parallelism: int = 3,
    epochs: int = 3,
    sleep: float = 0.5,
    early_stopping: Obj | None = None,
    algorithm: str = "random",
    extra_args: list[str] | None = None,
    resources: Obj | None = None,
    **spec: Any,
) -> Obj:
    """An Experiment over the synthetic trial (``kubetune_trials.synthetic``)."""
    container: Obj = {
        "name": "train",
        "image": TRIAL_IMAGE,
        "command": ["python", "-m", "kubetune_trials.synthetic"],
        "args": [
            "--lr=${params.lr}",
            "--layers=${params.layers}",
            f"--epochs={epochs}",
            f"--sleep={sleep}",
            *(extra_args or []),
        ],
    }
    if resources:
        container["resources"] = resources
    body: Obj = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "Experiment",
        "metadata": {"name": name},
        "spec": {
            "objective": {"metric": "val_loss", "direction": "minimize"},
            "parameters": [
                {"name": "lr", "type": "float", "min": 1e-4, "max": 1e-1, "log": True},
                {"name": "layers", "type": "int", "min": 1, "max": 6},
            ],
            "algorithm": {"name": algorithm, "seed": 7},
            "maxTrials": max_trials,
            "parallelism": parallelism,
            "template": {"spec": {"terminationGracePeriodSeconds": 5, "containers": [container]}},
        },
    }
    if early_stopping:
        body["spec"]["earlyStopping"] = early_stopping
    body["spec"].update(spec)
    return body


def wait_condition(kube: Kube, namespace: str, name: str, condition: str, timeout: int) -> None:
    """``kubectl wait --for=condition=<condition> experiment/<name>``."""
    kube.kubectl(
        "wait",
        "-n",
        namespace,
        f"--for=condition={condition}",
        f"experiment/{name}",
        f"--timeout={timeout}s",
        timeout=timeout + 30,
    )


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
        with httpx.Client(base_url=self.stack.service_url, timeout=10) as client:
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


def trials_of(kube: Kube, namespace: str, experiment: str) -> list[Obj]:
    """The experiment's Trials."""
    items: list[Obj] = kube.get(
        "trials", "-n", namespace, "-l", f"kubetune.io/experiment={experiment}"
    )["items"]
    return items


def iter_lines(text: str) -> Iterator[str]:
    """Non-empty lines."""
    return (line for line in text.splitlines() if line.strip())
