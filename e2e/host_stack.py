"""kubetune as host processes: the suggestion service and the operator on this machine.

The operator authenticates as the chart's ServiceAccount (its RBAC applied
from the chart, a bearer token), so it runs with exactly the permissions
``helm install`` gives it. The service listens on the host's loopback, which
trial Pods in their own network namespaces cannot reach: this stack serves
the operator benchmark on kwok's fake nodes, where no trial runs
(``KUBETUNE_E2E_STACK=host``; :class:`e2e.operator_helpers.ChartStack` is the
default).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from e2e.helpers import REPO, Kube, Samples, metric_samples, run_helm, wait_for


def free_port() -> int:
    """A free TCP port on loopback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The host-mode service's API key (the operator and the tests show it).
API_KEY = "e2e-host-stack-key"

# Where the host-mode operator's ServiceAccount lives.
HOST_OPERATOR_NAMESPACE = "kubetune-host"


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
    def service_headers(self) -> dict[str, str]:
        """What a client of the service shows: the API key."""
        return {"Authorization": f"Bearer {API_KEY}"}

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
        env = {**os.environ, "KUBETUNE_SECRET": "e2e-host-stack", "KUBETUNE_API_KEY": API_KEY}
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
                "--metrics-port",
                str(free_port()),
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
            KUBETUNE_SERVICE_API_KEY=API_KEY,
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

    def metrics(self) -> Samples:
        """The operator's samples: (name, sorted labels) -> value."""
        return metric_samples(httpx.get(self.metrics_url, timeout=5).text)

    def service_get(self, path: str, **params: Any) -> Any:
        """GET from the service's API."""
        resp = httpx.get(
            f"{self.service_url}{path}", params=params, timeout=10, headers=self.service_headers
        )
        resp.raise_for_status()
        return resp.json()
