"""List-then-watch streams for the kinds that come by the thousand: Trials and trial Pods.

Kopf watches Experiments (a handful of objects); a plain stream here follows
the Trials and trial Pods, which change several times per trial. Per event,
kopf built causes, loggers and a worker task, and decoded the JSON with the
standard library: together two fifths of the operator's CPU in the
1,000-trial benchmark. This stream takes the events its client decoded
(:meth:`~kubetune_controller.kube_api.KubeApi.watch`, orjson in the real one)
and hands each object straight to a callback.

The protocol is the one every Kubernetes informer follows: LIST (in pages) to
get a consistent snapshot and its resourceVersion, then WATCH from there with
bookmarks; a watch that times out resumes from the last version seen; a
version the server has compacted away ("410 Gone") means LIST again. After
each LIST the callback receives the whole snapshot, so objects deleted while
the stream was down are dropped from the cache, not kept forever.

Kopf's ``/healthz`` knows nothing of these streams: each one records since
when it has been down (not listed after a failure, or its task dead), and
:func:`stalled_streams` is what the operator's liveness probe
(:mod:`~kubetune_controller.handlers`) fails on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kubetune_controller.kube_api import KubeApi, KubeError, KubeUnreachable, Obj

log = logging.getLogger(__name__)

# A stream that has not listed for this long (failing, or its task dead) makes
# the operator's liveness probe fail: a restart is the only cure left for a
# watch that cannot come back by itself. Several retries at the longest
# backoff (30 s) fit in it, so an API server restart never triggers it.
STREAM_DOWN_LIMIT_SECONDS = 120.0


class ResourceVersionExpired(Exception):
    """The resourceVersion to watch from is too old (410 Gone): list again."""


@dataclass
class WatchProgress:
    """What one watch connection has seen: the pure part of the protocol.

    Attributes:
        resource_version: Where a new watch should resume.
    """

    resource_version: str

    def accept(self, event: Obj) -> tuple[str, Obj] | None:
        """Digest one decoded event: the (type, object) to deliver, if any.

        Bookmarks only move the resume point. An ERROR event carrying status
        410 raises :class:`ResourceVersionExpired`; any other ERROR raises
        :class:`KubeError`.
        """
        kind = str(event.get("type", ""))
        obj = event.get("object") or {}
        if kind == "ERROR":
            code = int(obj.get("code") or 0)
            message = str(obj.get("message", ""))
            if code == 410:
                raise ResourceVersionExpired(message)
            raise KubeError(code, str(obj.get("reason", "")), message)
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if version:
            self.resource_version = str(version)
        if kind == "BOOKMARK":
            return None
        return kind, obj


class ObjectStream:
    """Keeps a callback informed of every object at ``path`` that matches ``label_selector``.

    Args:
        kube: The Kubernetes client.
        path: A collection, e.g. ``/api/v1/pods`` or
            ``/apis/kubetune.io/v1alpha1/namespaces/team-a/trials``.
        label_selector: Only objects with these labels are sent by the server.
        on_snapshot: Called with every object after each LIST.
        on_event: Called with ``(type, object)`` for each ADDED, MODIFIED and DELETED.
        watch_seconds: How long the server keeps one watch open.
        page_size: Objects per LIST page.
    """

    def __init__(
        self,
        kube: KubeApi,
        path: str,
        label_selector: str,
        on_snapshot: Callable[[list[Obj]], None],
        on_event: Callable[[str, Obj], None],
        watch_seconds: int = 300,
        page_size: int = 500,
    ) -> None:
        self.kube = kube
        self.path = path
        self.label_selector = label_selector
        self.on_snapshot = on_snapshot
        self.on_event = on_event
        self.watch_seconds = watch_seconds
        self.page_size = page_size
        # Set once the first LIST has been delivered (readiness, tests).
        self.synced = asyncio.Event()
        # Why the last LIST or WATCH failed, until one succeeds.
        self.problem: str | None = None
        # Since when (monotonic seconds) the stream has not been listing and
        # watching: from its creation until its first LIST, and from a
        # failure until the next LIST succeeds. None while it works.
        self.down_since: float | None = time.monotonic()

    def failing(self) -> str | None:
        """Why the last LIST or WATCH failed, until one succeeds; ``None`` when it works."""
        return self.problem

    def down_for(self, now: float) -> float:
        """Seconds the stream has been down at ``now`` (monotonic); 0 while it works."""
        return 0.0 if self.down_since is None else max(0.0, now - self.down_since)

    async def run(self) -> None:
        """List and watch until cancelled; errors are logged and retried with backoff.

        An error no retry can help (a bug in a callback) ends the stream; it
        stays down, which the liveness probe reports.
        """
        try:
            await self._follow()
        except Exception as exc:
            self._went_down(f"the stream of {self.path} stopped: {exc!r}")
            log.exception("the stream of %s stopped", self.path)
            raise

    async def _follow(self) -> None:
        backoff = 0.5
        progress: WatchProgress | None = None
        while True:
            try:
                if progress is None:
                    progress = WatchProgress(await self._list())
                    self.problem = None
                    self.down_since = None
                    self.synced.set()
                await self._watch(progress)
                backoff = 0.5
            except ResourceVersionExpired:
                log.info("watch of %s expired; listing again", self.path)
                progress = None
            except (KubeError, KubeUnreachable, ValueError) as exc:
                log.warning("watch of %s failed (%s); retrying in %.1f s", self.path, exc, backoff)
                self._went_down(f"listing {self.path} failed: {exc}")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                # A broken stream may have missed deletions: start from a LIST.
                progress = None

    def _went_down(self, problem: str) -> None:
        self.problem = problem
        if self.down_since is None:
            self.down_since = time.monotonic()

    async def _list(self) -> str:
        items: list[Obj] = []
        params = {"labelSelector": self.label_selector, "limit": str(self.page_size)}
        while True:
            page = await self.kube.list_page(self.path, params)
            items.extend(page.get("items") or [])
            meta = page.get("metadata") or {}
            if not meta.get("continue"):
                break
            params["continue"] = str(meta["continue"])
        self.on_snapshot(items)
        return str(meta.get("resourceVersion") or "")

    async def _watch(self, progress: WatchProgress) -> None:
        params = {
            "watch": "1",
            "labelSelector": self.label_selector,
            "resourceVersion": progress.resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self.watch_seconds),
        }
        events = self.kube.watch(self.path, params, self.watch_seconds + 30)
        try:
            # Closed however the loop ends, so its connection goes back at once.
            async with contextlib.aclosing(events):
                async for event in events:
                    delivered = progress.accept(event)
                    if delivered is not None:
                        self.on_event(*delivered)
        except KubeError as exc:
            if exc.status == 410:
                raise ResourceVersionExpired(exc.message) from exc
            raise


def stalled_streams(
    streams: Iterable[ObjectStream], now: float, limit: float = STREAM_DOWN_LIMIT_SECONDS
) -> list[str]:
    """Why each stream that has been down for more than ``limit`` seconds at ``now`` is down.

    Args:
        streams: The operator's watch streams.
        now: The monotonic clock's time.
        limit: Seconds a stream may be down (listing again after a failure).

    Returns:
        One line per stalled stream; empty when every stream is healthy.
    """
    return [
        f"{s.path}: down for {s.down_for(now):.0f} s ({s.problem or 'not listed yet'})"
        for s in streams
        if s.down_for(now) > limit
    ]
