"""Who may call the service: the callers it knows and what each may do.

Two kinds of callers, told apart by the ``Authorization: Bearer`` they show:

- a **client**, which may make every call: it shows the service's API key
  (the standalone service, scripts) or a Kubernetes ServiceAccount token
  issued for the service's audience, which a TokenReview turns into a user
  name that must be one of the allowed users (the chart: the operator's);
- a **trial**, which shows its own token and may act on its own trial only
  (report, start, finish, read it): the routes check that token against the
  trial (:meth:`~.core.TuningService.check_token`).

Without credentials a caller is neither, and every route but ``/healthz``
and ``/readyz`` refuses it. ``KUBETUNE_NO_AUTH`` (for a service nobody else
can reach) lets anyone make the client calls; a trial's token is still
checked wherever one is shown.

TokenReview answers are kept for :data:`REVIEW_SECONDS` (as the API server's
own webhook authenticator does), so the operator's calls cost one review a
minute, not one per call; a revoked ServiceAccount token is refused at most
that much later.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass

from kubetune_suggestion.env_settings import SettingsError
from kubetune_suggestion.service.errors import Forbidden, Unauthorized
from kubetune_suggestion.service.settings import ServiceSettings

__all__ = ["REVIEW_SECONDS", "Authenticator", "Caller", "Review", "Reviewer"]

REVIEW_SECONDS = 60.0
# Reviews kept at most; past it the oldest half goes (callers are few: the
# operator's replicas, a token each).
_MAX_REVIEWS = 1024

CREDENTIALS = "the service's API key or a ServiceAccount token it accepts (KUBETUNE_ALLOWED_USERS)"


@dataclass(frozen=True)
class Review:
    """What the API server said of a token: the user it authenticates, or why not."""

    user: str | None
    error: str = ""


# Reviews a token for the service's audience (a TokenReview in a cluster).
Reviewer = Callable[[str], Review]


@dataclass(frozen=True)
class Caller:
    """The caller of one request.

    Attributes:
        client: May make every call (API key, allowed ServiceAccount).
        token: Otherwise the bearer it showed (a trial token, to be checked
            against the trial it acts on), or None.
    """

    client: bool
    token: str | None = None


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (None without one)."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <token>'", field="token")
    return token.strip()


def _looks_like_jwt(token: str) -> bool:
    # ServiceAccount tokens are JWTs; trial tokens and API keys have no dots.
    return token.count(".") == 2


class Authenticator:
    """Tells who a request's caller is (see the module docstring).

    Args:
        api_key: The key clients may show; None: none.
        reviewer: Reviews ServiceAccount tokens; None: they are not accepted.
        allowed_users: Users whose reviewed tokens make a client.
        no_auth: Every caller is a client.
        clock: Seconds, for how long a review is kept.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        reviewer: Reviewer | None = None,
        allowed_users: frozenset[str] = frozenset(),
        no_auth: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api_key = api_key
        self.reviewer = reviewer
        self.allowed_users = allowed_users
        self.no_auth = no_auth
        self.clock = clock
        self._reviews: dict[bytes, tuple[float, Review]] = {}

    @classmethod
    def from_settings(
        cls, settings: ServiceSettings, reviewer: Callable[[], Reviewer]
    ) -> Authenticator:
        """The authenticator ``settings`` ask for; ``reviewer`` makes the TokenReview one.

        Raises:
            SettingsError: If no way to authenticate a client is set, or
                ServiceAccount tokens are accepted for no user.
        """
        if settings.token_audience and not settings.allowed_users:
            raise SettingsError(
                "KUBETUNE_TOKEN_AUDIENCE is set but KUBETUNE_ALLOWED_USERS is not:"
                " name the users whose ServiceAccount tokens may call the service"
            )
        if not (settings.api_key or settings.token_audience or settings.no_auth):
            raise SettingsError(
                "the service needs a way to authenticate its callers: set KUBETUNE_API_KEY"
                " (or --api-key-file), or KUBETUNE_TOKEN_AUDIENCE with KUBETUNE_ALLOWED_USERS"
                " (in a cluster), or KUBETUNE_NO_AUTH=1 for a service nobody else can reach"
            )
        return cls(
            api_key=settings.api_key,
            reviewer=reviewer() if settings.token_audience else None,
            allowed_users=settings.allowed_users,
            no_auth=settings.no_auth,
        )

    def caller(self, authorization: str | None, *, review: bool = True) -> Caller:
        """The caller showing ``authorization`` (the header's value, or None).

        ``review=False`` takes a ServiceAccount token for an unknown bearer
        (no TokenReview: for routes on the event loop that clients do not use).

        Raises:
            Unauthorized: For a malformed header, or a ServiceAccount token
                the API server did not accept.
            Forbidden: For a ServiceAccount that is not an allowed user.
        """
        token = bearer(authorization)
        if token is None:
            return Caller(client=self.no_auth)
        if self.api_key is not None and hmac.compare_digest(token, self.api_key):
            return Caller(client=True)
        if review and self.reviewer is not None and _looks_like_jwt(token):
            answer = self._review(token)
            if answer.user is None:
                raise Unauthorized(
                    f"the ServiceAccount token was not accepted: {answer.error}",
                    field="authorization",
                )
            if answer.user not in self.allowed_users:
                raise Forbidden(
                    f"{answer.user} may not call the suggestion service"
                    " (it is not in KUBETUNE_ALLOWED_USERS)",
                    field="authorization",
                )
            return Caller(client=True)
        return Caller(client=False, token=token)

    def client(self, authorization: str | None) -> Caller:
        """The caller, who must be a client.

        Raises:
            Unauthorized: Without credentials.
            Forbidden: For a trial's token (or another unknown bearer).
        """
        if self.no_auth:
            return Caller(client=True)
        caller = self.caller(authorization)
        if caller.client:
            return caller
        if caller.token is None:
            raise Unauthorized(
                f"this call needs credentials: 'Authorization: Bearer <token>' with {CREDENTIALS}",
                field="authorization",
            )
        raise Forbidden(
            "the token is not a client's: a trial's token may only report, start, finish"
            f" and read its own trial; this call needs {CREDENTIALS}",
            field="authorization",
        )

    def _review(self, token: str) -> Review:
        assert self.reviewer is not None
        key = hashlib.sha256(token.encode()).digest()
        now = self.clock()
        kept = self._reviews.get(key)
        if kept is not None and kept[0] > now:
            return kept[1]
        review = self.reviewer(token)
        if len(self._reviews) >= _MAX_REVIEWS:
            for old in sorted(self._reviews, key=lambda k: self._reviews[k][0])[
                : _MAX_REVIEWS // 2
            ]:
                del self._reviews[old]
        self._reviews[key] = (now + REVIEW_SECONDS, review)
        return review
