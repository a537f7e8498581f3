"""Command line of the process kubelet (started by ``e2e.cluster``)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from e2e.kube import Api
from e2e.kubelet.kubelet import Kubelet
from e2e.kubelet.server import serve


def main(argv: list[str] | None = None) -> int:
    """Run one kubelet until SIGTERM/SIGINT; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m e2e.kubelet", description=__doc__)
    p.add_argument("--kubeconfig", required=True, help="node credentials")
    p.add_argument("--node-name", required=True)
    p.add_argument("--root-dir", required=True, type=Path)
    p.add_argument("--gpus", type=int, default=0, help="fake nvidia.com/gpu devices")
    p.add_argument("--cpu", default="16")
    p.add_argument("--memory", default="64Gi")
    p.add_argument("--max-pods", type=int, default=110)
    p.add_argument("--port", type=int, required=True, help="HTTPS port for logs")
    p.add_argument("--serving-cert", required=True)
    p.add_argument("--serving-key", required=True)
    p.add_argument("--client-ca", required=True)
    p.add_argument("--node-ip", default=None)
    p.add_argument("--backoff-seconds", type=float, default=10.0, help="first crash back-off")
    args = p.parse_args(argv)

    kubelet = Kubelet(
        Api.from_kubeconfig(args.kubeconfig),
        args.node_name,
        args.root_dir,
        args.gpus,
        args.cpu,
        args.memory,
        args.max_pods,
        args.port,
        args.node_ip,
        args.backoff_seconds,
    )
    serve(kubelet, kubelet.node_ip, args.port, args.serving_cert, args.serving_key, args.client_ca)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # Stop in another thread: the handler must return for run() to wake.
        threading.Thread(target=kubelet.stop, daemon=False).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    kubelet.run()
    for t in threading.enumerate():
        if t is not threading.current_thread() and not t.daemon:
            t.join()
    kubelet.log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
