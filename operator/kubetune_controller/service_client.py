"""The operator's client of the suggestion service (HTTP API in CONTRACT.md).

Retries what is worth retrying (connection errors, timeouts, 5xx, 429) with
exponential backoff and jitter, then raises :class:`ServiceUnavailable`; the
reconciler turns that into a ``ServiceAvailable=False`` condition and tries
again later, so a service restart shows up as a clear, temporary condition
rather than as failed trials. A 4xx answer is the service's considered "no"
and raises :class:`ServiceError` at once, with the service's code, message
and field.

Request and response bodies are the service's own pydantic models
(:mod:`kubetune_suggestion.service.models`): one definition of the wire format
for both sides.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from kubetune_suggestion.service.models import (
    AskResult,
    ExperimentSummary,
    ExperimentView,
    StopList,
    StopListItem,
    TrialView,
)

log = logging.getLogger(__name__)

_M = TypeVar("_M", bound=BaseModel)


class ServiceUnavailable(Exception):
    """The service could not be reached (or kept failing) after every retry."""


class ServiceError(Exception):
    """The service refused a request (a 4xx answer).

    Attributes:
        status: The HTTP status.
        code: The service's machine-readable code (``not_found``, ``conflict``...).
        field: The offending field, when one is to blame.
    """

    def __init__(self, status: int, code: str, message: str, field: str | None) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" (field {field})" if field else ""))
        self.status = status
        self.code = code
        self.message = message
        self.field = field


class ServiceClient:
    """Async client of one suggestion service.

    Args:
        base_url: The service's address, e.g. ``http://kubetune-suggestion:8000``.
        retries: Attempts after the first one before giving up.
        timeout: Seconds per request (long polls add their wait).
        transport: An httpx transport (tests pass a mock one).
    """

    def __init__(
        self,
        base_url: str,
        retries: int = 4,
        timeout: float = 15.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=5.0),
            transport=transport,
            # Few connections: httpcore scans its pool per request, which costs
            # more than it gains beyond a couple of dozen.
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
        )
        # The outcome of the last request, for the ServiceAvailable condition.
        self.available = True
        self.last_error = ""

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    # -- the API ------------------------------------------------------------------------

    async def register(
        self, uid: str, name: str, namespace: str, spec: Mapping[str, Any]
    ) -> ExperimentView:
        """Create or update an experiment (``PUT /v1/experiments/{uid}``)."""
        body = {"name": name, "namespace": namespace, "spec": dict(spec)}
        return await self._call(ExperimentView, "PUT", f"/v1/experiments/{uid}", body)

    async def ask(self, uid: str, count: int) -> AskResult:
        """Up to ``count`` trials to run (pending ones first)."""
        return await self._call(
            AskResult, "POST", f"/v1/experiments/{uid}/ask", {"count": min(count, 1000)}
        )

    async def start(self, uid: str, number: int) -> None:
        """Mark a trial as started (idempotent)."""
        await self._json("POST", f"/v1/experiments/{uid}/trials/{number}/start", {})

    async def finish(self, uid: str, number: int, state: str, message: str | None) -> TrialView:
        """End a trial; the answer carries its objective and final state.

        A conflict (finished earlier in another state, e.g. pruned before its
        Pod's failure was seen) answers with the trial as it is.
        """
        body: dict[str, Any] = {"state": state}
        if message:
            body["message"] = message[-8000:]
        try:
            return await self._call(
                TrialView, "POST", f"/v1/experiments/{uid}/trials/{number}/finish", body
            )
        except ServiceError as exc:
            if exc.status != 409:
                raise
        view = await self.trial(uid, number)
        if view is None:
            raise ServiceError(404, "not_found", f"trial {number} vanished", "number")
        return view

    async def trial(self, uid: str, number: int) -> TrialView | None:
        """One trial as the service sees it, or ``None`` if it does not know it."""
        try:
            return await self._call(TrialView, "GET", f"/v1/experiments/{uid}/trials/{number}")
        except ServiceError as exc:
            if exc.status == 404 and exc.field in ("number", None):
                return None
            if exc.status not in (404, 405):
                raise
        # Fallback for a service without the single-trial route.
        for view in await self.trials(uid):
            if view.number == number:
                return view
        return None

    async def trials(self, uid: str) -> list[TrialView]:
        """Every trial of an experiment."""
        data = await self._json("GET", f"/v1/experiments/{uid}/trials")
        return [TrialView.model_validate(v) for v in data or []]

    async def summary(self, uid: str) -> ExperimentSummary:
        """Counts by state and the best trial."""
        return await self._call(ExperimentSummary, "GET", f"/v1/experiments/{uid}")

    async def delete(self, uid: str) -> None:
        """Forget an experiment (its Kubernetes object is gone)."""
        try:
            await self._json("DELETE", f"/v1/experiments/{uid}")
        except ServiceError as exc:
            if exc.status != 404:
                raise

    async def stops(self, wait: float) -> list[StopListItem]:
        """Open stop orders of every experiment, long-polling up to ``wait`` seconds."""
        answer = await self._call(
            StopList, "GET", "/v1/stops", params={"wait": f"{wait:g}"}, extra_timeout=wait
        )
        return list(answer.stops)

    # -- plumbing -----------------------------------------------------------------------

    async def _call(
        self,
        model: type[_M],
        method: str,
        path: str,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        extra_timeout: float = 0.0,
    ) -> _M:
        """Send a request (see :meth:`_json`) and decode the answer into ``model``."""
        return model.model_validate(await self._json(method, path, body, params, extra_timeout))

    async def _json(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        extra_timeout: float = 0.0,
    ) -> Any:
        """Send a request with retries; return the decoded JSON answer.

        Raises:
            ServiceError: On a 4xx answer.
            ServiceUnavailable: When every attempt failed.
        """
        delay = 0.2
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                # Full jitter: many operators' retries never synchronise.
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, 5.0)
            try:
                timeout = self._client.timeout
                if extra_timeout:
                    timeout = httpx.Timeout(
                        (timeout.read or 15.0) + extra_timeout, connect=timeout.connect
                    )
                resp = await self._client.request(
                    method, path, json=body, params=params, timeout=timeout
                )
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                continue
            if resp.status_code >= 500 or resp.status_code == 429:
                problem = f"HTTP {resp.status_code}: {resp.text[:200]}"
                continue
            self.available, self.last_error = True, ""
            if resp.status_code >= 400:
                raise _refusal(resp)
            return resp.json() if resp.content else None
        self.available = False
        self.last_error = f"{method} {self.base_url}{path}: {problem}"
        log.warning("suggestion service unavailable: %s", self.last_error)
        raise ServiceUnavailable(self.last_error)


def _refusal(resp: httpx.Response) -> ServiceError:
    try:
        err = resp.json().get("error") or {}
    except (ValueError, AttributeError):
        err = {}
    return ServiceError(
        resp.status_code,
        str(err.get("code") or "error"),
        str(err.get("message") or resp.text[:500]),
        err.get("field"),
    )
