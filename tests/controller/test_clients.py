"""The service client's retry policy and the work queue's guarantees."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import httpx
import pytest

from kubetune_controller.service_client import ServiceCallError, ServiceClient, ServiceUnavailable
from kubetune_controller.workqueue import WorkQueue
from tests.controller.httpx_sender import HttpxSender

SUMMARY = {
    "uid": "u",
    "name": "e",
    "namespace": "ns",
    "counts": {"running": 1},
    "best": None,
    "allocated": 1,
    "done": 0,
    "max_trials": 4,
    "complete": False,
    "complete_reason": None,
}


def _mock(handler) -> HttpxSender:
    return HttpxSender("http://svc", httpx.MockTransport(handler))


def client(handler) -> ServiceClient:
    return ServiceClient("http://svc", retries=3, sender=_mock(handler))


def test_retries_5xx_then_succeeds_and_marks_available():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) < 3:
            return httpx.Response(503, text="starting")
        return httpx.Response(200, json=SUMMARY)

    async def go():
        c = client(handler)
        summary = await c.summary("u")
        assert summary.max_trials == 4
        assert c.available
        await c.close()

    asyncio.run(go())
    assert len(calls) == 3


def test_gives_up_with_a_message_naming_the_address():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async def go():
        c = client(handler)
        with pytest.raises(ServiceUnavailable, match="http://svc/v1/experiments/u"):
            await c.summary("u")
        assert not c.available
        assert "ConnectError" in c.last_error
        await c.close()

    asyncio.run(go())


def test_4xx_is_not_retried_and_carries_the_field():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        body = {"error": {"code": "invalid", "message": "bad count", "field": "count"}}
        return httpx.Response(422, json=body)

    async def go():
        c = client(handler)
        with pytest.raises(ServiceCallError) as err:
            await c.ask("u", 2, 4)
        assert (err.value.code, err.value.field) == ("invalid", "count")
        await c.close()

    asyncio.run(go())
    assert calls == [1]


def test_an_error_that_is_not_the_services_is_retried_on_a_new_connection():
    # A pooled connection that outlived the service's Pod answered 404 with no
    # body, and every call of the operator failed until it restarted.
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            return httpx.Response(404, content=b"")
        return httpx.Response(200, json=SUMMARY)

    async def go():
        c = client(handler)
        assert (await c.summary("u")).max_trials == 4
        await c.close()

    asyncio.run(go())
    assert len(calls) == 2


def test_finish_conflict_answers_with_the_trial_as_it_is():
    view = {
        "number": 2,
        "state": "pruned",
        "params": {},
        "objective": 0.5,
        "last_step": 3,
        "stop_reason": "asha",
        "message": None,
        "created_at": None,
        "started_at": None,
        "finished_at": None,
    }

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/finish"):
            return httpx.Response(409, json={"error": {"code": "conflict", "message": "x"}})
        return httpx.Response(200, json=view)

    async def go():
        c = client(handler)
        got = await c.finish("u", 2, "failed", "exit 1")
        assert got.state.value == "pruned"
        await c.close()

    asyncio.run(go())


def test_workqueue_coalesces_and_never_runs_a_key_twice_at_once():
    async def go():
        q: WorkQueue[str] = WorkQueue()
        q.add("a")
        q.add("a")
        q.add("b")
        assert len(q) == 2
        first = await q.get()
        q.add(first)  # event while active: one more run after this one
        second = await q.get()
        assert second != first
        q.done(first)
        assert await q.get() == first
        q.done(first)
        q.done(second)
        assert len(q) == 0

    asyncio.run(go())


def test_workqueue_delayed_add_keeps_the_earliest():
    async def go():
        q: WorkQueue[str] = WorkQueue()
        q.add_after("a", 0.05)
        q.add_after("a", 10)
        assert await asyncio.wait_for(q.get(), 1) == "a"

    asyncio.run(go())


def test_workqueue_min_interval_batches_a_stream_of_events():
    async def go():
        loop = asyncio.get_running_loop()
        q: WorkQueue[str] = WorkQueue(min_interval=0.2)
        q.add("a")
        assert await q.get() == "a"
        q.done("a")
        ended = loop.time()
        for _ in range(5):  # a burst right after the run: one more run, not five
            q.add("a")
        assert len(q) == 0  # held back, not ready yet
        assert await asyncio.wait_for(q.get(), 1) == "a"
        assert loop.time() - ended >= 0.19
        q.done("a")
        assert len(q) == 0
        q.forget("a")  # a forgotten key starts afresh: no wait
        q.add("a")
        assert len(q) == 1

    asyncio.run(go())


def test_cache_ignores_an_event_older_than_our_own_write():
    from kubetune_controller.cache import ClusterCache
    from kubetune_controller.model import TrialPhase
    from tests.controller.factories import trial

    cache = ClusterCache()
    final = replace(trial(0, TrialPhase.SUCCEEDED), resource_version="20")
    stale = replace(trial(0, TrialPhase.RUNNING), resource_version="12")
    cache.put_trial(final)
    cache.put_trial(stale)
    assert cache.trials(("ns", "exp"))["exp-0"].phase is TrialPhase.SUCCEEDED
    newer = replace(trial(0, TrialPhase.SUCCEEDED), resource_version="21", last_step=3)
    cache.put_trial(newer)
    assert cache.trials(("ns", "exp"))["exp-0"].last_step == 3


def test_over_real_http_retries_5xx_maps_4xx_and_gives_up_on_a_closed_port():
    """The production transport (aiohttp), against a real HTTP server on a free port."""
    from aiohttp import web

    from kubetune_suggestion.service.testing import free_port

    calls: list[str] = []

    async def summary(request: web.Request) -> web.Response:
        calls.append(request.path)
        if len(calls) < 2:
            return web.Response(status=503, text="starting")
        return web.json_response(SUMMARY)

    async def finish(request: web.Request) -> web.Response:
        body = await request.json()
        assert body == {"state": "failed", "message": "exit 1"}
        error = {"code": "invalid", "message": "state is bad", "field": "state"}
        return web.json_response({"error": error}, status=422)

    async def go() -> None:
        app = web.Application()
        app.router.add_get("/v1/experiments/u", summary)
        app.router.add_post("/v1/experiments/u/trials/2/finish", finish)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        c = ServiceClient(f"http://127.0.0.1:{port}", retries=3)
        try:
            assert (await c.summary("u")).max_trials == 4
            assert c.available
            with pytest.raises(ServiceCallError) as err:
                await c.finish("u", 2, "failed", "exit 1")
            assert (err.value.status, err.value.code, err.value.field) == (422, "invalid", "state")
        finally:
            await c.close()
            await runner.cleanup()
        closed = ServiceClient(f"http://127.0.0.1:{port}", retries=1)
        try:
            with pytest.raises(ServiceUnavailable, match=f"127.0.0.1:{port}/v1/experiments/u"):
                await closed.summary("u")
            assert not closed.available
        finally:
            await closed.close()

    asyncio.run(go())
    assert calls == ["/v1/experiments/u", "/v1/experiments/u"]


def test_workqueue_delayed_adds_work_under_uvloop_too():
    """The operator runs on uvloop, whose call_at for a past time returns a plain Handle."""
    uvloop = pytest.importorskip("uvloop")

    async def go():
        q: WorkQueue[str] = WorkQueue(min_interval=0.05)
        q.add("a")
        assert await q.get() == "a"
        q.done("a")
        q.add_after("a", 0)  # due at once
        q.add_after("a", -1)  # in the past
        q.add("a")  # within min_interval
        assert await asyncio.wait_for(q.get(), 1) == "a"
        q.done("a")
        q.forget("a")

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(go())


def test_concurrent_starts_of_one_experiment_go_out_as_one_request():
    import json as _json

    bodies: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/experiments/u/start"
        body = _json.loads(request.content)
        bodies.append(body)
        refused = [
            {"number": 3, "status": 409, "code": "conflict", "message": "trial 3 already finished"}
        ]
        started = [n for n in body["numbers"] if n != 3]
        return httpx.Response(200, json={"started": started, "refused": refused})

    async def go():
        c = client(handler)
        results = await asyncio.gather(
            *(c.start("u", n) for n in (5, 1, 3, 1)), return_exceptions=True
        )
        await c.close()
        return results

    results = asyncio.run(go())
    assert bodies == [{"numbers": [1, 3, 5]}]
    assert results[0] is None and results[1] is None and results[3] is None
    assert isinstance(results[2], ServiceCallError) and results[2].status == 409


def test_a_failed_start_batch_fails_every_waiter():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async def go():
        c = ServiceClient("http://svc", retries=0, sender=_mock(handler))
        results = await asyncio.gather(c.start("u", 1), c.start("u", 2), return_exceptions=True)
        await c.close()
        return results

    results = asyncio.run(go())
    assert all(isinstance(r, ServiceUnavailable) for r in results)
