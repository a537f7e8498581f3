"""What the service reads back for its API: summaries and trials, from the store."""

from __future__ import annotations

from kubetune_suggestion.engine.history import Direction
from kubetune_suggestion.service import logic
from kubetune_suggestion.service.errors import NotFound
from kubetune_suggestion.service.models import (
    BestTrial,
    ExperimentSummary,
    ObservationView,
    TrialState,
    TrialView,
)
from kubetune_suggestion.spec import ExperimentSpec
from kubetune_suggestion.store import ExperimentRow, Store


def summary(store: Store, row: ExperimentRow, spec: ExperimentSpec) -> ExperimentSummary:
    """Counts by state, the best trial, and whether the experiment ``row`` is complete."""
    counts = store.count_states(row.id)
    best_row = store.best_trial(row.id, spec.objective.direction is Direction.MAXIMIZE)
    best = None
    if best_row is not None and best_row.objective is not None:
        best = BestTrial(
            number=best_row.number, params=best_row.params, objective=best_row.objective
        )
    reason = logic.completion_reason(
        spec, counts, row.next_number, best.objective if best else None
    )
    return ExperimentSummary(
        uid=row.uid,
        name=row.name,
        namespace=row.namespace,
        counts={s: counts.get(s.value, 0) for s in TrialState},
        best=best,
        allocated=row.next_number,
        done=sum(n for s, n in counts.items() if TrialState(s).finished),
        max_trials=spec.maxTrials,
        complete=reason is not None,
        complete_reason=reason,
    )


def trials(store: Store, experiment_id: int, observations: bool) -> list[TrialView]:
    """Every trial of the experiment by number, with every report when ``observations``."""
    reports = store.observations(experiment_id) if observations else {}
    return [
        logic.trial_view(
            t,
            last_step,
            [ObservationView(step=s, metrics=m) for s, m in reports.get(t.number, [])]
            if observations
            else None,
        )
        for t, last_step in store.trials(experiment_id)
    ]


def trial(store: Store, experiment_id: int, uid: str, number: int) -> TrialView:
    """One trial of the experiment.

    Raises:
        NotFound: If the experiment has no such trial.
    """
    found = store.trial(experiment_id, number)
    if found is None:
        raise NotFound(f"experiment {uid!r} has no trial {number}", field="number")
    return logic.trial_view(found, store.last_step(found.id), None)
