"""The kubetune SDK: report a trial's metrics from training code.

Standard library only, so any training image can carry it. Each call appends
one JSON line to the file named by ``KUBETUNE_METRICS_FILE``; the metrics
collector (the sidecar in a cluster, the runner under ``kubetune run``) reads
that file and streams the reports to the suggestion service.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import sys
from typing import Final

__all__ = ["METRICS_FILE_ENV", "report"]

METRICS_FILE_ENV: Final = "KUBETUNE_METRICS_FILE"
# The metric names the collector accepts (kubetune_suggestion.metrics_protocol);
# checked here too so a bad name fails in the training code, not in a log.
METRIC_NAME: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_./:-]{0,127}$")


def report(step: int, **metrics: float) -> None:
    """Append one report (a step and named metric values) to the metrics file.

    Args:
        step: The training step or epoch the values belong to (resource units
            for early stopping), a non-negative integer.
        **metrics: Metric names and their numeric values, e.g. ``val_loss=0.21``.

    Raises:
        ValueError: If ``step`` is negative or not an integer, no metric is
            given, a name is not a valid metric name, or a value is not a
            finite number.

    When ``KUBETUNE_METRICS_FILE`` is unset (running the script by hand), the
    report is printed to stderr instead so the script still works.
    """
    # numbers.Integral/Real rather than int/float: numpy's scalars (an epoch
    # from np.arange, a float32 loss) register with them and are common here.
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    if not metrics:
        raise ValueError("report() needs at least one metric, e.g. report(step=1, loss=0.5)")
    line: dict[str, float | int] = {"step": int(step)}
    for name, value in metrics.items():
        if not METRIC_NAME.match(name):
            raise ValueError(
                f"invalid metric name {name!r}: use letters, digits and _ . / : - "
                "(starting with a letter or _), at most 128 characters"
            )
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(
                f"metric {name!r} must be a number, got {value!r} (for a tensor, pass .item())"
            )
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"metric {name!r} must be finite, got {value!r}")
        line[name] = number
    text = json.dumps(line, separators=(",", ":")) + "\n"
    path = os.environ.get(METRICS_FILE_ENV)
    if not path:
        sys.stderr.write("kubetune report: " + text)
        return
    # One write of a whole line in append mode: concurrent readers never see
    # half a line followed by another report.
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
