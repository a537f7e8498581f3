"""Command line: ``python -m e2e.cluster up|down|status|env|images``.

``up`` prints progress on stderr and, on stdout, the shell lines to use the
cluster, so ``eval "$(python -m e2e.cluster up)"`` works. ``images`` imports
the archives of ``scripts/images.sh`` into the running node again (after a
rebuild; Pods started afterwards use the new images).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from e2e.cluster.cluster import Cluster, ClusterError


def _env_lines(cluster: Cluster) -> str:
    return f"export KUBECONFIG={cluster.kubeconfig}\nexport PATH={cluster.bin}:$PATH\n"


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m e2e.cluster", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status", "env", "images"])
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds for up")
    args = parser.parse_args(argv)
    cluster = Cluster()
    if args.command == "up":
        t0 = time.monotonic()
        try:
            cluster.up(timeout=args.timeout)
        except (ClusterError, FileNotFoundError) as exc:
            print(f"e2e.cluster up failed: {exc}", file=sys.stderr)
            return 1
        print(f"# control plane up in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        sys.stdout.write(_env_lines(cluster))
    elif args.command == "down":
        cluster.down()
    elif args.command == "status":
        status = cluster.status()
        print(json.dumps(status, indent=2))
        return 0 if status["up"] else 3
    elif args.command == "images":
        if not cluster.is_up():
            print("e2e.cluster images: no cluster is up", file=sys.stderr)
            return 1
        for name in cluster.node().import_images():
            print(name)
    else:
        sys.stdout.write(_env_lines(cluster))
    return 0


if __name__ == "__main__":
    sys.exit(main())
