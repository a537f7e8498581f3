"""The operator's client of the suggestion service (HTTP API in CONTRACT.md).

Retries what is worth retrying (connection errors, timeouts, 5xx, 429) with
exponential backoff and jitter, then raises :class:`ServiceUnavailable`; the
reconciler turns that into a ``ServiceAvailable=False`` condition and tries
again later, so a service restart shows up as a clear, temporary condition
rather than as failed trials. A 4xx answer is the service's considered "no"
and raises :class:`ServiceCallError` at once, with the service's code, message
and field.

Request and response bodies are the service's own pydantic models
(:mod:`kubetune_suggestion.service.models`): one definition of the wire format
for both sides.

HTTP goes over aiohttp (kopf's HTTP stack, already in the process): with
fifty trials starting and ending a second, httpx's connection pool cost the
operator more CPU than anything it did itself. Tests hand in another
:class:`Sender` (``tests/controller/httpx_sender.py``: an in-process ASGI app
or a mock); the retry logic above the sender is the same for both.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

import aiohttp
from pydantic import BaseModel

from kubetune_suggestion.service.models import (
    AskResult,
    ExperimentSummary,
    ExperimentView,
    StartResult,
    StopList,
    StopListItem,
    TrialView,
)

log = logging.getLogger(__name__)

_M = TypeVar("_M", bound=BaseModel)

# The ask id of every operator replica: a new leader finds the trials the old
# one was handed and never started.
ASK_ID = "operator"


class ServiceUnavailable(Exception):
    """The service could not be reached (or kept failing) after every retry."""


class ServiceCallError(Exception):
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


class TransportError(Exception):
    """The request did not get an answer (connection refused, reset, timeout)."""


def describe(exc: BaseException) -> str:
    """``ConnectError: [Errno 111] ...``, or just the class when the error says nothing."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class Sender(Protocol):
    """How requests reach the service: over aiohttp here; tests hand in their own."""

    async def send(
        self,
        method: str,
        path: str,
        body: Any,
        params: Mapping[str, str] | None,
        timeout: float,
        headers: Mapping[str, str],
    ) -> tuple[int, bytes]:
        """Send one request; (status, body), or TransportError when no answer came."""
        ...

    async def close(self) -> None:
        """Release the connections."""
        ...

    async def reset(self) -> None:
        """Drop pooled connections (after a failure), so the next request opens new ones."""
        ...


class _AiohttpSender:
    """Requests over one aiohttp session (created in the running event loop)."""

    def __init__(self, base_url: str, connect_timeout: float, max_connections: int) -> None:
        self.base_url = base_url
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections),
                json_serialize=json.dumps,
            )
        return self._session

    async def send(
        self,
        method: str,
        path: str,
        body: Any,
        params: Mapping[str, str] | None,
        timeout: float,
        headers: Mapping[str, str],
    ) -> tuple[int, bytes]:
        try:
            async with self._client().request(
                method,
                self.base_url + path,
                json=body,
                params=params,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout, connect=self.connect_timeout),
            ) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransportError(describe(exc)) from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def reset(self) -> None:
        """Drop the pooled connections (the next request opens a new session)."""
        await self.close()


