"""What the controller does to one trial: create, finish, retry, settle a lost one.

Each operation is one trial's calls to the service and the API server, run as
a task of its own by the controller (at most one per trial at a time) and
safe to repeat: a controller killed halfway through one leaves what the next
reconcile plans again. What to do is decided by
:mod:`~kubetune_controller.trial_plan`; the status written is built by
:mod:`~kubetune_controller.status`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from datetime import UTC, datetime

from kubetune_controller import status as st
from kubetune_controller import trial_plan as tp
from kubetune_controller.cache import ClusterCache, Key
from kubetune_controller.kube_api import KubeApi, KubeError
from kubetune_controller.memory import ExperimentMemory
from kubetune_controller.metrics import OperatorMetrics
from kubetune_controller.model import (
    SERVICE_STATE_PHASE,
    ExperimentResource,
    PodResource,
    TrialPhase,
    TrialResource,
)
from kubetune_controller.pods import (
    TemplateError,
    build_token_secret,
    build_trial,
    build_trial_pod,
)
from kubetune_controller.reconcile import (
    REASON_INVALID_PARAMS,
    REASON_INVALID_TEMPLATE,
    REASON_POD_FORBIDDEN,
)
from kubetune_controller.recorder import Recorder
from kubetune_controller.service_client import ServiceCallError, ServiceClient, ServiceUnavailable
from kubetune_controller.settings import OperatorSettings
from kubetune_controller.workqueue import WorkQueue
from kubetune_suggestion.service.models import ExperimentSummary, TrialAssignment
from kubetune_suggestion.spec import ExperimentSpec, param_problems, parse_experiment

log = logging.getLogger(__name__)


class TrialActions:
    """Carries out the trial operations the controller plans.

    Args:
        settings: The installation's settings.
        kube: The Kubernetes client.
        service: The suggestion service client.
        cache: The watched objects (written Trials and Pods go back into it).
        metrics: Where to count what happens.
        recorder: Where Events go.
        queue: The experiments to reconcile (a finish frees a slot).
    """

    def __init__(
        self,
        settings: OperatorSettings,
        kube: KubeApi,
        service: ServiceClient,
        cache: ClusterCache,
        metrics: OperatorMetrics,
        recorder: Recorder,
        queue: WorkQueue[Key],
    ) -> None:
        self.settings = settings
        self.kube = kube
        self.service = service
        self.cache = cache
        self.metrics = metrics
        self.recorder = recorder
        self.queue = queue

    # -- creating ---------------------------------------------------------------------------

    async def create(
        self, experiment: ExperimentResource, memory: ExperimentMemory, assignment: TrialAssignment
    ) -> None:
        """Create a trial's Trial and Pod and mark it started; safe to repeat."""
        trial_obj, created = await self.kube.create_trial(
            build_trial(experiment, assignment.number, assignment.params)
        )
        trial = TrialResource.from_body(trial_obj)
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
        # What the service hands out is checked before it reaches a command
        # line: a configuration outside spec.parameters never runs.
        space = (memory.spec or parse_experiment(experiment.spec)).search_space()
        problems = param_problems(space, assignment.params)
        if problems:
            problem = "the suggestion service's parameters are not in spec.parameters: " + (
                "; ".join(problems)
            )
            await self._refuse(experiment, trial, REASON_INVALID_PARAMS, problem)
            return
        try:
            pod_body = build_trial_pod(
                experiment,
                trial.uid,
                assignment.number,
                assignment.params,
                self.settings,
                trial.pod_name,
            )
        except TemplateError as exc:
            await self._template_failed(experiment, memory, trial, assignment.number, str(exc))
            return
        # The token goes in a Secret the collector mounts, never in the Pod
        # spec; a retry's Pod finds it there already.
        await self.kube.create_secret(
            build_token_secret(experiment, assignment.number, trial.uid, assignment.token)
        )
        try:
            pod = await self.kube.create_pod(pod_body)
        except KubeError as exc:
            if tp.pod_forbidden(exc.status, exc.message):
                # Admission (Pod Security, a webhook) refuses it, and would
                # refuse it again: the trial fails, visibly, with the reason.
                problem = f"the API server refused the trial's Pod: {exc.message}"
                await self._refuse(experiment, trial, REASON_POD_FORBIDDEN, problem)
                return
            if exc.status not in (400, 422):
                raise
            # The API server refuses the rendered Pod: the template is wrong,
            # and every trial would fail the same way.
            problem = f"the trial Pod is invalid: {exc.message}"
            await self._template_failed(experiment, memory, trial, assignment.number, problem)
            return
        self.cache.put_pod(
            pod["metadata"]["labels"].get("kubetune.io/experiment", ""), PodResource.from_body(pod)
        )
        # No status write here: the CRD defaults a new Trial's phase to
        # Pending, and the Pod's name is in its spec (the Pod column shows
        # it); the phase is next written when the Pod runs or waits.
        await self.service.start(experiment.uid, assignment.number)
        if not created:
            return  # created by an earlier attempt: nothing else to record
        self.metrics.trials_created.labels(experiment.namespace).inc()
        params = ", ".join(f"{k}={v}" for k, v in assignment.params.items())
        self.recorder.event(experiment, "TrialCreated", f"created trial {trial.name} ({params})")

    async def _template_failed(
        self,
        experiment: ExperimentResource,
        memory: ExperimentMemory,
        trial: TrialResource,
        number: int,
        problem: str,
    ) -> None:
        """Fail a trial whose Pod cannot be made; the experiment fails with it."""
        memory.template_error = problem
        memory.template_error_generation = experiment.generation
        await self.service.finish(experiment.uid, number, "failed", problem)
        status = st.refused_status(trial, REASON_INVALID_TEMPLATE, problem, datetime.now(UTC))
        body = await self.kube.patch_trial_status(trial.namespace, trial.name, status)
        self.cache.put_trial(TrialResource.from_body(body))

    async def _refuse(
        self, experiment: ExperimentResource, trial: TrialResource, reason: str, problem: str
    ) -> None:
        """Fail a trial that will never start; it counts toward maxFailedTrials.

        The Trial's Failed condition carries ``reason`` (what the
        Experiment's TrialPodsAdmitted condition is built from), and a
        Warning Event of that reason says so on the Experiment.
        """
        await self.service.finish(experiment.uid, trial.number, "failed", problem)
        now = datetime.now(UTC)
        status = st.refused_status(trial, reason, problem, now)
        body = await self.kube.patch_trial_status(trial.namespace, trial.name, status)
        self.cache.put_trial(TrialResource.from_body(body))
        self._count_finish(experiment, trial, TrialPhase.FAILED, now)
        self.recorder.event(experiment, reason, f"trial {trial.name}: {problem}", warning=True)
        self.queue.add(experiment.key)

    # -- while it runs ----------------------------------------------------------------------

    async def record_progress(
        self, trial: TrialResource, progress: tp.TrialProgress, pods: Mapping[str, PodResource]
    ) -> TrialResource:
        """Write a live trial's phase (and why it waits) to its status."""
        status = st.progress_status(trial, progress, pods.get(trial.pod_name))
        body = await self.kube.patch_trial_status(trial.namespace, trial.name, status)
        view = TrialResource.from_body(body)
        self.cache.put_trial(view)
        return view

    async def copy_last_steps(self, key: Key, uid: str) -> None:
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
                    self.cache.put_trial(TrialResource.from_body(body))
        except (ServiceUnavailable, ServiceCallError, KubeError) as exc:
            log.info("last steps of %s/%s not copied: %s", *key, exc)

    # -- ending -----------------------------------------------------------------------------

    async def finish(
        self,
        experiment: ExperimentResource,
        spec: ExperimentSpec,
        memory: ExperimentMemory,
        finish: tp.TrialFinish,
        trials: Mapping[str, TrialResource],
        pods: Mapping[str, PodResource],
    ) -> TrialResource | None:
        """Tell the service a trial ended and record the outcome on its Trial."""
        trial = trials.get(finish.name)
        pod = pods.get(trial.pod_name) if trial is not None else None
        main = _main_container(experiment)
        logs: str | None = None
        message = finish.message
        if finish.wants_logs and pod is not None:
            logs = await self._last_lines(experiment.namespace, pod, main)
            message = st.with_logs(message, main, logs)
        view = await self.service.finish(experiment.uid, finish.number, finish.state, message)
        # The service has freed the trial's slot: its successor may be asked
        # for while this Trial's status is written (this trial stays in
        # flight, so that reconcile leaves it alone). Not asked for here, one
        # by one: measured, an ask per finish (1,218 asks per 1,000 trials
        # instead of about 250) cost more CPU than the wait for the next
        # reconcile saved, and the run took 1.77x its floor instead of 1.3x.
        self.queue.add(experiment.key)
        if trial is None:
            return None
        phase = SERVICE_STATE_PHASE[view.state.value]
        if phase is TrialPhase.METRICS_UNAVAILABLE and logs is None and pod is not None:
            logs = await self._last_lines(experiment.namespace, pod, main)
        message = st.finished_message(
            phase, finish, view, message, spec.objective.metric, main, logs
        )
        now = datetime.now(UTC)
        status = st.finished_status(trial, pod, phase, finish, view, message, now)
        body = await self.kube.patch_trial_status(trial.namespace, trial.name, status)
        updated = TrialResource.from_body(body)
        self.cache.put_trial(updated)
        memory.stops.pop(finish.number, None)
        self._count_finish(experiment, trial, phase, now)
        self.recorder.trial_ended(experiment, trial, phase, message)
        return updated

    async def _last_lines(self, namespace: str, pod: PodResource, container: str) -> str | None:
        logs = await self.kube.pod_logs(
            namespace, pod.name, container, self.settings.log_tail_lines
        )
        if logs:
            return logs.rstrip()[-4000:]
        for end in pod.ended_containers:
            if end.name == container and end.message:
                return end.message.rstrip()[-4000:]
        return None

    def _count_finish(
        self, experiment: ExperimentResource, trial: TrialResource, phase: TrialPhase, now: datetime
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

    async def retry(
        self,
        experiment: ExperimentResource,
        spec: ExperimentSpec,
        trial: TrialResource,
        retry: tp.TrialRetry,
    ) -> None:
        """Run a disrupted trial again: same number and params, in a Pod of its own.

        The service forgets the lost attempt's reports and hands the trial
        back (pending) to the operator's next ask, which creates its new Pod
        as it creates any: the Trial names that Pod from here on. Safe to
        repeat until the Trial shows the new attempt.
        """
        await self.service.retry(experiment.uid, trial.number)
        status = st.retry_status(trial, retry, spec.maxRetries)
        body = await self.kube.patch_trial_status(trial.namespace, trial.name, status)
        self.cache.put_trial(TrialResource.from_body(body))
        message = f"trial {trial.name}: {status['message']}"
        self.recorder.event(experiment, "TrialRetried", message, warning=True)
        with contextlib.suppress(KubeError):
            # The disrupted Pod's object (Failed, or still being deleted). Not
            # forced: until the kubelet confirms it stopped, the scheduler
            # counts its resources, and the new Pod is not refused admission.
            log.info("deleting Pod %s/%s: a new attempt runs", trial.namespace, trial.pod_name)
            await self.kube.delete_pod(
                trial.namespace, trial.pod_name, self.settings.stop_grace_seconds
            )

    # -- lost -------------------------------------------------------------------------------

    async def settle_lost(
        self,
        experiment: ExperimentResource,
        spec: ExperimentSpec,
        memory: ExperimentMemory,
        trial: TrialResource,
    ) -> None:
        """Finish or retry a trial whose Pod the cache has not had for a while, if it is gone."""
        outcome = await self._confirm_lost(experiment, trial, spec.maxRetries)
        if isinstance(outcome, tp.TrialRetry):
            await self.retry(experiment, spec, trial, outcome)
        elif outcome is not None:
            trials = self.cache.trials(experiment.key)
            await self.finish(experiment, spec, memory, outcome, trials, {})

    async def _confirm_lost(
        self, experiment: ExperimentResource, trial: TrialResource, max_retries: int
    ) -> tp.TrialFinish | tp.TrialRetry | None:
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
            return tp.TrialFinish(trial.number, trial.name, state, reason, view.message or "")
        return tp.lost_trial(trial, state, view.stop_reason, max_retries)

    async def restore(
        self, experiment: ExperimentResource, trials: Mapping[str, TrialResource]
    ) -> ExperimentSummary:
        """Re-seed a service that lost this experiment's trials from the Trials.

        The numbers go back with their params and results, so the service
        never hands a number out twice and its sampler learns from them;
        running trials go on reporting (their tokens do not depend on the
        database).

        Returns:
            The service's summary afterwards.
        """
        restored = await self.service.restore(experiment.uid, tp.restore_records(trials.values()))
        running = sum(1 for t in trials.values() if not t.final)
        message = (
            f"the suggestion service had lost this experiment (its database was reset): "
            f"restored {restored} trials from the cluster"
            + (f"; {running} running go on" if running else "")
        )
        log.warning("%s/%s: %s", experiment.namespace, experiment.name, message)
        self.recorder.event(experiment, "Restored", message, warning=True)
        return await self.service.summary(experiment.uid)


def _main_container(experiment: ExperimentResource) -> str:
    containers = ((experiment.spec.get("template") or {}).get("spec") or {}).get("containers") or []
    return str(containers[0].get("name", "")) if containers else ""
