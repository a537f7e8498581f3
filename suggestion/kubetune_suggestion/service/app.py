"""The suggestion service's HTTP API (FastAPI): routes over :class:`~.core.TuningService`.

Handlers only translate: HTTP in, one service call, JSON out. Every error is
answered as ``{"error": {"code", "message", "field"}}`` with a 4xx status
(5xx only for server faults), and counted in Prometheus.

Handlers that touch the database are plain ``def`` functions, which Starlette
runs in its thread pool (SQLAlchemy is synchronous); the stop long-poll is
``async`` so a waiting operator holds no thread between polls. The hot routes
(ask, report, finish) have a path of their own, :class:`_HotRoutes`, which
answers a lone request on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Annotated, Any

from fastapi import FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kubetune_suggestion.service import metrics as prom
from kubetune_suggestion.service.batching import ReportBatcher
from kubetune_suggestion.service.core import Report, TuningService
from kubetune_suggestion.service.errors import NotFound, ServiceError, Unauthorized
from kubetune_suggestion.service.models import (
    AskRequest,
    AskResult,
    ErrorBody,
    ExperimentSummary,
    ExperimentView,
    FinishRequest,
    ObservationRequest,
    RegisterRequest,
    RestoreRequest,
    RestoreResult,
    RetryRequest,
    StartRequest,
    StartResult,
    StopAnswer,
    StopList,
    StopOrder,
    TrialView,
)

log = logging.getLogger(__name__)

API_TITLE = "kubetune suggestion service"
# Longest a /v1/stops long-poll may wait; a client wanting longer polls again.
MAX_WAIT_SECONDS = 60.0


class SettingsError(ValueError):
    """An environment variable whose value the service cannot use; the message names it."""


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise ValueError("expected a port, 1 to 65535")
    return port


def _flag(value: str) -> bool:
    answer = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
    try:
        return answer[value.lower()]
    except KeyError:
        raise ValueError("expected 1, true, yes, 0, false or no") from None


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError("expected a number of seconds > 0")
    return seconds


def _env(name: str, parse: Callable[[str], Any]) -> dict[str, Any]:
    """A field's metadata: the variable it is read from and how its text is parsed."""
    return {"env": name, "parse": parse}


@dataclass(frozen=True)
class Settings:
    """How to run the service: every environment variable it reads, read here.

    :meth:`from_env` reads each field from the variable its comment names
    (``kubetune-service``'s flags win over the variables they name); the
    defaults here are the documented ones, and the table of variables,
    defaults and meanings is in the chart's README
    (``charts/kubetune/README.md``, "Settings"), which a test keeps in step.
    An empty (or blank) variable counts as unset; a value that does not
    parse is refused with a :class:`SettingsError` naming the variable.
    """

    # KUBETUNE_DB_URL (--db): ``sqlite:///path`` or
    # ``postgresql+psycopg://user:pw@host/db``.
    db_url: str = field(default="sqlite:///kubetune.db", metadata=_env("KUBETUNE_DB_URL", str))
    # KUBETUNE_SECRET (--secret-file): the trial-token secret; None uses (or
    # creates) the one stored in the database, shared by every replica on it.
    secret: str | None = field(default=None, metadata=_env("KUBETUNE_SECRET", str))
    # KUBETUNE_MIGRATE (--no-migrate): bring the schema up to date at startup.
    migrate: bool = field(default=True, metadata=_env("KUBETUNE_MIGRATE", _flag))
    # KUBETUNE_HOST (--host): the address to listen on.
    host: str = field(default="127.0.0.1", metadata=_env("KUBETUNE_HOST", str))
    # KUBETUNE_PORT (--port): the HTTP port (API, health, /metrics); the
    # chart's suggestion.port and the operator's default service URL use it too.
    port: int = field(default=8000, metadata=_env("KUBETUNE_PORT", _port))
    # KUBETUNE_STOP_POLL_SECONDS: how often a waiting /v1/stops long-poll
    # looks at the database. Configurable: on a shared database a longer
    # period costs fewer queries for a slower stop.
    stop_poll_seconds: float = field(
        default=0.15, metadata=_env("KUBETUNE_STOP_POLL_SECONDS", _positive_seconds)
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from the environment (``os.environ`` when ``env`` is omitted).

        Raises:
            SettingsError: If a variable's value does not parse or is out of
                range; the message names the variable.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f.metadata["env"]
            text = env.get(name, "")
            if not text.strip():
                continue
            try:
                values[f.name] = f.metadata["parse"](text)
            except ValueError as exc:
                raise SettingsError(f"{name}={text!r}: {exc}") from None
        return cls(**values)


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in [
        (400, "Malformed JSON"),
        (401, "No trial token"),
        (403, "A token of another trial"),
        (404, "Unknown experiment or trial"),
        (409, "Conflicts with the stored state"),
        (422, "Invalid input; `field` names it"),
    ]
}