class ServiceClient:
    """Async client of one suggestion service.

    Args:
        base_url: The service's address, e.g. ``http://kubetune-suggestion:8000``.
        retries: Attempts after the first one before giving up.
        timeout: Seconds per request (long polls add their wait).
        sender: How requests are sent (tests pass one over an in-process
            app or a mock); None, over aiohttp.
        start_window: Seconds :meth:`start` calls are gathered into one request.
        credentials: The bearer token to show, asked for each request (a
            ServiceAccount token is rotated); None, or one answering None:
            none.
    """

    def __init__(
        self,
        base_url: str,
        retries: int = 4,
        timeout: float = 15.0,
        sender: Sender | None = None,
        start_window: float = 0.01,
        credentials: Callable[[], str | None] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.timeout = timeout
        self._sender: Sender = sender or _AiohttpSender(
            self.base_url, connect_timeout=5.0, max_connections=32
        )
        # Trials to mark started, per experiment, gathered for ``start_window``.
        self._starts: dict[str, dict[int, asyncio.Future[None]]] = {}
        self._flushes: set[asyncio.Future[None]] = set()
        self.start_window = start_window
        self.credentials = credentials
        # The outcome of the last request, for the ServiceAvailable condition.
        self.available = True
        self.last_error = ""

    async def close(self) -> None:
        """Close the connection pool."""
        await self._sender.close()

    # -- the API ------------------------------------------------------------------------

    async def register(
        self, uid: str, name: str, namespace: str, spec: Mapping[str, Any]
    ) -> ExperimentView:
        """Create or update an experiment (``PUT /v1/experiments/{uid}``)."""
        body = {"name": name, "namespace": namespace, "spec": dict(spec)}
        return await self._call(ExperimentView, "PUT", f"/v1/experiments/{uid}", body)

    async def restore(self, uid: str, trials: list[dict[str, Any]]) -> int:
        """Put trials back into a service that lost them (``POST .../restore``).

        Idempotent: trials the service holds with the same params are left as
        they are.

        Returns:
            How many trials the service did not hold.
        """
        answer = await self._json("POST", f"/v1/experiments/{uid}/restore", {"trials": trials})
        return int((answer or {}).get("restored", 0))

    async def retry(self, uid: str, number: int) -> None:
        """Start a trial's next attempt (``POST .../trials/{n}/retry``).

        The service drops the last attempt's reports and hands the trial back,
        pending, to the operator's next ask.
        """
        body = {"ask_id": ASK_ID}
        await self._json("POST", f"/v1/experiments/{uid}/trials/{number}/retry", body)

    async def ask(self, uid: str, count: int, parallelism: int) -> AskResult:
        """Up to ``count`` trials to run (pending ones first), at most ``parallelism`` at once.

        Every ask allocates; the operator's fixed ``ask_id`` gets back the
        trials it was handed and has not started yet (a restart between ask
        and Pod creation, a refused creation), whichever replica asks.
        """
        body = {"count": min(count, 1000), "parallelism": parallelism, "ask_id": ASK_ID}
        return await self._call(AskResult, "POST", f"/v1/experiments/{uid}/ask", body)

    async def start(self, uid: str, number: int) -> None:
        """Mark a trial as started (idempotent).

        Calls made at about the same time for one experiment go out together
        as one ``POST /v1/experiments/{uid}/start`` (fifty trials a second
        would otherwise cost fifty requests and transactions a second).

        Raises:
            ServiceCallError: If the service refuses this trial (unknown, finished).
            ServiceUnavailable: If the service cannot be reached.
        """
        batch = self._starts.get(uid)
        if batch is None:
            batch = self._starts[uid] = {}
            asyncio.get_running_loop().call_later(self.start_window, self._spawn_flush, uid)
        waiter = batch.get(number)
        if waiter is None:
            waiter = batch[number] = asyncio.get_running_loop().create_future()
        await asyncio.shield(waiter)

    async def start_many(self, uid: str, numbers: list[int]) -> dict[int, ServiceCallError]:
        """Mark trials as started in one request; the refusals by trial number."""
        answer = await self._call(
            StartResult, "POST", f"/v1/experiments/{uid}/start", {"numbers": numbers}
        )
        return {
            r.number: ServiceCallError(r.status, r.code, r.message, "number")
            for r in answer.refused
        }

    def _spawn_flush(self, uid: str) -> None:
        # Referenced until done: the event loop keeps only weak references.
        task = asyncio.ensure_future(self._flush_starts(uid))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush_starts(self, uid: str) -> None:
        batch = self._starts.pop(uid, {})
        if not batch:
            return
        try:
            refused = await self.start_many(uid, sorted(batch))
        except BaseException as exc:
            # Every waiter learns the outcome, whatever it was.
            failure = (
                exc
                if isinstance(exc, ServiceCallError | ServiceUnavailable)
                else ServiceUnavailable(f"starting trials of {uid}: {exc!r}")
            )
            for waiter in batch.values():
                if not waiter.done():
                    waiter.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
            return
        for number, waiter in batch.items():
            if waiter.done():
                continue
            if number in refused:
                waiter.set_exception(refused[number])
            else:
                waiter.set_result(None)

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
        except ServiceCallError as exc:
            if exc.status != 409:
                raise
        view = await self.trial(uid, number)
        if view is None:
            raise ServiceCallError(404, "not_found", f"trial {number} vanished", "number")
        return view

    async def trial(self, uid: str, number: int) -> TrialView | None:
        """One trial as the service sees it, or ``None`` if it does not know it."""
        try:
            return await self._call(TrialView, "GET", f"/v1/experiments/{uid}/trials/{number}")
        except ServiceCallError as exc:
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
        except ServiceCallError as exc:
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
            ServiceCallError: On a 4xx answer.
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
                status, content = await self._sender.send(
                    method, path, body, params, self.timeout + extra_timeout, self._headers()
                )
            except (TransportError, OSError) as exc:
                # OSError: the token file, mid-rotation or not mounted yet.
                problem = str(exc)
                continue
            if status >= 500 or status == 429:
                problem = f"HTTP {status}: {content[:200].decode(errors='replace')}"
                continue
            if status >= 400 and not _from_the_service(content):
                # Not the service's answer (its errors are JSON with an
                # "error"): a pooled connection that outlived the service's
                # Pod and now reaches something else. Reconnect and retry.
                problem = f"HTTP {status} that is not the service's: reconnecting"
                await self._sender.reset()
                continue
            self.available, self.last_error = True, ""
            if status >= 400:
                raise _refusal(status, content)
            return json.loads(content) if content else None
        self.available = False
        self.last_error = f"{method} {self.base_url}{path}: {problem}"
        log.warning("suggestion service unavailable: %s", self.last_error)
        raise ServiceUnavailable(self.last_error)

    def _headers(self) -> dict[str, str]:
        token = self.credentials() if self.credentials else None
        return {"Authorization": f"Bearer {token}"} if token else {}


def _from_the_service(content: bytes) -> bool:
    """Whether an error answer has the service's shape (``{"error": {...}}``)."""
    try:
        body = json.loads(content)
    except ValueError:
        return False
    return isinstance(body, dict) and isinstance(body.get("error"), dict)


def _refusal(status: int, content: bytes) -> ServiceCallError:
    try:
        err = json.loads(content).get("error") or {}
    except (ValueError, AttributeError):
        err = {}
    return ServiceCallError(
        status,
        str(err.get("code") or "error"),
        str(err.get("message") or content[:500].decode(errors="replace")),
        err.get("field"),
    )
