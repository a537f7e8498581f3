"""The reconciler: gathers inputs, asks the pure decisions, has them carried out.

One :class:`Controller` per operator process. Kopf's watch handlers feed the
:class:`~kubetune_controller.cache.ClusterCache` and enqueue the affected
experiment; ``workers`` tasks take experiments off the
:class:`~kubetune_controller.workqueue.WorkQueue` and reconcile them, one
reconcile per experiment at a time. A separate task long-polls the service's
stop orders and deletes the Pods of trials to stop as soon as they arrive
(:mod:`~kubetune_controller.stops`).

A reconcile decides with :mod:`~kubetune_controller.reconcile` (the
experiment) and :mod:`~kubetune_controller.trial_plan` (each trial), runs
each trial's operation as a task of its own
(:mod:`~kubetune_controller.trials`), and writes the status and Events
(:mod:`~kubetune_controller.recorder`).

State kept in memory here is only an optimisation or a hint
(:mod:`~kubetune_controller.memory`); all of it is rebuilt from the cluster
and the service after a restart, so the process may be killed at any moment.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime
from typing import Any

from kubetune_controller import reconcile as rc
from kubetune_controller import trial_plan as tp
from kubetune_controller.cache import ClusterCache, Key
from kubetune_controller.kube_api import KubeApi, KubeError
from kubetune_controller.memory import ExperimentMemory
from kubetune_controller.metrics import OperatorMetrics
from kubetune_controller.model import (
    ExperimentPhase,
    ExperimentResource,
    PodResource,
    TrialPhase,
    TrialResource,
    trial_name,
)
from kubetune_controller.recorder import Recorder
from kubetune_controller.service_client import ServiceCallError, ServiceClient, ServiceUnavailable
from kubetune_controller.settings import OperatorSettings
from kubetune_controller.stops import StopOrders
from kubetune_controller.trials import TrialActions
from kubetune_controller.workqueue import WorkQueue
from kubetune_suggestion.spec import ExperimentSpec, SpecError, parse_experiment

log = logging.getLogger(__name__)


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
        settings: OperatorSettings,
        kube: KubeApi,
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
        self._memory: dict[str, ExperimentMemory] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        # Bounds the trial operations in progress at once, across experiments,
        # so a burst of thousands of events cannot flood the API server.
        self._trial_slots = asyncio.Semaphore(settings.trial_concurrency)
        # The watch streams' "listed" flags and why each is failing (see adopt).
        self._streams: list[tuple[asyncio.Event, Callable[[], str | None]]] = []
        self.recorder = Recorder(settings, kube, cache, self._spawn)
        self.trials = TrialActions(
            settings, kube, service, cache, metrics, self.recorder, self.queue
        )
        self.stops = StopOrders(
            settings, kube, service, cache, metrics, self.queue, self._remember, self._spawn
        )

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the workers, the stop-order poller and the periodic resync."""
        for i in range(self.settings.workers):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"kubetune-worker-{i}"))
        self._tasks.append(asyncio.create_task(self.stops.poll(), name="kubetune-stops"))
        self._tasks.append(asyncio.create_task(self._resync(), name="kubetune-resync"))
        self._tasks.append(asyncio.create_task(self.recorder.flush_held(), name="kubetune-events"))

    async def stop(self) -> None:
        """Write the held Events, cancel every task and close the clients."""
        await self.recorder.drain(2.0)
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

    def on_experiment(self, view: ExperimentResource, deleted: bool) -> None:
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

    def on_trial(self, view: TrialResource, deleted: bool) -> None:
        """A Trial changed (or was deleted)."""
        if deleted:
            self.cache.drop_trial(view)
        else:
            self.cache.put_trial(view)
        self.queue.add((view.namespace, view.experiment))

    def on_pod(
        self, experiment_label: str, experiment: str | None, view: PodResource, deleted: bool
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

    def _settle_ended_pod(self, key: Key, pod: PodResource) -> None:
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
        plan = tp.plan_trials(
            [trial],
            {pod.name: pod},
            memory.stops,
            memory.ending,
            datetime.now(UTC),
            self.settings.lost_pod_grace_seconds,
            self.settings.trial_running_delay_seconds,
            memory.spec.maxRetries,
        )
        for f in plan.finish:
            work = self.trials.finish(
                experiment, memory.spec, memory, f, {trial.name: trial}, {pod.name: pod}
            )
            self._launch(key, memory, f.number, work)
        for r in plan.retry:
            self._launch(
                key, memory, r.number, self.trials.retry(experiment, memory.spec, trial, r)
            )

    def on_trial_snapshot(self, views: list[TrialResource], namespace: str | None) -> None:
        """A fresh LIST of the Trials in ``namespace`` (all if ``None``)."""
        self.cache.replace_trials(views, namespace)
        self._requeue(namespace)

    def on_pod_snapshot(self, pods: list[tuple[str, PodResource]], namespace: str | None) -> None:
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
        except (ServiceUnavailable, ServiceCallError) as exc:
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
                # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a
                # cancellation that arrives as the event is set, and the worker
                # it runs in would then outlive Controller.stop.
                async with asyncio.timeout(self.settings.watch_grace_seconds):
                    await synced.wait()
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
            await self.recorder.write_status(experiment, max_trials, decision, None, True, "")
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

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            for key in self.cache.experiment_keys():
                self.queue.add(key)

    # -- the reconcile ---------------------------------------------------------------------

    def _remember(self, uid: str, experiment: ExperimentResource | None) -> ExperimentMemory:
        memory = self._memory.get(uid)
        if memory is None:
            memory = ExperimentMemory(uid)
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
        if rc.settled(experiment, trials, pods) and memory.registered == experiment.generation:
            return None  # ended, nothing left running, spec unchanged: no work
        try:
            spec = parse_experiment(experiment.spec)
        except SpecError as exc:
            decision = rc.Decision(
                ExperimentPhase.FAILED,
                rc.REASON_INVALID,
                f"{exc.field}: {exc.problem}; fix the manifest and apply it again",
            )
            await self.recorder.write_status(experiment, 0, decision, None, True, "")
            return None
        if memory.template_error and memory.template_error_generation != experiment.generation:
            memory.template_error = None
        try:
            decision, progress = await self._decide(experiment, spec, memory, trials)
        except ServiceCallError as exc:
            if not _experiment_unknown(exc):
                raise
            # The service lost it (a database on an emptyDir, reset): register
            # it again at once, and put its trials back.
            memory.registered = -1
            log.warning("the suggestion service does not know %s/%s: re-registering", *key)
            return 0.2
        except ServiceUnavailable as exc:
            self.metrics.service_errors.inc()
            decision = rc.unchanged(experiment, f"waiting for the suggestion service: {exc}")
            await self.recorder.write_status(
                experiment, spec.maxTrials, decision, None, False, str(exc)
            )
            return 2.0
        retry = await self.recorder.write_status(
            experiment, spec.maxTrials, decision, progress, True, "", memory
        )
        return self._next_reconcile(experiment, memory, decision, retry)

    async def _decide(
        self,
        experiment: ExperimentResource,
        spec: ExperimentSpec,
        memory: ExperimentMemory,
        trials: Mapping[str, TrialResource],
    ) -> tuple[rc.Decision, rc.Progress]:
        """Sync with the service, settle the trials, decide, and ask for new trials.

        Raises:
            ServiceCallError: A 404 for the experiment when the service lost it.
            ServiceUnavailable: When the service cannot be reached.
        """
        key = experiment.key
        if memory.registered != experiment.generation:
            await self.service.register(
                experiment.uid, experiment.name, experiment.namespace, experiment.spec
            )
            memory.registered = experiment.generation
            memory.spec = spec
            memory.exhausted = False
        summary = await self.service.summary(experiment.uid)
        if tp.service_lost_trials(trials.values(), summary.allocated):
            summary = await self.trials.restore(experiment, trials)
        self._settle_trials(key, experiment, spec, memory)
        progress = rc.Progress.from_summary(summary)
        if memory.template_error:
            decision = rc.Decision(
                ExperimentPhase.FAILED,
                rc.REASON_INVALID_TEMPLATE,
                f"{memory.template_error}; fix spec.template and apply it again",
                ending=rc.REASON_INVALID_TEMPLATE,
            )
        else:
            names = {t.number: t.name for t in trials.values()}
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
        return decision, progress

    def _next_reconcile(
        self,
        experiment: ExperimentResource,
        memory: ExperimentMemory,
        decision: rc.Decision,
        retry: float | None,
    ) -> float | None:
        """When to reconcile again without an event (``retry``: a deferred status write)."""
        if any(t.phase is TrialPhase.RUNNING for t in self.cache.trials(experiment.key).values()):
            # Keep `kubectl get trials` showing how far each running trial got.
            refresh = self.settings.step_refresh_seconds
            retry = min(retry or refresh, refresh)
            if time.monotonic() - memory.steps_copied >= refresh:
                memory.steps_copied = time.monotonic()
                self._spawn(self.trials.copy_last_steps(experiment.key, experiment.uid))
        if decision.phase is ExperimentPhase.RUNNING and memory.stops:
            retry = min(retry or 1.0, 1.0)
        return retry

    def _settle_trials(
        self,
        key: Key,
        experiment: ExperimentResource,
        spec: ExperimentSpec,
        memory: ExperimentMemory,
    ) -> None:
        """Start carrying out :func:`trial_plan.plan_trials`, one task per trial.

        Each trial's calls (a finish is a service call, a log read and a status
        patch) run on their own, so a reconcile of an experiment with many
        trials ending at once takes as long as one call, not their sum; a
        finished task requeues the experiment to ask for the freed slots.
        """
        trials = self.cache.trials(key)
        pods = self.cache.pods(key)
        plan = tp.plan_trials(
            trials.values(),
            pods,
            memory.stops,
            memory.ending,
            datetime.now(UTC),
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
                key, memory, f.number, self.trials.finish(experiment, spec, memory, f, trials, pods)
            )
        by_number = {t.number: t for t in trials.values()}
        for r in plan.retry:
            work = self.trials.retry(experiment, spec, by_number[r.number], r)
            self._launch(key, memory, r.number, work)
        for trial in plan.maybe_lost:
            work = self.trials.settle_lost(experiment, spec, memory, trial)
            self._launch(key, memory, trial.number, work)
        by_name = {t.name: t for t in trials.values()}
        for prog in plan.progress:
            trial = by_name[prog.name]
            self._launch(key, memory, trial.number, self.trials.record_progress(trial, prog, pods))

    def _launch(
        self, key: Key, memory: ExperimentMemory, number: int, work: Coroutine[Any, Any, Any]
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
            except (KubeError, ServiceCallError) as exc:
                self.metrics.reconcile_errors.labels("trial").inc()
                log.warning("trial %s of %s/%s: %s", number, *key, exc)
                retry = 2.0
                if isinstance(exc, ServiceCallError) and _experiment_unknown(exc):
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

    async def _start_trials(
        self, experiment: ExperimentResource, memory: ExperimentMemory, count: int, parallelism: int
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
                self.trials.create(experiment, memory, assignment),
            )


def _experiment_unknown(exc: ServiceCallError) -> bool:
    """Whether the service answered that it has no such experiment."""
    return exc.status == 404 and exc.field == "uid"
