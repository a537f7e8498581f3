"""How a trial ends: pure rules of ``finish`` (no database, no HTTP).

What state, objective and message a finish records from the trial's reports,
and whether a repeated finish matches the first one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from kubetune_suggestion.service import logic
from kubetune_suggestion.service.errors import Conflict, InvalidInput
from kubetune_suggestion.service.models import TrialState
from kubetune_suggestion.spec import ExperimentSpec
from kubetune_suggestion.store import TrialRow


def check_repeat(
    spec: ExperimentSpec,
    trial: TrialRow,
    final: TrialState,
    message: str | None,
    report: FinalReport | None,
    observed: Sequence[tuple[int, float | None]],
) -> None:
    """Check that finishing the finished ``trial`` again so would record what it did.

    A repeat is compared with what the first finish recorded: the state it
    would end in (so ``succeeded`` again of a trial that became
    ``metrics_unavailable`` is the same finish), the message when it gives
    one, and with a final report, the objective value stored at its step (the
    last one when it names none).

    Raises:
        Conflict: Saying what is stored, if anything differs.
    """
    objective_metric = spec.objective.metric
    differs = []
    state, _, recorded, _ = ending(spec, final, message, observed, trial)
    if state.value != trial.state:
        differs.append(f"state ({final.value})")
    elif message is not None and recorded != trial.message:
        differs.append("message")
    if report is not None:
        values = dict(observed)
        step = report.step if report.step is not None else max(values, default=None)
        value = report.metrics.get(objective_metric)
        if step is None or step not in values or values[step] != value:
            differs.append(f"final report ({objective_metric}={value} at step {step})")
    if not differs:
        return
    stored = f"state {trial.state}, objective {trial.objective}"
    if trial.message:
        text = trial.message if len(trial.message) <= 200 else trial.message[:200] + "..."
        stored += f", message {text!r}"
    raise Conflict(
        f"trial {trial.number} already finished ({stored}); "
        f"this finish differs in its {' and '.join(differs)}",
        field="state" if state.value != trial.state else "metrics" if report else "message",
    )


def check_final_report(spec: ExperimentSpec, final: TrialState, report: FinalReport | None) -> None:
    """Refuse the final report of a ``succeeded`` finish that lacks the objective.

    Stored, it would end the trial ``metrics_unavailable`` for good over what
    is most likely a misspelt metric name. Other ends may carry any metrics
    (a failed trial's last report rarely has a result).

    Raises:
        InvalidInput: Naming the objective metric.
    """
    metric = spec.objective.metric
    if final is TrialState.SUCCEEDED and report is not None and metric not in report.metrics:
        raise InvalidInput(
            f"metrics must include the objective {metric!r} "
            f"(got {', '.join(sorted(report.metrics))})",
            field=f"metrics.{metric}",
        )


@dataclass(frozen=True)
class FinalReport:
    """A finish's final report, checked: its step (None: after the last) and metrics."""

    step: int | None
    metrics: dict[str, float]


def with_final(
    spec: ExperimentSpec,
    observed: Sequence[tuple[int, float | None]],
    report: FinalReport | None,
) -> tuple[Sequence[tuple[int, float | None]], tuple[int, dict[str, float], float | None] | None]:
    """The trial's reports (step, objective) with ``report``, and what of it to store.

    Nothing to store without a report, or when its step was reported already
    (a repeated step is kept as first stored, as :meth:`TuningService.report` does).
    """
    if report is None:
        return observed, None
    step = report.step
    if step is None:
        step = observed[-1][0] + 1 if observed else 0
    elif any(s == step for s, _ in observed):
        return observed, None
    value = report.metrics.get(spec.objective.metric)
    merged = sorted([*observed, (step, value)], key=lambda o: o[0])
    return merged, (step, report.metrics, value)


def ending(
    spec: ExperimentSpec,
    final: TrialState,
    message: str | None,
    observed: Sequence[tuple[int, float | None]],
    trial: TrialRow,
) -> tuple[TrialState, float | None, str | None, int | None]:
    """(state, objective, message, stop step) a trial ends with, from its reports (step, objective).

    A ``pruned`` trial that had reported its objective at its last step
    (``maxResource``) ran to its end before its stop took effect: it ends
    ``succeeded``, the stop withdrawn (see :func:`logic.ran_to_the_end`).
    A ``pruned`` one counts its reports up to the step its stop was decided
    on (see :func:`logic.counted`); pruned without a decision, the step it
    was pruned at is its last with the objective.
    """
    if final is TrialState.PRUNED and logic.ran_to_the_end(spec, observed):
        final = TrialState.SUCCEEDED
        message = logic.stop_not_applied(spec, trial.stop_reason)
    objective = None
    values = logic.counted(observed, final.value, trial.stop_step)
    if final in (TrialState.SUCCEEDED, TrialState.PRUNED):
        objective = logic.final_objective(values, spec.objective.strategy)
    stop_step = trial.stop_step
    if final is TrialState.PRUNED and stop_step is None and values:
        stop_step = max(step for step, _ in values)
    if final is TrialState.SUCCEEDED and objective is None:
        final = TrialState.METRICS_UNAVAILABLE
        message = message or f"the trial never reported its objective {spec.objective.metric!r}"
    return final, objective, message, stop_step


def ended(
    trial: TrialRow,
    final: TrialState,
    objective: float | None,
    message: str | None,
    now: datetime,
    stop_step: int | None,
) -> TrialRow:
    """``trial`` as its end at ``now`` wrote it."""
    return replace(
        trial,
        stop_step=stop_step,
        state=final.value,
        objective=objective,
        message=message,
        started_at=trial.started_at or now,
        finished_at=now,
    )


def final_state(state: str) -> TrialState:
    """The state a finish ends a trial in.

    Raises:
        InvalidInput: For a state that is not a final one.
    """
    try:
        final = TrialState(state)
    except ValueError:
        final = TrialState.PENDING
    if not final.finished:
        raise InvalidInput(
            f"state must be one of succeeded, failed, pruned, metrics_unavailable; got {state!r}",
            field="state",
        )
    return final
