"""What ``kubetune run`` shows while it works: a live table on a terminal, plain lines otherwise.

Rendering is pure (:func:`render_table`, :func:`format_params`...) and the two
displays only decide where and when the lines go: :class:`LiveTable` redraws
in place about twice a second; :class:`PlainLog` prints one line per event,
which suits CI logs and pipes.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

from kubetune_suggestion.template import format_value

__all__ = [
    "Best",
    "Display",
    "LiveTable",
    "PlainLog",
    "RunningTrial",
    "Snapshot",
    "format_objective",
    "format_params",
    "render_table",
]

_COUNTED = ("succeeded", "pruned", "failed", "metrics_unavailable")


@dataclass(frozen=True)
class Best:
    """The best finished trial so far."""

    number: int
    params: Mapping[str, Any]
    objective: float


@dataclass(frozen=True)
class RunningTrial:
    """A trial whose process is running."""

    number: int
    params: Mapping[str, Any]
    seconds: float
    last_step: int | None = None
    last_value: float | None = None
    stopping: bool = False


@dataclass(frozen=True)
class Snapshot:
    """Everything the display shows at one moment."""

    name: str
    metric: str
    elapsed: float
    max_trials: int
    counts: Mapping[str, int]
    best: Best | None
    running: Sequence[RunningTrial] = field(default_factory=tuple)


def format_params(params: Mapping[str, Any]) -> str:
    """``lr=0.0123 hidden=32 optimizer=adam``, floats to 4 significant digits."""
    parts = []
    for name, value in params.items():
        text = f"{value:.4g}" if isinstance(value, float) else format_value(value)
        parts.append(f"{name}={text}")
    return " ".join(parts)


def format_objective(value: float | None) -> str:
    """An objective value for a table cell ("-" when unknown)."""
    return "-" if value is None else f"{value:.5g}"


def _counts_line(snapshot: Snapshot) -> str:
    counts = snapshot.counts
    done = sum(counts.get(state, 0) for state in _COUNTED)
    failed = counts.get("failed", 0) + counts.get("metrics_unavailable", 0)
    return (
        f"trials {done}/{snapshot.max_trials} done: {len(snapshot.running)} running, "
        f"{counts.get('succeeded', 0)} succeeded, {counts.get('pruned', 0)} pruned, {failed} failed"
    )


def render_table(snapshot: Snapshot) -> list[str]:
    """The live table's lines (no trailing newlines, not cut to the terminal's width)."""
    lines = [f"kubetune run {snapshot.name}  {snapshot.elapsed:6.1f}s  {_counts_line(snapshot)}"]
    if snapshot.best is None:
        lines.append(f"best  -   (no finished trial reported {snapshot.metric} yet)")
    else:
        best = snapshot.best
        lines.append(
            f"best  trial {best.number}  {snapshot.metric}={format_objective(best.objective)}  "
            f"{format_params(best.params)}"
        )
    if snapshot.running:
        metric = snapshot.metric[:12]
        lines.append(f"  {'trial':>5}  {'time':>6}  {'step':>5}  {metric:>12}  params")
        for trial in sorted(snapshot.running, key=lambda t: t.number):
            step = "-" if trial.last_step is None else str(trial.last_step)
            note = "  (stopping)" if trial.stopping else ""
            lines.append(
                f"  {trial.number:>5}  {trial.seconds:5.1f}s  {step:>5}  "
                f"{format_objective(trial.last_value):>12}  {format_params(trial.params)}{note}"
            )
    return lines


class Display(Protocol):
    """Where progress goes."""

    def event(self, text: str, snapshot: Snapshot) -> None:
        """A trial started or ended."""
        ...

    def tick(self, snapshot: Snapshot) -> None:
        """Called often; redraws when it is time."""
        ...

    def close(self, snapshot: Snapshot) -> None:
        """The run is over: leave the screen in its final state."""
        ...


class PlainLog:
    """One line per event, for pipes and CI logs."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def event(self, text: str, snapshot: Snapshot) -> None:
        """Print the event with the elapsed time."""
        self.stream.write(f"[{snapshot.elapsed:7.1f}s] {text}\n")
        self.stream.flush()

    def tick(self, snapshot: Snapshot) -> None:
        """Nothing: plain output only reports events."""

    def close(self, snapshot: Snapshot) -> None:
        """Nothing to clean up."""


class Quiet:
    """No progress at all (``-o json``)."""

    def event(self, text: str, snapshot: Snapshot) -> None:
        """Ignore."""

    def tick(self, snapshot: Snapshot) -> None:
        """Ignore."""

    def close(self, snapshot: Snapshot) -> None:
        """Ignore."""


class LiveTable:
    """A table redrawn in place on a terminal, with events scrolling above it."""

    def __init__(self, stream: TextIO, interval: float = 0.5) -> None:
        self.stream = stream
        self.interval = interval
        self._drawn = 0
        self._last = 0.0

    def event(self, text: str, snapshot: Snapshot) -> None:
        """Print the event above the table and redraw it."""
        self._clear()
        self.stream.write(f"[{snapshot.elapsed:7.1f}s] {text}\n")
        self._draw(snapshot)

    def tick(self, snapshot: Snapshot) -> None:
        """Redraw if the last drawing is older than the interval."""
        if time.monotonic() - self._last >= self.interval:
            self._clear()
            self._draw(snapshot)

    def close(self, snapshot: Snapshot) -> None:
        """Draw the final state and leave it on screen."""
        self._clear()
        self._draw(snapshot)
        self._drawn = 0

    def _clear(self) -> None:
        if self._drawn:
            # Up to the table's first line, then clear to the end of the screen.
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")

    def _draw(self, snapshot: Snapshot) -> None:
        width = max(40, shutil.get_terminal_size((100, 24)).columns - 1)
        # Cut lines to the width: a wrapped line would break the redraw's count.
        lines = [line[:width] for line in render_table(snapshot)]
        self.stream.write("".join(line + "\n" for line in lines))
        self.stream.flush()
        self._drawn = len(lines)
        self._last = time.monotonic()


def make_display(output: str, stream: TextIO = sys.stdout) -> Display:
    """The display for an output format: a live table on a terminal, plain lines otherwise."""
    if output == "json":
        return Quiet()
    if stream.isatty():
        return LiveTable(stream)
    return PlainLog(stream)
