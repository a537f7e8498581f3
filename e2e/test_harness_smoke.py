"""Smoke tests of the e2e harness itself, independent of the operator.

Each test asserts real cluster behaviour through kubectl only, so the file
runs unchanged against kind or any cluster; checks that need the local
cluster (pinned version, containerd, fake GPUs, host-side files) adapt or
skip. kwok's fake nodes are tested in ``test_kwok.py``.
"""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from e2e.cluster import K8S_VERSION
from e2e.helpers import (
    PYTHON_IMAGE,
    Kube,
    KubectlError,
    Obj,
    node_ready,
    python_pod,
    read_text,
    wait_for,
)

GPU = "nvidia.com/gpu"


# 1 -------------------------------------------------------------------------------------
def test_version_and_ready_gpu_nodes(kube: Kube) -> None:
    version = json.loads(kube.kubectl("version", "-o", "json"))
    server = version["serverVersion"]["gitVersion"]
    if kube.local:
        assert server == K8S_VERSION
        assert version["clientVersion"]["gitVersion"] == K8S_VERSION
    else:
        assert re.match(r"^v1\.\d+\.\d+", server)

    nodes = kube.get("nodes")["items"]
    assert nodes and all(node_ready(n) for n in nodes if "kwok" not in n["metadata"]["name"])
    if kube.local:
        ours = [n for n in nodes if n["metadata"]["labels"].get("kubetune.io/e2e-node")]
        assert ours, "the real node registered"
        for node in ours:
            info = node["status"]["nodeInfo"]
            assert info["containerRuntimeVersion"].startswith("containerd://2."), info
            assert info["kubeletVersion"] == K8S_VERSION, info
        gpus = {n["metadata"]["name"]: int(n["status"]["capacity"][GPU]) for n in ours}
        assert all(g >= 1 for g in gpus.values()), gpus
        # The table a user sees: Ready, with the GPU capacity column.
        table = kube.kubectl(
            "get",
            "nodes",
            "-o",
            "custom-columns=NAME:.metadata.name,GPU:.status.capacity.nvidia\\.com/gpu",
        )
        for name, count in gpus.items():
            assert re.search(rf"{name}\s+{count}", table), table
        assert "Ready" in kube.kubectl("get", "nodes")


