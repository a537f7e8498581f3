"""The suggestion service's settings: every environment variable it reads, read here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from kubetune_suggestion.env_settings import env, flag, from_env, port, seconds


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
    # KUBETUNE_MIGRATE (--no-migrate): bring the schema up to date at startup.
    migrate: bool = field(default=True, metadata=env("KUBETUNE_MIGRATE", flag))
    # KUBETUNE_HOST (--host): the address to listen on.
    host: str = field(default="127.0.0.1", metadata=env("KUBETUNE_HOST", str))
    # KUBETUNE_PORT (--port): the HTTP port (API, health, /metrics); the
    # chart's suggestion.port and the operator's default service URL use it too.
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