Uid = Annotated[
    str, Path(min_length=1, max_length=128, description="The Experiment's metadata.uid.")
]
Number = Annotated[int, Path(ge=0, description="The trial number.")]


def _json(model: BaseModel, status_code: int = 200) -> Response:
    # Serialised straight from the model: FastAPI would otherwise validate the
    # returned model a second time against response_model on the hot paths.
    return Response(model.model_dump_json(), status_code=status_code, media_type="application/json")


def _error(status: int, code: str, message: str, field: str | None = None) -> JSONResponse:
    prom.ERRORS.labels(code).inc()
    return JSONResponse(
        {"error": {"code": code, "message": message, "field": field}}, status_code=status
    )


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <token>'", field="token")
    return token.strip()


_OBSERVATION_DOCS: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": ObservationRequest.model_json_schema()}},
    },
    "parameters": [
        {
            "name": "Authorization",
            "in": "header",
            "required": True,
            "description": "Bearer <trial token>",
            "schema": {"type": "string"},
        }
    ],
}


def _observation(raw: bytes) -> ObservationRequest:
    """The report body, failing as FastAPI's own body parsing would (400 / 422)."""
    try:
        # The stdlib parser, like FastAPI's: it reads NaN and Infinity, so the
        # model (not the parser) refuses them, naming the metric.
        data = json.loads(raw)
    except ValueError as exc:
        raise RequestValidationError(
            [
                {
                    "type": "json_invalid",
                    "loc": ("body",),
                    "msg": "JSON decode error",
                    "ctx": {"error": str(exc).split(":")[0]},
                }
            ]
        ) from None
    try:
        return ObservationRequest.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
        ) from None


_AskMethod = Callable[..., AskResult | None]


def _ask(ask: _AskMethod, uid: str, request: AskRequest) -> AskResult | None:
    """One of the service's ask methods called with ``request``'s fields."""
    return ask(
        uid,
        request.count,
        request.parallelism,
        ask_id=request.ask_id,
        lease_seconds=request.lease_seconds,
    )


def _finish(
    svc: TuningService, uid: str, number: int, request: FinishRequest, authorization: str | None
) -> TrialView:
    """The service's finish of ``request`` (its final report's token from ``authorization``)."""
    # The header matters only with a final report, as it does for any report.
    token = None if request.metrics is None else _bearer(authorization)
    return svc.finish(
        uid,
        number,
        request.state,
        request.message,
        metrics=request.metrics,
        step=request.step,
        token=token,
    )


def _field(loc: tuple[int | str, ...]) -> str | None:
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


