"""``python -m kubetune_controller``: run the operator.

Flags win over environment variables (``KUBETUNE_NAMESPACES``, a comma-separated
list, or ``KUBETUNE_ALL_NAMESPACES=true``; ``KUBETUNE_SERVICE_URL`` and the other
``KUBETUNE_*`` settings of :func:`~kubetune_controller.settings.settings_from_env`).
Metrics are served on ``--metrics-port`` (9090), liveness on
``--health-port`` (8080) at ``/healthz``.
"""

from __future__ import annotations

import signal
import sys

if __name__ == "__main__":
    # As a container's PID 1 the process ignores a signal it has no handler
    # for, so until kopf installs its own (a second of imports and the login
    # away), SIGTERM would wait out the Pod's grace period: exit at once
    # (status 143) instead. Once running, kopf stops cleanly on SIGTERM.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

import argparse
import asyncio
import logging
import os

import kopf

from kubetune_controller.handlers import App, build_registry
from kubetune_controller.settings import settings_from_env


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the operator until it is stopped."""
    parser = argparse.ArgumentParser(prog="python -m kubetune_controller", description=__doc__)
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)"
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    parser.add_argument("--service-url", help="the suggestion service (KUBETUNE_SERVICE_URL)")
    parser.add_argument(
        "--kubeconfig", help="use this kubeconfig instead of the in-cluster account"
    )
    parser.add_argument(
        "--metrics-port", type=int, default=int(os.environ.get("KUBETUNE_METRICS_PORT", 9090))
    )
    parser.add_argument(
        "--health-port", type=int, default=int(os.environ.get("KUBETUNE_HEALTH_PORT", 8080))
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Kopf logs every watch event at DEBUG and each handler at INFO: too chatty
    # for thousands of trial Pods.
    logging.getLogger("kopf").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    # One line per HTTP request is noise at thousands of trials.
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

    env_namespaces = [n for n in os.environ.get("KUBETUNE_NAMESPACES", "").split(",") if n.strip()]
    namespaces = args.namespace or env_namespaces
    clusterwide = args.all_namespaces or (
        not namespaces and os.environ.get("KUBETUNE_ALL_NAMESPACES", "true").lower() == "true"
    )
    if not clusterwide and not namespaces:
        parser.error("give --namespace or --all-namespaces")

    settings = settings_from_env()
    if args.service_url:
        settings = type(settings)(
            **{**settings.__dict__, "service_url": args.service_url.rstrip("/")}
        )
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig  # for kopf's own login too
    app = App(
        settings=settings,
        kubeconfig=args.kubeconfig,
        metrics_port=args.metrics_port,
        namespaces=[] if clusterwide else [n.strip() for n in namespaces],
    )
    kopf.run(
        loop=_event_loop(),
        registry=build_registry(app),
        clusterwide=clusterwide,
        namespaces=[n.strip() for n in namespaces],
        standalone=True,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz",
    )
    return 0


def _event_loop() -> asyncio.AbstractEventLoop:
    """The event loop: uvloop where installed (a service dependency), else asyncio's.

    The operator is I/O-bound Python: with a thousand trial Pods changing, the
    default loop's own overhead was a fifth of its CPU.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


if __name__ == "__main__":
    sys.exit(main())
