"""Where the local cluster's pinned binaries and its state live, and which binaries it needs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Keep in sync with build.sh (both honour KUBETUNE_K8S_VERSION).
K8S_VERSION = os.environ.get("KUBETUNE_K8S_VERSION", "v1.36.3")

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
    "kube-router",
    "cni/bridge",
    "cni/host-local",
    "cni/loopback",
    "cni/portmap",
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


def missing_binaries(directory: Path | None = None) -> list[str]:
    """Names of the required binaries not (yet) built (runc and ipset: Debian's packages)."""
    d = directory or bin_dir()
    missing = [b for b in REQUIRED_BINARIES if not os.access(d / b, os.X_OK)]
    debian = [f"{b} (apt-get install {b})" for b in ("runc", "ipset") if not shutil.which(b)]
    return missing + debian
