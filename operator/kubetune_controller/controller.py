"""The reconciler: gathers inputs, asks :mod:`~kubetune_controller.reconcile`, acts.

One :class:`Controller` per operator process. Kopf's watch handlers feed the
:class:`~kubetune_controller.cache.ClusterCache` and enqueue the affected
experiment; ``workers`` tasks take experiments off the
:class:`~kubetune_controller.workqueue.WorkQueue` and reconcile them, one
reconcile per experiment at a time. A separate task long-polls the service's
stop orders and deletes the Pods of trials to stop as soon as they arrive.

State kept in memory here is only an optimisation or a hint (which spec
generation was registered, whether the search is exhausted, which stops are in
progress); all of it is rebuilt from the cluster and the service after a
restart, so the process may be killed at any moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubetune_controller import reconcile as rc
from kubetune_controller.cache import ClusterCache, Key
from kubetune_controller.events import EventBatcher, PendingEvent
from kubetune_controller.kube import Kube, KubeError
from kubetune_controller.metrics import OperatorMetrics
from kubetune_controller.model import (
    SERVICE_STATE_PHASE,
    ExperimentPhase,
    ExperimentView,
    PodView,
    TrialPhase,
    TrialView,
    format_time,
    trial_name,
)
from kubetune_controller.pods import TemplateError, build_event, build_trial, build_trial_pod
from kubetune_controller.service_client import ServiceClient, ServiceError, ServiceUnavailable
from kubetune_controller.settings import API_VERSION, COMPONENT, Settings
from kubetune_controller.workqueue import WorkQueue
from kubetune_suggestion.service.models import ExperimentSummary, TrialAssignment
from kubetune_suggestion.spec import ExperimentSpec, SpecError, parse_experiment

log = logging.getLogger(__name__)

# Events that come once per trial: combined per experiment (see events.py).
_COMBINED_REASONS = frozenset(
    {"TrialCreated", "TrialPruned", "TrialFailed", "TrialMetricsUnavailable"}
)


@dataclass
class _Memory:
    """What this process remembers about one experiment between reconciles."""

    uid: str
    # The spec generation last registered with the service.
    registered: int = -1
    # The service said no trial will ever be allocated again (reset on edits).
    exhausted: bool = False
    # Stop orders received and not yet recorded on their Trials: number -> reason.
    stops: dict[int, str] = field(default_factory=dict)
    # Why the experiment ended (its live trials are stopped), once it has.
    ending: str | None = None
    # Trials with a task of their own running (creating, finishing, stopping):
    # a later reconcile leaves them alone until it is done.
    in_flight: set[int] = field(default_factory=set)
    # When running trials' last steps were last copied from the service.
    steps_copied: float = 0.0
    # The spec of the generation last registered (what a Pod's end is
    # settled with between reconciles).
    spec: ExperimentSpec | None = None
    # A template that cannot be rendered: the experiment fails until edited.
    template_error: str | None = None
    template_error_generation: int = -1
    # When the Experiment's status was last written (monotonic seconds).
    status_written: float = -1e9


def _now() -> datetime:
    return datetime.now(UTC)


class Controller:
    """Reconciles Experiments.

    Args:
        settings: The installation's settings.
        kube: The Kubernetes client.
        service: The suggestion service client.
        cache: The watched objects.
        metrics: Where to count what happens.
    """

    def __init__(
        self,
        settings: Settings,
        kube: Kube,
        service: ServiceClient,
        cache: ClusterCache,
        metrics: OperatorMetrics,
    ) -> None:
        self.settings = settings
        self.kube = kube
        self.service = service
        self.cache = cache
        self.metrics = metrics
        self.queue: WorkQueue[Key] = WorkQueue(settings.reconcile_interval_seconds)
        self._memory: dict[str, _Memory] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        # Bounds the trial operations in progress at once, across experiments,
        # so a burst of thousands of events cannot flood the API server.
        self._trial_slots = asyncio.Semaphore(settings.trial_concurrency)
        self._instance = os.environ.get("POD_NAME") or os.environ.get("HOSTNAME", COMPONENT)
        self._events = EventBatcher(settings.event_window_seconds)
        # The watch streams' "listed" flags and why each is failing (see adopt).
        self._streams: list[tuple[asyncio.Event, Callable[[], str | None]]] = []

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the workers, the stop-order poller and the periodic resync."""
        for i in range(self.settings.workers):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"kubetune-worker-{i}"))
        self._tasks.append(asyncio.create_task(self._poll_stops(), name="kubetune-stops"))
        self._tasks.append(asyncio.create_task(self._resync(), name="kubetune-resync"))
        self._tasks.append(asyncio.create_task(self._flush_events(), name="kubetune-events"))

    async def stop(self) -> None:
        """Write the held Events, cancel every task and close the clients."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                asyncio.gather(*(self._write_event(e) for e in self._events.drain())), 2.0
            )
        for task in [*self._tasks, *self._background]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        await self.service.close()
        await self.kube.close()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run a task without awaiting it (kept referenced, cancelled at stop)."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- watch events (from kopf's handlers and the watch streams) ---------------------------

    def on_experiment(self, view: ExperimentView, deleted: bool) -> None:
        """An Experiment changed (or was deleted)."""
        if deleted:
            self.cache.drop_experiment(view.key)
            self.queue.forget(view.key)
            self._memory.pop(view.uid, None)
            # Its trials and Pods go by garbage collection; its history in the
            # service goes now (best effort: an unreachable service keeps it).
            self._spawn(self._forget_in_service(view.uid))
            return
        self.cache.put_experiment(view)
        self.queue.add(view.key)

    def on_trial(self, view: TrialView, deleted: bool) -> None:
        """A Trial changed (or was deleted)."""
        if deleted:
            self.cache.drop_trial(view)
        else:
            self.cache.put_trial(view)
        self.queue.add((view.namespace, view.experiment))

    def on_pod(
        self, experiment_label: str, experiment: str | None, view: PodView, deleted: bool
    ) -> None:
        """A trial Pod changed (or was deleted)."""
        if deleted:
            self.cache.drop_pod(experiment_label, view)
        else:
            self.cache.put_pod(experiment_label, view)
        if experiment:
            key = (view.namespace, experiment)
            if not deleted and view.ended:
                self._settle_ended_pod(key, view)
            self.queue.add(key)

    def _settle_ended_pod(self, key: Key, pod: PodView) -> None:
        """Finish the trial of a Pod that has just ended, without waiting for a reconcile.

        Its successor waits for this finish (the service frees the slot), and
        the experiment's next reconcile may be a running one's length away, or
        ``reconcile_interval_seconds`` after the last. Only the plain case is
        handled here: anything else (streams not listed yet, a spec not yet
        reconciled, an experiment ending) is left to the reconcile.
        """
        if not all(synced.is_set() for synced, _ in self._streams):
            return
        experiment = self.cache.experiment(key)
        if experiment is None or experiment.deleting:
            return
        memory = self._memory.get(experiment.uid)
        if (
            memory is None
            or memory.spec is None
            or memory.registered != experiment.generation
            or memory.ending is not None
        ):
            return
        trial = self.cache.trial(key, trial_name(key[1], pod.number))
        if trial is None or trial.pod_name != pod.name or trial.final:
            return
        plan = rc.plan_trials(
            [trial],
            {pod.name: pod},
            memory.stops,
            memory.ending,
            _now(),
            self.settings.lost_pod_grace_seconds,
            self.settings.trial_running_delay_seconds,
            memory.spec.maxRetries,
        )
        for f in plan.finish:
            work = self._finish_trial(
                experiment, memory.spec, memory, f, {trial.name: trial}, {pod.name: pod}
            )
            self._launch(key, memory, f.number, work)
        for r in plan.retry:
            self._launch(
                key, memory, r.number, self._retry_trial(experiment, memory.spec, trial, r)
            )

    def on_trial_snapshot(self, views: list[TrialView], namespace: str | None) -> None:
        """A fresh LIST of the Trials in ``namespace`` (all if ``None``)."""
        self.cache.replace_trials(views, namespace)
        self._requeue(namespace)

    def on_pod_snapshot(self, pods: list[tuple[str, PodView]], namespace: str | None) -> None:
        """A fresh LIST of the trial Pods in ``namespace`` (all if ``None``)."""
        self.cache.replace_pods(pods, namespace)
        self._requeue(namespace)

    def _requeue(self, namespace: str | None) -> None:
        # After a LIST any experiment may have gained or lost objects.
        for key in self.cache.experiment_keys():
            if namespace is None or key[0] == namespace:
                self.queue.add(key)

    def adopt(
        self,
        coro: Coroutine[Any, Any, None],
        name: str,
        synced: asyncio.Event | None = None,
        problem: Callable[[], str | None] = lambda: None,
    ) -> None:
        """Run a long-lived task (a watch stream) until :meth:`stop`.

        Args:
            coro: The task's work.
            name: The task's name.
            synced: Set once the stream has listed its objects; no reconcile
                runs before then, because an empty cache would make the live
                trials of an experiment look lost after a restart.
            problem: Why the stream cannot list, while it cannot: shown on
                the Experiments waiting for it (e.g. RBAC that forbids it).
        """
        if synced is not None:
            self._streams.append((synced, problem))
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def _forget_in_service(self, uid: str) -> None:
        try:
            await self.service.delete(uid)
        except (ServiceUnavailable, ServiceError) as exc:
            log.info("experiment %s not deleted from the service: %s", uid, exc)

    # -- loops ----------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            try:
                if await self._streams_listed(key):
                    await self._reconcile_once(key)
                else:
                    self.queue.add_after(key, self.settings.watch_grace_seconds)
            finally:
                self.queue.done(key)

    async def _streams_listed(self, key: Key) -> bool:
        """Wait a while for every watch stream to have listed.

        Returns:
            False if one has not by then; if it is failing, the Experiment
            says why (the caller tries again later).
        """
        for synced, problem in self._streams:
            try:
                await asyncio.wait_for(synced.wait(), self.settings.watch_grace_seconds)
            except TimeoutError:
                why = problem()
                if why is not None:
                    await self._report_blind(key, why)
                return False
        return True

    async def _report_blind(self, key: Key, why: str) -> None:
        """Show on an unfinished Experiment that its trials cannot be followed, and why."""
        experiment = self.cache.experiment(key)
        phase = experiment.phase if experiment is not None else None
        if experiment is None or experiment.deleting or (phase is not None and phase.final):
            return
        self.metrics.reconcile_errors.labels("watch").inc()
        decision = rc.Decision(
            phase or ExperimentPhase.PENDING,
            "CannotWatch",
            f"the operator cannot follow this experiment's trials ({why}); it keeps "
            "retrying: check that its ServiceAccount may list and watch trials and pods",
        )
        max_trials = int(experiment.spec.get("maxTrials") or 0)
        try:
            await self._write_status(experiment, max_trials, decision, None, True, "")
        except KubeError as exc:
            log.warning("status of %s/%s not written: %s", *key, exc)

    async def _reconcile_once(self, key: Key) -> None:
        started = time.monotonic()
        self.metrics.reconciles.inc()
        try:
            retry_in = await self.reconcile(key)
        except asyncio.CancelledError:
            raise
        except ServiceUnavailable:
            self.metrics.reconcile_errors.labels("service_unavailable").inc()
            retry_in = 2.0
        except KubeError as exc:
            self.metrics.reconcile_errors.labels("kubernetes").inc()
            log.warning("reconcile of %s/%s: %s", *key, exc)
            retry_in = 2.0
        except Exception:
            self.metrics.reconcile_errors.labels("internal").inc()
            log.exception("reconcile of %s/%s failed", *key)
            retry_in = 5.0
        finally:
            self.metrics.reconcile_latency.observe(time.monotonic() - started)
        if retry_in is not None:
            self.queue.add_after(key, retry_in)

    async def _flush_events(self) -> None:
        while True:
            await asyncio.sleep(min(0.5, self.settings.event_window_seconds))
            for event in self._events.due(time.monotonic()):
                self._spawn(self._write_event(event))

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            for key in self.cache.experiment_keys():
                self.queue.add(key)

    async def _poll_stops(self) -> None:
        """Long-poll the service's stop orders; delete the Pods they name at once."""
        backoff = 0.5
        while True:
            began = time.monotonic()
            try:
                orders = await self.service.stops(self.settings.stops_wait_seconds)
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except (ServiceUnavailable, ServiceError) as exc:
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

    # -- the reconcile ---------------------------------------------------------------------

    def _remember(self, uid: str, experiment: ExperimentView | None) -> _Memory:
        memory = self._memory.get(uid)
        if memory is None:
            memory = _Memory(uid)
            # After a restart, an ended experiment is still ended: its
            # remaining trials (if any) are stopped rather than left running.
            if experiment is not None and experiment.phase is not None and experiment.phase.final:
                memory.ending = str(experiment.status.get("phase"))
            self._memory[uid] = memory
        return memory

    async def reconcile(self, key: Key) -> float | None:
        """Bring one experiment one step closer to its goal.

        Returns:
            Seconds after which to reconcile again regardless of events, or
            ``None`` to wait for the next event (or the periodic resync).
        """
        experiment = self.cache.experiment(key)
        if experiment is None or experiment.deleting:
            return None
        memory = self._remember(experiment.uid, experiment)
        trials = self.cache.trials(key)
        pods = self.cache.pods(key)
        if _settled(experiment, trials, pods) and memory.registered == experiment.generation:
            return None  # ended, nothing left running, spec unchanged: no work
        try:
            spec = parse_experiment(experiment.spec)
        except SpecError as exc:
            decision = rc.Decision(
                ExperimentPhase.FAILED,
                rc.REASON_INVALID,
                f"{exc.field}: {exc.problem}; fix the manifest and apply it again",
            )
            await self._write_status(experiment, 0, decision, None, True, "")
            return None
        if memory.template_error and memory.template_error_generation != experiment.generation:
            memory.template_error = None

        names = {t.number: t.name for t in trials.values()}
        progress: rc.Progress | None = None
        try:
            if memory.registered != experiment.generation:
                await self.service.register(
                    experiment.uid, experiment.name, experiment.namespace, experiment.spec
                )
                memory.registered = experiment.generation
                memory.spec = spec
                memory.exhausted = False
            summary = await self.service.summary(experiment.uid)
            if rc.service_lost_trials(trials.values(), summary.allocated):
                summary = await self._restore(experiment, trials)
            self._settle_trials(key, experiment, spec, memory)
            progress = _progress(summary)
            if memory.template_error:
                decision = rc.Decision(
                    ExperimentPhase.FAILED,
                    "InvalidTemplate",
                    f"{memory.template_error}; fix spec.template and apply it again",
                    ending="InvalidTemplate",
                )
            else:
                decision = rc.decide(spec, experiment, progress, memory.exhausted, names)
            if decision.ending and memory.ending is None:
                # Just ended: stop the trials still running, now.
                memory.ending = decision.ending
                self._settle_trials(key, experiment, spec, memory)
            elif decision.ending is None:
                memory.ending = None
            decision = rc.hold_until_trials_end(decision, self.cache.trials(key).values())
            if decision.ask > 0:
                # The summary may be stale by the time the ask arrives (trials
                # being created start, others finish): the service checks
                # parallelism itself, with the allocation, so asks need not
                # wait for creations in progress.
                await self._start_trials(experiment, memory, decision.ask, spec.parallelism)
        except ServiceError as exc:
            if not _experiment_unknown(exc):
                raise
            # The service lost it (a database on an emptyDir, reset): register
            # it again at once, and put its trials back.
            memory.registered = -1
            log.warning("the suggestion service does not know %s/%s: re-registering", *key)
            return 0.2
        except ServiceUnavailable as exc:
            self.metrics.service_errors.inc()
            decision = _unchanged(experiment, f"waiting for the suggestion service: {exc}")
            await self._write_status(experiment, spec.maxTrials, decision, None, False, str(exc))
            return 2.0
        retry = await self._write_status(
            experiment, spec.maxTrials, decision, progress, True, "", memory
        )
        if any(t.phase is TrialPhase.RUNNING for t in self.cache.trials(key).values()):
            # Keep `kubectl get trials` showing how far each running trial got.
            refresh = self.settings.step_refresh_seconds
            retry = min(retry or refresh, refresh)
            if time.monotonic() - memory.steps_copied >= refresh:
                memory.steps_copied = time.monotonic()
                self._spawn(self._copy_last_steps(key, experiment.uid))
        if decision.phase is ExperimentPhase.RUNNING and memory.stops:
            retry = min(retry or 1.0, 1.0)
        return retry

    async def _restore(
        self, experiment: ExperimentView, trials: Mapping[str, TrialView]
    ) -> ExperimentSummary:
        """Re-seed a service that lost this experiment's trials from the Trials.

        The numbers go back with their params and results, so the service
        never hands a number out twice and its sampler learns from them;
        running trials go on reporting (their tokens do not depend on the
        database).

        Returns:
            The service's summary afterwards.
        """
        restored = await self.service.restore(experiment.uid, rc.restore_records(trials.values()))
        running = sum(1 for t in trials.values() if not t.final)
        message = (
            f"the suggestion service had lost this experiment (its database was reset): "
            f"restored {restored} trials from the cluster"
            + (f"; {running} running go on" if running else "")
        )
        log.warning("%s/%s: %s", experiment.namespace, experiment.name, message)
        self._event(experiment, "Restored", message, warning=True)
        return await self.service.summary(experiment.uid)

    async def _copy_last_steps(self, key: Key, uid: str) -> None:
        """Copy the last reported step of running trials from the service to their status."""
        try:
            views = {v.number: v for v in await self.service.trials(uid)}
            for trial in self.cache.trials(key).values():
                view = views.get(trial.number)
                if (
                    trial.phase is TrialPhase.RUNNING
                    and view is not None
                    and view.last_step is not None
                    and view.last_step != trial.last_step
                ):
                    body = await self.kube.patch_trial_status(
                        trial.namespace, trial.name, {"lastStep": view.last_step}
                    )
                    self.cache.put_trial(TrialView.from_body(body))
        except (ServiceUnavailable, ServiceError, KubeError) as exc:
            log.info("last steps of %s/%s not copied: %s", *key, exc)

    def _settle_trials(
        self,
        key: Key,
        experiment: ExperimentView,
        spec: ExperimentSpec,
        memory: _Memory,
    ) -> None:
        """Start carrying out :func:`reconcile.plan_trials`, one task per trial.

        Each trial's calls (a finish is a service call, a log read and a status
        patch) run on their own, so a reconcile of an experiment with many
        trials ending at once takes as long as one call, not their sum; a
        finished task requeues the experiment to ask for the freed slots.
        """
        trials = self.cache.trials(key)
        pods = self.cache.pods(key)
        plan = rc.plan_trials(
            trials.values(),
            pods,
            memory.stops,
            memory.ending,
            _now(),
            self.settings.lost_pod_grace_seconds,
            self.settings.trial_running_delay_seconds,
            spec.maxRetries,
        )
        if plan.recheck_after is not None:
            self.queue.add_after(key, plan.recheck_after)
        grace = self.settings.stop_grace_seconds
        for d in plan.delete_pods:
            log.info("deleting Pod %s/%s: %s", experiment.namespace, d.name, d.reason)
            self._launch(
                key, memory, d.number, self.kube.delete_pod(experiment.namespace, d.name, grace)
            )
        for f in plan.finish:
            self._launch(
                key, memory, f.number, self._finish_trial(experiment, spec, memory, f, trials, pods)
            )
        by_number = {t.number: t for t in trials.values()}
        for r in plan.retry:
            work = self._retry_trial(experiment, spec, by_number[r.number], r)
            self._launch(key, memory, r.number, work)
        for trial in plan.maybe_lost:
            self._launch(
                key, memory, trial.number, self._settle_lost(experiment, spec, memory, trial)
            )
        by_name = {t.name: t for t in trials.values()}
        for prog in plan.progress:
            trial = by_name[prog.name]
            self._launch(key, memory, trial.number, self._record_progress(trial, prog, pods))

    def _launch(
        self, key: Key, memory: _Memory, number: int, work: Coroutine[Any, Any, Any]
    ) -> None:
        """Run one trial's operation as a task; at most one per trial at a time."""
        if number in memory.in_flight:
            work.close()
            return
        memory.in_flight.add(number)

        async def run() -> None:
            retry: float | None = None
            try:
                async with self._trial_slots:
                    await work
            except asyncio.CancelledError:
                raise
            except ServiceUnavailable:
                self.metrics.reconcile_errors.labels("service_unavailable").inc()
                retry = 2.0
            except (KubeError, ServiceError) as exc:
                self.metrics.reconcile_errors.labels("trial").inc()
                log.warning("trial %s of %s/%s: %s", number, *key, exc)
                retry = 2.0
                if isinstance(exc, ServiceError) and _experiment_unknown(exc):
                    memory.registered = -1  # the next reconcile restores it
                    retry = 0.2
            except Exception:
                self.metrics.reconcile_errors.labels("internal").inc()
                log.exception("trial %s of %s/%s failed", number, *key)
                retry = 5.0
            finally:
                memory.in_flight.discard(number)
            if retry is None:
                self.queue.add(key)
                # Its Pod may have ended while this ran (a short trial still
                # being created): settle that now, as its Pod's event would have.
                trial = self.cache.trial(key, trial_name(key[1], number))
                pod = self.cache.pod(key, trial.pod_name) if trial is not None else None
                if pod is not None and pod.ended:
                    self._settle_ended_pod(key, pod)
            else:
                self.queue.add_after(key, retry)

        task = self._spawn(run())
        # Cancelled before it ran (at shutdown): close the operation, unawaited.
        task.add_done_callback(lambda t: work.close() if t.cancelled() else None)

    async def _settle_lost(
        self, experiment: ExperimentView, spec: ExperimentSpec, memory: _Memory, trial: TrialView
    ) -> None:
        outcome = await self._confirm_lost(experiment, trial, spec.maxRetries)
        if isinstance(outcome, rc.TrialRetry):
            await self._retry_trial(experiment, spec, trial, outcome)
        elif outcome is not None:
            trials = self.cache.trials(experiment.key)
            await self._finish_trial(experiment, spec, memory, outcome, trials, {})

    async def _record_progress(
        self, trial: TrialView, progress: rc.TrialProgress, pods: Mapping[str, PodView]
    ) -> TrialView:
        """Write a live trial's phase (and why it waits) to its status."""
        status: dict[str, Any] = {
            "phase": progress.phase.value,
            "message": progress.message,
            "podName": trial.pod_name,
        }
        pod = pods.get(trial.pod_name)
        if progress.phase is TrialPhase.RUNNING and pod is not None and pod.started:
            status["startTime"] = format_time(pod.started)
        body = await self.kube.patch_trial_status(trial.namespace, trial.name, status)
        view = TrialView.from_body(body)
        self.cache.put_trial(view)
        return view

    async def _confirm_lost(
        self, experiment: ExperimentView, trial: TrialView, max_retries: int
    ) -> rc.TrialFinish | rc.TrialRetry | None:
        """Check a Pod the cache does not have, with the API server and the service."""
        if await self.kube.get_pod(trial.namespace, trial.pod_name) is not None:
            return None  # the watch is behind; the Pod is there
        view = await self.service.trial(experiment.uid, trial.number)
        if view is None:
            return None
        state = view.state.value
        if view.state.finished:
            # Finished in the service already (crash before the Trial was
            # patched): record the same outcome on the Trial.
            reason = view.stop_reason or state
            return rc.TrialFinish(trial.number, trial.name, state, reason, view.message or "")
        return rc.lost_trial(trial, state, view.stop_reason, max_retries)

    async def _retry_trial(
        self,
        experiment: ExperimentView,
        spec: ExperimentSpec,
        trial: TrialView,
        retry: rc.TrialRetry,
    ) -> None:
        """Run a disrupted trial again: same number and params, in a Pod of its own.

        The service forgets the lost attempt's reports and hands the trial
        back (pending) to the operator's next ask, which creates its new Pod
        as it creates any: the Trial names that Pod from here on. Safe to
        repeat until the Trial shows the new attempt.
        """
        await self.service.retry(experiment.uid, trial.number)
        attempt = trial.attempt + 1
        message = f"attempt {attempt} of {spec.maxRetries + 1}: {retry.message}"
        status = {
            "phase": TrialPhase.PENDING.value,
            "attempt": attempt,
            "podName": f"{trial.name}-retry{attempt - 1}",
            "message": message,
            "startTime": None,
            "lastStep": None,
        }
        body = await self.kube.patch_trial_status(trial.namespace, trial.name, status)
        self.cache.put_trial(TrialView.from_body(body))
        self._event(experiment, "TrialRetried", f"trial {trial.name}: {message}", warning=True)
        with contextlib.suppress(KubeError):
            # The disrupted Pod's object (Failed, or still being deleted). Not
            # forced: until the kubelet confirms it stopped, the scheduler
            # counts its resources, and the new Pod is not refused admission.
            log.info("deleting Pod %s/%s: a new attempt runs", trial.namespace, trial.pod_name)
            await self.kube.delete_pod(
                trial.namespace, trial.pod_name, self.settings.stop_grace_seconds
            )

    async def _finish_trial(
        self,
        experiment: ExperimentView,
        spec: ExperimentSpec,
        memory: _Memory,
        finish: rc.TrialFinish,
        trials: Mapping[str, TrialView],
        pods: Mapping[str, PodView],
    ) -> TrialView | None:
        """Tell the service a trial ended and record the outcome on its Trial."""
        trial = trials.get(finish.name)
        pod = pods.get(trial.pod_name) if trial is not None else None
        main = _main_container(experiment)
        logs: str | None = None
        message = finish.message
        if finish.wants_logs and pod is not None:
            logs = await self._last_lines(experiment.namespace, pod, main)
            if logs:
                message = f"{message}; last lines of {main}:\n{logs}"
        view = await self.service.finish(experiment.uid, finish.number, finish.state, message)
        # The service has freed the trial's slot: its successor may be asked
        # for while this Trial's status is written (this trial stays in
        # flight, so that reconcile leaves it alone). Not asked for here, one
        # by one: measured, an ask per finish (1,218 asks per 1,000 trials
        # instead of about 250) cost more CPU than the wait for the next
        # reconcile saved, and the run took 1.77x its floor instead of 1.3x.
        self.queue.add(experiment.key)
        phase = SERVICE_STATE_PHASE[view.state.value]
        if phase is TrialPhase.METRICS_UNAVAILABLE:
            if logs is None and pod is not None:
                logs = await self._last_lines(experiment.namespace, pod, main)
            message = (
                f"the trial ended without reporting {spec.objective.metric!r} "
                f"(write it to $KUBETUNE_METRICS_FILE or call kubetune.report)"
            )
            if logs:
                message += f"; last lines of {main}:\n{logs}"
        elif phase is TrialPhase.SUCCEEDED:
            message = (
                f"{spec.objective.metric}={view.objective:.6g}"
                if view.objective is not None
                else ""
            )
        elif phase is TrialPhase.PRUNED:
            message = f"stopped early: {view.stop_reason or finish.reason}"
        elif view.message and not message:
            message = view.message
        now = _now()
        status: dict[str, Any] = {
            "phase": phase.value,
            "objective": view.objective,
            "lastStep": view.last_step,
            "message": message,
            "completionTime": format_time(now),
            "conditions": [
                {
                    "type": "Succeeded"
                    if phase is TrialPhase.SUCCEEDED
                    else "Failed"
                    if phase in (TrialPhase.FAILED, TrialPhase.METRICS_UNAVAILABLE)
                    else "Pruned",
                    "status": "True",
                    "reason": finish.reason if phase is not TrialPhase.PRUNED else "Pruned",
                    "message": message[:32000],
                    "lastTransitionTime": format_time(now),
                }
            ],
        }
        if phase is TrialPhase.PRUNED:
            status["stopReason"] = view.stop_reason or finish.reason
        if trial is None:
            return None
        status["podName"] = trial.pod_name
        if trial.started is None and pod is not None and pod.started is not None:
            # A trial that ended before it was seen running (a short one,
            # or while the operator was down) still gets its start time.
            status["startTime"] = format_time(pod.started)
        body = await self.kube.patch_trial_status(trial.namespace, trial.name, status)
        updated = TrialView.from_body(body)
        self.cache.put_trial(updated)
        memory.stops.pop(finish.number, None)
        self._count_finish(experiment, trial, phase, now)
        self._trial_event(experiment, trial, phase, message)
        return updated

    async def _last_lines(self, namespace: str, pod: PodView, container: str) -> str | None:
        logs = await self.kube.pod_logs(
            namespace, pod.name, container, self.settings.log_tail_lines
        )
        if logs:
            return logs.rstrip()[-4000:]
        for end in pod.ended_containers:
            if end.name == container and end.message:
                return end.message.rstrip()[-4000:]
        return None

    async def _start_trials(
        self, experiment: ExperimentView, memory: _Memory, count: int, parallelism: int
    ) -> None:
        """Ask for trials and create each one's Trial and Pod (idempotently)."""
        answer = await self.service.ask(experiment.uid, count, parallelism)
        if answer.exhausted:
            memory.exhausted = True
        for assignment in answer.trials:
            if assignment.number in memory.in_flight:
                continue  # a pending trial whose creation is under way
            self._launch(
                experiment.key,
                memory,
                assignment.number,
                self._create_trial(experiment, memory, assignment),
            )

    async def _create_trial(
        self, experiment: ExperimentView, memory: _Memory, assignment: TrialAssignment
    ) -> None:
        """Create a trial's Trial and Pod and mark it started; safe to repeat."""
        trial_obj, created = await self.kube.create_trial(
            build_trial(experiment, assignment.number, assignment.params)
        )
        trial = TrialView.from_body(trial_obj)
        owners = {o.get("uid") for o in trial_obj["metadata"].get("ownerReferences") or []}
        if experiment.uid not in owners:
            # A Trial of a deleted Experiment of the same name, not yet
            # garbage-collected: wait for it to go rather than adopt it.
            raise KubeError(
                409, "AlreadyExists", f"Trial {trial.name} belongs to another Experiment"
            )
        self.cache.put_trial(trial)
        if trial.final:
            return
        try:
            pod_body = build_trial_pod(
                experiment,
                trial.uid,
                assignment.number,
                assignment.params,
                assignment.token,
                self.settings,
                trial.pod_name,
            )
        except TemplateError as exc:
            await self._template_failed(experiment, memory, trial, assignment.number, str(exc))
            return
        try:
            pod = await self.kube.create_pod(pod_body)
        except KubeError as exc:
            if exc.status not in (400, 422):
                raise
            # The API server refuses the rendered Pod: the template is wrong,
            # and every trial would fail the same way.
            problem = f"the trial Pod is invalid: {exc.message}"
            await self._template_failed(experiment, memory, trial, assignment.number, problem)
            return
        self.cache.put_pod(
            pod["metadata"]["labels"].get("kubetune.io/experiment", ""), PodView.from_body(pod)
        )
        # No status write here: the CRD defaults a new Trial's phase to
        # Pending, and the Pod's name is in its spec (the Pod column shows
        # it); the phase is next written when the Pod runs or waits.
        await self.service.start(experiment.uid, assignment.number)
        if not created:
            return  # created by an earlier attempt: nothing else to record
        self.metrics.trials_created.labels(experiment.namespace).inc()
        params = ", ".join(f"{k}={v}" for k, v in assignment.params.items())
        self._event(experiment, "TrialCreated", f"created trial {trial.name} ({params})")

    async def _template_failed(
        self,
        experiment: ExperimentView,
        memory: _Memory,
        trial: TrialView,
        number: int,
        problem: str,
    ) -> None:
        """Fail a trial whose Pod cannot be made; the experiment fails with it."""
        memory.template_error = problem
        memory.template_error_generation = experiment.generation
        await self.service.finish(experiment.uid, number, "failed", problem)
        body = await self.kube.patch_trial_status(
            trial.namespace,
            trial.name,
            {"phase": TrialPhase.FAILED.value, "message": problem},
        )
        self.cache.put_trial(TrialView.from_body(body))

    # -- status and events ----------------------------------------------------------------

    async def _write_status(
        self,
        experiment: ExperimentView,
        max_trials: int,
        decision: rc.Decision,
        progress: rc.Progress | None,
        service_ok: bool,
        service_message: str,
        memory: _Memory | None = None,
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
        now = _now()
        desired = rc.desired_conditions(
            decision,
            service_ok,
            service_message if not service_ok else f"reachable at {self.settings.service_url}",
        )
        conditions = rc.render_conditions(
            desired, experiment.status.get("conditions") or [], now, experiment.generation
        )
        trials = self.cache.trials(experiment.key)
        names = {t.number: t.name for t in trials.values()}
        status = rc.experiment_status(
            experiment, max_trials, decision, progress, trials.values(), conditions, names
        )
        if not experiment.status.get("startTime") and decision.phase is not ExperimentPhase.PENDING:
            status["startTime"] = format_time(now)
        if decision.phase.final and not experiment.status.get("completionTime"):
            status["completionTime"] = format_time(now)
        if not rc.status_changed(experiment.status, status):
            return None
        if memory is not None and not rc.status_change_urgent(experiment.status, status):
            wait = memory.status_written + self.settings.status_interval_seconds - time.monotonic()
            if wait > 0:
                return wait
        body = await self.kube.patch_experiment_status(
            experiment.namespace, experiment.name, status
        )
        if memory is not None:
            memory.status_written = time.monotonic()
        self.cache.put_experiment(ExperimentView.from_body(body))
        before = experiment.phase
        if before is not decision.phase:
            self._phase_event(experiment, before, decision)
        return None

    def _phase_event(
        self, experiment: ExperimentView, before: ExperimentPhase | None, decision: rc.Decision
    ) -> None:
        phase = decision.phase
        if phase is ExperimentPhase.SUCCEEDED:
            reason = decision.reason if decision.reason == rc.REASON_GOAL else "ExperimentSucceeded"
            self._event(experiment, reason, decision.message)
        elif phase is ExperimentPhase.FAILED:
            self._event(experiment, "ExperimentFailed", decision.message, warning=True)
        elif phase is ExperimentPhase.SUSPENDED:
            self._event(experiment, "Suspended", decision.message)
        elif phase is ExperimentPhase.RUNNING and before is ExperimentPhase.SUSPENDED:
            self._event(experiment, "Resumed", decision.message)
        elif phase is ExperimentPhase.RUNNING and before in (None, ExperimentPhase.PENDING):
            self._event(
                experiment, "Started", f"registered with the suggestion service; {decision.message}"
            )

    def _trial_event(
        self, experiment: ExperimentView, trial: TrialView, phase: TrialPhase, message: str
    ) -> None:
        first_line = message.splitlines()[0] if message else ""
        if phase is TrialPhase.PRUNED:
            self._event(experiment, "TrialPruned", f"trial {trial.name} {first_line}")
        elif phase is TrialPhase.FAILED:
            self._event(
                experiment, "TrialFailed", f"trial {trial.name}: {first_line}", warning=True
            )
            self._event(experiment, "TrialFailed", message, warning=True, trial=trial)
        elif phase is TrialPhase.METRICS_UNAVAILABLE:
            self._event(
                experiment,
                "TrialMetricsUnavailable",
                f"trial {trial.name}: {first_line}",
                warning=True,
            )

    def _event(
        self,
        experiment: ExperimentView,
        reason: str,
        message: str,
        warning: bool = False,
        trial: TrialView | None = None,
    ) -> None:
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
                involved, reason, message, warning, time.monotonic(), when=_now()
            )
        else:
            held = self._events.flush(involved["uid"])
            ready = [*held, PendingEvent(involved, reason, message, warning)]
        if ready:
            # One task writes them in order: their timestamps keep that order.
            self._spawn(self._write_events(ready))

    async def _write_events(self, events: list[PendingEvent]) -> None:
        for event in events:
            await self._write_event(event)

    async def _write_event(self, event: PendingEvent) -> None:
        body = build_event(
            event.involved,
            event.reason,
            event.message,
            event.last or _now(),
            event.warning,
            self._instance,
            first=event.first,
            count=event.count,
        )
        await self.kube.create_event(body)

    def _count_finish(
        self, experiment: ExperimentView, trial: TrialView, phase: TrialPhase, now: datetime
    ) -> None:
        ns = experiment.namespace
        self.metrics.trials_finished.labels(ns, phase.value).inc()
        if phase is TrialPhase.PRUNED:
            self.metrics.trials_pruned.labels(ns).inc()
        elif phase in (TrialPhase.FAILED, TrialPhase.METRICS_UNAVAILABLE):
            self.metrics.trials_failed.labels(ns).inc()
        if trial.created is not None:
            self.metrics.trial_duration.labels(phase.value).observe(
                max(0.0, (now - trial.created).total_seconds())
            )