class _LatencyMiddleware:
    """Observes every request's duration by route template (pure ASGI: no per-request task)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            prom.REQUEST_SECONDS.labels(scope["method"], template).observe(
                time.perf_counter() - start
            )


# The three routes of every trial's life (ask, report, finish), matched by the
# fast path below. Groups: uid; "ask"; a trial number; "observations" or
# "finish". Anything else (odd numbers, long uids) is left to FastAPI's own
# routing and validation.
_HOT_PATH = re.compile(
    r"^/v1/experiments/([^/]{1,128})/(?:(ask)|trials/([0-9]{1,9})/(observations|finish))$"
)
_ASK_ROUTE = "/v1/experiments/{uid}/ask"
_FINISH_ROUTE = "/v1/experiments/{uid}/trials/{n}/finish"
_OBSERVATIONS_ROUTE = "/v1/experiments/{uid}/trials/{n}/observations"


class _HotRoutes:
    """A pure-ASGI fast path for ``ask``, ``observations`` and ``finish``.

    Those three requests make up a trial's life, and FastAPI's middleware,
    routing, dependency solving and body handling cost more CPU than the
    database work behind them. :class:`_ServiceApp` hands them here before
    its middleware stack; this path answers well-formed requests itself,
    with the same request models, the same service calls and the same
    responses (timed in the same latency histogram, errors answered and
    counted as the app's handlers do); the OpenAPI document still describes
    them through the FastAPI routes. Whatever it does not recognise as well
    formed (another content type, invalid JSON, a body the model refuses)
    is handed to the FastAPI app with the body replayed, so every error
    answer stays exactly FastAPI's.

    A request that is alone (no other hot request in flight in this
    process) is answered on the event loop's thread: its statement or two
    cost less than handing it to a worker thread and back, which takes two
    thread wake-ups and about 0.1 ms of CPU each way. That covers the
    cache-backed paths of ``ask`` and reports (which wait for no lock beyond
    their one statement) and, on PostgreSQL, ``finish`` (row locks held for
    a statement or a short transaction). The locked paths of ``ask`` and
    reports, and every request that has company, go to the worker threads
    (reports through the batcher): concurrent requests overlap their
    database waits and concurrent reports share transactions.
    """

    def __init__(self, service: TuningService, batcher: ReportBatcher, executor: Executor) -> None:
        self._service = service
        self._batcher = batcher
        self._executor = executor
        # Hot requests between their arrival and their answer.
        self._in_flight = 0
        self._timers = {
            route: prom.REQUEST_SECONDS.labels("POST", route)
            for route in (_ASK_ROUTE, _FINISH_ROUTE, _OBSERVATIONS_ROUTE)
        }

    def _ask(self, uid: str, request: AskRequest, tried_cache: bool) -> bytes:
        ask = self._service.ask_locked if tried_cache else self._service.ask
        asked = _ask(ask, uid, request)
        assert asked is not None  # only ask_from_cache may leave an ask unanswered
        return asked.model_dump_json().encode()

    def _finish(
        self, uid: str, number: int, request: FinishRequest, authorization: str | None
    ) -> bytes:
        view = _finish(self._service, uid, number, request, authorization)
        return view.model_dump_json().encode()

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, match: re.Match[str], fallback: ASGIApp
    ) -> None:
        """Answer the request ``match`` matched, or hand it to ``fallback`` with its body."""
        self._in_flight += 1
        finished = False
        try:
            finished = await self._handle(scope, receive, send, match, fallback)
        finally:
            self._in_flight -= 1
        if finished and self._in_flight == 0:
            # Nothing else to do: work out the next ask's suggestion now, while
            # the client reads this answer (the loop runs it before new requests).
            asyncio.get_running_loop().call_soon(self._prepare, match.group(1))

    def _prepare(self, uid: str) -> None:
        try:
            self._service.prepare_ask(uid)
        except Exception:  # only a head start: the ask works it out itself
            log.exception("preparing the next suggestion of %s failed", uid)

    async def _handle(
        self, scope: Scope, receive: Receive, send: Send, match: re.Match[str], fallback: ASGIApp
    ) -> bool:
        """Answer the request; whether it was a finish that ended a trial on this path."""
        start = time.perf_counter()
        content_type = authorization = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value
            elif name == b"authorization":
                authorization = value.decode("latin-1")
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return False
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        uid, ask, number, action = match.groups()
        request: AskRequest | FinishRequest | ObservationRequest | None = None
        if content_type == b"application/json":
            model: type[AskRequest | FinishRequest | ObservationRequest] = (
                AskRequest if ask else FinishRequest if action == "finish" else ObservationRequest
            )
            try:
                request = model.model_validate(json.loads(body))
            except ValueError:  # bad JSON or a ValidationError: FastAPI answers it, as always
                request = None
        if request is None:
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            await fallback(scope, replay, send)
            return False
        route = _ASK_ROUTE if ask else _FINISH_ROUTE if action == "finish" else _OBSERVATIONS_ROUTE
        answer: bytes | Response
        try:
            answer = await self._answer(uid, number, request, authorization)
        except ServiceError as exc:
            answer = _error(exc.status, exc.code, exc.message, exc.field)
        except Exception as exc:
            # What the app's ServerErrorMiddleware and exception handler do.
            log.exception("unhandled error", exc_info=exc)
            await _error(500, "internal", "internal server error (see the service log)")(
                scope, receive, send
            )
            self._timers[route].observe(time.perf_counter() - start)
            raise
        if isinstance(answer, Response):
            await answer(scope, receive, send)
        else:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-length", str(len(answer)).encode()),
                        (b"content-type", b"application/json"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": answer})
        self._timers[route].observe(time.perf_counter() - start)
        return action == "finish" and not isinstance(answer, Response)

    async def _answer(
        self,
        uid: str,
        number: str | None,
        request: AskRequest | FinishRequest | ObservationRequest,
        authorization: str | None,
    ) -> bytes:
        """The body of the answer (raising ServiceError for an error answer)."""
        svc = self._service
        loop = asyncio.get_running_loop()
        report = None
        if isinstance(request, ObservationRequest):
            assert number is not None
            token = _bearer(authorization)
            report = Report(uid, int(number), token, request.step, request.metrics)
        # Requests that arrived together are all counted once each has run up
        # to here: one pass of the loop tells a lone request from a burst.
        await asyncio.sleep(0)
        alone = self._in_flight == 1
        if isinstance(request, AskRequest):
            asked = _ask(svc.ask_from_cache, uid, request) if alone else None
            if asked is not None:
                return asked.model_dump_json().encode()
            return await loop.run_in_executor(self._executor, self._ask, uid, request, alone)
        if isinstance(request, FinishRequest):
            assert number is not None
            # On SQLite a finish may wait for another writer's database lock.
            if alone and svc.store.postgres:
                return self._finish(uid, int(number), request, authorization)
            return await loop.run_in_executor(
                self._executor, self._finish, uid, int(number), request, authorization
            )
        assert report is not None
        stop = svc.report_from_cache(report) if alone else None
        if stop is None:
            stop = await self._batcher.submit(report)
        return stop.model_dump_json().encode()


class _ServiceApp(FastAPI):
    """The FastAPI app, with the hot routes answered before its middleware stack."""

    hot_routes: _HotRoutes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hot = self.hot_routes
        if (
            hot is not None
            and scope["type"] == "http"
            and scope["method"] == "POST"
            and not scope.get("root_path")
        ):
            match = _HOT_PATH.match(scope["path"])
            if match is not None:
                await hot(scope, receive, send, match, super().__call__)
                return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings, service: TuningService | None = None) -> FastAPI:
    """The HTTP app over ``service`` (or one opened from ``settings``)."""
    svc = service or TuningService.open(
        settings.db_url, secret=settings.secret, migrate=settings.migrate
    )
    app = _ServiceApp(
        title=API_TITLE,
        version="v1",
        description="Suggestions, observations and early stopping for kubetune experiments.",
        responses=_ERRORS,
    )
    app.state.service = svc

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message, exc.field)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        first: dict[str, Any] = dict(errors[0]) if errors else {"loc": (), "msg": "invalid"}
        if first.get("type") == "json_invalid":
            detail = (first.get("ctx") or {}).get("error", "")
            return _error(
                400, "malformed_json", f"the request body is not valid JSON: {detail}".strip()
            )
        field = _field(tuple(first.get("loc", ())))
        message = str(first.get("msg", "invalid"))
        if first.get("type") == "missing":
            message = "required" if field else "a JSON request body is required"
        text = f"{field}: {message}" if field else message
        return _error(422, "invalid", text, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return _error(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return _error(500, "internal", "internal server error (see the service log)")

    @app.put("/v1/experiments/{uid}", response_model=ExperimentView, tags=["experiments"])
    def register(uid: Uid, body: RegisterRequest) -> Response:
        """Create or update an experiment (keyed by the Kubernetes object's UID)."""
        view = svc.register(uid, body.name, body.namespace, body.spec)
        return _json(view, 201 if view.created else 200)

    @app.get("/v1/experiments/{uid}", response_model=ExperimentSummary, tags=["experiments"])
    def summary(uid: Uid) -> Response:
        """Counts by state, the best trial, whether the experiment is complete."""
        return _json(svc.summary(uid))

    @app.delete("/v1/experiments/{uid}", status_code=204, tags=["experiments"])
    def delete(uid: Uid) -> Response:
        """Delete an experiment with all its trials and observations."""
        svc.delete(uid)
        return Response(status_code=204)

    @app.post("/v1/experiments/{uid}/restore", response_model=RestoreResult, tags=["experiments"])
    def restore(uid: Uid, body: RestoreRequest) -> Response:
        """Put back the trials the cluster holds, after the service lost its database.

        Numbers not stored are inserted as given; those stored with the same
        params are left as they are (409 with other params). The next trial
        number moves past the highest one given.
        """
        return _json(svc.restore(uid, body.trials))

    @app.post("/v1/experiments/{uid}/ask", response_model=AskResult, tags=["trials"])
    def ask(uid: Uid, body: AskRequest | None = None) -> Response:
        """Up to ``count`` trials to run that no other ask returned (no body: one trial).

        With ``ask_id``, the trials earlier asks with that id handed out and
        nobody started come first (idempotent). With ``parallelism``, no new
        trial is handed out while that many are pending or running. With
        ``lease_seconds``, a trial not started, reported or finished in time
        is failed as abandoned.
        """
        asked = _ask(svc.ask, uid, body or AskRequest())
        assert asked is not None  # only ask_from_cache may leave an ask unanswered
        return _json(asked)

    @app.get("/v1/experiments/{uid}/trials", response_model=list[TrialView], tags=["trials"])
    def trials(
        uid: Uid,
        observations: Annotated[bool, Query(description="Include every report.")] = False,
    ) -> Response:
        """Every trial (the full history, for plots and reports)."""
        views = svc.trials(uid, observations=observations)
        body = b"[" + b",".join(v.model_dump_json().encode() for v in views) + b"]"
        return Response(body, media_type="application/json")

    @app.get("/v1/experiments/{uid}/trials/{n}", response_model=TrialView, tags=["trials"])
    def trial(uid: Uid, n: Number) -> Response:
        """One trial."""
        return _json(svc.trial(uid, n))

    @app.post("/v1/experiments/{uid}/start", response_model=StartResult, tags=["trials"])
    def start_many(uid: Uid, request: StartRequest) -> StartResult:
        """Mark several handed-out trials as running, in one transaction.

        Each unknown or finished trial is refused on its own, in ``refused``.
        """
        return svc.start_many(uid, request.numbers)

    @app.post("/v1/experiments/{uid}/trials/{n}/start", status_code=204, tags=["trials"])
    def start(uid: Uid, n: Number) -> Response:
        """Mark a handed-out trial as running (idempotent)."""
        svc.start(uid, n)
        return Response(status_code=204)

    @app.post("/v1/experiments/{uid}/trials/{n}/retry", response_model=TrialView, tags=["trials"])
    def retry(uid: Uid, n: Number, body: RetryRequest | None = None) -> Response:
        """Start a new attempt of a pending or running trial (its Pod was lost).

        Its reports and its stop are forgotten: reports start over from step 0.
        With ``ask_id`` the trial is pending until an ask with that id hands it
        back; without, it is running at once.
        """
        return _json(svc.retry(uid, n, (body or RetryRequest()).ask_id))

    # Database calls of the fast path and of the report batcher run here: the
    # event loop's own executor is lighter than anyio's thread hop, and this
    # one has as many threads as anyio's default limiter (its default has 6
    # on 2 cores, too few for requests queueing on an experiment's row lock).
    executor = ThreadPoolExecutor(max_workers=40, thread_name_prefix="kubetune-db")
    batcher = ReportBatcher(svc.report_batch, executor=executor)

    # The hottest route: it reads its body and header itself, which costs
    # about half of what FastAPI's body and header parameters do; the
    # request body and header are documented through openapi_extra instead.
    @app.post(
        "/v1/experiments/{uid}/trials/{n}/observations",
        response_model=StopAnswer,
        tags=["trials"],
        openapi_extra=_OBSERVATION_DOCS,
    )
    async def observe(uid: Uid, n: Number, request: Request) -> Response:
        """Store one report (step + metrics) and answer whether the trial should stop."""
        body = _observation(await request.body())
        return await report(uid, n, body, request.headers.get("authorization"))

    async def report(
        uid: str, n: int, body: ObservationRequest, authorization: str | None
    ) -> Response:
        token = _bearer(authorization)
        return _json(await batcher.submit(Report(uid, n, token, body.step, body.metrics)))

    @app.post("/v1/experiments/{uid}/trials/{n}/finish", response_model=TrialView, tags=["trials"])
    def finish(
        uid: Uid,
        n: Number,
        body: FinishRequest,
        authorization: Annotated[
            str | None, Header(description="Bearer <trial token>: needed with metrics.")
        ] = None,
    ) -> Response:
        """End a trial; its objective is computed from its reports.

        With ``metrics``, the trial's final report is stored with its end (as
        Optuna's ``tell``); it then needs the trial's token, as any report.
        """
        return _json(_finish(svc, uid, n, body, authorization))

    @app.get("/v1/experiments/{uid}/stops", response_model=list[StopOrder], tags=["trials"])
    def experiment_stops(uid: Uid) -> Response:
        """Running trials of the experiment that should stop."""
        orders = svc.stops(uid)
        return Response(
            b"[" + b",".join(o.model_dump_json().encode() for o in orders) + b"]",
            media_type="application/json",
        )

    @app.get("/v1/stops", response_model=StopList, tags=["trials"])
    async def stops(
        experiment: Annotated[str | None, Query(max_length=128)] = None,
        wait: Annotated[
            float, Query(ge=0, le=MAX_WAIT_SECONDS, description="Long-poll seconds.")
        ] = 0,
    ) -> Response:
        """Running trials that should stop; waits up to ``wait`` seconds for the first one."""
        if (
            experiment is not None
            and await run_in_threadpool(svc.store.experiment, experiment) is None
        ):
            raise NotFound(f"no experiment {experiment!r}", field="experiment")
        deadline = time.monotonic() + wait
        while True:
            items = await run_in_threadpool(svc.all_stops, experiment)
            if items or time.monotonic() >= deadline:
                return _json(StopList(stops=items))
            await asyncio.sleep(
                min(settings.stop_poll_seconds, max(0.0, deadline - time.monotonic()))
            )

    app.add_middleware(_LatencyMiddleware)
    app.hot_routes = _HotRoutes(svc, batcher, executor)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"model": ErrorBody}})
    def readyz() -> Response:
        """The database answers."""
        try:
            svc.ping()
        except Exception as exc:  # any failure to reach the database means "not ready"
            return _error(503, "unavailable", f"database unreachable: {type(exc).__name__}")
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["health"], response_class=Response)
    def metrics() -> Response:
        """Prometheus metrics."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory`` (and worker processes): settings from the env."""
    return create_app(Settings.from_env())


__all__ = ["Settings", "SettingsError", "app_from_env", "create_app"]
