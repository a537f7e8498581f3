"""The real node: upstream kubelet and kube-proxy, containerd with runc, CNI, CoreDNS.

One node per machine (see :mod:`e2e.cluster.host` for why). Pods are real
containers from images imported into containerd (``ctr images import`` of the
archives ``scripts/images.sh`` writes, and the pause image ``build.sh``
makes), each in its own network namespace on the ``cni0`` bridge
(``10.244.0.0/24``); kube-proxy (iptables) routes ClusterIPs, CoreDNS on the
node IP answers cluster DNS, kube-router's firewall controller enforces
NetworkPolicy, and a fake device plugin advertises ``nvidia.com/gpu`` devices
the kubelet's own device manager hands out.

The settings that this kind of machine needs (cgroup v1, no
CAP_SYS_RESOURCE, no writable ``nf_conntrack_max``) are commented where they
are set; ``shared/REAL-NODE.md`` has the errors each prevents.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from e2e.cluster import host
from e2e.cluster.processes import ProcessTable

POD_SUBNET = "10.244.0.0/24"
CLUSTER_DOMAIN = "cluster.local"
KUBELET_PORT = 10250
# Cluster DNS needs list/watch of what it answers for; bound to CoreDNS's
# client certificate identity.
COREDNS_USER = "system:coredns"
COREDNS_RBAC = f"""
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: "system:coredns"}}
rules:
  - apiGroups: [""]
    resources: [endpoints, services, pods, namespaces]
    verbs: [list, watch]
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: "system:coredns"}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}}
subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: "{COREDNS_USER}"}}]
"""
# NetworkPolicy enforcement reads the policies and whom they select (pods,
# namespaces) and its own Node (the node IP); the read-only part of
# kube-router's ClusterRole, since its router and service proxy do not run.
# Bound to kube-router's client certificate identity, as kube-proxy's is.
KUBE_ROUTER_USER = "system:kube-router"
KUBE_ROUTER_RBAC = f"""
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: "system:kube-router"}}
rules:
  - apiGroups: [""]
    resources: [namespaces, pods, services, nodes, endpoints]
    verbs: [get, list, watch]
  - apiGroups: [networking.k8s.io]
    resources: [networkpolicies]
    verbs: [get, list, watch]
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: "system:kube-router"}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:kube-router"}}
subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: "{KUBE_ROUTER_USER}"}}]
"""


def images_dir() -> Path:
    """Where ``scripts/images.sh`` writes image archives (``KUBETUNE_IMAGES_OUT``)."""
    default = Path.home() / ".cache" / "kubetune-images" / "archives"
    return Path(os.environ.get("KUBETUNE_IMAGES_OUT", default))


def _versions(bin_dir: Path) -> dict[str, str]:
    env = bin_dir.parent / "versions.env"
    if not env.exists():
        return {}
    return dict(line.split("=", 1) for line in env.read_text().split() if "=" in line)


@dataclass(frozen=True)
class RealNode:
    """One node of the local cluster, run by the upstream kubelet.

    Attributes:
        name: Node name (its client certificate is ``system:node:<name>``).
        gpus: Fake ``nvidia.com/gpu`` devices the device plugin advertises.
        ip: The node's InternalIP: CoreDNS, the kubelet and NodePorts listen there.
        state: The cluster's state directory.
        bin: The binaries ``build.sh`` made.
    """

    name: str
    gpus: int
    ip: str
    state: Path
    bin: Path

    @property
    def dir(self) -> Path:
        """Everything of this node's lives here (configs, containerd, kubelet root)."""
        return self.state / "node"

    @property
    def containerd_socket(self) -> Path:
        """The containerd (and CRI) endpoint."""
        return self.dir / "containerd" / "containerd.sock"

    @property
    def pause_image(self) -> str:
        """The sandbox image, as ``build.sh`` tagged it."""
        return _versions(self.bin).get("PAUSE_IMAGE", "localhost/kubetune/pause:3.10-kubetune")

    def ctr(self, *args: str, timeout: float = 300) -> str:
        """Run ``ctr`` in the CRI namespace of this node's containerd; its output."""
        proc = subprocess.run(
            [
                str(self.bin / "ctr"),
                "--address",
                str(self.containerd_socket),
                "-n",
                "k8s.io",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    # --- configuration files -------------------------------------------------
    def _containerd_config(self) -> Path:
        root = self.dir / "containerd"
        cni = self.dir / "cni"
        root.mkdir(parents=True, exist_ok=True)
        path = root / "config.toml"
        path.write_text(
            f"""version = 3
root = "{root / "root"}"
state = "{root / "state"}"

[grpc]
  address = "{self.containerd_socket}"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    # No registry is reachable: the sandbox image is the one build.sh made.
    sandbox = "{self.pause_image}"

[plugins."io.containerd.cri.v1.runtime"]
  # runc cannot write a negative oom_score_adj without CAP_SYS_RESOURCE:
  # without this every sandbox fails ("can't get final child's PID from pipe").
  restrict_oom_score_adj = true
  # Network namespaces under our state, not /run/netns.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
    BinaryName = "runc"
    # The kubelet's cgroupDriver is cgroupfs (no systemd here).
    SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{self.bin / "cni"}"]
    conf_dir = "{cni / "net.d"}"
"""
        )
        (cni / "net.d").mkdir(parents=True, exist_ok=True)
        conflist = {
            "cniVersion": "1.0.0",
            "name": "kubetune",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": host.BRIDGE,
                    "isGateway": True,
                    "ipMasq": True,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_SUBNET}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        # Allocations live and die with the cluster's state.
                        "dataDir": str(cni / "ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        (cni / "net.d" / "10-kubetune.conflist").write_text(json.dumps(conflist, indent=1))
        return path

    def _kubelet_config(self, ca: Path, cert: Path, key: Path) -> Path:
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.ip,
            "port": KUBELET_PORT,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "tlsCertFile": str(cert),
            "tlsPrivateKeyFile": str(key),
            "authentication": {
                "x509": {"clientCAFile": str(ca)},
                "webhook": {"enabled": True},
                "anonymous": {"enabled": False},
            },
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "cgroupDriver": "cgroupfs",
            # This machine's cgroups are v1 (hybrid): the kubelet refuses to
            # start on them unless told to.
            "failCgroupV1": False,
            "failSwapOn": False,
            # No CAP_SYS_RESOURCE: the kubelet may not lower its own
            # oom_score_adj (-999 by default) nor raise the nofile limit
            # above the hard one (20000 here).
            "oomScoreAdj": 0,
            "maxOpenFiles": 20000,
            "clusterDNS": [self.ip],
            "clusterDomain": CLUSTER_DOMAIN,
            "resolvConf": "/etc/resolv.conf",
            # `podLogsDir`, not `podLogsDirectory` (silently ignored).
            "podLogsDir": str(self.dir / "pod-logs"),
            # Imported images cannot be pulled again: never collect them, and
            # do not evict pods for a full disk on a shared test machine.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
            },
            "serializeImagePulls": False,
            "registerNode": True,
            "shutdownGracePeriod": "0s",
            "syncFrequency": "10s",
            "nodeStatusReportFrequency": "10s",
        }
        path = self.dir / "kubelet-config.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def _kube_proxy_config(self, kubeconfig: Path, ports: dict[str, int]) -> Path:
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "hostnameOverride": self.name,
            "mode": "iptables",
            "clusterCIDR": POD_SUBNET,
            "healthzBindAddress": f"127.0.0.1:{ports['kube-proxy-healthz']}",
            "metricsBindAddress": f"127.0.0.1:{ports['kube-proxy-metrics']}",
            # nf_conntrack_max is not writable here; 0 leaves it as it is.
            "conntrack": {"maxPerCore": 0},
            "nodePortAddresses": ["primary"],
            # Would need route_localnet, which this machine does not allow.
            "iptables": {"localhostNodePorts": False},
        }
        path = self.dir / "kube-proxy-config.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def _corefile(self, kubeconfig: Path) -> Path:
        # No `forward`: nothing outside this machine is reachable, and a name
        # outside the cluster should fail at once rather than time out.
        path = self.dir / "Corefile"
        path.write_text(
            f""".:53 {{
    bind {self.ip}
    errors
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
"""
        )
        return path

    # --- processes -------------------------------------------------------------
    def start_runtime(self, procs: ProcessTable) -> None:
        """Start containerd with the node's configuration and import the images."""
        self.dir.mkdir(parents=True, exist_ok=True)
        host.save_sysctls(self.state / "sysctls.json")
        config = self._containerd_config()
        env = {**os.environ, "PATH": f"{self.bin}:{os.environ.get('PATH', '')}"}
        procs.start("containerd", [str(self.bin / "containerd"), "--config", str(config)], env=env)

    def import_images(self) -> list[str]:
        """Import the pause image and every archive in :func:`images_dir`; their names."""
        archives = [self.bin / "pause.tar", *sorted(images_dir().glob("*.tar"))]
        for archive in archives:
            if archive.exists():
                self.ctr("images", "import", str(archive))
        return [n for n in self.ctr("images", "ls", "-q").split() if not n.startswith("sha256:")]

    def start_node(
        self,
        procs: ProcessTable,
        *,
        ca: Path,
        kubeconfigs: Path,
        serving: tuple[Path, Path],
        ports: dict[str, int],
    ) -> None:
        """Start the kubelet, the GPU device plugin, kube-proxy and CoreDNS."""
        kubelet_config = self._kubelet_config(ca, *serving)
        procs.start(
            "kubelet",
            [
                str(self.bin / "kubelet"),
                f"--config={kubelet_config}",
                f"--kubeconfig={kubeconfigs / f'node-{self.name}.kubeconfig'}",
                f"--root-dir={self.dir / 'kubelet'}",
                f"--hostname-override={self.name}",
                f"--node-ip={self.ip}",
                "--node-labels=kubetune.io/e2e-node=true",
                "--v=1",
            ],
        )
        procs.start("gpu-plugin", [str(self.bin / "gpu-plugin"), f"--devices={self.gpus}"])
        procs.start(
            "kube-proxy",
            [
                str(self.bin / "kube-proxy"),
                f"--config={self._kube_proxy_config(kubeconfigs / 'kube-proxy.kubeconfig', ports)}",
                "--v=1",
            ],
        )
        procs.start(
            "coredns",
            [
                str(self.bin / "coredns"),
                "-conf",
                str(self._corefile(kubeconfigs / "coredns.kubeconfig")),
            ],
        )

    def kube_router_argv(self, kubeconfig: Path, service_cidr: str, health_port: int) -> list[str]:
        """kube-router as NetworkPolicy enforcement only, next to kube-proxy and the bridge CNI.

        The firewall controller filters pod traffic in the filter table's
        INPUT, FORWARD and OUTPUT chains with ipsets of the selected pods;
        traffic between two pods on ``cni0`` reaches FORWARD because
        br_netfilter hands bridged packets to iptables, and traffic to a
        ClusterIP is filtered after kube-proxy's DNAT (the pod's own IP).
        Pods no policy selects are not filtered at all.
        """
        return [
            str(self.bin / "kube-router"),
            f"--kubeconfig={kubeconfig}",
            f"--hostname-override={self.name}",
            "--run-firewall=true",
            "--run-router=false",
            "--run-service-proxy=false",
            # Its default is 10.96.0.0/12: it must be the API server's range
            # (traffic to it is routed by kube-proxy, not filtered as a pod's).
            f"--service-cluster-ip-range={service_cidr}",
            f"--health-port={health_port}",
            "--v=1",
        ]

    def start_firewall(
        self, procs: ProcessTable, *, kubeconfigs: Path, service_cidr: str, ports: dict[str, int]
    ) -> None:
        """Start kube-router's NetworkPolicy firewall; the Node must exist (it reads its IP)."""
        procs.start(
            "kube-router",
            self.kube_router_argv(
                kubeconfigs / "kube-router.kubeconfig", service_cidr, ports["kube-router-health"]
            ),
            # It runs iptables-save/-restore and ipset from PATH.
            env={**os.environ, "PATH": f"{self.bin}:{os.environ.get('PATH', '')}"},
        )

    def clean_host(self) -> None:
        """Undo what this node changed on the host (see :func:`host.clean`)."""
        proxy = self.bin / "kube-proxy"
        if proxy.exists():
            subprocess.run([str(proxy), "--cleanup"], capture_output=True, check=False, timeout=60)
        host.clean(self.state, self.containerd_socket)
