"""The local cluster: etcd, kube-apiserver, controller manager, scheduler and a real node.

``Cluster.up`` generates the PKI and kubeconfigs (:mod:`e2e.cluster.credentials`),
starts the upstream binaries built by ``build.sh`` with free ports
(:mod:`e2e.cluster.control_plane`), waits for ``/readyz``, starts the real
node (containerd, kubelet, kube-proxy, CoreDNS, the fake GPU device plugin:
see :mod:`e2e.cluster.node`), imports the images, waits until the node is
Ready, schedulable and shows its GPUs, then starts kube-router's NetworkPolicy
firewall and waits for its first sync. ``Cluster.down`` stops all of it and
puts the host back as it was (:mod:`e2e.cluster.host`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from e2e.cluster import control_plane, host
from e2e.cluster.credentials import Credentials, issue_credentials, issue_kubelet_serving
from e2e.cluster.node import COREDNS_RBAC, KUBE_ROUTER_RBAC, RealNode
from e2e.cluster.paths import K8S_VERSION, bin_dir, missing_binaries, state_dir
from e2e.cluster.pki import Pki
from e2e.cluster.processes import ProcessTable
from e2e.kube import Api, ApiError

NODE_NAME = "kubetune-node-0"
# Two fake GPUs: enough for parallel GPU trials, few enough that the tests
# can fill the node and see the next GPU Pod wait.
DEFAULT_GPUS = 2


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
        """Start every component in order, each step waiting for what the next needs."""
        ports = control_plane.allocate_ports()
        server = f"https://127.0.0.1:{ports['apiserver']}"
        node = self.node(detect_node_ip())
        host.claim(self.state)
        pki = Pki(self.state / "pki")
        self.log(f"generating certificates in {pki.dir}")
        creds = issue_credentials(
            pki, self.state / "kubeconfigs", server=server, node_name=node.name, node_ip=node.ip
        )
        shutil.copy(creds.kubeconfigs / "admin.kubeconfig", self.kubeconfig)
        self.kubeconfig.chmod(0o600)
        self._record_info(server, ports, node)

        # containerd first: it needs nothing else, and the images import
        # while the control plane starts.
        self.log("starting containerd")
        node.start_runtime(self.procs)
        self._start_etcd(ports, deadline)
        admin = self._start_apiserver(ports, node.ip, creds, deadline)
        self._start_controllers(ports, creds)
        self._kubectl_apply(COREDNS_RBAC)
        self._kubectl_apply(KUBE_ROUTER_RBAC)
        images = node.import_images()
        self.log(f"imported {len(images)} images into containerd: {', '.join(images)}")
        self._start_node(node, pki, creds, ports)
        self._wait_nodes(admin, deadline)
        # After the node: kube-router reads its Node object once, at start.
        self.log("starting kube-router (NetworkPolicy firewall only)")
        node.start_firewall(
            self.procs,
            kubeconfigs=creds.kubeconfigs,
            service_cidr=control_plane.SERVICE_CIDR,
            ports=ports,
        )
        self._wait_firewall(deadline)
        self._wait_default_service_account(admin, deadline)
        admin.close()

    def _record_info(self, server: str, ports: dict[str, int], node: RealNode) -> None:
        """Write ``cluster.json``: version, API server, ports, binaries and the node."""
        info: dict[str, Any] = {
            "version": K8S_VERSION,
            "server": server,
            "ports": ports,
            "bin": str(self.bin),
            "node": {"name": node.name, "gpus": node.gpus, "ip": node.ip},
        }
        self.info_path.write_text(json.dumps(info, indent=1))

    def _start_etcd(self, ports: dict[str, int], deadline: float) -> None:
        self.log("starting etcd")
        self.procs.start("etcd", control_plane.etcd_argv(self.bin, self.state / "etcd", ports))
        self._wait_http(f"{control_plane.etcd_url(ports)}/health", deadline, "etcd")

    def _start_apiserver(
        self, ports: dict[str, int], node_ip: str, creds: Credentials, deadline: float
    ) -> Api:
        """Start kube-apiserver, wait for ``/readyz``; an admin client of it."""
        self.log("starting kube-apiserver")
        self.procs.start(
            "kube-apiserver",
            control_plane.apiserver_argv(self.bin, ports, node_ip, creds, self.state),
            env=control_plane.apiserver_env(),
        )
        admin = Api.from_kubeconfig(self.kubeconfig)
        self._wait_api(admin, "/readyz", deadline, "kube-apiserver")
        return admin

    def _start_controllers(self, ports: dict[str, int], creds: Credentials) -> None:
        self.log("starting kube-controller-manager, kube-scheduler")
        self.procs.start(
            "kube-controller-manager", control_plane.controller_manager_argv(self.bin, ports, creds)
        )
        self.procs.start("kube-scheduler", control_plane.scheduler_argv(self.bin, ports, creds))

    def _start_node(
        self, node: RealNode, pki: Pki, creds: Credentials, ports: dict[str, int]
    ) -> None:
        self.log(
            f"starting the node {node.name} (kubelet, kube-proxy, CoreDNS, {node.gpus} fake GPUs)"
        )
        serving = issue_kubelet_serving(pki, node.name, node.ip)
        node.start_node(
            self.procs,
            ca=creds.ca,
            kubeconfigs=creds.kubeconfigs,
            serving=(serving.cert, serving.key),
            ports=ports,
        )

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

    def _wait_firewall(self, deadline: float) -> None:
        """Wait for kube-router's first sync: its chain hooked into FORWARD.

        Its health endpoint tracks heartbeats, not whether policies are in
        place yet; the jump from the built-in chain is written by its first
        full sync.
        """
        while True:
            self._check_alive("kube-router")
            rules = subprocess.run(
                ["iptables", "-w", "-t", "filter", "-S", "FORWARD"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            if "-j KUBE-ROUTER-FORWARD" in rules:
                self.log("kube-router enforces NetworkPolicy")
                return
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"kube-router never hooked into FORWARD; see {self.state / 'logs'}"
                )
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
