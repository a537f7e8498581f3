"""The pure parts of the watch streams: line framing, the resume point, and relists."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace
from typing import Any

import pytest

from kubetune_controller.cache import ClusterCache
from kubetune_controller.kube import KubeError
from kubetune_controller.watch import Gone, LineBuffer, ObjectStream, WatchProgress
from tests.controller.factories import pod, trial


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
    with pytest.raises(Gone, match="too old"):
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
    class Forbidding:
        """Refuses the first LIST (as RBAC would), then lists nothing and never watches."""

        def __init__(self) -> None:
            self.lists = 0
            self.watching = asyncio.Event()

        async def get_json(self, path: str, params: dict[str, str]) -> dict[str, Any]:
            self.lists += 1
            if self.lists == 1:
                raise KubeError(403, "Forbidden", 'pods is forbidden: cannot list resource "pods"')
            return {"items": [], "metadata": {"resourceVersion": "7"}}

        def stream(self, path: str, params: dict[str, str], timeout: float) -> Any:
            self.watching.set()
            raise asyncio.CancelledError  # ends run(): enough for this test

    async def go() -> None:
        kube = Forbidding()
        stream = ObjectStream(
            kube,  # type: ignore[arg-type]
            "/api/v1/pods",
            "x",
            lambda _: None,
            lambda *_: None,
        )
        task = asyncio.create_task(stream.run())
        while kube.lists < 1:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)
        assert stream.failing() == (
            "listing /api/v1/pods failed: 403 Forbidden: "
            'pods is forbidden: cannot list resource "pods"'
        )
        assert not stream.synced.is_set()
        await kube.watching.wait()  # retried after its backoff, listed, and went on to watch
        assert stream.failing() is None and stream.synced.is_set()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(go())
