"""kwok's fake nodes run 500 Pods beside the real node, which they leave alone.

kwok (built by ``e2e/cluster/build.sh``) fakes nodes and Pod lifecycles
without running anything: the operator benchmark's scale. It manages only the
nodes annotated ``kwok.x-k8s.io/node=fake``; the real node must stay its own
kubelet's. Skipped where the kwok binary is not in the cache.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import IO

import pytest

from e2e.helpers import Kube, Obj, node_ready, read_text, wait_for

KWOK_NODES = 5
KWOK_PODS = 500
# kwok manages only nodes with this annotation; their taint keeps other Pods off.
KWOK_MARK = "kwok.x-k8s.io/node"


def _fake_node(name: str) -> Obj:
    """A Node for kwok: annotated, tainted, labelled ``type: kwok``, room for 200 Pods."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_MARK: "fake"},
            "labels": {"type": "kwok", "kubernetes.io/hostname": name},
        },
        "spec": {"taints": [{"key": KWOK_MARK, "value": "fake", "effect": "NoSchedule"}]},
        "status": {
            "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "200"},
            "capacity": {"cpu": "32", "memory": "256Gi", "pods": "200"},
        },
    }


def _fake_load(replicas: int) -> Obj:
    """A Deployment whose Pods go only to kwok's nodes (an image nothing pulls)."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "fake-load"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "fake-load"}},
            "template": {
                "metadata": {"labels": {"app": "fake-load"}},
                "spec": {
                    "nodeSelector": {"type": "kwok"},
                    "tolerations": [
                        {"key": KWOK_MARK, "operator": "Exists", "effect": "NoSchedule"}
                    ],
                    "containers": [{"name": "fake", "image": "fake-image"}],
                },
            },
        },
    }


def _start_kwok(kube: Kube, kwok_bin: Path, stages: Path, log: IO[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            str(kwok_bin),
            f"--kubeconfig={kube.kubeconfig}",
            f"--config={stages}",
            # Only nodes carrying kwok's annotation: the real node is never
            # touched.
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_MARK}=fake",
            "--cidr=10.128.0.0/16",
            "--node-lease-duration-seconds=40",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=kube.env(),
    )


def _wait_all_running(
    kube: Kube, namespace: str, kwok: subprocess.Popen[bytes], log: Path
) -> list[Obj]:
    def all_running() -> list[Obj] | None:
        if kwok.poll() is not None:
            pytest.fail(f"kwok exited: {read_text(log)[-2000:]}")
        pods = kube.get("pods", "-n", namespace, "-l", "app=fake-load")["items"]
        running = [p for p in pods if p["status"].get("phase") == "Running"]
        return running if len(running) == KWOK_PODS else None

    return wait_for(all_running, 300, f"{KWOK_PODS} kwok pods Running", interval=3)


def _assert_real_nodes_untouched(kube: Kube, namespace: str, before: dict[str, Obj]) -> None:
    """No fake Pods, no kwok marks, still reported Ready by their own kubelet."""
    for name, old in before.items():
        node = kube.get("node", name)
        assert not any(
            k.startswith("kwok.x-k8s.io") for k in node["metadata"].get("annotations", {})
        )
        assert node_ready(node)
        if kube.local:
            ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
            assert ready["reason"] == "KubeletReady", ready
            assert node["status"]["nodeInfo"] == old["status"]["nodeInfo"]
        on_node = kube.get("pods", "-n", namespace, "--field-selector", f"spec.nodeName={name}")[
            "items"
        ]
        assert on_node == []


def _delete_fake_load(kube: Kube, namespace: str) -> None:
    """Delete the Deployment and give kwok (still running) a minute to finish its Pods."""
    kube.kubectl(
        "delete", "deployment", "-n", namespace, "fake-load", "--ignore-not-found", "--wait=false"
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not kube.get("pods", "-n", namespace, "-l", "app=fake-load")["items"]:
            break
        time.sleep(2)


def test_kwok_fake_nodes_run_500_pods(kube: Kube, namespace: str, tmp_path: Path) -> None:
    kwok_bin = kube.bin_dir / "kwok" if kube.bin_dir else None
    stages = kube.bin_dir / "kwok-stages.yaml" if kube.bin_dir else None
    if not kwok_bin or not kwok_bin.exists() or not stages or not stages.exists():
        pytest.skip("kwok binary or stages not built (e2e/cluster/build.sh)")
    before = {
        n["metadata"]["name"]: n
        for n in kube.get("nodes")["items"]
        if not n["metadata"].get("annotations", {}).get(KWOK_MARK)
    }
    prefix = f"kwok-{namespace[-5:]}"
    fake_nodes = [_fake_node(f"{prefix}-{i}") for i in range(KWOK_NODES)]
    log = tmp_path / "kwok.log"
    out = log.open("w")
    kwok = _start_kwok(kube, kwok_bin, stages, out)
    try:
        kube.create(*fake_nodes)
        kube.create(_fake_load(KWOK_PODS), namespace=namespace)
        running = _wait_all_running(kube, namespace, kwok, log)
        fake_names = {n["metadata"]["name"] for n in fake_nodes}
        assert {p["spec"]["nodeName"] for p in running} <= fake_names
        assert kwok.poll() is None, read_text(log)
        _assert_real_nodes_untouched(kube, namespace, before)
    finally:
        _delete_fake_load(kube, namespace)
        kwok.terminate()
        kwok.wait(timeout=30)
        out.close()
        kube.kubectl(
            "delete",
            "nodes",
            *(n["metadata"]["name"] for n in fake_nodes),
            "--ignore-not-found",
            "--wait=false",
        )
