"""The cluster enforces NetworkPolicy: a denied Pod cannot connect, an allowed one can.

kubetune's chart puts a NetworkPolicy around the suggestion service (only the
operator and trial Pods reach its API port). That wall exists only where the
cluster enforces NetworkPolicy; the local cluster does it with kube-router's
firewall (see ``e2e/cluster/node.py``). This test proves enforcement itself,
so that a cluster which silently ignores policies fails here, not nowhere:
a server Pod, a client the policy will allow and one it will not; each
connects to the server's Pod IP and to its Service's cluster IP (kube-proxy's
DNAT comes first, the filter sees the Pod's address).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e.helpers import Kube, KubectlError, Obj, python_pod, wait_for

# Pods on one bridge talk past iptables unless br_netfilter hands bridged
# packets to it: without it no policy between them can be enforced.
BRIDGE_NF = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")

SERVER = "import http.server; http.server.test(port=8000, bind='0.0.0.0')"
IDLE = "import time; time.sleep(3600)"
# Exits 0 when a TCP connection opens. A refused or dropped connection is an
# error either way: kube-router rejects, other enforcers drop.
PROBE = (
    "import socket, sys\n"
    "try:\n"
    "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()\n"
    "except OSError as exc:\n"
    "    sys.exit(f'{sys.argv[1]}:{sys.argv[2]}: {exc}')\n"
)


def _connects(kube: Kube, namespace: str, client: str, target: tuple[str, int]) -> bool:
    """Whether ``client`` opens a TCP connection to ``target`` (host, port)."""
    try:
        kube.kubectl(
            "exec", "-n", namespace, client, "--", "python", "-c", PROBE, target[0], str(target[1])
        )
    except KubectlError:
        return False
    return True


def _policy(name: str, spec: Obj) -> Obj:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }


def test_default_deny_then_allow_by_pod_label(kube: Kube, namespace: str) -> None:
    if kube.local and not (BRIDGE_NF.exists() and BRIDGE_NF.read_text().strip() == "1"):
        pytest.fail(
            f"{BRIDGE_NF} is not 1: load br_netfilter (modprobe br_netfilter) and set it to 1, "
            "else the local node cannot filter traffic between Pods on its bridge",
            pytrace=False,
        )
    server = python_pod("server", SERVER)
    server["metadata"]["labels"] = {"app": "server"}
    friend = python_pod("friend", IDLE)
    friend["metadata"]["labels"] = {"role": "friend"}
    stranger = python_pod("stranger", IDLE)
    service: Obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "server"},
        "spec": {"selector": {"app": "server"}, "ports": [{"port": 80, "targetPort": 8000}]},
    }
    kube.create(server, friend, stranger, service, namespace=namespace)
    for name in ("server", "friend", "stranger"):
        kube.wait_pod_phase(namespace, name, ("Running",))
    pod_ip = kube.pod(namespace, "server")["status"]["podIP"]
    cluster_ip = kube.get("service", "-n", namespace, "server")["spec"]["clusterIP"]
    targets = [(pod_ip, 8000), (cluster_ip, 80)]

    def reached(client: str) -> list[bool]:
        return [_connects(kube, namespace, client, t) for t in targets]

    # Without a policy every Pod reaches every other (once the server listens
    # and kube-proxy has the Service's endpoint).
    for client in ("friend", "stranger"):
        wait_for(lambda c=client: all(reached(c)), 60, f"{client} to reach {targets}")

    # Default deny: nothing reaches the Pods of the namespace any more.
    kube.apply(
        _policy("default-deny", {"podSelector": {}, "policyTypes": ["Ingress"]}),
        namespace=namespace,
    )
    for client in ("friend", "stranger"):
        wait_for(lambda c=client: not any(reached(c)), 30, f"{client} to be denied {targets}")
    # Denied by the policy, not by a server that went away.
    assert kube.pod(namespace, "server")["status"]["phase"] == "Running"

    # Allowed by label: the friend gets through, directly and through the
    # Service; the stranger still does not.
    kube.apply(
        _policy(
            "friend-to-server",
            {
                "podSelector": {"matchLabels": {"app": "server"}},
                "policyTypes": ["Ingress"],
                "ingress": [
                    {
                        "from": [{"podSelector": {"matchLabels": {"role": "friend"}}}],
                        "ports": [{"port": 8000, "protocol": "TCP"}],
                    }
                ],
            },
        ),
        namespace=namespace,
    )
    wait_for(lambda: all(reached("friend")), 30, f"friend to be allowed {targets}")
    assert reached("stranger") == [False, False]
