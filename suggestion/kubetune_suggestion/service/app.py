"""The suggestion service's HTTP API (FastAPI): routes over :class:`~.core.TuningService`.

Handlers only translate: HTTP in, one service call, JSON out. Every error is
answered as ``{"error": {"code", "message", "field"}}`` with a 4xx status
(5xx only for server faults), and counted in Prometheus.

Handlers that touch the database are plain ``def`` functions, which Starlette
runs in its thread pool (SQLAlchemy is synchronous); the stop long-poll is
``async`` so a waiting operator holds no thread between polls: so the
samplers' work (a CMA-ES replay at 10,000 trials takes 0.6 s) never runs on
the event loop. Reports go through :class:`~.batching.ReportBatcher`, which
stores concurrent ones in one transaction.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from kubetune_suggestion.service import metrics as prom
from kubetune_suggestion.service.auth import Authenticator, Caller, Reviewer
from kubetune_suggestion.service.batching import ReportBatcher
from kubetune_suggestion.service.core import TuningService
from kubetune_suggestion.service.errors import NotFound, ServiceError
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
from kubetune_suggestion.service.reporting import Report
from kubetune_suggestion.service.settings import ServiceSettings

log = logging.getLogger(__name__)

API_TITLE = "kubetune suggestion service"
# Longest a /v1/stops long-poll may wait; a client wanting longer polls again.
MAX_WAIT_SECONDS = 60.0


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in [
        (400, "Malformed JSON"),
        (401, "No credentials, or credentials not accepted"),
        (403, "Credentials that may not make this call (a token of another trial)"),
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
    # returned model a second time against response_model.
    return Response(model.model_dump_json(), status_code=status_code, media_type="application/json")


def _error(status: int, code: str, message: str, field: str | None = None) -> JSONResponse:
    prom.ERRORS.labels(code).inc()
    return JSONResponse(
        {"error": {"code": code, "message": message, "field": field}}, status_code=status
    )


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
            "description": "Bearer <the trial's token> (or a client's credentials)",
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


def create_app(
    settings: ServiceSettings,
    service: TuningService | None = None,
    reviewer: Callable[[], Reviewer] | None = None,
) -> FastAPI:
    """The HTTP app over ``service`` (or one opened from ``settings``).

    ``reviewer`` makes the TokenReview client when ``settings`` accept
    ServiceAccount tokens (None: the API server of the cluster the service
    runs in).

    Raises:
        SettingsError: If ``settings`` give no way to authenticate callers.
    """
    auth = Authenticator.from_settings(settings, reviewer or in_cluster(settings))
    svc = service or TuningService.open(
        settings.db_url, secret=settings.secret, migrate=settings.migrate
    )
    app = FastAPI(
        title=API_TITLE,
        version="v1",
        description="Suggestions, observations and early stopping for kubetune experiments.",
        responses=_ERRORS,
    )
    app.state.service = svc
    _add_error_handlers(app)
    app.state.auth = auth
    app.include_router(_experiment_routes(svc))
    app.include_router(_trial_routes(svc))
    app.include_router(_report_routes(svc))
    app.include_router(_stop_routes(svc, settings))
    app.include_router(_health_routes(svc))
    app.add_middleware(_LatencyMiddleware)
    return app


def in_cluster(settings: ServiceSettings) -> Callable[[], Reviewer]:
    """What makes the TokenReview client of the cluster the service runs in."""

    def make() -> Reviewer:
        from kubetune_suggestion.service.kubernetes import in_cluster_reviewer

        return in_cluster_reviewer(settings.token_audience or "")

    return make


Authorization = Annotated[
    str | None,
    Header(description="Bearer <API key | ServiceAccount token | the trial's token>"),
]


def _client(request: Request, authorization: Authorization = None) -> Caller:
    """The caller, who must be a client (401/403 otherwise)."""
    auth: Authenticator = request.app.state.auth
    return auth.client(authorization)


def _caller(request: Request, authorization: Authorization = None) -> Caller:
    """Whoever calls; a route acting on a trial checks a trial caller's token."""
    auth: Authenticator = request.app.state.auth
    return auth.caller(authorization)


