"""Writes what users see: the Experiment's status and the Events.

The controller decides; the :class:`Recorder` writes the decision where
``kubectl get``, ``kubectl describe`` and ``kubectl wait`` look. Status is
built by :mod:`~kubetune_controller.status` and written only when it changed;
Events that come once per trial are combined per experiment
(:mod:`~kubetune_controller.events`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from kubetune_controller import status as st
from kubetune_controller.cache import ClusterCache
from kubetune_controller.events import EventBatcher, PendingEvent
from kubetune_controller.kube_api import KubeApi
from kubetune_controller.memory import ExperimentMemory
from kubetune_controller.model import ExperimentPhase, ExperimentResource, TrialPhase, TrialResource
from kubetune_controller.pods import build_event
from kubetune_controller.reconcile import (
    REASON_GOAL,
    REASON_INVALID_PARAMS,
    REASON_POD_FORBIDDEN,
    Decision,
    Progress,
)
from kubetune_controller.settings import API_VERSION, COMPONENT, OperatorSettings

# Events that come once per trial: combined per experiment (see events.py).
_COMBINED_REASONS = frozenset(
    {
        "TrialCreated",
        "TrialPruned",
        "TrialFailed",
        "TrialMetricsUnavailable",
        REASON_POD_FORBIDDEN,
        REASON_INVALID_PARAMS,
    }
)


class Recorder:
    """Writes Experiment status and Events.

    Args:
        settings: The installation's settings.
        kube: The Kubernetes client.
        cache: The watched objects (a written Experiment goes back into it).
        spawn: Runs a task without awaiting it (Events are written so).
    """

    def __init__(
        self,
        settings: OperatorSettings,
        kube: KubeApi,
        cache: ClusterCache,
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
    ) -> None:
        self.settings = settings
        self.kube = kube
        self.cache = cache
        self._spawn = spawn
        self._instance = os.environ.get("POD_NAME") or os.environ.get("HOSTNAME", COMPONENT)
        self._events = EventBatcher(settings.event_window_seconds)

    # -- status ---------------------------------------------------------------------------

    async def write_status(
        self,
        experiment: ExperimentResource,
        max_trials: int,
        decision: Decision,
        progress: Progress | None,
        service_ok: bool,
        service_message: str,
        memory: ExperimentMemory | None = None,
    ) -> float | None:
        """Write the Experiment's status if it changed.

        With ``memory``, a change of progress alone (counts, best so far) is
        written at most every ``status_interval_seconds``: at hundreds of
        trials a minute, a write per reconcile made the status patch the
        slowest step of a reconcile and a large share of the API server's
        work. Phase, condition and generation changes are written at once.

        Returns:
            Seconds until a deferred write is due, or ``None``.
        """
        now = datetime.now(UTC)
        trials = self.cache.trials(experiment.key)
        desired = st.desired_conditions(
            decision,
            service_ok,
            service_message if not service_ok else f"reachable at {self.settings.service_url}",
        )
        desired.append(st.pod_admission(trials.values()))
        conditions = st.render_conditions(
            desired, experiment.status.get("conditions") or [], now, experiment.generation
        )
        names = {t.number: t.name for t in trials.values()}
        status = st.experiment_status(
            experiment, max_trials, decision, progress, trials.values(), conditions, names
        )
        status.update(st.experiment_times(experiment, decision.phase, now))
        if not st.status_changed(experiment.status, status):
            return None
        if memory is not None and not st.status_change_urgent(experiment.status, status):
            wait = memory.status_written + self.settings.status_interval_seconds - time.monotonic()
            if wait > 0:
                return wait
        body = await self.kube.patch_experiment_status(
            experiment.namespace, experiment.name, status
        )
        if memory is not None:
            memory.status_written = time.monotonic()
        self.cache.put_experiment(ExperimentResource.from_body(body))
        before = experiment.phase
        if before is not decision.phase:
            self._phase_event(experiment, before, decision)
        return None

    def _phase_event(
        self, experiment: ExperimentResource, before: ExperimentPhase | None, decision: Decision
    ) -> None:
        phase = decision.phase
        if phase is ExperimentPhase.SUCCEEDED:
            reason = decision.reason if decision.reason == REASON_GOAL else "ExperimentSucceeded"
            self.event(experiment, reason, decision.message)
        elif phase is ExperimentPhase.FAILED:
            self.event(experiment, "ExperimentFailed", decision.message, warning=True)
        elif phase is ExperimentPhase.SUSPENDED:
            self.event(experiment, "Suspended", decision.message)
        elif phase is ExperimentPhase.RUNNING and before is ExperimentPhase.SUSPENDED:
            self.event(experiment, "Resumed", decision.message)
        elif phase is ExperimentPhase.RUNNING and before in (None, ExperimentPhase.PENDING):
            self.event(
                experiment, "Started", f"registered with the suggestion service; {decision.message}"
            )

    # -- events ---------------------------------------------------------------------------

    def trial_ended(
        self, experiment: ExperimentResource, trial: TrialResource, phase: TrialPhase, message: str
    ) -> None:
        """The Events of a trial that ended (none for a success: the status shows it)."""
        first_line = message.splitlines()[0] if message else ""
        if phase is TrialPhase.PRUNED:
            self.event(experiment, "TrialPruned", f"trial {trial.name} {first_line}")
        elif phase is TrialPhase.FAILED:
            self.event(experiment, "TrialFailed", f"trial {trial.name}: {first_line}", warning=True)
            self.event(experiment, "TrialFailed", message, warning=True, trial=trial)
        elif phase is TrialPhase.METRICS_UNAVAILABLE:
            self.event(
                experiment,
                "TrialMetricsUnavailable",
                f"trial {trial.name}: {first_line}",
                warning=True,
            )

    def event(
        self,
        experiment: ExperimentResource,
        reason: str,
        message: str,
        warning: bool = False,
        trial: TrialResource | None = None,
    ) -> None:
        """Write an Event about the experiment (or one of its trials), in order.

        Events that come once per trial are held a while and combined.
        """
        involved = (
            {
                "apiVersion": API_VERSION,
                "kind": "Trial",
                "name": trial.name,
                "namespace": trial.namespace,
                "uid": trial.uid,
            }
            if trial is not None
            else {
                "apiVersion": API_VERSION,
                "kind": "Experiment",
                "name": experiment.name,
                "namespace": experiment.namespace,
                "uid": experiment.uid,
            }
        )
        if reason in _COMBINED_REASONS:
            ready = self._events.add(
                involved, reason, message, warning, time.monotonic(), when=datetime.now(UTC)
            )
        else:
            held = self._events.flush(involved["uid"])
            ready = [*held, PendingEvent(involved, reason, message, warning)]
        if ready:
            # One task writes them in order: their timestamps keep that order.
            self._spawn(self._write_events(ready))

    async def flush_held(self) -> None:
        """Write held Events as their window closes; runs until cancelled."""
        while True:
            await asyncio.sleep(min(0.5, self.settings.event_window_seconds))
            for event in self._events.due(time.monotonic()):
                self._spawn(self._write_event(event))

    async def drain(self, timeout: float) -> None:
        """Write every held Event now (at shutdown), for at most ``timeout`` seconds."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(self._write_event(e) for e in self._events.drain()))

    async def _write_events(self, events: list[PendingEvent]) -> None:
        for event in events:
            await self._write_event(event)

    async def _write_event(self, event: PendingEvent) -> None:
        body = build_event(
            event.involved,
            event.reason,
            event.message,
            event.last or datetime.now(UTC),
            event.warning,
            self._instance,
            first=event.first,
            count=event.count,
        )
        await self.kube.create_event(body)
