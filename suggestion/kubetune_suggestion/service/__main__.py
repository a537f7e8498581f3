"""``kubetune-service``: run the suggestion service, or only migrate its database.

    kubetune-service --db postgresql+psycopg://u:p@db/kubetune --api-key-file key.txt
    kubetune-service migrate --db sqlite:///kubetune.db

Every call but ``/healthz`` and ``/readyz`` needs credentials
(:mod:`~kubetune_suggestion.service.auth`): an API key (``--api-key-file`` or
``KUBETUNE_API_KEY``), ServiceAccount tokens checked by TokenReview (in a
cluster), or a trial's own token for its own trial. ``/metrics`` is served on
``--metrics-port`` (9090).

Settings come from the environment, read by
:meth:`~kubetune_suggestion.service.settings.ServiceSettings.from_env` (``KUBETUNE_DB_URL``,
``KUBETUNE_SECRET``, ``KUBETUNE_PORT``...; the table is in the chart's
README); the flags win over the variables they name. Without a secret the one
stored in the database is used (the first replica generates it), so replicas
on one database agree. ``--workers`` and ``--log-level`` are options of this
process only, with no variable.
"""

from __future__ import annotations

import signal
import sys

if __name__ == "__main__":
    # As a container's PID 1 the process ignores a signal it has no handler
    # for, so until uvicorn installs its own (after the imports and the
    # database migration), SIGTERM would wait out the Pod's grace period:
    # exit at once (status 143) instead. uvicorn shuts down gracefully on
    # SIGTERM, puts this handler back and raises the signal again, so a
    # stopped service exits 143 either way.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from prometheus_client import start_http_server

from kubetune_suggestion.env_settings import SettingsError
from kubetune_suggestion.service.auth import Authenticator
from kubetune_suggestion.service.settings import ServiceSettings
from kubetune_suggestion.store import Store, UnsupportedDatabase


def _parser(defaults: ServiceSettings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetune-service", description=__doc__.split("\n")[0])
    parser.add_argument(
        "command",
        nargs="?",
        choices=["serve", "migrate"],
        default="serve",
        help="serve (default) or migrate the database and exit",
    )
    parser.add_argument(
        "--db",
        default=defaults.db_url,
        help=f"database URL (KUBETUNE_DB_URL; default {ServiceSettings.db_url})",
    )
    parser.add_argument(
        "--host",
        default=defaults.host,
        help=f"address to listen on (KUBETUNE_HOST; default {ServiceSettings.host})",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=defaults.port,
        help=f"port to listen on (KUBETUNE_PORT; default {ServiceSettings.port})",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=defaults.metrics_port,
        help=f"port of /metrics (KUBETUNE_METRICS_PORT; default {ServiceSettings.metrics_port})",
    )
    parser.add_argument(
        "--api-key-file",
        type=Path,
        help="file holding the key clients show as 'Authorization: Bearer <key>'"
        " (else KUBETUNE_API_KEY)",
    )
    parser.add_argument(
        "--secret-file",
        type=Path,
        help="file holding the trial-token secret (else KUBETUNE_SECRET)",
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes (uvicorn)")
    parser.add_argument(
        "--no-migrate",
        action="store_true",
        help="do not migrate at startup (KUBETUNE_MIGRATE=0)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    return parser


def _read_file(path: Path | None, flag: str) -> str | None:
    """The stripped text of a flag's file (None without the flag)."""
    if path is None:
        return None
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise SettingsError(f"cannot read {flag}: {exc}") from None
    if not text:
        raise SettingsError(f"{flag} {path} is empty")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kubetune-service`` and ``python -m kubetune_suggestion.service``."""
    try:
        settings = ServiceSettings.from_env()
    except SettingsError as exc:
        print(f"kubetune-service: {exc}", file=sys.stderr)
        return 2
    args = _parser(settings).parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        secret = _read_file(args.secret_file, "--secret-file") or settings.secret
        api_key = _read_file(args.api_key_file, "--api-key-file") or settings.api_key
        if secret is None and settings.secret_name and args.command == "serve":
            from kubetune_suggestion.service.kubernetes import InCluster

            secret = InCluster.from_environment().token_secret(settings.secret_name)
        if args.command == "serve":
            from kubetune_suggestion.service.app import in_cluster  # FastAPI: only to serve

            # Refuse settings that authenticate nobody, or a TokenReview
            # outside a cluster, before anything starts.
            Authenticator.from_settings(replace(settings, api_key=api_key), in_cluster(settings))
    except SettingsError as exc:
        print(f"kubetune-service: {exc}", file=sys.stderr)
        return 2
    try:
        migrate = args.command == "migrate" or (settings.migrate and not args.no_migrate)
        store = Store.open(args.db, migrate=migrate)
    except UnsupportedDatabase as exc:
        print(f"kubetune-service: {exc}", file=sys.stderr)
        return 2
    if args.command == "migrate":
        store.close()
        print("database schema is up to date")
        return 0
    # Settle the shared secret once, before any worker starts.
    secret = secret or store.secret(os.urandom(32).hex())
    store.close()

    import uvicorn

    # Workers are separate processes: hand them the settings through the environment.
    os.environ["KUBETUNE_DB_URL"] = args.db
    os.environ["KUBETUNE_SECRET"] = secret
    os.environ["KUBETUNE_MIGRATE"] = "0"
    if api_key:
        os.environ["KUBETUNE_API_KEY"] = api_key
    if args.workers == 1:
        # One process: its registry is the one the routes count in.
        start_http_server(args.metrics_port, addr=args.host)
    else:
        logging.getLogger("kubetune_suggestion.service").warning(
            "no /metrics with --workers %d: each worker counts on its own;"
            " run one worker per replica instead",
            args.workers,
        )
    uvicorn.run(
        "kubetune_suggestion.service.app:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
