"""Storing reports and deciding stops, inside one write transaction.

:meth:`~.core.TuningService.report_batch` checks the reports (token, step,
metrics) and calls :func:`store_reports` in its transaction: every report of
the batch is stored with one statement, the reporting trials are marked
running, and the early-stopping rule decides on each report that carries the
objective, from one load of the experiment's intermediate values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from kubetune_suggestion.service import logic
from kubetune_suggestion.service import metrics as prom
from kubetune_suggestion.service.compiled import Compiled
from kubetune_suggestion.service.errors import Conflict, NotFound, ServiceError
from kubetune_suggestion.service.models import StopAnswer, TrialState
from kubetune_suggestion.store import StepRow, TrialRow, WriteTxn


@dataclass(frozen=True)
class Report:
    """One observation to store (the arguments of :meth:`~.core.TuningService.report`)."""

    uid: str
    number: int
    # The trial's token (None when the request carried none).
    token: str | None
    step: int
    metrics: Mapping[str, Any]


@dataclass(frozen=True)
class CheckedReport:
    """A report whose token, step and metrics were checked: its place in the batch too."""

    index: int
    report: Report
    step: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class _Accepted:
    """A checked report of an open trial, about to be stored."""

    index: int
    step: int
    metrics: dict[str, float]
    experiment_id: int
    compiled: Compiled
    trial: TrialRow
    objective: float | None


def finished_conflict(number: int, state: str) -> Conflict:
    """The answer to a report of a trial that finished."""
    return Conflict(
        f"trial {number} already finished ({state}); reports are no longer accepted",
        field="number",
    )


def store_reports(
    tx: WriteTxn,
    checked: Sequence[CheckedReport],
    compiled: Callable[[WriteTxn, int, int], Compiled],
    results: list[StopAnswer | ServiceError | None],
) -> int:
    """Store checked reports and decide stops, filling ``results`` (by index) in place.

    ``compiled(tx, experiment_id, spec_version)`` gives an experiment's
    compiled spec. Returns how many observations were stored (a repeated
    step is acknowledged and not stored again).
    """
    accepted = _lock_trials(tx, checked, compiled, results)
    stored = tx.store_reports([(a.trial.id, a.step, a.metrics, a.objective) for a in accepted])
    # A report starts its trial if pending and renews its lease, if it has one.
    tx.mark_running(
        a.trial.id
        for a in accepted
        if a.trial.state != TrialState.RUNNING or a.trial.lease_seconds is not None
    )
    # One load of intermediate values per experiment serves every decision.
    top_step: dict[int, int] = {}
    for a in accepted:
        if a.compiled.rule is not None and a.objective is not None:
            top_step[a.experiment_id] = max(a.step, top_step.get(a.experiment_id, a.step))
    curves = {e: tx.step_history(e, top) for e, top in top_step.items()}
    stopped: dict[int, str] = {}
    for a in accepted:
        reason = a.trial.stop_reason or stopped.get(a.trial.id)
        if reason is not None:
            results[a.index] = StopAnswer(stop=True, reason=reason)
        elif (a.trial.id, a.step) in stored and a.experiment_id in curves:
            answer = decide(tx, a.compiled, curves[a.experiment_id], a.trial, a.step)
            if answer.stop:
                stopped[a.trial.id] = answer.reason
                # Its later reports in this batch no longer count for the others.
                curves[a.experiment_id] = [
                    replace(c, stop_step=a.step) if c.number == a.trial.number else c
                    for c in curves[a.experiment_id]
                ]
            results[a.index] = answer
        else:
            results[a.index] = StopAnswer(stop=False)
    return len(stored)


def _lock_trials(
    tx: WriteTxn,
    checked: Sequence[CheckedReport],
    compiled: Callable[[WriteTxn, int, int], Compiled],
    results: list[StopAnswer | ServiceError | None],
) -> list[_Accepted]:
    """Lock the reporting trials; the reports of open ones, errors for the others."""
    numbers: dict[str, set[int]] = {}
    for c in checked:
        numbers.setdefault(c.report.uid, set()).add(c.report.number)
    # Experiments in a fixed order too, so batches spanning several cannot deadlock.
    found = {uid: tx.lock_trials_of(uid, sorted(numbers[uid])) for uid in sorted(numbers)}
    accepted = []
    for c in checked:
        hit = found[c.report.uid].get(c.report.number)
        if hit is None:
            results[c.index] = not_found(tx, c.report.uid, c.report.number)
            continue
        experiment_id, spec_version, trial = hit
        if TrialState(trial.state).finished:
            results[c.index] = finished_conflict(c.report.number, trial.state)
            continue
        engine = compiled(tx, experiment_id, spec_version)
        objective = c.metrics.get(engine.spec.objective.metric)
        accepted.append(
            _Accepted(c.index, c.step, c.metrics, experiment_id, engine, trial, objective)
        )
    return accepted


def not_found(tx: WriteTxn, uid: str, number: int) -> NotFound:
    """The 404 for trial ``number`` of ``uid``: naming the experiment or the trial."""
    if tx.experiment_id(uid) is None:
        return NotFound(f"no experiment {uid!r}", field="uid")
    return NotFound(f"experiment {uid!r} has no trial {number}", field="number")


def decide(
    tx: WriteTxn, compiled: Compiled, rows: Sequence[StepRow], trial: TrialRow, step: int
) -> StopAnswer:
    """Run the early-stopping rule for ``trial`` after its report at ``step``.

    ``rows`` holds the experiment's intermediate values (possibly beyond
    ``step``, when a batch holds later reports): the rule sees them up to
    ``step``, as if the reports had come one by one. A stop is recorded.
    """
    assert compiled.rule is not None
    me, history = logic.stop_inputs(
        ((r.number, r.state, r.objective, r.step, r.value, r.stop_step) for r in rows),
        trial.number,
        trial.params,
        step,
    )
    decision = compiled.rule.decide(me, history)
    if not decision.stop:
        return StopAnswer(stop=False)
    reason = decision.reason or f"stopped by {compiled.rule.name}"
    tx.add_stop_order(trial.id, reason, step)
    prom.STOP_DECISIONS.labels(compiled.rule.name).inc()
    return StopAnswer(stop=True, reason=reason)
