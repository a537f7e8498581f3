"""``kubetune run``: an Experiment manifest run on one machine.

Each trial is a local process started from the template's first container
(:mod:`.launch`), up to ``parallelism`` at once. Everything else is the
product's own machinery, in-process: the ``TuningService`` over a SQLite store
under ``--dir`` (:mod:`.files`) asks, records and decides, and a
:class:`~kubetune_suggestion.collector.Collector` per trial tails its metrics
file exactly as the cluster sidecar does.

The loop is single-threaded and polls (every 0.02 s by default): a stop the
service decides on a trial's report reaches the trial within a poll of that
report, and one thread leaves nothing to lock. The stop itself is sent the
moment the service answers the deciding report
(:class:`~kubetune_suggestion.runner.reporter.StopOnAnswer`), not after the
rest of the trial's new reports were forwarded.

``spec.trialTimeoutSeconds`` holds as in a cluster (where it becomes the
Pod's ``activeDeadlineSeconds``): a trial still running that long after its
process started is stopped like any other (SIGTERM, then SIGKILL after the
grace period) and ends ``failed``, saying it timed out, however it exited.
The deadline is checked on every poll, so the stop comes within a poll of
it. A timed-out trial is never run again: should the run end before its
process did, the ``.timedout`` file tells the next run to record it failed
rather than re-run it. (An interrupted trial that runs again gets the whole
limit again, as a new Pod would.)

Ctrl-C (or SIGTERM) stops every trial (SIGTERM, then SIGKILL after a grace
period), stores what they reported, and leaves them ``running`` in the store;
the run exits 130. Re-running the same command continues the experiment
(:mod:`.resume`): each interrupted trial runs again from its start, and
finished trials are never repeated. A second Ctrl-C kills the trials at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from kubetune_suggestion.collector import Collector, Delivery
from kubetune_suggestion.runner.files import RunPaths
from kubetune_suggestion.runner.launch import trial_argv, trial_container, trial_environment
from kubetune_suggestion.runner.manifest import Manifest
from kubetune_suggestion.runner.outcome import (
    EXPERIMENT_ENDED,
    ExperimentOutcome,
    experiment_outcome,
    next_streak,
    trial_end,
)
from kubetune_suggestion.runner.process import TrialProcess, describe_exit, tail
from kubetune_suggestion.runner.progress import (
    Best,
    Display,
    RunningTrial,
    Snapshot,
    format_objective,
    format_params,
)
from kubetune_suggestion.runner.reporter import LineLog, ServiceReporter, StopOnAnswer
from kubetune_suggestion.runner.result import RunResult, streak_of
from kubetune_suggestion.runner.resume import trials_to_rerun
from kubetune_suggestion.service.models import (
    AskResult,
    ExperimentSummary,
    ExperimentView,
    StopAnswer,
    StopOrder,
    TrialView,
)
from kubetune_suggestion.spec import ExperimentSpec
from kubetune_suggestion.template import trial_env

__all__ = ["LocalRunner", "TuningServiceLike"]

LOCAL_NAMESPACE: Final = "local"
# Refresh the counts and best trial from the store this often (seconds).
_SUMMARY_INTERVAL: Final = 0.5


class TuningServiceLike(Protocol):
    """The part of ``TuningService`` (see service/CONTRACT.md) the runner uses."""

    def register(self, uid: str, name: str, namespace: str, spec: ExperimentSpec) -> ExperimentView:
        """Upsert the experiment."""
        ...

    def ask(self, uid: str, count: int) -> AskResult:
        """Pending trials first, then new ones."""
        ...

    def start(self, uid: str, number: int) -> None:
        """Mark a trial running."""
        ...

    def report(
        self, uid: str, number: int, token: str, step: int, metrics: dict[str, float]
    ) -> StopAnswer:
        """Store an observation and decide whether the trial should stop."""
        ...

    def finish(self, uid: str, number: int, state: str, message: str | None = None) -> TrialView:
        """Record how a trial ended."""
        ...

    def stops(self, uid: str) -> list[StopOrder]:
        """Running trials marked to stop."""
        ...

    def summary(self, uid: str) -> ExperimentSummary:
        """Counts by state and the best trial."""
        ...

    def trials(self, uid: str) -> list[TrialView]:
        """Every trial."""
        ...


@dataclass
class _Active:
    """A trial whose process kubetune run started and has not yet recorded as finished."""

    number: int
    params: Mapping[str, Any]
    process: TrialProcess
    collector: Collector
    # When (time.monotonic()) it has run for trialTimeoutSeconds; None without a limit.
    deadline: float | None = None
    last_step: int | None = None
    last_value: float | None = None
    saw_objective: bool = False
    # Set when kubetune decided to stop it: the early-stopping rule's reason,
    # or why the experiment ended while it ran.
    stop_reason: str | None = None
    # Stopped by Ctrl-C while still running: left `running` in the store.
    interrupted: bool = False
    # Stopped for running past its deadline: it ends failed, whatever else happens.
    timed_out: bool = False


class LocalRunner:
    """Runs one experiment's trials as local processes until it ends or is interrupted."""

    def __init__(
        self,
        manifest: Manifest,
        service: TuningServiceLike,
        paths: RunPaths,
        display: Display,
        token: Callable[[int], str],
        *,
        grace: float = 5.0,
        poll_interval: float = 0.02,
    ) -> None:
        """Set up a run.

        Args:
            manifest: The validated manifest.
            service: The in-process tuning service over the local store.
            paths: Where the experiment's files go.
            display: Where progress goes.
            token: ``token(number) -> str``, the trial token the service
                checks (needed to re-run an interrupted trial, which ``ask``
                does not hand out again).
            grace: Seconds between SIGTERM and SIGKILL when stopping a trial.
            poll_interval: Seconds between polls of the trials.
        """
        self.manifest = manifest
        self.spec = manifest.spec
        self.uid = manifest.uid
        self.service = service
        self.paths = paths
        self.display = display
        self.token = token
        self.grace = grace
        self.poll_interval = poll_interval
        self.metric = self.spec.objective.metric
        self.active: dict[int, _Active] = {}
        # Trials an interrupted run left running, to re-run before asking for new ones.
        self.resume_queue: list[TrialView] = []
        self.interrupted = 0
        self.started = time.monotonic()
        self._summary: ExperimentSummary | None = None
        self._summary_at = 0.0
        self._exhausted = False
        # Failures in a row, for the limit that applies without maxFailedTrials.
        self._streak = 0
        self._container = trial_container(manifest)

    # -- entry point --------------------------------------------------------

    def interrupt(self) -> None:
        """Ctrl-C: the first stops trials cleanly, a second kills them."""
        self.interrupted += 1
        if self.interrupted > 1:
            for trial in list(self.active.values()):
                trial.process.kill()

    def run(self) -> RunResult:
        """Run until the experiment ends or :meth:`interrupt` is called."""
        self.paths.trials.mkdir(parents=True, exist_ok=True)
        view = self.service.register(self.uid, self.manifest.name, LOCAL_NAMESPACE, self.spec)
        self.resume_queue.extend(
            trials_to_rerun(self.service, self.uid, self.paths, self.spec.trialTimeoutSeconds)
        )
        self._streak = streak_of(self.service.trials(self.uid))
        spec = self.spec
        rule = spec.earlyStopping.name
        self._event(
            f"experiment {self.manifest.name}: {spec.algorithm.name} sampler, "
            f"{'no early stopping' if rule == 'none' else rule + ' early stopping'}, "
            f"{spec.maxTrials} trials, {spec.parallelism} at a time; store {self.paths.database}"
        )
        if not view.created:
            done = self._summary_now(force=True).done
            again = f", {len(self.resume_queue)} interrupted to re-run" if self.resume_queue else ""
            self._event(f"continuing: {done}/{spec.maxTrials} trials already done{again}")
        try:
            return self._loop()
        except BaseException:
            # Never leave trial processes behind, whatever went wrong; they
            # stay `running` in the store and the next run re-runs them.
            for trial in self.active.values():
                trial.process.kill()
            raise

    def _loop(self) -> RunResult:
        outcome: ExperimentOutcome | None = None
        while True:
            if self.interrupted:
                self._stop_all(None)
                self._wait_all()
                return self._result("interrupted", "interrupted; run the same command to continue")
            outcome = self._outcome(refresh=not self.active)
            if outcome is not None:
                if not self.active:
                    break
                self._stop_all(f"{EXPERIMENT_ENDED}: {outcome.reason}")
            elif not self._fill() and not self.active:
                # Nothing running and nothing handed out: the service will
                # start no more trials (it halted, or every number is taken).
                summary = self._summary_now(force=True)
                outcome = self._outcome() or ExperimentOutcome(
                    summary.best is not None, summary.complete_reason or "no more trials to run"
                )
                break
            self._poll_all()
            self.display.tick(self._snapshot())
            time.sleep(self.poll_interval)
        summary = self._summary_now(force=True)
        return self._result("succeeded" if outcome.succeeded else "failed", outcome.reason, summary)

    # -- starting trials ----------------------------------------------------

    def _fill(self) -> bool:
        """Start trials up to ``parallelism``; whether any was handed out."""
        free = self.spec.parallelism - len(self.active)
        if free <= 0:
            return True
        handed = False
        while free > 0 and self.resume_queue:
            trial = self.resume_queue.pop(0)
            self._start(trial.number, trial.params, self.token(trial.number), resumed=True)
            free -= 1
            handed = True
        if free <= 0 or self._exhausted:
            return handed
        result = self.service.ask(self.uid, free)
        self._exhausted = result.exhausted
        for assignment in result.trials:
            self._start(assignment.number, assignment.params, assignment.token, resumed=False)
        return handed or bool(result.trials)

    def _start(self, number: int, params: Mapping[str, Any], token: str, *, resumed: bool) -> None:
        declared = [p.name for p in self.spec.parameters]
        container, argv = trial_argv(self._container, params, declared)
        metrics_path = self.paths.metrics(number)
        # A fresh file per attempt: a re-run trial starts its reports over.
        metrics_path.unlink(missing_ok=True)
        identity = trial_env(
            experiment=self.manifest.name,
            experiment_uid=self.uid,
            trial_number=number,
            params=params,
            metrics_file=str(metrics_path.resolve()),
        )
        env = trial_environment(container, identity)
        self.service.start(self.uid, number)
        log_path = self.paths.log(number)
        header = "re-run after an interrupted run" if resumed else "start"
        try:
            process = TrialProcess(argv, env, self.manifest.directory, log_path, header)
        except OSError as exc:
            message = f"cannot start {argv[0]!r}: {exc.strerror or exc}"
            self.service.finish(self.uid, number, "failed", message)
            self._streak = next_streak(self._streak, "failed", message)
            self._summary_at = 0.0  # counts changed
            self._event(f"trial {number} failed: {message}")
            return
        self.paths.pid(number).write_text(f"{process.pid}\n")
        log_handle = LineLog(log_path)
        collector = Collector(
            metrics_path,
            StopOnAnswer(
                ServiceReporter(self.service, self.uid, number, token),
                lambda reason: self._stop_early(number, reason),
            ),
            log_handle.write,
            # A busy store is retried, but Ctrl-C must still get through.
            interrupted=lambda: self.interrupted > 0,
            log_deliveries=False,
        )
        limit = self.spec.trialTimeoutSeconds
        deadline = None if limit is None else process.started + limit
        self.active[number] = _Active(number, params, process, collector, deadline=deadline)
        verb = "re-started (interrupted earlier)" if resumed else "started"
        self._event(f"trial {number} {verb}: {format_params(params)}")

    # -- watching trials ----------------------------------------------------

    def _poll_all(self) -> None:
        # No polling of the service's stop orders: here every stop is decided
        # on the trial's own report, and its answer stops the trial (StopOnAnswer).
        # Nor a timer per trialTimeoutSeconds: each poll checks the deadlines,
        # so a trial is stopped within a poll of its own.
        for trial in list(self.active.values()):
            self._take(trial, trial.collector.collect())
            code = trial.process.poll()
            if code is not None:
                self._finish(trial, code)
            elif (
                trial.deadline is not None
                and not trial.process.terminating
                and time.monotonic() >= trial.deadline
            ):
                self._time_out(trial)

    def _time_out(self, trial: _Active) -> None:
        """The trial ran past ``trialTimeoutSeconds``: SIGTERM it now, and note why on disk."""
        trial.timed_out = True
        # Before the signal: a run that dies before the trial does must not re-run it.
        self.paths.timed_out(trial.number).write_text(f"{self.spec.trialTimeoutSeconds}\n")
        trial.process.terminate(self.grace)

    def _stop_early(self, number: int, reason: str) -> None:
        """The early-stopping rule stopped trial ``number``: SIGTERM it now."""
        trial = self.active.get(number)
        if trial is None or trial.stop_reason is not None or trial.interrupted or trial.timed_out:
            return
        trial.stop_reason = reason or "stopped by the early-stopping rule"
        trial.process.terminate(self.grace)

    def _take(self, trial: _Active, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            report = delivery.report
            if self.metric in report.metrics:
                trial.saw_objective = True
                trial.last_step = report.step
                trial.last_value = report.metrics[self.metric]

    def _finish(self, trial: _Active, code: int) -> None:
        # The writer is gone: whatever it left, even without a final newline, counts.
        self._take(trial, trial.collector.collect(final=True))
        del self.active[trial.number]
        self.paths.pid(trial.number).unlink(missing_ok=True)
        if trial.interrupted:
            # Left running in the store: the next run re-runs it.
            self._event(f"trial {trial.number} interrupted ({describe_exit(code)}); it will re-run")
            return
        end = trial_end(
            code,
            stop_reason=trial.stop_reason,
            saw_objective=trial.saw_objective,
            metric=self.metric,
            log_tail=tail(self.paths.log(trial.number)),
            metrics_tail=tail(self.paths.metrics(trial.number), lines=3),
            timed_out_after=self.spec.trialTimeoutSeconds if trial.timed_out else None,
        )
        view = self.service.finish(self.uid, trial.number, end.state, end.message)
        self.paths.timed_out(trial.number).unlink(missing_ok=True)
        self._summary_at = 0.0  # counts changed
        self._streak = next_streak(self._streak, view.state, end.message)
        if view.state == "succeeded":
            text = f"succeeded: {self.metric}={format_objective(view.objective)}"
            if view.last_step is not None:
                text += f" at step {view.last_step}"
        elif view.state == "pruned":
            where = "before its first report"
            if trial.last_step is not None:
                where = f"at step {trial.last_step}"
            text = f"pruned {where}: {end.message}"
        else:
            # The whole message: its first line ends "last lines of its log:".
            message = view.message or end.message or ""
            text = f"{view.state} (log: {self.paths.log(trial.number)}): {message}"
        self._event(f"trial {trial.number} {text}")

    def _stop_all(self, reason: str | None) -> None:
        """Terminate every running trial: with a reason when the experiment ended, else Ctrl-C."""
        for trial in self.active.values():
            if trial.process.poll() is not None:
                continue  # it ended on its own: recorded as usual by the next poll
            if trial.timed_out:
                continue  # being stopped already, and recorded failed even after Ctrl-C
            if reason is None:
                trial.interrupted = True
            elif trial.stop_reason is None:
                trial.stop_reason = reason
            trial.process.terminate(self.grace)

    def _wait_all(self) -> None:
        while self.active:
            for trial in list(self.active.values()):
                code = trial.process.poll()
                if code is not None:
                    self._finish(trial, code)
            time.sleep(0.02)

    # -- experiment state ---------------------------------------------------

    def _summary_now(self, force: bool = False) -> ExperimentSummary:
        now = time.monotonic()
        if force or self._summary is None or now - self._summary_at >= _SUMMARY_INTERVAL:
            self._summary = self.service.summary(self.uid)
            self._summary_at = now
        return self._summary

    def _outcome(self, refresh: bool = False) -> ExperimentOutcome | None:
        summary = self._summary_now(force=refresh)
        best = summary.best.objective if summary.best is not None else None
        counts = {str(state): n for state, n in summary.counts.items()}
        # ``ask`` says exhausted once every number up to maxTrials is handed
        # out too; only a sampler that ran dry with nothing left running ends it early.
        exhausted = (
            self._exhausted
            and not self.active
            and not self.resume_queue
            and summary.allocated < self.spec.maxTrials
        )
        return experiment_outcome(self.spec, counts, best, exhausted=exhausted, streak=self._streak)

    def _snapshot(self) -> Snapshot:
        summary = self._summary_now()
        best = summary.best
        return Snapshot(
            name=self.manifest.name,
            metric=self.metric,
            elapsed=time.monotonic() - self.started,
            max_trials=self.spec.maxTrials,
            counts={str(state): n for state, n in summary.counts.items()},
            best=None if best is None else Best(best.number, best.params, best.objective),
            running=[
                RunningTrial(
                    number=t.number,
                    params=t.params,
                    seconds=time.monotonic() - t.process.started,
                    last_step=t.last_step,
                    last_value=t.last_value,
                    stopping=t.process.terminating,
                )
                for t in self.active.values()
            ],
        )

    def _event(self, text: str) -> None:
        self.display.event(text, self._snapshot())

    def _result(
        self, status: str, reason: str, summary: ExperimentSummary | None = None
    ) -> RunResult:
        final = summary or self._summary_now(force=True)
        self.display.close(self._snapshot())
        return RunResult(
            name=self.manifest.name,
            uid=self.uid,
            status=status,
            reason=reason,
            summary=final,
            metric=self.metric,
            direction=str(self.spec.objective.direction),
            paths=self.paths,
            elapsed=time.monotonic() - self.started,
        )
