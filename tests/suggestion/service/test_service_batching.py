"""Natural batching of concurrent reports (no database: a fake batch function)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from kubetune_suggestion.service.batching import ReportBatcher
from kubetune_suggestion.service.errors import Forbidden, ServiceError
from kubetune_suggestion.service.models import StopAnswer
from kubetune_suggestion.service.reporting import Report


class FakeStore:
    """Answers each report by its step; step 13 is refused; blocks until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = threading.Event()

    def __call__(self, reports: Sequence[Report]) -> list[StopAnswer | ServiceError]:
        self.release.wait(5)
        self.batches.append([r.step for r in reports])
        return [
            Forbidden("not yours", field="token") if r.step == 13 else StopAnswer(stop=r.step > 5)
            for r in reports
        ]


def _report(step: int) -> Report:
    return Report("uid", 0, "token", step, {"loss": 1.0})


def test_an_idle_service_stores_a_report_alone_and_a_busy_one_batches() -> None:
    store = FakeStore()

    async def scenario() -> list[StopAnswer | BaseException]:
        batcher = ReportBatcher(store, max_batch=2)
        first = asyncio.create_task(batcher.submit(_report(1)))
        await asyncio.sleep(0.05)  # the first batch is in flight, holding only report 1
        rest = [asyncio.create_task(batcher.submit(_report(s))) for s in (6, 13, 4)]
        await asyncio.sleep(0.05)
        store.release.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    results = asyncio.run(scenario())
    assert store.batches == [[1], [6, 13], [4]]
    assert results[0] == StopAnswer(stop=False)
    assert results[1] == StopAnswer(stop=True)
    assert isinstance(results[2], Forbidden)  # refused alone: its neighbours were answered
    assert results[3] == StopAnswer(stop=False)


def test_a_failing_database_fails_the_batch_and_the_next_one_runs() -> None:
    calls: list[int] = []

    def flaky(reports: Sequence[Report]) -> list[StopAnswer | ServiceError]:
        calls.append(len(reports))
        if len(calls) == 1:
            raise ConnectionError("database down")
        return [StopAnswer(stop=False) for _ in reports]

    async def scenario() -> None:
        batcher = ReportBatcher(flaky)
        with pytest.raises(ConnectionError):
            await batcher.submit(_report(1))
        assert await batcher.submit(_report(2)) == StopAnswer(stop=False)

    asyncio.run(scenario())
    assert calls == [1, 1]
