"""The suggestion service's settings: every environment variable it reads, read here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from kubetune_suggestion.env_settings import env, flag, from_env, names, port, seconds


@dataclass(frozen=True)
class ServiceSettings:
    """How to run the service.

    :meth:`from_env` reads each field from the variable its comment names
    (``kubetune-service``'s flags win over the variables they name); the
    defaults here are the documented ones, and the table of variables,
    defaults and meanings is in the chart's README
    (``charts/kubetune/README.md``, "Settings"), which a test keeps in step.
    An empty (or blank) variable counts as unset; a value that does not
    parse is refused with a :class:`~kubetune_suggestion.env_settings.SettingsError`
    naming the variable.
    """

    # KUBETUNE_DB_URL (--db): ``sqlite:///path`` or
    # ``postgresql+psycopg://user:pw@host/db``.
    db_url: str = field(default="sqlite:///kubetune.db", metadata=env("KUBETUNE_DB_URL", str))
    # KUBETUNE_SECRET (--secret-file): the trial-token secret; None uses (or
    # creates) the one stored in the database, shared by every replica on it.
    secret: str | None = field(default=None, metadata=env("KUBETUNE_SECRET", str))
    # KUBETUNE_SECRET_NAME: in a cluster, the Secret (in the service's own
    # namespace) that keeps the trial-token secret; the service creates it at
    # its first start and reads it after, so no render of the chart (helm
    # template, Argo CD, Flux) ever replaces it. Unset: KUBETUNE_SECRET, or
    # the database.
    secret_name: str | None = field(default=None, metadata=env("KUBETUNE_SECRET_NAME", str))
    # KUBETUNE_API_KEY (--api-key-file): a key that callers present as
    # ``Authorization: Bearer <key>`` for every call (the standalone service,
    # scripts).
    api_key: str | None = field(default=None, metadata=env("KUBETUNE_API_KEY", str))
    # KUBETUNE_TOKEN_AUDIENCE: accept Kubernetes ServiceAccount tokens issued
    # for this audience, checked with a TokenReview (the chart: the operator's
    # projected token).
    token_audience: str | None = field(default=None, metadata=env("KUBETUNE_TOKEN_AUDIENCE", str))
    # KUBETUNE_ALLOWED_USERS: the Kubernetes users (comma-separated, e.g.
    # ``system:serviceaccount:kubetune-system:kubetune-operator``) whose
    # reviewed tokens may make every call.
    allowed_users: frozenset[str] = field(
        default=frozenset(), metadata=env("KUBETUNE_ALLOWED_USERS", names)
    )
    # KUBETUNE_NO_AUTH: accept every caller without credentials (trial
    # reports still need their token). Only for a service nobody else can
    # reach.
    no_auth: bool = field(default=False, metadata=env("KUBETUNE_NO_AUTH", flag))
    # KUBETUNE_MIGRATE (--no-migrate): bring the schema up to date at startup.
    migrate: bool = field(default=True, metadata=env("KUBETUNE_MIGRATE", flag))
    # KUBETUNE_HOST (--host): the address to listen on.
    host: str = field(default="127.0.0.1", metadata=env("KUBETUNE_HOST", str))
    # KUBETUNE_METRICS_PORT (--metrics-port); declared before ``port``, whose field
    # name hides the parser of the same name below it.: Prometheus' /metrics, on a port
    # of its own so that a NetworkPolicy can open it to the scraper alone.
    metrics_port: int = field(default=9090, metadata=env("KUBETUNE_METRICS_PORT", port))
    # KUBETUNE_PORT (--port): the HTTP port (API and health); the chart's
    # suggestion.port and the operator's default service URL use it too.
    port: int = field(default=8000, metadata=env("KUBETUNE_PORT", port))
    # KUBETUNE_STOP_POLL_SECONDS: how often a waiting /v1/stops long-poll
    # looks at the database. Configurable: on a shared database a longer
    # period costs fewer queries for a slower stop.
    stop_poll_seconds: float = field(
        default=0.15, metadata=env("KUBETUNE_STOP_POLL_SECONDS", seconds(zero=False))
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServiceSettings:
        """Settings from the environment (``os.environ`` when ``environ`` is omitted)."""
        return from_env(cls, environ)
