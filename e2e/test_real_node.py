"""What a real node enforces that a process kubelet could not.

Containers from images, each Pod in its own network namespace, security
contexts, memory limits, `kubectl exec` and `kubectl port-forward`, images
whose processes stop at SIGTERM, and one real node per machine. Everything
goes through kubectl, so these run against kind or any cluster too; the
check of the harness itself needs the local cluster.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest

from e2e.cluster import Cluster
from e2e.helpers import TRIAL_IMAGE, Kube, Obj, python_pod, wait_for


def _terminated(pod: Obj, index: int = 0) -> Obj:
    state: Obj = pod["status"]["containerStatuses"][index]["state"]
    return state.get("terminated") or {}


def test_exec_runs_in_the_container(kube: Kube, namespace: str) -> None:
    pod = python_pod("shell", "import time; time.sleep(3600)")
    pod["spec"]["securityContext"] = {"runAsUser": 4242, "runAsGroup": 4242}
    kube.create(pod, namespace=namespace)
    kube.wait_pod_phase(namespace, "shell", ("Running",))
    out = kube.kubectl("exec", "-n", namespace, "shell", "--", "id", "-u")
    assert out.strip() == "4242"
    # The container's own root filesystem and hostname, not the host's.
    assert kube.kubectl("exec", "-n", namespace, "shell", "--", "hostname").strip() == "shell"
    release = kube.kubectl("exec", "-n", namespace, "shell", "--", "cat", "/etc/os-release")
    assert "ID=debian" in release


def test_read_only_root_filesystem_and_writable_volume(kube: Kube, namespace: str) -> None:
    script = (
        "import pathlib\n"
        "try:\n"
        "    pathlib.Path('/root-write').write_text('x')\n"
        "    print('root: written')\n"
        "except OSError as exc:\n"
        "    print('root:', exc.strerror)\n"
        "pathlib.Path('/scratch/ok').write_text('x')\n"
        "print('scratch: written')\n"
    )
    pod = python_pod(
        "readonly",
        script,
        extra={"volumes": [{"name": "scratch", "emptyDir": {}}]},
    )
    container = pod["spec"]["containers"][0]
    container["securityContext"] = {"readOnlyRootFilesystem": True}
    container["volumeMounts"] = [{"name": "scratch", "mountPath": "/scratch"}]
    kube.create(pod, namespace=namespace)
    done = kube.wait_pod_phase(namespace, "readonly", ("Succeeded", "Failed"))
    logs = kube.logs(namespace, "readonly")
    assert done["status"]["phase"] == "Succeeded", logs
    assert "root: Read-only file system" in logs
    assert "scratch: written" in logs


def test_run_as_non_root_refuses_a_root_image(kube: Kube, namespace: str) -> None:
    pod = python_pod("rootless", "print('ran')")
    pod["spec"]["securityContext"] = {"runAsNonRoot": True}
    kube.create(pod, namespace=namespace)

    def refused() -> Obj | None:
        statuses = kube.pod(namespace, "rootless")["status"].get("containerStatuses") or []
        waiting = (statuses[0]["state"].get("waiting") or {}) if statuses else {}
        return waiting if waiting.get("reason") == "CreateContainerConfigError" else None

    waiting = wait_for(refused, 60, "the kubelet to refuse a root image under runAsNonRoot")
    assert "runAsNonRoot" in waiting["message"] and "root" in waiting["message"]


def test_memory_limit_is_enforced(kube: Kube, namespace: str) -> None:
    hog = "chunks = []\nwhile True:\n    chunks.append(bytearray(8 << 20))\n"
    pod = python_pod("hog", hog, resources={"limits": {"memory": "64Mi"}})
    kube.create(pod, namespace=namespace)
    done = kube.wait_pod_phase(namespace, "hog", ("Failed", "Succeeded"))
    term = _terminated(done)
    assert term["reason"] == "OOMKilled", term
    assert term["exitCode"] == 137


def test_port_forward_reaches_the_pod(kube: Kube, namespace: str) -> None:
    pod = python_pod("web", "import http.server; http.server.test(port=8000, bind='0.0.0.0')")
    pod["spec"]["containers"][0]["command"] = ["python", "-m", "http.server", "8000"]
    kube.create(pod, namespace=namespace)
    kube.wait_pod_phase(namespace, "web", ("Running",))
    forward = subprocess.Popen(
        [kube.kubectl_bin, "port-forward", "-n", namespace, "pod/web", ":8000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=kube.env(),
    )
    try:
        assert forward.stdout is not None
        line = forward.stdout.readline()  # "Forwarding from 127.0.0.1:NNNNN -> 8000"
        local = line.split("->")[0].split()[-1]

        def fetch() -> int | None:
            try:
                with urllib.request.urlopen(f"http://{local}/", timeout=5) as resp:
                    return int(resp.status)
            except OSError:
                return None

        assert wait_for(fetch, 30, f"HTTP through port-forward ({line.strip()})") == 200
    finally:
        forward.terminate()
        forward.wait(timeout=10)


def test_trial_image_stops_at_sigterm(kube: Kube, namespace: str) -> None:
    """The trial image's process (PID 1) ends at SIGTERM instead of waiting out the grace period."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "trial"},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 30,
            "containers": [
                {
                    "name": "train",
                    "image": TRIAL_IMAGE,
                    "args": ["--lr=0.01", "--layers=2", "--epochs=1000", "--sleep=1"],
                }
            ],
        },
    }
    kube.create(pod, namespace=namespace)
    kube.wait_pod_phase(namespace, "trial", ("Running",))
    # The training code's own output, through the kubelet's log files.
    wait_for(lambda: "val_loss" in kube.logs(namespace, "trial"), 30, "the trial's output")
    start = time.monotonic()
    kube.kubectl("delete", "pod", "-n", namespace, "trial", "--wait=true", timeout=60)
    elapsed = time.monotonic() - start
    assert elapsed < 5, f"took {elapsed:.1f}s: SIGTERM not handled (grace period 30s)"


def test_a_second_real_node_cluster_is_refused(kube: Kube, tmp_path: object) -> None:
    if not kube.local:
        pytest.skip("a property of the local cluster harness")
    env = {**os.environ, "KUBETUNE_E2E_STATE": str(Cluster().state) + "-second"}
    env.pop("KUBECONFIG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "e2e.cluster", "up"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert "already runs on this machine" in proc.stderr, proc.stderr
    assert "python -m e2e.cluster down" in proc.stderr
    # And the running cluster was left alone.
    assert kube.get("nodes")["items"]