# Route dependencies: a client only; anyone, the route checks the trial's token.
CLIENT = [Depends(_client)]
AnyCaller = Annotated[Caller, Depends(_caller)]


def _trial_token(svc: TuningService, caller: Caller, uid: str, number: int) -> str:
    """The token to act on trial ``number`` with: its own, or the caller's once checked.

    Raises:
        Unauthorized: A caller without credentials.
        Forbidden: A token of another trial.
    """
    if caller.client:
        return svc.token(uid, number)
    svc.check_token(uid, number, caller.token)
    assert caller.token is not None
    return caller.token


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answered as ``{"error": {code, message, field}}``."""

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


def _experiment_routes(svc: TuningService) -> APIRouter:
    router = APIRouter(tags=["experiments"], dependencies=CLIENT)

    @router.put("/v1/experiments/{uid}", response_model=ExperimentView)
    def register(uid: Uid, body: RegisterRequest) -> Response:
        """Create or update an experiment (keyed by the Kubernetes object's UID)."""
        view = svc.register(uid, body.name, body.namespace, body.spec)
        return _json(view, 201 if view.created else 200)

    @router.get("/v1/experiments/{uid}", response_model=ExperimentSummary)
    def summary(uid: Uid) -> Response:
        """Counts by state, the best trial, whether the experiment is complete."""
        return _json(svc.summary(uid))

    @router.delete("/v1/experiments/{uid}", status_code=204)
    def delete(uid: Uid) -> Response:
        """Delete an experiment with all its trials and observations."""
        svc.delete(uid)
        return Response(status_code=204)

    @router.post("/v1/experiments/{uid}/restore", response_model=RestoreResult)
    def restore(uid: Uid, body: RestoreRequest) -> Response:
        """Put back the trials the cluster holds, after the service lost its database.

        Numbers not stored are inserted as given; those stored with the same
        params are left as they are (409 with other params). The next trial
        number moves past the highest one given.
        """
        return _json(svc.restore(uid, body.trials))

    return router


def _trial_routes(svc: TuningService) -> APIRouter:
    router = APIRouter(tags=["trials"])

    @router.post("/v1/experiments/{uid}/ask", response_model=AskResult, dependencies=CLIENT)
    def ask(uid: Uid, body: AskRequest | None = None) -> Response:
        """Up to ``count`` trials to run that no other ask returned (no body: one trial).

        With ``ask_id``, the trials earlier asks with that id handed out and
        nobody started come first (idempotent). With ``parallelism``, no new
        trial is handed out while that many are pending or running. With
        ``lease_seconds``, a trial not started, reported or finished in time
        is failed as abandoned.
        """
        request = body or AskRequest()
        asked = svc.ask(
            uid,
            request.count,
            request.parallelism,
            ask_id=request.ask_id,
            lease_seconds=request.lease_seconds,
        )
        return _json(asked)

    @router.get("/v1/experiments/{uid}/trials", response_model=list[TrialView], dependencies=CLIENT)
    def trials(
        uid: Uid,
        observations: Annotated[bool, Query(description="Include every report.")] = False,
    ) -> Response:
        """Every trial (the full history, for plots and reports)."""
        views = svc.trials(uid, observations=observations)
        body = b"[" + b",".join(v.model_dump_json().encode() for v in views) + b"]"
        return Response(body, media_type="application/json")

    @router.get("/v1/experiments/{uid}/trials/{n}", response_model=TrialView)
    def trial(uid: Uid, n: Number, caller: AnyCaller) -> Response:
        """One trial (a client, or the trial with its token)."""
        _trial_token(svc, caller, uid, n)
        return _json(svc.trial(uid, n))

    @router.post("/v1/experiments/{uid}/start", response_model=StartResult, dependencies=CLIENT)
    def start_many(uid: Uid, request: StartRequest) -> StartResult:
        """Mark several handed-out trials as running, in one transaction.

        Each unknown or finished trial is refused on its own, in ``refused``.
        """
        return svc.start_many(uid, request.numbers)

    @router.post("/v1/experiments/{uid}/trials/{n}/start", status_code=204)
    def start(uid: Uid, n: Number, caller: AnyCaller) -> Response:
        """Mark a handed-out trial as running (idempotent; a client, or the trial)."""
        _trial_token(svc, caller, uid, n)
        svc.start(uid, n)
        return Response(status_code=204)

    @router.post(
        "/v1/experiments/{uid}/trials/{n}/retry", response_model=TrialView, dependencies=CLIENT
    )
    def retry(uid: Uid, n: Number, body: RetryRequest | None = None) -> Response:
        """Start a new attempt of a pending or running trial (its Pod was lost).

        Its reports and its stop are forgotten: reports start over from step 0.
        With ``ask_id`` the trial is pending until an ask with that id hands it
        back; without, it is running at once.
        """
        return _json(svc.retry(uid, n, (body or RetryRequest()).ask_id))

    return router


def _report_routes(svc: TuningService) -> APIRouter:
    """Reports and finishes."""
    router = APIRouter(tags=["trials"])

    # The report batcher's database calls run here: the
    # event loop's own executor is lighter than anyio's thread hop, and this
    # one has as many threads as anyio's default limiter (its default has 6
    # on 2 cores, too few for requests queueing on an experiment's row lock).
    executor = ThreadPoolExecutor(max_workers=40, thread_name_prefix="kubetune-db")
    batcher = ReportBatcher(svc.report_batch, executor=executor)

    # The hottest route: it reads its body and header itself, which costs
    # about half of what FastAPI's body and header parameters do; the
    # request body and header are documented through openapi_extra instead.
    @router.post(
        "/v1/experiments/{uid}/trials/{n}/observations",
        response_model=StopAnswer,
        openapi_extra=_OBSERVATION_DOCS,
    )
    async def observe(uid: Uid, n: Number, request: Request) -> Response:
        """Store one report (step + metrics) and answer whether the trial should stop."""
        body = _observation(await request.body())
        # No TokenReview here (it would block the event loop): reports come
        # from trials, with their token, or from a client with the API key.
        auth: Authenticator = request.app.state.auth
        caller = auth.caller(request.headers.get("authorization"), review=False)
        token = svc.token(uid, n) if caller.client else caller.token
        return _json(await batcher.submit(Report(uid, n, token, body.step, body.metrics)))

    @router.post("/v1/experiments/{uid}/trials/{n}/finish", response_model=TrialView)
    def finish(
        uid: Uid,
        n: Number,
        body: FinishRequest,
        caller: AnyCaller,
    ) -> Response:
        """End a trial (a client, or the trial itself); its objective comes from its reports.

        With ``metrics``, the trial's final report is stored with its end (as
        Optuna's ``tell``).
        """
        token = _trial_token(svc, caller, uid, n)
        view = svc.finish(
            uid, n, body.state, body.message, metrics=body.metrics, step=body.step, token=token
        )
        return _json(view)

    return router


def _stop_routes(svc: TuningService, settings: ServiceSettings) -> APIRouter:
    """Stop orders: per experiment, and the operator's long poll over all of them."""
    router = APIRouter(tags=["trials"], dependencies=CLIENT)

    @router.get("/v1/experiments/{uid}/stops", response_model=list[StopOrder])
    def experiment_stops(uid: Uid) -> Response:
        """Running trials of the experiment that should stop."""
        orders = svc.stops(uid)
        return Response(
            b"[" + b",".join(o.model_dump_json().encode() for o in orders) + b"]",
            media_type="application/json",
        )

    @router.get("/v1/stops", response_model=StopList)
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

    return router


def _health_routes(svc: TuningService) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz")
    def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @router.get("/readyz", responses={503: {"model": ErrorBody}})
    def readyz() -> Response:
        """The database answers."""
        try:
            svc.ping()
        except Exception as exc:  # any failure to reach the database means "not ready"
            return _error(503, "unavailable", f"database unreachable: {type(exc).__name__}")
        return JSONResponse({"status": "ready"})

    return router


def app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory`` (and worker processes): settings from the env."""
    return create_app(ServiceSettings.from_env())


__all__ = ["app_from_env", "create_app"]
