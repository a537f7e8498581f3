"""A local Kubernetes cluster (control plane and one real node) from the pinned upstream binaries.

Use ``python -m e2e.cluster up|down|status|env`` or :class:`Cluster`.
"""

from e2e.cluster.cluster import Cluster, ClusterError
from e2e.cluster.paths import K8S_VERSION, bin_dir, missing_binaries, state_dir

__all__ = [
    "K8S_VERSION",
    "Cluster",
    "ClusterError",
    "bin_dir",
    "missing_binaries",
    "state_dir",
]
