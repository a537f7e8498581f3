"""Pure decisions of the service layer: no database, no HTTP.

Kept apart from :mod:`~kubetune_suggestion.service.core` so they are tested
as plain functions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from kubetune_suggestion.engine.history import Direction, RecordState, TrialRecord
from kubetune_suggestion.engine.space import SearchSpace, SpaceError
from kubetune_suggestion.experiment_end import (
    EndReason,
    ExperimentEnd,
    TrialCounts,
    experiment_end,
)
from kubetune_suggestion.service.errors import Conflict, InvalidInput
from kubetune_suggestion.service.models import (
    ObservationView,
    RestoreTrial,
    TrialState,
    TrialView,
)
from kubetune_suggestion.spec import ExperimentSpec, Strategy
from kubetune_suggestion.store import RestoredTrial, TrialRow

_ENGINE_STATES = {
    TrialState.PENDING: RecordState.RUNNING,
    TrialState.RUNNING: RecordState.RUNNING,
    TrialState.SUCCEEDED: RecordState.SUCCEEDED,
    TrialState.FAILED: RecordState.FAILED,
    TrialState.METRICS_UNAVAILABLE: RecordState.FAILED,
    TrialState.PRUNED: RecordState.PRUNED,
}
MAX_METRIC_NAME = 128
MAX_METRICS = 256


def engine_state(state: str) -> RecordState:
    """What the engine sees of a stored state."""
    return _ENGINE_STATES[TrialState(state)]


def trial_record(
    number: int,
    params: Mapping[str, Any],
    state: str,
    objective: float | None,
    stop_step: int | None = None,
) -> TrialRecord:
    """A stored trial as samplers see it.

    A pruned trial carries ``{stop_step: objective}`` as its steps: TPE ranks
    pruned trials by the step they reached first, as Optuna does. Other
    trials carry no steps: samplers do not need their curves.
    """
    value = objective if state in (TrialState.SUCCEEDED, TrialState.PRUNED) else None
    steps = {}
    if state == TrialState.PRUNED and stop_step is not None and value is not None:
        steps = {stop_step: value}
    return TrialRecord(
        number=number, params=params, state=engine_state(state), value=value, steps=steps
    )


def stored_record(trial: TrialRow) -> TrialRecord:
    """What samplers see of a stored trial."""
    return trial_record(trial.number, trial.params, trial.state, trial.objective, trial.stop_step)


def trial_view(
    trial: TrialRow, last_step: int | None, observations: Sequence[ObservationView] | None
) -> TrialView:
    """The API's view of a stored trial."""
    return TrialView(
        number=trial.number,
        state=TrialState(trial.state),
        params=trial.params,
        objective=trial.objective,
        last_step=last_step,
        stop_reason=trial.stop_reason,
        message=trial.message,
        created_at=trial.created_at,
        started_at=trial.started_at,
        finished_at=trial.finished_at,
        observations=list(observations) if observations is not None else None,
    )


def counted(
    observed: Iterable[tuple[int, float | None]], state: str, stop_step: int | None
) -> list[tuple[int, float]]:
    """A trial's objective values (step, value) that count for its result and for rules.

    Stops are asynchronous: a stopped trial may report steps after the one its
    stop was decided on, sooner or later depending on timing. Those reports do
    not count, so its result and what rules see do not depend on timing;
    unless it succeeded (it reached its last step before the stop took effect).
    """
    cut = stop_step if stop_step is not None and state != TrialState.SUCCEEDED else None
    return [(s, v) for s, v in observed if v is not None and (cut is None or s <= cut)]


def check_step(step: Any) -> int:
    """The report's step, or InvalidInput naming ``step``."""
    if isinstance(step, bool) or not isinstance(step, int):
        raise InvalidInput(f"step must be a whole number, got {step!r}", field="step")
    if step < 0:
        raise InvalidInput(f"step must be >= 0, got {step}", field="step")
    return step


