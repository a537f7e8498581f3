"""``kubetune run``: an Experiment manifest run on one machine.

Each trial is a local process started from the template's first container,
up to ``parallelism`` at once. Everything else is the product's own machinery,
in-process: the ``TuningService`` over a SQLite store under ``--dir`` asks,
records and decides, and a :class:`~kubetune_suggestion.collector.Collector`
per trial tails its metrics file exactly as the cluster sidecar does.

The loop is single-threaded and polls (every 0.02 s by default): a stop the
service decides on a trial's report reaches the trial within a poll of that
report, and one thread leaves nothing to lock. The stop itself is sent the
moment the service answers the deciding report (:class:`_StopOnAnswer`), not
after the rest of the trial's new reports were forwarded.

Files, for experiment ``NAME`` under ``--dir`` (default ``.kubetune``)::

    NAME.db                 the store (SQLite): experiments, trials, observations
    NAME.lock               held while a run is going (one runner per experiment)
    NAME/trial-N.log        the trial's stdout and stderr (one header line per attempt)
    NAME/trial-N.metrics    its metrics file (KUBETUNE_METRICS_FILE)
    NAME/trial-N.pid        its running attempt's process id (gone once it ended)
    NAME/trial-N.timedout   it ran past trialTimeoutSeconds and is being stopped

Each trial runs in the manifest's directory (relative paths in ``command``
and ``args`` resolve there), with this process's environment plus the
container's ``env`` values (``valueFrom`` entries need a cluster and are
skipped) and the trial's identity (``KUBETUNE_TRIAL_NUMBER``,
``KUBETUNE_PARAMS``, ``KUBETUNE_METRICS_FILE``...). ``python`` and ``python3``
mean the interpreter running kubetune. ``image``, ``resources`` and
``workingDir`` only matter in a cluster.

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
the run exits 130. Re-running the same command continues the experiment: each
interrupted trial runs again from its start, under the same number and with
the same parameters, and finished trials are never repeated, so the
experiment still ends with ``maxTrials`` trials, each run to its end once. An
interrupted trial that early stopping had already decided to stop is recorded
as pruned instead. (Restarting rather than resuming is deliberate: a training
script has no checkpoint protocol here, and its reports for the steps it
repeats are idempotent in the store.) A second Ctrl-C kills the trials at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, Protocol

from kubetune_suggestion.collector import Ack, Collector, Delivery, Reporter
from kubetune_suggestion.metrics_protocol import Report
from kubetune_suggestion.runner.manifest import Manifest
from kubetune_suggestion.runner.outcome import (
    EXPERIMENT_ENDED,
    ExperimentOutcome,
    experiment_outcome,
    failure_streak,
    grid_exhausted,
    next_streak,
    shown_counts,
    timed_out,
    trial_end,
)
from kubetune_suggestion.runner.process import (
    TrialProcess,
    describe_exit,
    group_alive,
    missing_executable,
    resolve_command,
    tail,
)
from kubetune_suggestion.runner.progress import (
    Best,
    Display,
    RunningTrial,
    Snapshot,
    format_objective,
    format_params,
)
from kubetune_suggestion.runner.reporter import ServiceReporter
from kubetune_suggestion.service.models import (
    AskResult,
    ExperimentSummary,
    ExperimentView,
    StopAnswer,
    StopOrder,
    TrialView,
)
from kubetune_suggestion.spec import ExperimentSpec
from kubetune_suggestion.template import TemplateError, render_container, trial_env

__all__ = [
    "LocalRunner",
    "RunPaths",
    "RunResult",
    "RunnerBusy",
    "TuningServiceLike",
    "experiment_lock",
    "runner_of",
    "stored_result",
    "streak_of",
    "trial_container",
]

LOCAL_NAMESPACE: Final = "local"
# Refresh the counts and best trial from the store this often (seconds).
_SUMMARY_INTERVAL: Final = 0.5
# How long a starting run waits for the lock: `kubetune status` holds it for a
# moment to see whether a run is going.
_LOCK_PATIENCE: Final = 0.5


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


class RunnerBusy(RuntimeError):
    """Another ``kubetune run`` is running the same experiment, or one of its trials."""


@dataclass(frozen=True)
class RunPaths:
    """Where one experiment's local files live."""

    root: Path
    name: str

    @property
    def database(self) -> Path:
        """The SQLite store."""
        return self.root / f"{self.name}.db"

    @property
    def lock(self) -> Path:
        """Held while a run is going."""
        return self.root / f"{self.name}.lock"

    @property
    def trials(self) -> Path:
        """Per-trial logs and metrics files."""
        return self.root / self.name

    def log(self, number: int) -> Path:
        """Trial ``number``'s stdout and stderr."""
        return self.trials / f"trial-{number}.log"

    def metrics(self, number: int) -> Path:
        """Trial ``number``'s metrics file."""
        return self.trials / f"trial-{number}.metrics"

    def timed_out(self, number: int) -> Path:
        """Present from trial ``number``'s timeout until its end is recorded; holds the limit."""
        return self.trials / f"trial-{number}.timedout"

    def pid(self, number: int) -> Path:
        """The process id of trial ``number``'s running attempt (gone once it ended)."""
        return self.trials / f"trial-{number}.pid"

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL of the store."""
        return f"sqlite:///{self.database.resolve()}"


@contextlib.contextmanager
def experiment_lock(paths: RunPaths) -> Iterator[None]:
    """Hold the experiment's lock file for the duration of a run.

    Raises:
        RunnerBusy: Another process holds it.
    """
    paths.root.mkdir(parents=True, exist_ok=True)
    handle: IO[str] = paths.lock.open("a+")
    try:
        if not _try_lock(handle.fileno(), fcntl.LOCK_EX, patience=_LOCK_PATIENCE):
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunnerBusy(
                f"experiment {paths.name!r} is already being run by {holder} "
                f"(lock file {paths.lock})"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the lock


def runner_of(paths: RunPaths) -> str | None:
    """Who runs the experiment now (``pid N``), or None when no run is going.

    The lock, not the pid it names, tells: the kernel releases it when the
    runner exits, however it exits (``kill -9`` included).
    """
    try:
        handle = paths.lock.open("r")
    except FileNotFoundError:
        return None
    with handle:
        if _try_lock(handle.fileno(), fcntl.LOCK_SH, patience=0.0):
            return None  # closing the file releases the probe at once
        return handle.read().strip() or "another process"


def _try_lock(fd: int, kind: int, *, patience: float) -> bool:
    """Take ``flock(kind)`` without blocking, retrying for ``patience`` seconds."""
    end = time.monotonic() + patience
    while True:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= end:
                return False
            time.sleep(0.02)


def trial_container(manifest: Manifest) -> Mapping[str, Any]:
    """The container a trial process is started from, once its program is known to exist.

    Checked before any trial starts: a missing program would fail every trial
    within a second.

    Raises:
        TemplateError: Naming the field: no command, or a program that cannot start.
    """
    field = "spec.template.spec.containers[0]"
    containers = (manifest.spec.template.get("spec") or {}).get("containers") or []
    container = containers[0]
    if not isinstance(container, Mapping):
        raise TemplateError(field, "must be a container")
    argv = [*(container.get("command") or []), *(container.get("args") or [])]
    if not argv:
        raise TemplateError(
            f"{field}.command",
            "kubetune run needs a command: an image's entrypoint does not exist locally",
        )
    program = resolve_command(argv)[0]
    if "${" in program:
        return container  # a parameter picks the program: each trial finds out
    env = {e.get("name"): e.get("value") for e in container.get("env") or [] if "value" in e}
    search_path = env.get("PATH") or os.environ.get("PATH")
    problem = missing_executable(program, manifest.directory, search_path)
    if problem is not None:
        where = "command[0]" if container.get("command") else "args[0]"
        raise TemplateError(f"{field}.{where}", problem)
    return container


@dataclass(frozen=True)
class RunResult:
    """How a run ended, or where a stored experiment stands (``kubetune status``).

    Attributes:
        name: The experiment's name.
        uid: Its UID in the store.
        status: ``succeeded``, ``failed``, ``interrupted`` (it has not ended
            and no run is going: run the manifest again to continue) or
            ``running`` (a ``kubetune run`` is running it now).
        reason: In words.
        summary: The store's summary at the end.
        metric: The objective metric's name.
        direction: ``minimize`` or ``maximize``.
        paths: Where its files are.
        elapsed: Seconds this run took (None from ``kubetune status``).
    """

    name: str
    uid: str
    status: str
    reason: str
    summary: ExperimentSummary
    metric: str
    direction: str
    paths: RunPaths
    elapsed: float | None

    @property
    def exit_code(self) -> int:
        """0 succeeded, 1 failed, 130 interrupted (the shell's code for Ctrl-C)."""
        return {"succeeded": 0, "failed": 1}.get(self.status, 130)

    @property
    def counts(self) -> dict[str, int]:
        """Trials by state (``interrupted`` for those an ended run left ``running``)."""
        stored = {str(state): n for state, n in self.summary.counts.items()}
        return shown_counts(stored, runner_alive=self.status == "running")

    def to_json(self) -> dict[str, Any]:
        """The ``-o json`` document of ``run`` and ``status`` alike (the README's schema)."""
        best = self.summary.best
        return {
            "experiment": self.name,
            "uid": self.uid,
            "status": self.status,
            "reason": self.reason,
            "objective": {"metric": self.metric, "direction": self.direction},
            "best": None
            if best is None
            else {"trial": best.number, "params": best.params, "objective": best.objective},
            "counts": self.counts,
            "trials": self.summary.done,
            "maxTrials": self.summary.max_trials,
            "store": str(self.paths.database),
            "logs": str(self.paths.trials),
            "elapsedSeconds": None if self.elapsed is None else round(self.elapsed, 3),
        }


def streak_of(trials: Sequence[TrialView]) -> int:
    """How many of the last trials to finish failed in a row."""
    ended = sorted(
        (t.finished_at, t.number, str(t.state), t.message)
        for t in trials
        if t.finished_at is not None
    )
    return failure_streak([(state, message) for _, _, state, message in ended])


def stored_result(
    name: str,
    summary: ExperimentSummary,
    trials: Sequence[TrialView],
    spec: ExperimentSpec,
    paths: RunPaths,
) -> RunResult:
    """Where a stored experiment stands, decided as ``kubetune run`` decides its end."""
    holder = runner_of(paths)
    counts = {str(state): n for state, n in summary.counts.items()}
    best = summary.best.objective if summary.best is not None else None
    unfinished = counts.get("running", 0) + counts.get("pending", 0)
    exhausted = not unfinished and grid_exhausted(spec, summary.allocated)
    outcome = experiment_outcome(spec, counts, best, exhausted=exhausted, streak=streak_of(trials))
    if holder is not None:
        status, reason = "running", f"{holder} is running it"
    elif outcome is None:
        status, reason = "interrupted", "not ended; run its manifest again to continue"
    else:
        status = "succeeded" if outcome.succeeded else "failed"
        reason = outcome.reason
    return RunResult(
        name=name,
        uid=summary.uid,
        status=status,
        reason=reason,
        summary=summary,
        metric=spec.objective.metric,
        direction=str(spec.objective.direction),
        paths=paths,
        elapsed=None,
    )


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
        self._resume()
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

    def _resume(self) -> None:
        """Queue trials a previous, interrupted run left running, or asked for and never started.

        Every ask allocates new trials, so the ones a run was handed before it
        died are only ever this run's to start.
        """
        orphans = [t for t in self.service.trials(self.uid) if t.state in ("pending", "running")]
        if not orphans:
            return
        stops = {s.number: s.reason for s in self.service.stops(self.uid)}
        for trial in orphans:
            self._check_gone(trial.number)
        for trial in orphans:
            limit = self._timed_out_earlier(trial.number)
            if limit is not None:
                # Its clock ran out in an earlier run: re-running it would restart it.
                end = timed_out(limit, tail(self.paths.log(trial.number)))
                self.service.finish(self.uid, trial.number, end.state, end.message)
                self.paths.timed_out(trial.number).unlink(missing_ok=True)
            elif trial.number in stops:
                self.service.finish(self.uid, trial.number, "pruned", stops[trial.number])
            else:
                self.resume_queue.append(trial)

    def _timed_out_earlier(self, number: int) -> int | None:
        """The limit trial ``number`` ran past in an earlier run that ended before recording it."""
        path = self.paths.timed_out(number)
        if not path.exists():
            return None
        text = path.read_text().strip()
        # Empty if that run died writing it; the spec holds the same limit.
        return int(text) if text.isdigit() else self.spec.trialTimeoutSeconds

    def _check_gone(self, number: int) -> None:
        """Refuse to go on while an earlier run's process of trial ``number`` is alive.

        A second copy would train beside it and write into the same metrics file.

        Raises:
            RunnerBusy: Naming the process group to stop.
        """
        try:
            pid = int(self.paths.pid(number).read_text())
        except (FileNotFoundError, ValueError):
            return
        if group_alive(pid):
            raise RunnerBusy(
                f"trial {number} of an earlier run is still running (process group {pid}); "
                f"stop it (kill -- -{pid}) and run again"
            )

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
        container = render_container(
            self._container, params, declared, "spec.template.spec.containers[0]"
        )
        argv = resolve_command([*(container.get("command") or []), *(container.get("args") or [])])
        metrics_path = self.paths.metrics(number)
        # A fresh file per attempt: a re-run trial starts its reports over.
        metrics_path.unlink(missing_ok=True)
        env = dict(os.environ)
        env.update({e["name"]: e["value"] for e in container.get("env") or [] if "value" in e})
        env.update(
            trial_env(
                experiment=self.manifest.name,
                experiment_uid=self.uid,
                trial_number=number,
                params=params,
                metrics_file=str(metrics_path.resolve()),
            )
        )
        # Live logs: Python buffers stdout when it is not a terminal.
        env.setdefault("PYTHONUNBUFFERED", "1")
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
        log_handle = _LineLog(log_path)
        collector = Collector(
            metrics_path,
            _StopOnAnswer(
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
        # on the trial's own report, and its answer stops the trial (_StopOnAnswer).
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


class _StopOnAnswer:
    """A trial's reporter that acts on a stop answer the moment the service gives it.

    The collector forwards a batch of reports before handing back their
    answers; a trial behind by a few reports would otherwise keep training
    while the rest of its batch is stored.
    """

    def __init__(self, reporter: Reporter, stop: Callable[[str], None]) -> None:
        self.reporter = reporter
        self.stop = stop

    def send(self, report: Report) -> Ack:
        """Forward ``report``; stop the trial if the answer says so."""
        ack = self.reporter.send(report)
        if ack.stop:
            self.stop(ack.reason)
        return ack


class _LineLog:
    """Appends the collector's remarks (skipped lines, rejected reports) to the trial's log."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, line: str) -> None:
        # O_APPEND: whole lines land between the trial's own writes.
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(f"[kubetune] {line}\n")
