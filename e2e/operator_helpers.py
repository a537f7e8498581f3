"""kubetune installed for the operator's e2e tests, and the experiments they run.

Two ways to run kubetune, chosen by ``KUBETUNE_E2E_STACK``:

- ``chart`` (:class:`ChartStack`, the default): ``helm install`` of
  ``charts/kubetune`` with the images ``scripts/images.sh`` built; the
  operator and the service run as the chart's Deployments, with its
  ServiceAccounts and RBAC. The user's path.
- ``host`` (:class:`e2e.host_stack.HostStack`): the service and the operator
  as processes on this machine, the operator as the chart's ServiceAccount;
  for the operator benchmark on kwok's fake nodes, where no trial runs.

Both serve the same interface to the tests: ``service_url``, ``metrics()``,
``kill_operator()`` / ``start_operator()``. What happens during a run is
recorded by :mod:`e2e.recorders`.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from e2e.helpers import REPO, TRIAL_IMAGE, Kube, Obj, Samples, metric_samples, run_helm, wait_for
from e2e.host_stack import HostStack

# The audience of the tokens the suggestion service accepts (the chart's
# suggestion.auth.audience).
SERVICE_AUDIENCE = "kubetune-suggestion"

# The admission policy and its binding, as crds/ and the chart name them.
POLICY_NAME = "experiments.kubetune.io"


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
    _token: str = ""

    def _service_address(self, name: str) -> str:
        svc = self.kube.get("service", "-n", self.namespace, name)
        return f"{svc['spec']['clusterIP']}:{svc['spec']['ports'][0]['port']}"

    @property
    def service_url(self) -> str:
        """The suggestion service, through its Service."""
        return f"http://{self._service_address(f'{self.release}-kubetune-suggestion')}"

    @property
    def service_headers(self) -> dict[str, str]:
        """What a client of the service shows: a token of the operator's ServiceAccount.

        Issued for the service's audience, as the operator's projected one.
        """
        if not self._token:
            self._token = self.kube.kubectl(
                "create",
                "token",
                "-n",
                self.namespace,
                f"{self.release}-kubetune-operator",
                f"--audience={SERVICE_AUDIENCE}",
                "--duration=2h",
            ).strip()
        return {"Authorization": f"Bearer {self._token}"}

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

    def metrics(self) -> Samples:
        """The operator's samples: (name, sorted labels) -> value."""
        return metric_samples(httpx.get(self.metrics_url, timeout=5).text)


def make_stack(kube: Kube, workdir: Path) -> HostStack | ChartStack:
    """The stack ``KUBETUNE_E2E_STACK`` asks for (``chart`` unless ``host``)."""
    if os.environ.get("KUBETUNE_E2E_STACK", "chart") == "host":
        return HostStack(kube, workdir)
    return ChartStack(kube, workdir)


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


def trials_of(kube: Kube, namespace: str, experiment: str) -> list[Obj]:
    """The experiment's Trials."""
    items: list[Obj] = kube.get(
        "trials", "-n", namespace, "-l", f"kubetune.io/experiment={experiment}"
    )["items"]
    return items
