"""The metrics file protocol: what a trial writes and how a collector reads it.

A trial's process gets ``KUBETUNE_METRICS_FILE`` in its environment and
appends one line per report, in either of two forms::

    {"step": 3, "val_loss": 0.21, "accuracy": 0.93}
    step=3 val_loss=0.21 accuracy=0.93

Rules, the same in a cluster (the sidecar) and under ``kubetune run``:

- Blank lines and lines starting with ``#`` are ignored, so a script may
  annotate its file.
- ``name=value`` pairs are separated by whitespace or commas.
- ``step`` is a non-negative integer (``3.0`` is accepted as 3). A line
  without a step is given the previous report's step plus one, and 1 for the
  first report: a script that reports once per epoch without counting gets
  steps 1, 2, 3..., the resource units early stopping counts from
  ``minResource`` (at least 1).
- Every other field is a metric: a finite number. Strings, booleans, nested
  values, NaN and infinities are rejected with a :class:`ParseError` saying
  which metric and why; a line needs at least one metric.

Parsing is pure (:class:`MetricsParser`); :class:`MetricsFileReader` is the
only part that touches the file system, and it hands out complete lines only,
so a report that is being written is never read half-way.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "MAX_LINE_BYTES",
    "METRIC_NAME",
    "MetricsFileReader",
    "MetricsParser",
    "ParseError",
    "Report",
    "parse_line",
]

# A report is a handful of numbers; a longer line is a bug in the trial (e.g. it
# writes its logs into the metrics file), and keeping it would grow memory.
MAX_LINE_BYTES: Final = 64 * 1024

# Metric names as Prometheus, TensorBoard and most frameworks write them
# (``val/loss``, ``top-1``, ``lr.group0``), without characters that would make
# ``name=value`` lines ambiguous.
METRIC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_./:-]{0,127}$")
_PAIR_SEPARATORS = re.compile(r"[\s,]+")


class ParseError(ValueError):
    """A metrics line that is not a valid report.

    Attributes:
        line: The offending line (shortened for display).
        problem: What is wrong with it, in words.
    """

    def __init__(self, line: str, problem: str) -> None:
        shown = line if len(line) <= 120 else line[:117] + "..."
        super().__init__(f"{problem} (line: {shown!r})")
        self.line = shown
        self.problem = problem


@dataclass(frozen=True)
class Report:
    """One report of a trial.

    Attributes:
        step: The training step or epoch the values belong to.
        metrics: Metric names and their finite values (``step`` excluded).
    """

    step: int
    metrics: dict[str, float] = field(default_factory=dict)

    def format(self) -> str:
        """The report as a ``name=value`` line (how collectors log it)."""
        pairs = " ".join(f"{name}={value:.6g}" for name, value in self.metrics.items())
        return f"step={self.step} {pairs}"


def parse_line(text: str, default_step: int = 1) -> Report | None:
    """Parse one metrics line.

    Args:
        text: The line, with or without its line break.
        default_step: The step to use when the line has none.

    Returns:
        The report, or None for a blank line or a comment.

    Raises:
        ParseError: If the line is neither a JSON object nor ``name=value``
            pairs, or a step or value is invalid.
    """
    line = text.strip()
    if not line or line.startswith("#"):
        return None
    # A line that looks like JSON is parsed as JSON, so `[1, 2]` gets a JSON message.
    fields = _json_fields(line) if line.startswith(("{", "[", '"')) else _pair_fields(line)
    step = default_step
    metrics: dict[str, float] = {}
    for name, value in fields.items():
        if name == "step":
            step = _step(line, value)
        else:
            metrics[_check_name(line, name)] = _metric(line, name, value)
    if not metrics:
        raise ParseError(line, "no metric in the report; write e.g. step=1 val_loss=0.5")
    return Report(step=step, metrics=metrics)


def _json_fields(line: str) -> dict[str, Any]:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ParseError(line, f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(data, dict):
        raise ParseError(line, 'a JSON report must be an object like {"step": 1, "loss": 0.5}')
    return data


def _pair_fields(line: str) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for token in _PAIR_SEPARATORS.split(line):
        if not token:
            continue
        name, sep, value = token.partition("=")
        if not sep or not name:
            raise ParseError(line, f"expected name=value pairs or a JSON object, found {token!r}")
        if name in fields:
            raise ParseError(line, f"{name!r} appears twice")
        fields[name] = value
    return fields


def _check_name(line: str, name: str) -> str:
    if not METRIC_NAME.match(name):
        raise ParseError(
            line,
            f"invalid metric name {name!r}: use letters, digits and _ . / : - "
            "(starting with a letter or _), at most 128 characters",
        )
    return name


def _step(line: str, value: Any) -> int:
    problem = f"step must be a non-negative integer, got {value!r}"
    number: float
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ParseError(line, problem)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ParseError(line, problem) from None
    else:
        number = value
    if not math.isfinite(number) or number < 0 or number != int(number):
        raise ParseError(line, problem)
    return int(number)


def _metric(line: str, name: str, value: Any) -> float:
    if isinstance(value, str):
        # name=value lines carry text; JSON strings ("0.5") are a bug in the
        # writer that would hide real mistakes such as "n/a", so only pairs parse.
        if line.startswith(("{", "[", '"')):
            raise ParseError(line, f"metric {name!r} must be a number, got the string {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ParseError(line, f"metric {name!r} must be a number, got {value!r}") from None
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise ParseError(line, f"metric {name!r} must be a number, got {json.dumps(value)}")
    else:
        number = float(value)
    if not math.isfinite(number):
        raise ParseError(line, f"metric {name!r} must be a finite number, got {value!r}")
    return number


class MetricsParser:
    """Parses a stream of lines, numbering reports that carry no step.

    Keeps only the last step between calls, so a collector that restarts and
    reads the file from the start assigns the same steps again.
    """

    def __init__(self) -> None:
        self.last_step: int | None = None

    def feed(self, text: str) -> Report | None:
        """Parse the next line (see :func:`parse_line`).

        Raises:
            ParseError: For an invalid line; the step counter is unchanged.
        """
        default = 1 if self.last_step is None else self.last_step + 1
        report = parse_line(text, default_step=default)
        if report is not None:
            self.last_step = report.step
        return report


class MetricsFileReader:
    """Reads the complete lines appended to a metrics file since the last call.

    The file may not exist yet (the trial has not reported) and its last line
    may be incomplete (the trial is writing it): both simply yield nothing
    until there is more. A file that shrinks was recreated (a restarted
    trial), so reading starts again from its beginning.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.offset = 0
        self._partial = b""

    def read_lines(self, final: bool = False) -> list[str]:
        """Lines completed since the previous call, without their line breaks.

        Args:
            final: The writer has exited, so an unterminated last line is as
                complete as it will ever be: return it too.
        """
        try:
            with open(self.path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size < self.offset:
                    self.offset, self._partial = 0, b""
                handle.seek(self.offset)
                chunk = handle.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        data = self._partial + chunk
        *complete, rest = data.split(b"\n")
        if final and rest:
            complete.append(rest)
            rest = b""
        if len(rest) > MAX_LINE_BYTES:
            # Keep the tail bounded; the line will fail to parse when it ends.
            rest = rest[:MAX_LINE_BYTES]
        self._partial = rest
        return [
            raw[:MAX_LINE_BYTES].decode("utf-8", errors="replace").rstrip("\r") for raw in complete
        ]

    @property
    def pending_bytes(self) -> int:
        """Bytes of an unterminated last line held back so far."""
        return len(self._partial)
