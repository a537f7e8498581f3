"""Natural batching of concurrent reports into one database transaction.

Reports arrive concurrently (one per sidecar per training step). Instead of a
transaction each, the event loop queues them and one thread at a time stores
everything queued so far with :meth:`TuningService.report_batch`: when the
service is idle a report is stored alone at once (no added latency); under
load the batch grows while the previous one commits, so the cost of the
commit and of each statement is shared. A report is answered only after the
transaction holding it committed, so an acknowledged report is never lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

from kubetune_suggestion.service.errors import ServiceError
from kubetune_suggestion.service.models import StopAnswer
from kubetune_suggestion.service.reporting import Report

BatchFn = Callable[[Sequence[Report]], list[StopAnswer | ServiceError]]


class ReportBatcher:
    """Funnels concurrent :class:`Report` submissions into batches.

    Args:
        store_batch: Stores a batch, one answer or error per report
            (``TuningService.report_batch``); runs in a worker thread.
        max_batch: The most reports in one transaction.
        executor: Where batches are stored (None: the event loop's default executor).
    """

    def __init__(
        self, store_batch: BatchFn, max_batch: int = 256, executor: Executor | None = None
    ) -> None:
        self._store_batch = store_batch
        self._executor = executor
        self._max_batch = max_batch
        self._queue: list[tuple[Report, asyncio.Future[StopAnswer]]] = []
        self._draining = False
        # Held so the running drain task is not garbage-collected mid-flight.
        self._task: asyncio.Task[None] | None = None

    async def submit(self, report: Report) -> StopAnswer:
        """Store ``report`` (with whatever else is queued); its answer.

        Raises:
            ServiceError: If this report was refused.
        """
        future: asyncio.Future[StopAnswer] = asyncio.get_running_loop().create_future()
        self._queue.append((report, future))
        if not self._draining:
            self._draining = True
            self._task = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                try:
                    # An executor of the loop's: lighter than anyio's thread hop.
                    results = await asyncio.get_running_loop().run_in_executor(
                        self._executor, self._store_batch, [r for r, _ in batch]
                    )
                except Exception as exc:  # the database failed: every report of the batch fails
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():  # the client went away
                        continue
                    if isinstance(result, ServiceError):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._draining = False
