"""The watch streams: line framing, the resume point, relists, and their health."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from dataclasses import replace
from typing import Any

import aiohttp
import kopf
import pytest
from aiohttp import web
from kopf._cogs.structs.ephemera import AnyMemo
from kopf._core.engines.probing import health_reporter
from kubernetes import client as k8s_client

from kubetune_controller.cache import ClusterCache
from kubetune_controller.handlers import OperatorApp, build_registry
from kubetune_controller.kube import Kube, LineBuffer
from kubetune_controller.kube_api import KubeError, KubeUnreachable
from kubetune_controller.settings import LABEL_EXPERIMENT, OperatorSettings
from kubetune_controller.watch import (
    ObjectStream,
    ResourceVersionExpired,
    WatchProgress,
    stalled_streams,
)
from tests.controller.factories import pod, trial
from tests.controller.fake_cluster import FakeCluster


def test_lines_split_across_and_within_chunks_are_reassembled() -> None:
    buffer = LineBuffer()
    got = list(buffer.feed(b'{"a": 1}\n{"b"'))
    got += list(buffer.feed(b": 2}"))
    got += list(buffer.feed(b'\n\n{"c": 3}\n{"d"'))
    assert got == [b'{"a": 1}', b'{"b": 2}', b'{"c": 3}']
    # The unfinished event waits for its newline.
    assert list(buffer.feed(b": 4}\n")) == [b'{"d": 4}']


def test_a_line_larger_than_any_chunk_is_kept_whole() -> None:
    buffer = LineBuffer()
    big = b'{"x": "' + b"y" * 300_000 + b'"}'
    got = [line for i in range(0, len(big), 4096) for line in buffer.feed(big[i : i + 4096])]
    assert got == []
    assert list(buffer.feed(b"\n")) == [big]


def test_events_move_the_resume_point_and_bookmarks_deliver_nothing() -> None:
    progress = WatchProgress("10")
    obj = {"metadata": {"name": "p", "resourceVersion": "11"}}
    assert progress.accept({"type": "ADDED", "object": obj}) == ("ADDED", obj)
    assert progress.resource_version == "11"
    bookmark = {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "20"}}}
    assert progress.accept(bookmark) is None
    assert progress.resource_version == "20"


def test_an_expired_version_means_gone_and_other_errors_are_errors() -> None:
    progress = WatchProgress("10")
    expired = {"type": "ERROR", "object": {"code": 410, "message": "too old resource version"}}
    with pytest.raises(ResourceVersionExpired, match="too old"):
        progress.accept(expired)
    forbidden = {"type": "ERROR", "object": {"code": 403, "reason": "Forbidden", "message": "no"}}
    with pytest.raises(KubeError) as info:
        progress.accept(forbidden)
    assert info.value.status == 403
    assert progress.resource_version == "10"


def test_a_relist_drops_what_was_deleted_meanwhile_in_its_namespace_only() -> None:
    cache = ClusterCache()
    for n in range(3):
        cache.put_trial(trial(n))
        cache.put_pod("exp", pod(n))
    other = replace(trial(7), namespace="other")
    cache.put_trial(other)
    cache.put_pod("exp", replace(pod(7), namespace="other"))

    # Trial 1 and its Pod were deleted while the stream was down.
    cache.replace_trials([trial(0), trial(2)], "ns")
    cache.replace_pods([("exp", pod(0)), ("exp", pod(2))], "ns")

    assert sorted(cache.trials(("ns", "exp"))) == ["exp-0", "exp-2"]
    assert sorted(cache.pods(("ns", "exp"))) == ["exp-0", "exp-2"]
    assert list(cache.trials(("other", "exp"))) == ["exp-7"]
    assert list(cache.pods(("other", "exp"))) == ["exp-7"]

    # A cluster-wide relist replaces everything.
    cache.replace_trials([], None)
    cache.replace_pods([], None)
    assert cache.trials(("other", "exp")) == {} and cache.pods(("ns", "exp")) == {}


def test_a_stream_says_why_it_cannot_list_until_it_can() -> None:
    async def go() -> None:
        cluster = FakeCluster()
        cluster.forbidden.add("pods")  # as RBAC would
        stream = ObjectStream(cluster, "/api/v1/pods", "x", lambda _: None, lambda *_: None)
        task = asyncio.create_task(stream.run())
        while stream.failing() is None:
            await asyncio.sleep(0.01)
        assert stream.failing() == (
            "listing /api/v1/pods failed: 403 Forbidden: "
            'pods is forbidden: cannot list resource "pods"'
        )
        assert not stream.synced.is_set()
        cluster.forbidden.clear()
        await stream.synced.wait()  # retried after its backoff, and listed
        assert stream.failing() is None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(go())


def test_a_stream_delivers_what_changes_after_its_list() -> None:
    async def go() -> None:
        cluster = FakeCluster()
        spec = {"containers": [{"name": "train", "image": "t"}]}
        labelled = {"namespace": "ns", "labels": {LABEL_EXPERIMENT: "exp"}}
        await cluster.create_pod({"metadata": {"name": "exp-0", **labelled}, "spec": spec})
        await cluster.create_pod({"metadata": {"name": "other", "namespace": "ns"}, "spec": spec})
        snapshots: list[list[str]] = []
        events: list[tuple[str, str]] = []
        stream = ObjectStream(
            cluster,
            "/api/v1/namespaces/ns/pods",
            LABEL_EXPERIMENT,
            lambda items: snapshots.append([o["metadata"]["name"] for o in items]),
            lambda kind, obj: events.append((kind, obj["metadata"]["name"])),
        )
        task = asyncio.create_task(stream.run())
        await stream.synced.wait()
        await cluster.create_pod({"metadata": {"name": "exp-1", **labelled}, "spec": spec})
        await cluster.delete_pod("ns", "exp-0", 0)
        while len(events) < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert snapshots == [["exp-0"]]
        assert events == [("ADDED", "exp-1"), ("MODIFIED", "exp-0"), ("DELETED", "exp-0")]
        assert cluster._watches == []  # the watch was closed with its task

    asyncio.run(go())


# -- health ----------------------------------------------------------------------------


def test_a_stream_down_longer_than_the_limit_is_stalled() -> None:
    stream = ObjectStream(FakeCluster(), "/api/v1/pods", "x", lambda _: None, lambda *_: None)
    assert stream.down_since is not None  # down until its first LIST
    began = stream.down_since
    stream.problem = "listing /api/v1/pods failed: 403 Forbidden"
    assert stalled_streams([stream], began + 60, limit=120) == []
    (why,) = stalled_streams([stream], began + 121, limit=120)
    assert why == "/api/v1/pods: down for 121 s (listing /api/v1/pods failed: 403 Forbidden)"
    stream.down_since = None  # listed again
    assert stalled_streams([stream], began + 1000, limit=120) == []


async def _healthz(app: OperatorApp) -> tuple[int, str]:
    """GET kopf's liveness endpoint, served with the operator's registry."""
    port = _free_port()
    ready = asyncio.Event()
    server = asyncio.create_task(
        health_reporter(
            f"http://127.0.0.1:{port}/healthz",
            memo=AnyMemo(kopf.Memo()),
            indices={},
            registry=build_registry(app),
            settings=kopf.OperatorSettings(),
            ready_flag=ready,
        )
    )
    try:
        await ready.wait()
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/healthz") as resp,
        ):
            return resp.status, await resp.text()
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server


def test_healthz_fails_while_a_watch_stream_is_down_and_passes_while_it_is_up() -> None:
    async def go() -> None:
        cluster = FakeCluster()
        cluster.forbidden.add("pods")
        pods = ObjectStream(cluster, "/api/v1/pods", LABEL_EXPERIMENT, print, print)
        trials = ObjectStream(
            cluster, "/apis/kubetune.io/v1alpha1/trials", LABEL_EXPERIMENT, print, print
        )
        app = OperatorApp(OperatorSettings(), streams=[pods, trials], stream_down_limit_seconds=60)
        tasks = [asyncio.create_task(s.run()) for s in app.streams]
        try:
            await trials.synced.wait()
            while pods.failing() is None:
                await asyncio.sleep(0.01)
            # Down, but not for long yet: a stream may fail and come back.
            status, body = await _healthz(app)
            assert status == 200, body
            app.stream_down_limit_seconds = 0.0  # now it has been down too long
            status, body = await _healthz(app)
            assert status == 500, body
            cluster.forbidden.clear()
            await pods.synced.wait()
            status, body = await _healthz(app)
            assert status == 200, body
            assert json.loads(body) == {
                "watch-streams": {"/api/v1/pods": "up", "/apis/kubetune.io/v1alpha1/trials": "up"}
            }
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(go())


def test_healthz_fails_once_a_stream_has_stopped_for_good() -> None:
    async def go() -> None:
        def broken(items: object) -> None:
            raise KeyError("a bug in a callback")

        stream = ObjectStream(FakeCluster(), "/api/v1/pods", LABEL_EXPERIMENT, broken, print)
        app = OperatorApp(OperatorSettings(), streams=[stream], stream_down_limit_seconds=0.0)
        task = asyncio.create_task(stream.run())
        with pytest.raises(KeyError):
            await task
        assert stream.failing() == (
            "the stream of /api/v1/pods stopped: KeyError('a bug in a callback')"
        )
        status, body = await _healthz(app)
        assert status == 500, body

    asyncio.run(go())


# -- the real client's LIST and WATCH, against a local HTTP server -------------------------


def _kube(port: int) -> Kube:
    configuration = k8s_client.Configuration()
    configuration.host = f"http://127.0.0.1:{port}"
    configuration.verify_ssl = False
    return Kube(configuration)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_real_client_lists_and_watches_over_http() -> None:
    """Events split across chunks arrive whole; a 410 answer means list again."""
    watches: list[dict[str, str]] = []
    quiet = asyncio.Event()

    async def pods(request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") != "1":
            pod = {"metadata": {"name": "exp-0", "resourceVersion": "5"}}
            return web.json_response({"items": [pod], "metadata": {"resourceVersion": "5"}})
        watches.append(dict(request.query))
        if len(watches) == 2:
            status = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}
            return web.json_response(status, status=410)
        resp = web.StreamResponse()
        await resp.prepare(request)
        if len(watches) > 2:
            await quiet.wait()  # a quiet watch, until the test ends
        added = {"type": "ADDED", "object": {"metadata": {"name": "exp-1"}}}
        bookmark = {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}}
        body = f"{json.dumps(added)}\n{json.dumps(bookmark)}\n".encode()
        for i in range(0, len(body), 7):
            await resp.write(body[i : i + 7])
        await resp.write_eof()
        return resp

    async def go() -> None:
        app = web.Application()
        app.router.add_get("/api/v1/pods", pods)
        runner = web.AppRunner(app)
        await runner.setup()
        port = _free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        kube = _kube(port)
        snapshots: list[list[str]] = []
        events: list[tuple[str, str]] = []
        stream = ObjectStream(
            kube,
            "/api/v1/pods",
            LABEL_EXPERIMENT,
            lambda items: snapshots.append([o["metadata"]["name"] for o in items]),
            lambda kind, obj: events.append((kind, obj["metadata"]["name"])),
        )
        task = asyncio.create_task(stream.run())
        try:
            while len(watches) < 3:  # the second watch's 410 made it list again
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await kube.close()
            quiet.set()
            await runner.cleanup()
        assert snapshots == [["exp-0"], ["exp-0"]]
        assert events == [("ADDED", "exp-1")]
        assert watches[0]["resourceVersion"] == "5"
        assert watches[1]["resourceVersion"] == "9"  # resumed after the bookmark
        assert watches[2]["resourceVersion"] == "5"  # from the new LIST
        assert stream.failing() is None

    asyncio.run(go())


def test_the_real_client_says_when_the_api_server_does_not_answer() -> None:
    async def go() -> None:
        kube = _kube(_free_port())  # nothing listens there
        try:
            with pytest.raises(KubeUnreachable, match="no answer from the API server"):
                await kube.list_page("/api/v1/pods", {})
            with pytest.raises(KubeUnreachable, match="no answer from the API server"):
                async with contextlib.aclosing(kube.watch("/api/v1/pods", {}, 1.0)) as events:
                    async for _ in events:
                        pass
        finally:
            await kube.close()

    asyncio.run(go())


def test_the_real_client_creates_secrets_and_never_reads_them() -> None:
    """201: created; 409: already there (not read back: the operator may not get Secrets)."""
    seen: list[tuple[str, str]] = []

    async def secrets(request: web.Request) -> web.Response:
        seen.append((request.method, request.path))
        body = await request.json()
        name = body["metadata"]["name"]
        if name == "taken":
            status = {"kind": "Status", "code": 409, "reason": "AlreadyExists", "message": "x"}
            return web.json_response(status, status=409)
        if name == "refused":
            status = {"kind": "Status", "code": 403, "reason": "Forbidden", "message": "no"}
            return web.json_response(status, status=403)
        return web.json_response(body, status=201)

    async def go() -> None:
        app = web.Application()
        app.router.add_route("*", "/api/v1/namespaces/ns/secrets{tail:.*}", secrets)
        runner = web.AppRunner(app)
        await runner.setup()
        port = _free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        kube = _kube(port)
        try:

            def secret(name: str) -> dict[str, Any]:
                return {"metadata": {"name": name, "namespace": "ns"}, "stringData": {"k": "v"}}

            assert await kube.create_secret(secret("new")) is True
            assert await kube.create_secret(secret("taken")) is False
            with pytest.raises(KubeError) as err:
                await kube.create_secret(secret("refused"))
            assert (err.value.status, err.value.message) == (403, "no")
        finally:
            await kube.close()
            await runner.cleanup()
        assert seen == [("POST", "/api/v1/namespaces/ns/secrets")] * 3

    asyncio.run(go())
