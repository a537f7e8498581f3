"""``kubetune curves``: every trial's reports step by step, its learning curve.

Pure: :func:`curves_of` turns the stored trials into rows (one per trial and
reported step, one value per metric), which :func:`render_curves` lays out
for people and :func:`csv_rows` for scripts. Reading the store and printing
stay in the CLI.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from kubetune_suggestion.runner.outcome import shown_state
from kubetune_suggestion.runner.progress import format_objective
from kubetune_suggestion.service.models import TrialView

__all__ = ["CSV_FIELDS", "CurveRow", "Curves", "csv_rows", "curves_of", "render_curves"]

# The CSV columns before the metrics.
CSV_FIELDS: Final = ("trial", "state", "step")


@dataclass(frozen=True)
class CurveRow:
    """One report of one trial, or a trial that has reported nothing yet."""

    # The trial's number.
    trial: int
    # Its state as users see it (``interrupted`` for one an ended run left running).
    state: str
    # The report's step; None for a trial without any report.
    step: int | None
    # One value per metric column of :class:`Curves`; None where not reported.
    values: tuple[float | None, ...]


@dataclass(frozen=True)
class Curves:
    """Every trial's reports, by trial number then step."""

    # The metric columns: the objective metric first, then the others by name.
    metrics: tuple[str, ...]
    rows: tuple[CurveRow, ...]


def curves_of(trials: Sequence[TrialView], objective: str, *, runner_alive: bool) -> Curves:
    """The curves of trials read with their observations (``trials(uid, observations=True)``)."""
    others = {
        name
        for trial in trials
        for observation in trial.observations or ()
        for name in observation.metrics
    }
    metrics = (objective, *sorted(others - {objective}))
    rows = []
    for trial in sorted(trials, key=lambda t: t.number):
        state = shown_state(str(trial.state), runner_alive=runner_alive)
        observations = sorted(trial.observations or (), key=lambda o: o.step)
        if not observations:
            rows.append(CurveRow(trial.number, state, None, (None,) * len(metrics)))
        for observation in observations:
            values = tuple(observation.metrics.get(name) for name in metrics)
            rows.append(CurveRow(trial.number, state, observation.step, values))
    return Curves(metrics, tuple(rows))


def render_curves(curves: Curves, best: int | None) -> list[str]:
    """The table for people: a trial's number and state on its first row only, ``-`` for none.

    ``best`` (a trial number) is marked with ``*``, explained under the table.
    """
    table = [("trial", "state", "step", *curves.metrics)]
    previous = None
    for row in curves.rows:
        first = row.trial != previous
        previous = row.trial
        mark = "*" if row.trial == best else ""
        table.append(
            (
                f"{row.trial}{mark}" if first else "",
                row.state if first else "",
                "-" if row.step is None else str(row.step),
                *(format_objective(value) for value in row.values),
            )
        )
    widths = [max(len(cells[i]) for cells in table) for i in range(len(table[0]))]
    lines = [
        "  ".join(
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()
        for cells in table
    ]
    if best is not None:
        lines.append("* best trial")
    return lines


def csv_rows(curves: Curves) -> list[list[str]]:
    """The CSV: a header, then one row per trial and reported step; empty where not reported.

    Trials without any report have no row. Values keep every digit (``repr``).
    """
    rows = [[*CSV_FIELDS, *curves.metrics]]
    for row in curves.rows:
        if row.step is None:
            continue
        values = ["" if value is None else repr(value) for value in row.values]
        rows.append([str(row.trial), row.state, str(row.step), *values])
    return rows