def _main_container(experiment: ExperimentView) -> str:
    containers = ((experiment.spec.get("template") or {}).get("spec") or {}).get("containers") or []
    return str(containers[0].get("name", "")) if containers else ""


def _experiment_unknown(exc: ServiceError) -> bool:
    """Whether the service answered that it has no such experiment."""
    return exc.status == 404 and exc.field == "uid"


def _progress(summary: ExperimentSummary) -> rc.Progress:
    counts = {str(k): v for k, v in summary.counts.items()}
    best = summary.best
    return rc.Progress(
        done=summary.done,
        started=counts.get("running", 0),
        pending=counts.get("pending", 0),
        succeeded=counts.get("succeeded", 0),
        failed=counts.get("failed", 0),
        pruned=counts.get("pruned", 0),
        metrics_unavailable=counts.get("metrics_unavailable", 0),
        best_number=best.number if best is not None else None,
        best_objective=best.objective if best is not None else None,
        best_params=best.params if best is not None else None,
    )


def _settled(
    experiment: ExperimentView, trials: Mapping[str, TrialView], pods: Mapping[str, PodView]
) -> bool:
    """Whether an experiment has ended with nothing left to clean up."""
    if experiment.phase is None or not experiment.phase.final:
        return False
    # The status written at the end may have counted a trial whose own status
    # was still being written; rewrite it until it shows nothing running.
    if experiment.status.get("running") or experiment.status.get("pending"):
        return False
    if any(not t.final for t in trials.values()):
        return False
    return all(p.ended or p.deleting for p in pods.values())


def _unchanged(experiment: ExperimentView, why: str) -> rc.Decision:
    """The experiment's recorded phase, kept while the service cannot be asked."""
    phase = experiment.phase or ExperimentPhase.PENDING
    if phase.final:
        for cond in experiment.status.get("conditions") or []:
            if (
                cond.get("type") in (rc.COND_SUCCEEDED, rc.COND_FAILED)
                and cond.get("status") == "True"
            ):
                return rc.Decision(phase, str(cond.get("reason")), str(cond.get("message")))
    return rc.Decision(phase, "ServiceUnavailable", why)
