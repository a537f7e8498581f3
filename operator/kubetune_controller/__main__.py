"""``python -m kubetune_controller``: run the operator.

Its settings are the ``KUBETUNE_*`` environment variables that
:func:`~kubetune_controller.settings.settings_from_env` reads (the table is in
the chart's README); the flags below win over the variables they name.
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

from kubetune_controller.handlers import OperatorApp, build_registry
from kubetune_controller.settings import settings_from_env
from kubetune_suggestion.env_settings import SettingsError


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the operator until it is stopped."""
    parser = argparse.ArgumentParser(prog="python -m kubetune_controller", description=__doc__)
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="watch this namespace (repeatable; KUBETUNE_NAMESPACES)",
    )
    scope.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        help="watch every namespace (the default when KUBETUNE_NAMESPACES is empty)",
    )
    parser.add_argument("--service-url", help="the suggestion service (KUBETUNE_SERVICE_URL)")
    parser.add_argument(
        "--kubeconfig", help="use this kubeconfig instead of the in-cluster account"
    )
    parser.add_argument("--metrics-port", help="/metrics port (KUBETUNE_METRICS_PORT; 9090)")
    parser.add_argument("--health-port", help="/healthz port (KUBETUNE_HEALTH_PORT; 8080)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)

    # A flag replaces the variable it names, so flags and the environment go
    # through the same parsing, and an invalid value is refused the same way.
    flags = {
        "KUBETUNE_SERVICE_URL": args.service_url,
        "KUBETUNE_METRICS_PORT": args.metrics_port,
        "KUBETUNE_HEALTH_PORT": args.health_port,
        "KUBETUNE_NAMESPACES": (
            "" if args.all_namespaces else ",".join(args.namespace) if args.namespace else None
        ),
    }
    try:
        settings = settings_from_env(
            {**os.environ, **{name: v for name, v in flags.items() if v is not None}}
        )
    except SettingsError as exc:
        parser.error(str(exc))

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

    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig  # for kopf's own login too
    app = OperatorApp(settings=settings, kubeconfig=args.kubeconfig)
    kopf.run(
        loop=_event_loop(),
        registry=build_registry(app),
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        standalone=True,
        liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz",
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
