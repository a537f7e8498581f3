"""Who each component of the local cluster is: its certificates and its kubeconfig.

:class:`e2e.cluster.pki.Pki` signs; this module decides what to sign: the API
server's serving certificate and its client identities (kubelet client, front
proxy), the service-account key pair, and one client certificate with a
self-contained kubeconfig per identity (admin, controller manager, scheduler,
kube-proxy, CoreDNS, kube-router, the node), plus the kubelet's serving certificate.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

import yaml

from e2e.cluster.node import COREDNS_USER, KUBE_ROUTER_USER
from e2e.cluster.pki import CertPair, Pki

# The "kubernetes" Service's cluster IP: the API server's certificate names it.
KUBERNETES_SERVICE_IP = "10.96.0.1"


@dataclass(frozen=True)
class Credentials:
    """The files the control plane's command lines name."""

    # The PKI directory: the API server's --cert-dir, the parent of the others'.
    pki_dir: Path
    # The CA certificate every component trusts.
    ca: Path
    # The API server's serving certificate (SANs: localhost, the Service, the node IP).
    serving: CertPair
    # The API server's client certificate towards the kubelet.
    kubelet_client: CertPair
    # The API server's front-proxy identity (aggregated APIs, request-header CA).
    front_proxy: CertPair
    # The service-account signing pair (``cert`` holds the public key).
    service_account: CertPair
    # One ``<identity>.kubeconfig`` per identity (admin, controller-manager, ...).
    kubeconfigs: Path


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


def issue_credentials(
    pki: Pki, kubeconfigs: Path, *, server: str, node_name: str, node_ip: str
) -> Credentials:
    """Issue the control plane's certificates and write every identity's kubeconfig.

    Args:
        pki: The cluster's CA.
        kubeconfigs: A new directory for the kubeconfigs.
        server: The API server's URL, written into every kubeconfig.
        node_name: The node's name (its identity is ``system:node:<name>``).
        node_ip: The node's IP: the API server is advertised there.
    """
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
    service_account = pki.service_account_keys()
    kubeconfigs.mkdir()
    identities = {
        "admin": ("kubetune-admin", ("system:masters",)),
        "controller-manager": ("system:kube-controller-manager", ()),
        "scheduler": ("system:kube-scheduler", ()),
        "kube-proxy": ("system:kube-proxy", ()),
        "coredns": (COREDNS_USER, ()),
        "kube-router": (KUBE_ROUTER_USER, ()),
        f"node-{node_name}": (f"system:node:{node_name}", ("system:nodes",)),
    }
    for name, (cn, orgs) in identities.items():
        pair = pki.issue(name, cn, orgs, client=True)
        write_kubeconfig(kubeconfigs / f"{name}.kubeconfig", server, pki.ca.cert, pair, cn)
    return Credentials(
        pki_dir=pki.dir,
        ca=pki.ca.cert,
        serving=serving,
        kubelet_client=kubelet_client,
        front_proxy=front_proxy,
        service_account=service_account,
        kubeconfigs=kubeconfigs,
    )


def issue_kubelet_serving(pki: Pki, node_name: str, node_ip: str) -> CertPair:
    """The kubelet's serving certificate (the API server checks it on logs, exec...)."""
    return pki.issue(
        f"kubelet-serving-{node_name}",
        f"system:node:{node_name}",
        ("system:nodes",),
        server=True,
        dns_names=(node_name, "localhost"),
        ip_addresses=tuple({"127.0.0.1", node_ip}),
    )