def check_metrics(metrics: Any) -> dict[str, float]:
    """The report's metrics as finite floats, or InvalidInput naming the bad one.

    NaN and infinities are refused rather than stored: a NaN objective would
    poison every comparison an early-stopping rule makes.
    """
    if not isinstance(metrics, Mapping) or not metrics:
        raise InvalidInput("metrics must be a non-empty object of name: number", field="metrics")
    if len(metrics) > MAX_METRICS:
        raise InvalidInput(f"at most {MAX_METRICS} metrics per report", field="metrics")
    clean: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name or len(name) > MAX_METRIC_NAME:
            raise InvalidInput(
                f"metric name {name!r} must be 1-{MAX_METRIC_NAME} characters", field="metrics"
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInput(
                f"metric {name!r} is not a number: {value!r}", field=f"metrics.{name}"
            )
        number = float(value)
        if not math.isfinite(number):
            raise InvalidInput(
                f"metric {name!r} is {value!r}: only finite numbers are accepted",
                field=f"metrics.{name}",
            )
        clean[name] = number
    return clean


def final_objective(values: Sequence[tuple[int, float]], strategy: Strategy) -> float | None:
    """The trial's result from its reported objective values (step, value), by ``strategy``."""
    if not values:
        return None
    if strategy is Strategy.MIN:
        return min(v for _, v in values)
    if strategy is Strategy.MAX:
        return max(v for _, v in values)
    return max(values, key=lambda sv: sv[0])[1]


def ran_to_the_end(spec: ExperimentSpec, observed: Iterable[tuple[int, float | None]]) -> bool:
    """Whether a trial reported its objective at its last step (``maxResource``) or later.

    Stops are asynchronous: a trial ordered to stop may run all its steps
    before the order reaches it. Its last report is then a result at full
    budget, as good as any trial's that was never stopped. Without
    ``maxResource`` there is no known last step, so never.

    Args:
        spec: The experiment's spec.
        observed: The trial's reports, (step, objective value or None).
    """
    last = spec.earlyStopping.maxResource
    return last is not None and any(s >= last and v is not None for s, v in observed)


def stop_not_applied(spec: ExperimentSpec, stop_reason: str | None) -> str:
    """The message of a trial that ran to its end before its stop took effect."""
    why = f" ({stop_reason})" if stop_reason else ""
    return (
        f"reported its last step (maxResource {spec.earlyStopping.maxResource}) before "
        f"its stop{why} took effect: the stop was not applied"
    )


def best_value(spec: ExperimentSpec, objectives: Iterable[float]) -> float | None:
    """The best finite objective, by the spec's direction."""
    finite = [v for v in objectives if math.isfinite(v)]
    if not finite:
        return None
    return min(finite) if spec.objective.direction is Direction.MINIMIZE else max(finite)


def halt_reason(spec: ExperimentSpec, counts: Mapping[str, int], best: float | None) -> str | None:
    """Why no trial may start any more before maxTrials (target reached, too many failures)."""
    end = experiment_end(spec, TrialCounts.from_states(counts), best)
    if end is None or not end.reason.halts:
        return None
    return _halt_message(spec, end)


def completion_reason(
    spec: ExperimentSpec, counts: Mapping[str, int], allocated: int, best: float | None
) -> str | None:
    """Why the experiment is complete (no trial will be started any more), or None if it goes on.

    Complete when it ended (:func:`~kubetune_suggestion.experiment_end.experiment_end`):
    at once for a target reached or too many failures, and once every trial
    handed out has finished for ``maxTrials``.

    Args:
        spec: The experiment's spec.
        counts: Trials by stored state.
        allocated: Trials handed out so far.
        best: The best objective of a succeeded trial so far.
    """
    end = experiment_end(spec, TrialCounts.from_states(counts), best)
    if end is None:
        return None
    if end.reason.halts:
        return _halt_message(spec, end)
    if end.counts.done >= allocated:
        return f"maxTrials ({spec.maxTrials}) reached"
    return None


def _halt_message(spec: ExperimentSpec, end: ExperimentEnd) -> str:
    """How the service words a halt (in ``ask``'s reason and the summary's)."""
    if end.reason is EndReason.GOAL_REACHED:
        return f"objective target {spec.objective.target} reached"
    failures = end.counts.failures
    trials = "trial" if failures == 1 else "trials"
    return f"{failures} {trials} failed (maxFailedTrials is {spec.maxFailedTrials})"


def stop_inputs(
    rows: Iterable[tuple[int, str, float | None, int, float, int | None]],
    number: int,
    params: Mapping[str, Any],
    step: int,
) -> tuple[TrialRecord, list[TrialRecord]]:
    """The trial that just reported at ``step`` and the history an early-stopping rule sees.

    Args:
        rows: (trial number, stored state, objective, step, value, stop step)
            of every intermediate objective value of the experiment; values
            after ``step`` are left out, as if reports had come one by one,
            and so are those that do not count (see :func:`counted`).
        number: The reporting trial.
        params: Its parameters.
        step: The step it reported.
    """
    curves: dict[int, dict[int, float]] = {}
    meta: dict[int, tuple[str, float | None]] = {}
    for trial_number, state, objective, at, value, stop_step in rows:
        if at <= step and counted([(at, value)], state, stop_step):
            curves.setdefault(trial_number, {})[at] = value
            meta[trial_number] = (state, objective)
    history = []
    for trial_number, curve in curves.items():
        state, objective = meta[trial_number]
        if trial_number == number:
            # It is reporting, so it is running, whatever the row said a moment ago.
            state, objective = TrialState.RUNNING, None
        record = trial_record(trial_number, {}, state, objective)
        history.append(
            TrialRecord(trial_number, record.params, record.state, record.value, steps=curve)
        )
    me = TrialRecord(number, params, RecordState.RUNNING, None, steps=curves.get(number, {}))
    return me, history


# Spec fields that cannot change once trials exist: the history would no
# longer mean what the sampler and the rule think it means.
_FROZEN_SPEC_FIELDS = ("objective", "parameters", "algorithm")


def check_spec_change(old: Mapping[str, Any], new: Mapping[str, Any], handed_out: int) -> None:
    """Refuse a spec change that would change what the stored history means.

    Raises:
        Conflict: For a change of objective, parameters or algorithm after
            ``handed_out`` (> 0) trials, naming the field.
    """
    if handed_out == 0:
        return
    for field in _FROZEN_SPEC_FIELDS:
        if old.get(field) != new.get(field):
            raise Conflict(
                f"spec.{field} cannot change after trials were handed out "
                f"({handed_out} so far); create a new Experiment instead",
                field=f"spec.{field}",
            )


def restore_entries(
    items: Sequence[RestoreTrial | Mapping[str, Any]], space: SearchSpace
) -> list[RestoreTrial]:
    """The trials of a restore, checked: each a valid entry, once, with params of ``space``.

    A ``succeeded`` trial needs a finite objective (it is its result); any
    objective given must be finite.

    Raises:
        InvalidInput: Naming the first bad field, e.g. ``trials[3].params.lr``.
    """
    checked: list[RestoreTrial] = []
    seen: dict[int, int] = {}
    for i, item in enumerate(items):
        where = f"trials[{i}]"
        try:
            trial = item if isinstance(item, RestoreTrial) else RestoreTrial.model_validate(item)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = where + "".join(
                f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"]
            )
            raise InvalidInput(f"{field}: {error['msg']}", field=field) from None
        if trial.number in seen:
            raise InvalidInput(
                f"trial {trial.number} is listed twice (trials[{seen[trial.number]}] and {where})",
                field=f"{where}.number",
            )
        seen[trial.number] = i
        try:
            space.check_config(trial.params)
        except SpaceError as exc:
            raise InvalidInput(
                f"trial {trial.number}: parameter {exc.field!r}: {exc.problem}",
                field=f"{where}.params.{exc.field}",
            ) from None
        objective = trial.objective
        if objective is not None and not math.isfinite(objective):
            raise InvalidInput(
                f"trial {trial.number}: objective {objective!r} is not a finite number",
                field=f"{where}.objective",
            )
        if TrialState(trial.state) is TrialState.SUCCEEDED and objective is None:
            raise InvalidInput(
                f"trial {trial.number} succeeded: its objective is required",
                field=f"{where}.objective",
            )
        checked.append(trial)
    return checked


def restored_trials(
    given: Sequence[RestoreTrial], stored: Mapping[int, TrialRow]
) -> list[RestoredTrial]:
    """The trials of a restore to insert: those whose number is not ``stored`` yet.

    A number stored with the same params is left as it is (a restore may be
    repeated). A pruned trial keeps its step as its stop step; the objective
    is kept for scored states only, the stop reason for finished ones.

    Raises:
        Conflict: For a number stored with other params (naming
            ``trials[i].params`` and what is stored).
    """
    new: list[RestoredTrial] = []
    for i, trial in enumerate(given):
        old = stored.get(trial.number)
        if old is not None:
            if old.params != trial.params:
                raise Conflict(
                    f"trial {trial.number} is stored with params {old.params} "
                    f"({old.state}); trials[{i}] gives {trial.params}",
                    field=f"trials[{i}].params",
                )
            continue
        state = TrialState(trial.state)
        scored = state in (TrialState.SUCCEEDED, TrialState.PRUNED)
        new.append(
            RestoredTrial(
                number=trial.number,
                params=trial.params,
                state=state.value,
                objective=trial.objective if scored else None,
                message=trial.message,
                stop_reason=trial.stop_reason if state.finished else None,
                stop_step=trial.step if state is TrialState.PRUNED else None,
            )
        )
    return new