# 2 -------------------------------------------------------------------------------------
def test_pod_exit_codes_and_logs(kube: Kube, namespace: str) -> None:
    kube.create(
        python_pod("ok", "print('hello from the ok pod')"),
        python_pod("bad", "import sys; print('about to fail'); sys.exit(3)"),
        namespace=namespace,
    )
    ok = kube.wait_pod_phase(namespace, "ok", ("Succeeded", "Failed"))
    bad = kube.wait_pod_phase(namespace, "bad", ("Succeeded", "Failed"))
    assert ok["status"]["phase"] == "Succeeded"
    assert ok["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert bad["status"]["phase"] == "Failed"
    term = bad["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 3
    assert term["reason"] == "Error"
    assert "hello from the ok pod" in kube.logs(namespace, "ok")
    assert "about to fail" in kube.logs(namespace, "bad")


# 3 -------------------------------------------------------------------------------------
GPU_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    for name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        print(name + "=" + os.environ.get(name, "<unset>"), flush=True)
    time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0)
    """
)


def _device(kube: Kube, namespace: str, pod: str) -> str:
    logs = wait_for(
        lambda: (lambda s: s if "NVIDIA" in s else None)(kube.logs(namespace, pod)),
        30,
        f"{pod} logs",
    )
    cuda = re.search(r"CUDA_VISIBLE_DEVICES=(\S+)", logs)
    assert cuda and re.fullmatch(r"\d+", cuda.group(1)), logs
    assert f"NVIDIA_VISIBLE_DEVICES={cuda.group(1)}" in logs
    return cuda.group(1)


def test_gpu_visible_and_exclusive(kube: Kube, namespace: str) -> None:
    """Every GPU of a node goes to one Pod at a time; the next GPU Pod waits for one."""
    with_gpus = [
        n
        for n in kube.get("nodes")["items"]
        if int(n["status"].get("capacity", {}).get(GPU, 0)) and node_ready(n)
    ]
    if not with_gpus:
        pytest.skip("no Ready node with nvidia.com/gpu")
    node = with_gpus[0]["metadata"]["name"]
    count = int(with_gpus[0]["status"]["capacity"][GPU])
    if count > 8:
        pytest.skip(f"{node} has {count} GPUs: too many to fill in a test")
    extra = {"nodeSelector": {"kubernetes.io/hostname": node}}
    gpu1 = {"limits": {GPU: "1"}}
    holders = [f"gpu-{i}" for i in range(count)]
    kube.create(
        *(
            python_pod(name, GPU_SCRIPT + "\ntime.sleep(3600)", resources=gpu1, extra=extra)
            for name in holders
        ),
        namespace=namespace,
    )
    for name in holders:
        kube.wait_pod_phase(namespace, name, ("Running",))
    devices = {name: _device(kube, namespace, name) for name in holders}
    assert len(set(devices.values())) == count, f"each Pod its own device: {devices}"

    kube.create(
        python_pod("gpu-waits", GPU_SCRIPT, resources=gpu1, extra=extra), namespace=namespace
    )

    def unschedulable() -> bool:
        pod = kube.pod(namespace, "gpu-waits")
        conds = {c["type"]: c for c in pod["status"].get("conditions", [])}
        sched = conds.get("PodScheduled", {})
        return bool(
            pod["status"].get("phase") == "Pending"
            and sched.get("status") == "False"
            and sched.get("reason") == "Unschedulable"
        )

    wait_for(unschedulable, 60, "gpu-waits to be Unschedulable")
    # Still pending a moment later: every GPU is taken.
    time.sleep(2)
    assert kube.pod(namespace, "gpu-waits")["status"]["phase"] == "Pending"

    kube.kubectl("delete", "pod", "-n", namespace, holders[0], "--grace-period=1")
    last = kube.wait_pod_phase(namespace, "gpu-waits", ("Succeeded", "Failed"), timeout=120)
    assert last["status"]["phase"] == "Succeeded"
    assert last["spec"]["nodeName"] == node
    assert _device(kube, namespace, "gpu-waits") == devices[holders[0]], "the freed device"


# 4 -------------------------------------------------------------------------------------
def test_garbage_collection_and_namespace_deletion(kube: Kube, namespace: str) -> None:
    kube.create(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}},
        namespace=namespace,
    )
    owner_uid = kube.get("configmap", "-n", namespace, "owner")["metadata"]["uid"]
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner_uid}
    dependent_cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "dependent", "ownerReferences": [ref]},
        "data": {"k": "v"},
    }
    dependent_pod = python_pod("dependent-pod", "import time; time.sleep(3600)")
    dependent_pod["metadata"]["ownerReferences"] = [ref]
    kube.create(dependent_cm, dependent_pod, namespace=namespace)
    kube.wait_pod_phase(namespace, "dependent-pod", ("Running",))

    kube.kubectl("delete", "configmap", "-n", namespace, "owner", "--cascade=background")
    kube.wait_gone("configmap", "-n", namespace, "dependent", timeout=60)
    kube.wait_gone("pod", "-n", namespace, "dependent-pod", timeout=60)

    # A namespace's deletion removes its pods (and finishes only then).
    other = f"{namespace}-gone"
    kube.kubectl("create", "namespace", other)
    wait_for(lambda: kube.try_get("serviceaccount", "-n", other, "default"), 60, "default SA")
    kube.create(python_pod("doomed", "import time; time.sleep(3600)"), namespace=other)
    kube.wait_pod_phase(other, "doomed", ("Running",))
    kube.kubectl("delete", "namespace", other, "--wait=false")
    kube.wait_gone("pod", "-n", other, "doomed", timeout=90)
    kube.wait_gone("namespace", other, timeout=90)


# 5 -------------------------------------------------------------------------------------
SIGTERM_SCRIPT = textwrap.dedent(
    """
    import pathlib, signal, sys, time
    def on_term(signum, frame):
        print("got SIGTERM", flush=True)
        pathlib.Path("/out/sigterm").write_text("TERM")
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    print("ready", flush=True)
    while True:
        time.sleep(0.1)
    """
)


def test_delete_sends_sigterm_within_grace(kube: Kube, namespace: str, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # On the process cluster the pod's hostPath is this machine's directory,
    # so the test can read the file the trap wrote; elsewhere it reads logs.
    volume = (
        {"name": "out", "hostPath": {"path": str(out_dir), "type": "Directory"}}
        if kube.local
        else {"name": "out", "emptyDir": {}}
    )
    pod = python_pod("trap", SIGTERM_SCRIPT, extra={"volumes": [volume]})
    pod["spec"]["terminationGracePeriodSeconds"] = 20
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "out", "mountPath": "/out"}]
    kube.create(pod, namespace=namespace)
    kube.wait_pod_phase(namespace, "trap", ("Running",))
    wait_for(lambda: "ready" in kube.logs(namespace, "trap"), 30, "trap to be ready")

    follow = subprocess.Popen(
        [kube.kubectl_bin, "logs", "-f", "-n", namespace, "trap"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=kube.env(),
    )
    time.sleep(1)
    start = time.monotonic()
    kube.kubectl("delete", "pod", "-n", namespace, "trap", "--wait=true", timeout=60)
    elapsed = time.monotonic() - start
    streamed, _ = follow.communicate(timeout=30)
    assert "got SIGTERM" in streamed, streamed
    assert elapsed < 20, f"pod took {elapsed:.1f}s to go, grace period is 20s"
    if kube.local:
        assert read_text(out_dir / "sigterm") == "TERM"


def test_sigterm_ignored_means_sigkill_after_grace(kube: Kube, namespace: str) -> None:
    script = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(3600)"
    pod = python_pod("stubborn", script)
    pod["spec"]["terminationGracePeriodSeconds"] = 3
    kube.create(pod, namespace=namespace)
    kube.wait_pod_phase(namespace, "stubborn", ("Running",))
    time.sleep(1)  # let the interpreter install its handler
    start = time.monotonic()
    kube.kubectl("delete", "pod", "-n", namespace, "stubborn", "--wait=true", timeout=60)
    elapsed = time.monotonic() - start
    assert 2.5 <= elapsed < 15, f"SIGKILL after the 3 s grace period, took {elapsed:.1f}s"


# 6 -------------------------------------------------------------------------------------
SIDECAR = textwrap.dedent(
    """
    import pathlib, signal, sys, time
    def on_term(signum, frame):
        print("sidecar stopping", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    pathlib.Path("/shared/from-sidecar").write_text("hello from the sidecar")
    print("sidecar up", flush=True)
    while True:
        time.sleep(0.1)
    """
)
MAIN = textwrap.dedent(
    """
    import pathlib, time
    p = pathlib.Path("/shared/from-sidecar")
    for _ in range(300):
        if p.exists():
            break
        time.sleep(0.1)
    print("main saw: " + p.read_text(), flush=True)
    """
)


def test_native_sidecar_lifecycle(kube: Kube, namespace: str) -> None:
    mount = [{"name": "shared", "mountPath": "/shared"}]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "with-sidecar"},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 10,
            "volumes": [{"name": "shared", "emptyDir": {}}],
            "initContainers": [
                {
                    "name": "sidecar",
                    "image": PYTHON_IMAGE,
                    "restartPolicy": "Always",
                    "command": ["python", "-u", "-c", SIDECAR],
                    "volumeMounts": mount,
                }
            ],
            "containers": [
                {
                    "name": "main",
                    "image": PYTHON_IMAGE,
                    "command": ["python", "-u", "-c", MAIN],
                    "volumeMounts": mount,
                }
            ],
        },
    }
    kube.create(pod, namespace=namespace)
    done = kube.wait_pod_phase(namespace, "with-sidecar", ("Succeeded", "Failed"), timeout=90)
    assert done["status"]["phase"] == "Succeeded"
    assert "main saw: hello from the sidecar" in kube.logs(namespace, "with-sidecar", "main")

    def sidecar_stopped() -> Obj | None:
        pod = kube.pod(namespace, "with-sidecar")
        st = pod["status"]["initContainerStatuses"][0]["state"]
        return pod if "terminated" in st else None

    final = wait_for(sidecar_stopped, 30, "the sidecar to be stopped")
    side = final["status"]["initContainerStatuses"][0]["state"]["terminated"]
    main = final["status"]["containerStatuses"][0]["state"]["terminated"]
    assert main["exitCode"] == 0
    assert side["finishedAt"] >= main["finishedAt"], (side, main)
    assert side["startedAt"] <= main["startedAt"], (side, main)
    side_logs = kube.logs(namespace, "with-sidecar", "sidecar")
    assert "sidecar up" in side_logs and "sidecar stopping" in side_logs


# 7 -------------------------------------------------------------------------------------
RBAC_PROBE = textwrap.dedent(
    """
    import json, os, ssl, urllib.error, urllib.request
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    token = open(sa + "/token").read()
    ns = open(sa + "/namespace").read()
    ctx = ssl.create_default_context(cafile=sa + "/ca.crt")
    env = os.environ
    base = "https://%s:%s" % (env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"])
    def call(method, path, body=None):
        req = urllib.request.Request(base + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, context=ctx) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)
    who = call("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews",
               {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
    pods = call("GET", "/api/v1/namespaces/%s/pods" % ns)
    secrets = call("GET", "/api/v1/namespaces/%s/secrets" % ns)
    print("RESULT " + json.dumps({
        "user": who[1].get("status", {}).get("userInfo", {}).get("username"),
        "pods": pods[0], "secrets": secrets[0], "secrets_reason": secrets[1].get("reason"),
    }), flush=True)
    """
)


def test_service_account_token_and_rbac(kube: Kube, namespace: str) -> None:
    kube.create(
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader"}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "reader-reads-pods"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "pod-reader",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
        namespace=namespace,
    )
    pod = python_pod("rbac", RBAC_PROBE, extra={"serviceAccountName": "reader"})
    kube.create(pod, namespace=namespace)
    done = kube.wait_pod_phase(namespace, "rbac", ("Succeeded", "Failed"))
    logs = kube.logs(namespace, "rbac")
    assert done["status"]["phase"] == "Succeeded", logs
    result = json.loads(logs.split("RESULT ", 1)[1])
    assert result["user"] == f"system:serviceaccount:{namespace}:reader"
    assert result["pods"] == 200
    assert result["secrets"] == 403
    assert result["secrets_reason"] == "Forbidden"


# 8 -------------------------------------------------------------------------------------
def _deployment(name: str, replicas: int, container: Obj) -> Obj:
    """A Deployment of ``replicas`` Pods labelled ``app: <name>``, each running ``container``."""
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"terminationGracePeriodSeconds": 2, "containers": [container]},
            },
        },
    }


def _web_server(port: int) -> Obj:
    """Python's HTTP server on ``port``, named ``http``, ready once it listens."""
    return {
        "name": "web",
        "image": PYTHON_IMAGE,
        "command": ["python", "-m", "http.server", str(port)],
        "ports": [{"name": "http", "containerPort": port}],
        "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 1},
    }


def _dns_client(namespace: str, port: int) -> str:
    """A script resolving the ``web`` Service by its short and full names, then GETting it."""
    return textwrap.dedent(
        f"""
        import socket, time, urllib.request
        print("web resolves to " + socket.gethostbyname("web"), flush=True)
        fqdn = "web.{namespace}.svc.cluster.local"
        print("fqdn resolves to " + socket.gethostbyname(fqdn), flush=True)
        for attempt in range(60):
            try:
                with urllib.request.urlopen("http://" + fqdn + ":{port}/", timeout=5) as r:
                    print("HTTP", r.status, flush=True)
                    break
            except OSError as exc:
                print("retry", exc, flush=True)
                time.sleep(1)
        """
    )


def test_deployment_and_service_name(kube: Kube, namespace: str) -> None:
    """Two replicas serve one port on one node (each Pod its own network); DNS finds the Service."""
    target, port = 8080, 80
    sleeper = {
        "name": "sleep",
        "image": PYTHON_IMAGE,
        "command": ["python", "-c", "import time; time.sleep(3600)"],
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {
            "selector": {"app": "web"},
            "ports": [{"name": "http", "port": port, "targetPort": "http"}],
        },
    }
    kube.create(
        _deployment("web", 2, _web_server(target)),
        _deployment("sleepers", 3, sleeper),
        service,
        namespace=namespace,
    )
    kube.kubectl("rollout", "status", "-n", namespace, "deployment/sleepers", "--timeout=120s")
    kube.kubectl("rollout", "status", "-n", namespace, "deployment/web", "--timeout=120s")
    assert kube.get("deployment", "-n", namespace, "sleepers")["status"]["readyReplicas"] == 3
    web_pods = kube.get("pods", "-n", namespace, "-l", "app=web")["items"]
    assert len({p["status"]["podIP"] for p in web_pods}) == 2, "each replica its own IP"
    if kube.local:
        assert len({p["spec"]["nodeName"] for p in web_pods}) == 1, "both on the one node"

    kube.create(python_pod("client", _dns_client(namespace, port)), namespace=namespace)
    done = kube.wait_pod_phase(namespace, "client", ("Succeeded", "Failed"), timeout=120)
    logs = kube.logs(namespace, "client")
    assert done["status"]["phase"] == "Succeeded", logs
    cluster_ip = kube.get("service", "-n", namespace, "web")["spec"]["clusterIP"]
    assert f"web resolves to {cluster_ip}" in logs, logs
    assert f"fqdn resolves to {cluster_ip}" in logs, logs
    assert "HTTP 200" in logs, logs


# 9 -------------------------------------------------------------------------------------
def test_crd_cel_validation(kube: Kube, namespace: str) -> None:
    group = "e2e.kubetune.io"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"ranges.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "ranges", "singular": "range", "kind": "Range"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["min", "max"],
                                    "properties": {
                                        "min": {"type": "integer"},
                                        "max": {"type": "integer"},
                                    },
                                    "x-kubernetes-validations": [
                                        {
                                            "rule": "self.min <= self.max",
                                            "message": "min must not exceed max",
                                        }
                                    ],
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    kube.apply(crd)
    try:
        kube.kubectl("wait", "--for=condition=Established", f"crd/ranges.{group}", "--timeout=60s")

        def obj(name: str, lo: int, hi: int) -> Obj:
            return {
                "apiVersion": f"{group}/v1",
                "kind": "Range",
                "metadata": {"name": name},
                "spec": {"min": lo, "max": hi},
            }

        # Discovery may lag the Established condition by a moment.
        wait_for(lambda: kube.create(obj("good", 1, 2), namespace=namespace), 30, "good Range")
        with pytest.raises(KubectlError) as refused:
            kube.create(obj("bad", 5, 2), namespace=namespace)
        assert "min must not exceed max" in refused.value.stderr
        assert kube.try_get("range", "-n", namespace, "bad") is None
    finally:
        kube.kubectl("delete", "crd", f"ranges.{group}", "--wait=false", "--ignore-not-found")
