"""The process kubelet's pod worker against a fake API (no cluster needed).

Runs real processes in real mount namespaces, so it needs root and
``unshare``; it is skipped elsewhere.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.kube import ApiError
from e2e.kubelet.kubelet import Kubelet
from e2e.kubelet.volumes import remove_created_mountpoints

Obj = dict[str, Any]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare (mount namespaces)",
)


class FakeApi:
    """Records what the kubelet writes; serves the root CA configMap and tokens."""

    server = "https://127.0.0.1:6443"

    def __init__(self) -> None:
        self.statuses: list[Obj] = []
        self.deletes: list[tuple[str, Obj | None]] = []
        self.secrets: dict[str, Obj] = {}
        self.events: list[str] = []

    def get(self, path: str, **params: Any) -> Obj:
        if path.endswith("/configmaps/kube-root-ca.crt"):
            return {"data": {"ca.crt": "CA-PEM"}}
        name = path.rsplit("/", 1)[-1]
        if "/secrets/" in path and name in self.secrets:
            return self.secrets[name]
        raise ApiError(404, {"message": "not found"}, "GET", path)

    def create(self, path: str, body: Obj) -> Obj:
        if path.endswith("/events"):
            self.events.append(body["reason"])
            return body
        assert path.endswith("/serviceaccounts/default/token"), path
        assert body["spec"]["boundObjectRef"]["kind"] == "Pod"
        return {"status": {"token": "TOKEN-FOR-" + body["spec"]["boundObjectRef"]["name"]}}

    def merge_patch(self, path: str, patch: Obj) -> Obj:
        self.statuses.append(copy.deepcopy(patch["status"]))
        return {}

    def delete(self, path: str, body: Obj | None = None) -> Obj:
        self.deletes.append((path, body))
        return {}


SA_VOLUME = {
    "name": "kube-api-access",
    "projected": {
        "defaultMode": 420,
        "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {
                "configMap": {
                    "name": "kube-root-ca.crt",
                    "items": [{"key": "ca.crt", "path": "ca.crt"}],
                }
            },
            {
                "downwardAPI": {
                    "items": [
                        {"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}
                    ]
                }
            },
        ],
    },
}
SA_MOUNT = {
    "name": "kube-api-access",
    "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
    "readOnly": True,
}


def make_pod(name: str, spec: Obj) -> Obj:
    spec = {"restartPolicy": "Never", "nodeName": "n0", "terminationGracePeriodSeconds": 5, **spec}
    spec.setdefault("volumes", []).append(SA_VOLUME)
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        c.setdefault("image", "python:3.11-slim")
        c.setdefault("volumeMounts", []).append(SA_MOUNT)
    return {
        "metadata": {"name": name, "namespace": "ns1", "uid": f"uid-{name}"},
        "spec": spec,
        "status": {"conditions": [{"type": "PodScheduled", "status": "True"}]},
    }


@pytest.fixture
def kubelet(tmp_path: Path) -> Iterator[Kubelet]:
    k = Kubelet(FakeApi(), "n0", tmp_path, 2, "4", "8Gi", 10, 10250, "192.0.2.2", 0.2)  # type: ignore[arg-type]
    k.write_shims()
    yield k
    k.stop()
    # Mount points the pods needed on this host (/var/run/secrets/...).
    remove_created_mountpoints([tmp_path / "created-mountpoints"])


def wait_status(k: Kubelet, pred: Any, timeout: float = 20) -> Obj:
    api: FakeApi = k.api  # type: ignore[assignment]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if api.statuses and pred(api.statuses[-1]):
            return api.statuses[-1]
        time.sleep(0.1)
    raise AssertionError(f"status never matched; last: {api.statuses[-1:]}")


def logs(k: Kubelet, uid: str, container: str) -> str:
    return "".join(
        p.read_text() for p in sorted((k.root / "pods" / uid / "logs" / container).glob("*.log"))
    )


def test_env_volumes_gpu_and_exit_code(kubelet: Kubelet) -> None:
    kubelet.api.secrets["creds"] = {"data": {"pw": "czNjcjN0"}}  # type: ignore[attr-defined]
    script = (
        "import os, sys\n"
        "sa = '/var/run/secrets/kubernetes.io/serviceaccount/'\n"
        "e = os.environ\n"
        "print('B=' + e['B'], 'PW=' + e['PW'], 'GPU=' + e['CUDA_VISIBLE_DEVICES'])\n"
        "print('TOKEN=' + open(sa + 'token').read(), 'NS=' + open(sa + 'namespace').read())\n"
        "print('HOST=' + e['KUBERNETES_SERVICE_HOST'] + ':' + e['KUBERNETES_SERVICE_PORT'])\n"
        "sys.exit(7)\n"
    )
    pod = make_pod(
        "envpod",
        {
            "containers": [
                {
                    "name": "main",
                    "command": ["python", "-c", script],
                    "resources": {"limits": {"nvidia.com/gpu": "1"}},
                    "env": [
                        {"name": "A", "value": "a"},
                        {"name": "B", "value": "$(A)-b"},
                        {
                            "name": "PW",
                            "valueFrom": {"secretKeyRef": {"name": "creds", "key": "pw"}},
                        },
                    ],
                }
            ]
        },
    )
    kubelet._handle("ADDED", pod)
    st = wait_status(kubelet, lambda s: s["phase"] in ("Succeeded", "Failed"))
    assert st["phase"] == "Failed"
    assert st["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 7
    assert {c["type"] for c in st["conditions"]} >= {"PodScheduled", "Ready", "Initialized"}
    out = logs(kubelet, "uid-envpod", "main")
    assert "B=a-b PW=s3cr3t GPU=0" in out
    assert "TOKEN=TOKEN-FOR-envpod NS=ns1" in out
    assert "HOST=127.0.0.1:6443" in out
    assert kubelet.gpus.free() == [0, 1]  # released once terminal


def test_sidecar_and_graceful_deletion(kubelet: Kubelet) -> None:
    side = (
        "import pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: (print('side term', flush=True), sys.exit(0)))\n"
        "pathlib.Path('/shared/x').write_text('hi')\n"
        "while True: time.sleep(0.05)\n"
    )
    main = (
        "import pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: (print('main term', flush=True), sys.exit(0)))\n"
        "while not pathlib.Path('/shared/x').exists(): time.sleep(0.02)\n"
        "print('main saw', pathlib.Path('/shared/x').read_text(), flush=True)\n"
        "while True: time.sleep(0.05)\n"
    )
    mount = [{"name": "shared", "mountPath": "/shared-e2e-test"}]
    pod = make_pod(
        "sc",
        {
            "volumes": [{"name": "shared", "emptyDir": {}}],
            "initContainers": [
                {
                    "name": "side",
                    "restartPolicy": "Always",
                    "command": ["python", "-c", side.replace("/shared/", "/shared-e2e-test/")],
                    "volumeMounts": list(mount),
                }
            ],
            "containers": [
                {
                    "name": "main",
                    "command": ["python", "-c", main.replace("/shared/", "/shared-e2e-test/")],
                    "volumeMounts": list(mount),
                }
            ],
        },
    )
    kubelet._handle("ADDED", pod)
    wait_status(
        kubelet,
        lambda s: s["phase"] == "Running" and "running" in s["containerStatuses"][0]["state"],
    )
    time.sleep(0.5)
    deleting = copy.deepcopy(pod)
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    deleting["metadata"]["deletionGracePeriodSeconds"] = 5
    start = time.monotonic()
    kubelet._handle("MODIFIED", deleting)
    api: FakeApi = kubelet.api  # type: ignore[assignment]
    while not api.deletes and time.monotonic() - start < 10:
        time.sleep(0.05)
    assert time.monotonic() - start < 5
    assert api.deletes == [
        (
            "/api/v1/namespaces/ns1/pods/sc",
            {"gracePeriodSeconds": 0, "preconditions": {"uid": "uid-sc"}},
        )
    ]
    final = api.statuses[-1]
    assert final["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert final["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    with pytest.raises(FileNotFoundError):
        (kubelet.root / "pods" / "uid-sc").stat()  # cleaned up


def test_crash_loop_restart_with_on_failure(kubelet: Kubelet, tmp_path: Path) -> None:
    counter = tmp_path / "count"
    script = (
        "import pathlib, sys\n"
        f"p = pathlib.Path('{counter}')\n"
        "n = int(p.read_text()) if p.exists() else 0\n"
        "p.write_text(str(n + 1))\n"
        "print('attempt', n, flush=True)\n"
        "sys.exit(0 if n >= 2 else 1)\n"
    )
    pod = make_pod(
        "crash",
        {
            "restartPolicy": "OnFailure",
            "containers": [{"name": "main", "command": ["python", "-c", script]}],
        },
    )
    kubelet._handle("ADDED", pod)
    st = wait_status(kubelet, lambda s: s["phase"] == "Succeeded", timeout=30)
    cs = st["containerStatuses"][0]
    assert cs["restartCount"] == 2
    assert "BackOff" in kubelet.api.events  # type: ignore[attr-defined]
    assert cs["lastState"]["terminated"]["exitCode"] == 1
    assert counter.read_text() == "3"
