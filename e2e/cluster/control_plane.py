"""The control plane's command lines: etcd, kube-apiserver, kube-controller-manager, kube-scheduler.

Functions from the cluster's binaries, ports and credentials to the argv each
component starts with; :class:`e2e.cluster.cluster.Cluster` starts them and
waits for them.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from e2e.cluster.credentials import Credentials

SERVICE_CIDR = "10.96.0.0/16"

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


def free_port() -> int:
    """Ask the kernel for a currently unused loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def allocate_ports() -> dict[str, int]:
    """A free port for every listener of the control plane, kube-proxy and kube-router."""
    names = (
        "etcd",
        "etcd-peer",
        "apiserver",
        "controller-manager",
        "scheduler",
        "kube-proxy-healthz",
        "kube-proxy-metrics",
        "kube-router-health",
    )
    return {name: free_port() for name in names}


def etcd_url(ports: dict[str, int]) -> str:
    """The client URL of etcd."""
    return f"http://127.0.0.1:{ports['etcd']}"


def etcd_argv(binaries: Path, data_dir: Path, ports: dict[str, int]) -> list[str]:
    """etcd: one member on loopback, without fsync."""
    client_url = etcd_url(ports)
    peer_url = f"http://127.0.0.1:{ports['etcd-peer']}"
    return [
        str(binaries / "etcd"),
        "--name=e2e",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client_url}",
        f"--advertise-client-urls={client_url}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=e2e={peer_url}",
        # Test data is disposable: skipping fsync makes every API
        # write faster on slow CI disks.
        "--unsafe-no-fsync",
        "--log-level=warn",
        "--quota-backend-bytes=4294967296",
    ]


# What the API server's audit log keeps: every request of a ServiceAccount
# (the operator's and the service's calls, from which e2e derives the RBAC
# they use) and who deleted a Pod. Metadata only: no bodies.
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  userGroups: ["system:serviceaccounts"]
- level: Metadata
  verbs: [delete, deletecollection]
  resources: [{group: "", resources: [pods]}]
- level: None
"""


def audit_files(state: Path) -> tuple[Path, Path]:
    """The audit policy the API server reads and the log it writes, under ``state``."""
    return state / "audit-policy.yaml", state / "audit.log"


def apiserver_argv(
    binaries: Path, ports: dict[str, int], node_ip: str, creds: Credentials, state: Path
) -> list[str]:
    """kube-apiserver: Node and RBAC authorization, NodeRestriction, advertised on the node IP."""
    policy, audit_log = audit_files(state)
    policy.write_text(AUDIT_POLICY)
    return [
        str(binaries / "kube-apiserver"),
        f"--etcd-servers={etcd_url(ports)}",
        # Pods reach the API server through the "kubernetes" Service
        # (10.96.0.1), which kube-proxy sends to the node IP.
        "--bind-address=0.0.0.0",
        f"--advertise-address={node_ip}",
        f"--secure-port={ports['apiserver']}",
        f"--tls-cert-file={creds.serving.cert}",
        f"--tls-private-key-file={creds.serving.key}",
        f"--client-ca-file={creds.ca}",
        "--authorization-mode=Node,RBAC",
        "--enable-admission-plugins=NodeRestriction",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={creds.service_account.cert}",
        f"--service-account-signing-key-file={creds.service_account.key}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        f"--kubelet-client-certificate={creds.kubelet_client.cert}",
        f"--kubelet-client-key={creds.kubelet_client.key}",
        f"--kubelet-certificate-authority={creds.ca}",
        "--kubelet-preferred-address-types=InternalIP,Hostname",
        "--allow-privileged=true",
        f"--requestheader-client-ca-file={creds.ca}",
        "--requestheader-allowed-names=front-proxy-client",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={creds.front_proxy.cert}",
        f"--proxy-client-key-file={creds.front_proxy.key}",
        f"--cert-dir={creds.pki_dir}",
        # Profiling on demand (go tool pprof against /debug/pprof).
        f"--profiling={str(os.environ.get('KUBETUNE_E2E_PROFILING') == '1').lower()}",
        f"--audit-policy-file={policy}",
        f"--audit-log-path={audit_log}",
        "--audit-log-maxsize=1000",
        "--audit-log-maxbackup=1",
        "--v=1",
    ]


def apiserver_env() -> dict[str, str]:
    """kube-apiserver's environment: this one, with ``GOGC`` raised."""
    # Collect garbage less often (the default GOGC is 100): on a 2-core
    # machine the API server's GC was an eighth of its CPU, and memory is
    # not what is short here.
    return {**os.environ, "GOGC": os.environ.get("KUBETUNE_E2E_APISERVER_GOGC", "400")}


def controller_manager_argv(binaries: Path, ports: dict[str, int], creds: Credentials) -> list[str]:
    """kube-controller-manager: :data:`CONTROLLERS`, no leader election."""
    config = creds.kubeconfigs / "controller-manager.kubeconfig"
    return [
        str(binaries / "kube-controller-manager"),
        f"--kubeconfig={config}",
        f"--authentication-kubeconfig={config}",
        f"--authorization-kubeconfig={config}",
        "--bind-address=127.0.0.1",
        f"--secure-port={ports['controller-manager']}",
        f"--cert-dir={creds.pki_dir / 'controller-manager'}",
        "--leader-elect=false",
        "--use-service-account-credentials=true",
        f"--controllers={','.join(CONTROLLERS)}",
        f"--root-ca-file={creds.ca}",
        f"--service-account-private-key-file={creds.service_account.key}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        # Higher client rates so 500 kwok pods are created in seconds.
        "--kube-api-qps=200",
        "--kube-api-burst=400",
        "--v=1",
    ]


def scheduler_argv(binaries: Path, ports: dict[str, int], creds: Credentials) -> list[str]:
    """kube-scheduler: no leader election, the same client rates as the controller manager."""
    config = creds.kubeconfigs / "scheduler.kubeconfig"
    return [
        str(binaries / "kube-scheduler"),
        f"--kubeconfig={config}",
        f"--authentication-kubeconfig={config}",
        f"--authorization-kubeconfig={config}",
        "--bind-address=127.0.0.1",
        f"--secure-port={ports['scheduler']}",
        f"--cert-dir={creds.pki_dir / 'scheduler'}",
        "--leader-elect=false",
        "--kube-api-qps=200",
        "--kube-api-burst=400",
        "--v=1",
    ]
