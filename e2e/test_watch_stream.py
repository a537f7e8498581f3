"""The operator's list-then-watch stream against the real API server.

ConfigMaps stand in for trial Pods: the stream is generic over the collection,
and ConfigMaps need no node to exist.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from e2e.helpers import Kube
from kubetune_controller.kube import Kube as OperatorKube
from kubetune_controller.kube import load_configuration
from kubetune_controller.watch import ObjectStream

LABEL = "kubetune.io/experiment"


def configmap(name: str, labelled: bool = True, value: str = "1") -> dict[str, Any]:
    labels = {LABEL: "exp"} if labelled else {}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "labels": labels},
        "data": {"value": value},
    }


class Recorder:
    """What the stream delivered."""

    def __init__(self) -> None:
        self.snapshots: list[list[str]] = []
        self.events: list[tuple[str, str, str]] = []

    def snapshot(self, items: list[dict[str, Any]]) -> None:
        self.snapshots.append(sorted(o["metadata"]["name"] for o in items))

    def event(self, kind: str, obj: dict[str, Any]) -> None:
        self.events.append(
            (kind, obj["metadata"]["name"], (obj.get("data") or {}).get("value", ""))
        )


@contextlib.asynccontextmanager
async def following(
    kube: Kube, namespace: str, recorder: Recorder, **options: int
) -> AsyncIterator[None]:
    """An operator stream on the namespace's ConfigMaps, listed, until the block ends."""
    client = OperatorKube(load_configuration(str(kube.kubeconfig)))
    stream = ObjectStream(
        client,
        f"/api/v1/namespaces/{namespace}/configmaps",
        LABEL,
        recorder.snapshot,
        recorder.event,
        **options,
    )
    task = asyncio.create_task(stream.run())
    try:
        await asyncio.wait_for(stream.synced.wait(), 20)
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()


async def until(check: Any, timeout: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.05)


def test_stream_lists_in_pages_then_follows_changes(kube: Kube, namespace: str) -> None:
    # Five labelled objects over pages of two, and one the selector excludes.
    kube.create(
        *(configmap(f"cm-{i}") for i in range(5)),
        configmap("other", labelled=False),
        namespace=namespace,
    )
    recorder = Recorder()

    async def scenario() -> None:
        async with following(kube, namespace, recorder, page_size=2):
            assert recorder.snapshots == [[f"cm-{i}" for i in range(5)]]
            await asyncio.to_thread(kube.create, configmap("cm-new"), namespace=namespace)
            await asyncio.to_thread(
                kube.kubectl,
                "patch",
                "configmap",
                "-n",
                namespace,
                "cm-0",
                "--type=merge",
                "-p",
                '{"data": {"value": "2"}}',
            )
            await asyncio.to_thread(kube.kubectl, "delete", "configmap", "-n", namespace, "cm-1")
            await asyncio.to_thread(
                kube.create, configmap("unlabelled", labelled=False), namespace=namespace
            )
            await until(lambda: len(recorder.events) >= 3)
            await asyncio.sleep(0.5)  # nothing else may follow (the unlabelled one)

    asyncio.run(scenario())
    assert recorder.events == [
        ("ADDED", "cm-new", "1"),
        ("MODIFIED", "cm-0", "2"),
        ("DELETED", "cm-1", "1"),
    ]


def test_a_watch_that_times_out_resumes_without_losing_or_relisting(
    kube: Kube, namespace: str
) -> None:
    """The server closes each watch after a second: changes in between are still all seen."""
    recorder = Recorder()

    async def scenario() -> None:
        async with following(kube, namespace, recorder, watch_seconds=1):
            for i in range(8):
                await asyncio.to_thread(kube.create, configmap(f"cm-{i}"), namespace=namespace)
                await asyncio.sleep(0.4)
            await until(lambda: len(recorder.events) >= 8)

    asyncio.run(scenario())
    assert recorder.snapshots == [[]]
    assert recorder.events == [("ADDED", f"cm-{i}", "1") for i in range(8)]
