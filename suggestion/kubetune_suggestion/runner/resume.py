"""Taking over an experiment from an earlier ``kubetune run`` that was interrupted.

Re-running the same command continues the experiment: each interrupted trial
runs again from its start, under the same number and with the same
parameters, and finished trials are never repeated, so the experiment still
ends with ``maxTrials`` trials, each run to its end once. An interrupted
trial that early stopping had already decided to stop is recorded as pruned
instead, and one that had run past ``trialTimeoutSeconds`` (its ``.timedout``
file says so) is recorded failed rather than re-run. (Restarting rather than
resuming is deliberate: a training script has no checkpoint protocol here,
and its reports for the steps it repeats are idempotent in the store.)
"""

from __future__ import annotations

from typing import Protocol

from kubetune_suggestion.runner.files import RunnerBusy, RunPaths
from kubetune_suggestion.runner.outcome import timed_out
from kubetune_suggestion.runner.process import group_alive, tail
from kubetune_suggestion.service.models import StopOrder, TrialView

__all__ = ["trials_to_rerun"]


class _SettlesTrials(Protocol):
    """The part of ``TuningService`` taking over needs."""

    def trials(self, uid: str) -> list[TrialView]: ...

    def stops(self, uid: str) -> list[StopOrder]: ...

    def finish(
        self, uid: str, number: int, state: str, message: str | None = None
    ) -> TrialView: ...


def trials_to_rerun(
    service: _SettlesTrials, uid: str, paths: RunPaths, limit: int | None
) -> list[TrialView]:
    """Trials an earlier run left running, or asked for and never started: those to run again.

    Every ask allocates new trials, so the ones a run was handed before it
    died are only ever this run's to start. Those that timed out or were
    marked to stop are recorded as ended here instead.

    Args:
        service: The in-process tuning service.
        uid: The experiment's UID.
        paths: Where its files are.
        limit: ``spec.trialTimeoutSeconds``, for a ``.timedout`` file left empty.

    Raises:
        RunnerBusy: A process of the earlier run is still alive.
    """
    orphans = [t for t in service.trials(uid) if t.state in ("pending", "running")]
    if not orphans:
        return []
    stops = {s.number: s.reason for s in service.stops(uid)}
    for trial in orphans:
        _check_gone(paths, trial.number)
    rerun = []
    for trial in orphans:
        ran_past = _timed_out_earlier(paths, trial.number, limit)
        if ran_past is not None:
            # Its clock ran out in an earlier run: re-running it would restart it.
            end = timed_out(ran_past, tail(paths.log(trial.number)))
            service.finish(uid, trial.number, end.state, end.message)
            paths.timed_out(trial.number).unlink(missing_ok=True)
        elif trial.number in stops:
            service.finish(uid, trial.number, "pruned", stops[trial.number])
        else:
            rerun.append(trial)
    return rerun


def _timed_out_earlier(paths: RunPaths, number: int, limit: int | None) -> int | None:
    """The limit trial ``number`` ran past in an earlier run that ended before recording it."""
    path = paths.timed_out(number)
    if not path.exists():
        return None
    text = path.read_text().strip()
    # Empty if that run died writing it; the spec holds the same limit.
    return int(text) if text.isdigit() else limit


def _check_gone(paths: RunPaths, number: int) -> None:
    """Refuse to go on while an earlier run's process of trial ``number`` is alive.

    A second copy would train beside it and write into the same metrics file.

    Raises:
        RunnerBusy: Naming the process group to stop.
    """
    try:
        pid = int(paths.pid(number).read_text())
    except (FileNotFoundError, ValueError):
        return
    if group_alive(pid):
        raise RunnerBusy(
            f"trial {number} of an earlier run is still running (process group {pid}); "
            f"stop it (kill -- -{pid}) and run again"
        )
