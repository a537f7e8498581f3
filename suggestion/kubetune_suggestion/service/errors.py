"""Errors of the service layer; each maps to one HTTP status and error code."""

from __future__ import annotations

from typing import ClassVar


class ServiceError(Exception):
    """A request the service refuses; nothing was changed.

    Attributes:
        status: The HTTP status it maps to.
        code: A stable machine-readable code.
        message: What is wrong, in words.
        field: The offending field of the request, when one is to blame.
    """

    status: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidInput(ServiceError):
    """A value the service cannot accept (bad spec, NaN metric, ...)."""

    status = 422
    code = "invalid"


class NotFound(ServiceError):
    """An unknown experiment or trial."""

    status = 404
    code = "not_found"


class Unauthorized(ServiceError):
    """A report without a trial token."""

    status = 401
    code = "unauthorized"


class Forbidden(ServiceError):
    """A report whose token belongs to another trial."""

    status = 403
    code = "forbidden"


class Conflict(ServiceError):
    """A request that contradicts the stored state (a report after the trial finished)."""

    status = 409
    code = "conflict"


class Unavailable(ServiceError):
    """A service the request depends on (the Kubernetes API, for a TokenReview) did not answer."""

    status = 503
    code = "unavailable"
