"""The local cluster: etcd, kube-apiserver, controller manager, scheduler and a real node.

``Cluster.up`` generates the PKI and kubeconfigs, starts the upstream binaries
built by ``build.sh`` with free ports, waits for ``/readyz``, starts the real
node (containerd, kubelet, kube-proxy, CoreDNS, the fake GPU device plugin:
see :mod:`e2e.cluster.node`), imports the images, and waits until the node is
Ready, schedulable and shows its GPUs. ``Cluster.down`` stops all of it and
puts the host back as it was (:mod:`e2e.cluster.host`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from e2e.cluster import host
from e2e.cluster.node import COREDNS_RBAC, COREDNS_USER, RealNode
from e2e.cluster.pki import CertPair, Pki
from e2e.cluster.processes import ProcessTable
from e2e.kube import Api, ApiError

# Keep in sync with build.sh (both honour KUBETUNE_K8S_VERSION).
K8S_VERSION = os.environ.get("KUBETUNE_K8S_VERSION", "v1.36.3")
SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"
REPO_ROOT = Path(__file__).resolve().parents[2]

# The controllers the issue asks for, plus the few more that workloads of the
# operator's e2e tests rely on (endpoints for Services, statefulsets, cronjobs,
# TTL for finished Jobs, resource quotas, disruption budgets).
CONTROLLERS = (
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "node-lifecycle-controller",
    "taint-eviction-controller",
    "pod-garbage-collector-controller",
    "deployment-controller",
    "replicaset-controller",
    "job-controller",
    "cronjob-controller",
    "statefulset-controller",
    "daemonset-controller",
    "endpoints-controller",
    "endpointslice-controller",
    "endpointslice-mirroring-controller",
    "ttl-after-finished-controller",
    "resourcequota-controller",
    "disruption-controller",
)


def cache_dir() -> Path:
    """The build cache root (``KUBETUNE_E2E_CACHE``, default ``~/.cache/kubetune-e2e``)."""
    return Path(os.environ.get("KUBETUNE_E2E_CACHE", Path.home() / ".cache" / "kubetune-e2e"))


def bin_dir() -> Path:
    """Where ``build.sh`` puts the binaries (``KUBETUNE_E2E_BIN`` overrides)."""
    override = os.environ.get("KUBETUNE_E2E_BIN")
    return Path(override) if override else cache_dir() / K8S_VERSION / "bin"


def state_dir() -> Path:
    """The running cluster's state (``KUBETUNE_E2E_STATE``, default ``/var/lib/kubetune-e2e``).

    Not under /tmp: a pod's emptyDir mounted at /tmp (the chart's read-only
    root filesystem needs one) would hide the state directory inside the
    pod's mount namespace, and its later bind mounts would fail.
    """
    return Path(os.environ.get("KUBETUNE_E2E_STATE", "/var/lib/kubetune-e2e"))


REQUIRED_BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kubelet",
    "kube-proxy",
    "containerd",
    "containerd-shim-runc-v2",
    "ctr",
    "coredns",
    "gpu-plugin",
    "cni/bridge",
    "cni/host-local",
    "cni/loopback",
    "cni/portmap",
)
NODE_NAME = "kubetune-node-0"
# Two fake GPUs: enough for parallel GPU trials, few enough that the tests
# can fill the node and see the next GPU Pod wait.
DEFAULT_GPUS = 2


def missing_binaries(directory: Path | None = None) -> list[str]:
    """Names of the required binaries not (yet) built (runc comes from Debian's package)."""
    d = directory or bin_dir()
    missing = [b for b in REQUIRED_BINARIES if not os.access(d / b, os.X_OK)]
    return missing + ([] if shutil.which("runc") else ["runc (apt-get install runc)"])


def detect_node_ip() -> str:
    """The host's first global IPv4 address (``KUBETUNE_E2E_NODE_IP`` overrides).

    Pods reach the API server and cluster DNS there; it cannot be a loopback
    address (pods have their own network namespaces).
    """
    override = os.environ.get("KUBETUNE_E2E_NODE_IP")
    if override:
        return override
    with contextlib.suppress(OSError):
        out = subprocess.run(
            ["ip", "-4", "-o", "addr", "show", "scope", "global"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        for line in out.splitlines():
            parts = line.split()
            if "inet" in parts and parts[1] != host.BRIDGE:
                return parts[parts.index("inet") + 1].split("/")[0]
    raise ClusterError("no global IPv4 address for the node: set KUBETUNE_E2E_NODE_IP")


def free_port() -> int:
    """Ask the kernel for a currently unused loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, server: str, ca: Path, client: CertPair, user: str) -> None:
    """Write a self-contained kubeconfig (credentials inlined) for one identity."""
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kubetune-e2e",
                "cluster": {"server": server, "certificate-authority-data": _b64(ca)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": _b64(client.cert),
                    "client-key-data": _b64(client.key),
                },
            }
        ],
        "contexts": [
            {"name": "kubetune-e2e", "context": {"cluster": "kubetune-e2e", "user": user}}
        ],
        "current-context": "kubetune-e2e",
    }
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o600)


class ClusterError(RuntimeError):
    """The control plane failed to start; the message names the log to read."""


class Cluster:
    """A local control plane rooted in a state directory.

    Args:
        state: State directory (PKI, etcd data, logs, kubeconfigs, the node's files).
        binaries: Directory holding the upstream binaries.
        gpus: Fake GPUs of the node (``KUBETUNE_E2E_GPUS``, default 2).
        log: Progress printer.
    """

    def __init__(
        self,
        state: Path | None = None,
        binaries: Path | None = None,
        gpus: int | None = None,
        log: Any = None,
    ) -> None:
        self.state = state or state_dir()
        self.bin = binaries or bin_dir()
        self.gpus = (
            gpus if gpus is not None else int(os.environ.get("KUBETUNE_E2E_GPUS", DEFAULT_GPUS))
        )
        self.procs = ProcessTable(self.state)
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._t0 = time.monotonic()

    # --- paths -------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig handed to users and tests."""
        return self.state / "kubeconfig"

    @property
    def info_path(self) -> Path:
        """``cluster.json``: ports and versions of the running cluster."""
        return self.state / "cluster.json"

    def info(self) -> dict[str, Any]:
        """The running cluster's recorded facts (empty when not up)."""
        if not self.info_path.exists():
            return {}
        data: dict[str, Any] = json.loads(self.info_path.read_text())
        return data

    def log(self, msg: str) -> None:
        """Print a progress line with the elapsed time."""
        self._log(f"[e2e.cluster +{time.monotonic() - self._t0:5.1f}s] {msg}")

    def node(self, ip: str | None = None) -> RealNode:
        """The cluster's node (its IP as recorded when ``ip`` is not given)."""
        ip = ip if ip is not None else self.info().get("node", {}).get("ip", "")
        return RealNode(NODE_NAME, self.gpus, ip, self.state, self.bin)

    # --- lifecycle ---------------------------------------------------------
    def is_up(self) -> bool:
        """Whether the recorded API server process is alive."""
        return any(r.name == "kube-apiserver" and r.alive() for r in self.procs.load())

    def up(self, timeout: float = 180.0) -> Path:
        """Start everything and wait until it is usable.

        Returns:
            The admin kubeconfig path.

        Raises:
            ClusterError: A component did not become ready in time.
            FileNotFoundError: Binaries are missing (run ``build.sh``).
        """
        self._t0 = time.monotonic()
        missing = missing_binaries(self.bin)
        if missing:
            raise FileNotFoundError(
                f"missing binaries in {self.bin}: {', '.join(missing)}; run e2e/cluster/build.sh"
            )
        if self.is_up():
            self.log("already up")
            return self.kubeconfig
        self._refuse_a_second_node()
        self.down(quiet=True)
        # A fresh state every time: a test session must not see objects left
        # by an earlier one, and etcd/PKI creation costs well under a second.
        if self.state.exists():
            shutil.rmtree(self.state)
        self.state.mkdir(parents=True)
        deadline = time.monotonic() + timeout
        try:
            self._up(deadline)
        except BaseException:
            self.log(f"start failed; logs are in {self.state / 'logs'}")
            self.down(quiet=True, keep_state=True)
            raise
        self.log(f"up; export KUBECONFIG={self.kubeconfig}")
        return self.kubeconfig

    def _refuse_a_second_node(self) -> None:
        """One real node per machine: refuse a live one, clean a dead one's leftovers."""
        other = host.owner().get("state")
        if other and other != str(self.state):
            if Cluster(Path(other), self.bin).is_up():
                raise ClusterError(
                    f"a real-node cluster already runs on this machine (state {other}); "
                    "there can be one per machine (the node's iptables chains, bridge and "
                    f"device-plugin directory are machine-wide): stop it with "
                    f"KUBETUNE_E2E_STATE={other} python -m e2e.cluster down"
                )
            self.log(f"cleaning the leftovers of a dead cluster in {other}")
            Cluster(Path(other), self.bin).down(quiet=True)
        kubelets = host.running_kubelets()
        if kubelets:
            raise ClusterError(
                "a kubelet already runs on this machine, and there can be one per machine: "
                + "; ".join(kubelets)
            )

    def _up(self, deadline: float) -> None:
        pki_dir = self.state / "pki"
        pki = Pki(pki_dir)
        ports = {
            "etcd": free_port(),
            "etcd-peer": free_port(),
            "apiserver": free_port(),
            "controller-manager": free_port(),
            "scheduler": free_port(),
            "kube-proxy-healthz": free_port(),
            "kube-proxy-metrics": free_port(),
        }
        server = f"https://127.0.0.1:{ports['apiserver']}"
        node = self.node(detect_node_ip())
        node_ip = node.ip
        host.claim(self.state)
        self.log(f"generating certificates in {pki_dir}")
        serving = pki.issue(
            "apiserver",
            "kube-apiserver",
            server=True,
            dns_names=(
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ),
            ip_addresses=("127.0.0.1", KUBERNETES_SERVICE_IP, node_ip),
        )
        kubelet_client = pki.issue(
            "apiserver-kubelet-client",
            "kube-apiserver-kubelet-client",
            ("system:masters",),
            client=True,
        )
        # Front-proxy identity: lets the API server authenticate to aggregated
        # API servers, and gives the components' delegated authentication the
        # request-header CA they look for (they log errors without one).
        front_proxy = pki.issue("front-proxy-client", "front-proxy-client", client=True)
        sa = pki.service_account_keys()
        kcfg = self.state / "kubeconfigs"
        kcfg.mkdir()
        identities = {
            "admin": ("kubetune-admin", ("system:masters",)),
            "controller-manager": ("system:kube-controller-manager", ()),
            "scheduler": ("system:kube-scheduler", ()),
            "kube-proxy": ("system:kube-proxy", ()),
            "coredns": (COREDNS_USER, ()),
            f"node-{node.name}": (f"system:node:{node.name}", ("system:nodes",)),
        }
        for name, (cn, orgs) in identities.items():
            pair = pki.issue(name, cn, orgs, client=True)
            write_kubeconfig(kcfg / f"{name}.kubeconfig", server, pki.ca.cert, pair, cn)
        shutil.copy(kcfg / "admin.kubeconfig", self.kubeconfig)
        self.kubeconfig.chmod(0o600)
        info: dict[str, Any] = {
            "version": K8S_VERSION,
            "server": server,
            "ports": ports,
            "bin": str(self.bin),
            "node": {"name": node.name, "gpus": node.gpus, "ip": node_ip},
        }
        self.info_path.write_text(json.dumps(info, indent=1))

        # containerd first: it needs nothing else, and the images import
        # while the control plane starts.
        self.log("starting containerd")
        node.start_runtime(self.procs)

        self.log("starting etcd")
        etcd_url = f"http://127.0.0.1:{ports['etcd']}"
        peer_url = f"http://127.0.0.1:{ports['etcd-peer']}"
        self.procs.start(
            "etcd",
            [
                str(self.bin / "etcd"),
                "--name=e2e",
                f"--data-dir={self.state / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=e2e={peer_url}",
                # Test data is disposable: skipping fsync makes every API
                # write faster on slow CI disks.
                "--unsafe-no-fsync",
                "--log-level=warn",
                "--quota-backend-bytes=4294967296",
            ],
        )
        self._wait_http(f"{etcd_url}/health", deadline, "etcd")

        self.log("starting kube-apiserver")
        p = pki_dir
        self.procs.start(
            "kube-apiserver",
            [
                str(self.bin / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                # Pods reach the API server through the "kubernetes" Service
                # (10.96.0.1), which kube-proxy sends to the node IP.
                "--bind-address=0.0.0.0",
                f"--advertise-address={node_ip}",
                f"--secure-port={ports['apiserver']}",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                f"--client-ca-file={pki.ca.cert}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={sa.cert}",
                f"--service-account-signing-key-file={sa.key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--kubelet-client-certificate={kubelet_client.cert}",
                f"--kubelet-client-key={kubelet_client.key}",
                f"--kubelet-certificate-authority={pki.ca.cert}",
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                "--allow-privileged=true",
                f"--requestheader-client-ca-file={pki.ca.cert}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={front_proxy.cert}",
                f"--proxy-client-key-file={front_proxy.key}",
                f"--cert-dir={p}",
                # Profiling on demand (go tool pprof against /debug/pprof).
                f"--profiling={str(os.environ.get('KUBETUNE_E2E_PROFILING') == '1').lower()}",
                "--v=1",
            ],
            # Collect garbage less often (the default GOGC is 100): on a
            # 2-core machine the API server's GC was an eighth of its CPU,
            # and memory is not what is short here.
            env={**os.environ, "GOGC": os.environ.get("KUBETUNE_E2E_APISERVER_GOGC", "400")},
        )
        admin = Api.from_kubeconfig(self.kubeconfig)
        self._wait_api(admin, "/readyz", deadline, "kube-apiserver")

        self.log("starting kube-controller-manager, kube-scheduler")
        cm_cfg = kcfg / "controller-manager.kubeconfig"
        self.procs.start(
            "kube-controller-manager",
            [
                str(self.bin / "kube-controller-manager"),
                f"--kubeconfig={cm_cfg}",
                f"--authentication-kubeconfig={cm_cfg}",
                f"--authorization-kubeconfig={cm_cfg}",
                "--bind-address=127.0.0.1",
                f"--secure-port={ports['controller-manager']}",
                f"--cert-dir={p / 'controller-manager'}",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--controllers={','.join(CONTROLLERS)}",
                f"--root-ca-file={pki.ca.cert}",
                f"--service-account-private-key-file={sa.key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # Higher client rates so 500 kwok pods are created in seconds.
                "--kube-api-qps=200",
                "--kube-api-burst=400",
                "--v=1",
            ],
        )
        sch_cfg = kcfg / "scheduler.kubeconfig"
        self.procs.start(
            "kube-scheduler",
            [
                str(self.bin / "kube-scheduler"),
                f"--kubeconfig={sch_cfg}",
                f"--authentication-kubeconfig={sch_cfg}",
                f"--authorization-kubeconfig={sch_cfg}",
                "--bind-address=127.0.0.1",
                f"--secure-port={ports['scheduler']}",
                f"--cert-dir={p / 'scheduler'}",
                "--leader-elect=false",
                "--kube-api-qps=200",
                "--kube-api-burst=400",
                "--v=1",
            ],
        )

        self._kubectl_apply(COREDNS_RBAC)
        images = node.import_images()
        self.log(f"imported {len(images)} images into containerd: {', '.join(images)}")
        self.log(
            f"starting the node {node.name} (kubelet, kube-proxy, CoreDNS, {node.gpus} fake GPUs)"
        )
        serving_node = pki.issue(
            f"kubelet-serving-{node.name}",
            f"system:node:{node.name}",
            ("system:nodes",),
            server=True,
            dns_names=(node.name, "localhost"),
            ip_addresses=tuple({"127.0.0.1", node_ip}),
        )
        node.start_node(
            self.procs,
            ca=pki.ca.cert,
            kubeconfigs=kcfg,
            serving=(serving_node.cert, serving_node.key),
            ports=ports,
        )
        self._wait_nodes(admin, deadline)
        self._wait_default_service_account(admin, deadline)
        admin.close()

    def _kubectl_apply(self, manifest: str) -> None:
        subprocess.run(
            [str(self.bin / "kubectl"), f"--kubeconfig={self.kubeconfig}", "apply", "-f", "-"],
            input=manifest,
            text=True,
            capture_output=True,
            check=True,
        )

    def _check_alive(self, component: str) -> None:
        for rec in self.procs.load():
            if not rec.alive():
                tail = Path(rec.log).read_text(errors="replace")[-3000:]
                raise ClusterError(f"{rec.name} exited (log {rec.log}):\n{tail}")

    def _wait_http(self, url: str, deadline: float, component: str) -> None:
        import httpx

        while True:
            self._check_alive(component)
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2).status_code == 200:
                    self.log(f"{component} ready")
                    return
            if time.monotonic() > deadline:
                raise ClusterError(f"{component} not ready at {url}; see {self.state / 'logs'}")
            time.sleep(0.2)

    def _wait_api(self, api: Api, path: str, deadline: float, component: str) -> None:
        import httpx

        while True:
            self._check_alive(component)
            with contextlib.suppress(httpx.HTTPError, ApiError):
                api.get(path)
                self.log(f"{component} ready")
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"{component} not ready; see {self.state / 'logs'}")
            time.sleep(0.25)

    def _wait_nodes(self, api: Api, deadline: float) -> None:
        state = "not registered"
        while True:
            self._check_alive("nodes")
            with contextlib.suppress(ApiError):
                node = api.get(f"/api/v1/nodes/{NODE_NAME}")
                conds = {c["type"]: c["status"] for c in node["status"].get("conditions", [])}
                taints = [t["key"] for t in node["spec"].get("taints", [])]
                gpus = int(node["status"].get("allocatable", {}).get("nvidia.com/gpu", "0"))
                # The node-lifecycle controller removes the not-ready taint
                # once it sees Ready: only then can pods land. The GPUs appear
                # once the device plugin has registered.
                if conds.get("Ready") != "True":
                    state = "not Ready"
                elif "node.kubernetes.io/not-ready" in taints:
                    state = "still tainted not-ready"
                elif gpus != self.gpus:
                    state = f"{gpus} of {self.gpus} GPUs allocatable"
                else:
                    self.log(f"node {NODE_NAME} ready with {gpus} GPUs")
                    return
            if time.monotonic() > deadline:
                raise ClusterError(f"node {NODE_NAME} {state}; see {self.state / 'logs'}")
            time.sleep(0.25)

    def _wait_default_service_account(self, api: Api, deadline: float) -> None:
        # Pods are refused until the namespace's default ServiceAccount exists.
        while True:
            try:
                api.get("/api/v1/namespaces/default/serviceaccounts/default")
                api.get("/api/v1/namespaces/default/configmaps/kube-root-ca.crt")
                self.log("default service account and root CA published")
                return
            except ApiError:
                if time.monotonic() > deadline:
                    raise ClusterError("default ServiceAccount never appeared") from None
                time.sleep(0.25)

    def down(self, quiet: bool = False, keep_state: bool = False) -> None:
        """Stop every process of this state directory, its containers, and clean the host."""
        stopped = self.procs.stop_all()
        # The host's chains, bridge and mounts are shared with whichever node
        # runs on this machine: only its owner (or a dead one) cleans them.
        if (
            host.owner().get("state", str(self.state)) == str(self.state)
            and not host.running_kubelets()
        ):
            self.node().clean_host()
        host.release(self.state)
        if not quiet:
            self.log(f"stopped {', '.join(stopped) or 'nothing (not running)'}")
        if (
            not keep_state
            and os.environ.get("KUBETUNE_E2E_KEEP_STATE") != "1"
            and self.state.exists()
        ):
            shutil.rmtree(self.state, ignore_errors=True)

    def status(self) -> dict[str, Any]:
        """Liveness and memory (RSS) of every recorded process plus the cluster facts."""
        procs = {
            r.name: {"pid": r.pid, "alive": r.alive(), "rss_mib": _rss_mib(r.pid)}
            for r in self.procs.load()
        }
        return {
            "up": self.is_up(),
            "kubeconfig": str(self.kubeconfig),
            "processes": procs,
            "rss_mib_total": round(sum(p["rss_mib"] for p in procs.values()), 1),
            **self.info(),
        }


def _rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB (0 when gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0
