"""Test helpers that talk to a cluster only through kubectl and a kubeconfig.

Keeping every interaction behind ``kubectl`` is what lets the same e2e tests
run against the local process cluster, kind, or any real cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

Obj = dict[str, Any]
T = TypeVar("T")
# Prometheus samples by (name, sorted labels).
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

REPO = Path(__file__).resolve().parents[1]
# The release the images are tagged with (scripts/images.sh): the chart's appVersion.
APP_VERSION = next(
    line.split(":", 1)[1].strip().strip('"')
    for line in (REPO / "charts" / "kubetune" / "Chart.yaml").read_text().splitlines()
    if line.startswith("appVersion:")
)
# Test Pods run `python -c ...`: scripts/images.sh builds this base image (and
# the local cluster imports it); point it at any image with `python` elsewhere.
PYTHON_IMAGE = os.environ.get(
    "KUBETUNE_E2E_PYTHON_IMAGE", "localhost/kubetune/python-base:bookworm"
)
# The synthetic trial (trial-images/synthetic).
TRIAL_IMAGE = os.environ.get("KUBETUNE_E2E_TRIAL_IMAGE", f"kubetune/trial-synthetic:{APP_VERSION}")


class KubectlError(Exception):
    """kubectl exited non-zero.

    Attributes:
        stderr: What kubectl printed on stderr.
    """

    def __init__(self, args: list[str], code: int, stdout: str, stderr: str) -> None:
        self.stderr = stderr
        self.stdout = stdout
        super().__init__(f"kubectl {' '.join(args)} exited {code}: {stderr.strip()}")


@dataclass
class Kube:
    """A cluster under test.

    Attributes:
        kubeconfig: Path of the kubeconfig the tests use.
        kubectl_bin: The kubectl executable.
        local: True when this session's process cluster is the target (tests
            may then also look at host-side effects, e.g. hostPath files).
        bin_dir: Where the pinned binaries live (kwok, helm), if known.
    """

    kubeconfig: Path
    kubectl_bin: str
    local: bool
    bin_dir: Path | None = None

    def env(self) -> dict[str, str]:
        """Environment for child processes (kubectl, helm, kwok)."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        return env

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 120) -> str:
        """Run kubectl and return stdout.

        Raises:
            KubectlError: On a non-zero exit.
        """
        argv = [self.kubectl_bin, *args]
        proc = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
            check=False,
        )
        if proc.returncode != 0:
            raise KubectlError(list(args), proc.returncode, proc.stdout, proc.stderr)
        return proc.stdout

    def get(self, *args: str) -> Obj:
        """``kubectl get ... -o json`` decoded."""
        data: Obj = json.loads(self.kubectl("get", *args, "-o", "json"))
        return data

    def try_get(self, *args: str) -> Obj | None:
        """Like :meth:`get` but None when the object does not exist."""
        try:
            return self.get(*args)
        except KubectlError as exc:
            if "NotFound" in exc.stderr or "not found" in exc.stderr:
                return None
            raise

    def apply(self, *objects: Obj, namespace: str | None = None) -> str:
        """``kubectl apply`` the given objects (sent as a JSON List)."""
        body = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)})
        ns = ["-n", namespace] if namespace else []
        return self.kubectl("apply", *ns, "-f", "-", input=body)

    def create(self, *objects: Obj, namespace: str | None = None) -> str:
        """``kubectl create`` the given objects."""
        body = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)})
        ns = ["-n", namespace] if namespace else []
        return self.kubectl("create", *ns, "-f", "-", input=body)

    def logs(self, namespace: str, pod: str, container: str | None = None) -> str:
        """``kubectl logs`` of a pod (one container)."""
        c = ["-c", container] if container else []
        return self.kubectl("logs", "-n", namespace, pod, *c)

    def pod(self, namespace: str, name: str) -> Obj:
        """The pod object."""
        return self.get("pod", "-n", namespace, name)

    def wait_pod_phase(
        self, namespace: str, name: str, phases: tuple[str, ...], timeout: float = 120
    ) -> Obj:
        """Wait until the pod reaches one of ``phases``; returns the pod."""

        def check() -> Obj | None:
            pod = self.try_get("pod", "-n", namespace, name)
            if pod and pod.get("status", {}).get("phase") in phases:
                return pod
            return None

        return wait_for(check, timeout, f"pod {namespace}/{name} to reach {phases}")

    def wait_gone(self, *args: str, timeout: float = 120) -> None:
        """Wait until ``kubectl get <args>`` answers NotFound."""
        wait_for(
            lambda: self.try_get(*args) is None or None, timeout, f"{' '.join(args)} to be gone"
        )


def wait_for(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.5) -> T:
    """Poll ``check`` until it returns something truthy.

    Raises:
        TimeoutError: After ``timeout`` seconds, naming ``what``.
    """
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except (KubectlError, subprocess.TimeoutExpired) as exc:
            last_exc = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what} ({last_exc})")
        time.sleep(interval)


def find_kubectl(bin_dir: Path | None) -> str:
    """Return kubectl from the pinned build when present, else from PATH."""
    if bin_dir and (bin_dir / "kubectl").exists():
        return str(bin_dir / "kubectl")
    found = shutil.which("kubectl")
    if not found:
        raise FileNotFoundError("kubectl not found: run e2e/cluster/build.sh or install it")
    return found


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


def metric_samples(text: str) -> Samples:
    """The samples of a Prometheus text exposition: (name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def node_ready(node: Obj) -> bool:
    """Whether the Node's Ready condition is True."""
    return any(
        c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", [])
    )


def python_pod(
    name: str,
    script: str,
    *,
    restart: str = "Never",
    env: list[Obj] | None = None,
    resources: Obj | None = None,
    extra: Obj | None = None,
) -> Obj:
    """A one-container pod running ``python -c script``.

    ``extra`` is merged into the pod spec (volumes, nodeSelector, ...).
    """
    container: Obj = {
        "name": "main",
        "image": PYTHON_IMAGE,
        "command": ["python", "-u", "-c", script],
    }
    if env:
        container["env"] = env
    if resources:
        container["resources"] = resources
    spec: Obj = {
        "restartPolicy": restart,
        "terminationGracePeriodSeconds": 5,
        "containers": [container],
    }
    spec.update(extra or {})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def read_text(path: Path) -> str:
    """Read a file, empty string when absent."""
    try:
        return path.read_text()
    except OSError:
        return ""
