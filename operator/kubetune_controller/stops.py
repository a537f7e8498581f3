"""Stop orders: the service's early-stopping decisions, carried out within about a second.

One task long-polls the service for the stop orders of every experiment and
deletes the Pods they name as soon as they arrive, without waiting for a
reconcile; the reconcile records each stop on its Trial once the Pod is gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from kubetune_controller.cache import ClusterCache, Key
from kubetune_controller.kube_api import KubeApi, KubeError
from kubetune_controller.memory import ExperimentMemory
from kubetune_controller.metrics import OperatorMetrics
from kubetune_controller.model import ExperimentResource, trial_name
from kubetune_controller.service_client import ServiceCallError, ServiceClient, ServiceUnavailable
from kubetune_controller.settings import OperatorSettings
from kubetune_controller.workqueue import WorkQueue

log = logging.getLogger(__name__)


class StopOrders:
    """Long-polls the service's stop orders and deletes the Pods they name.

    Args:
        settings: The installation's settings.
        kube: The Kubernetes client.
        service: The suggestion service client.
        cache: The watched objects.
        metrics: Where to count what happens.
        queue: The experiments to reconcile (one is queued after each stop).
        remember: The controller's memory of an experiment, by uid (stop
            orders are kept there until their Trials record them).
        spawn: Runs a task without awaiting it.
    """

    def __init__(
        self,
        settings: OperatorSettings,
        kube: KubeApi,
        service: ServiceClient,
        cache: ClusterCache,
        metrics: OperatorMetrics,
        queue: WorkQueue[Key],
        remember: Callable[[str, ExperimentResource | None], ExperimentMemory],
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
    ) -> None:
        self.settings = settings
        self.kube = kube
        self.service = service
        self.cache = cache
        self.metrics = metrics
        self.queue = queue
        self._remember = remember
        self._spawn = spawn

    async def poll(self) -> None:
        """Long-poll the service's stop orders; delete the Pods they name at once."""
        backoff = 0.5
        while True:
            began = time.monotonic()
            try:
                orders = await self.service.stops(self.settings.stops_wait_seconds)
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except (ServiceUnavailable, ServiceCallError) as exc:
                log.info("stop orders unavailable: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            fresh = False
            for order in orders:
                key = self.cache.key_for_uid(order.experiment)
                if key is None:
                    continue  # another operator's experiment, or already deleted
                memory = self._remember(order.experiment, self.cache.experiment(key))
                if order.number in memory.stops:
                    continue
                fresh = True
                memory.stops[order.number] = order.reason or "EarlyStopped"
                self._spawn(self._stop_trial(key, order.number, memory.stops[order.number]))
            # Open orders are listed until their trials finish; when nothing is
            # new, pause briefly instead of spinning on the same answer.
            if not fresh and time.monotonic() - began < 0.1:
                await asyncio.sleep(0.1)

    async def _stop_trial(self, key: Key, number: int, reason: str) -> None:
        began = time.monotonic()
        namespace, experiment = key
        trial = self.cache.trial(key, trial_name(experiment, number))
        name = trial.pod_name if trial is not None else trial_name(experiment, number)
        try:
            await self.kube.delete_pod(namespace, name, self.settings.stop_grace_seconds)
            self.metrics.stop_latency.observe(time.monotonic() - began)
            log.info("stopping trial %s/%s: %s", namespace, name, reason)
        except KubeError as exc:
            log.warning("deleting Pod %s/%s to stop it: %s", namespace, name, exc)
        self.queue.add(key)
