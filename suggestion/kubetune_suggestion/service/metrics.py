"""Prometheus metrics of the suggestion service (one set per process).

Defined once at import, in the default registry, because a registry refuses
a second metric of the same name (several apps in one test process share them).
With several uvicorn workers each process serves its own counters; a
Prometheus scrape of a Service sums over the pods it reaches.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUEST_SECONDS = Histogram(
    "kubetune_service_request_duration_seconds",
    "Time to answer an HTTP request, by route template.",
    ["method", "route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0),
)
SUGGESTIONS = Counter(
    "kubetune_suggestions_total",
    "New trials allocated by ask, by algorithm.",
    ["algorithm"],
)
OBSERVATIONS = Counter(
    "kubetune_observations_total",
    "Observations stored (duplicates of an already stored step not counted).",
)
STOP_DECISIONS = Counter(
    "kubetune_stop_decisions_total",
    "Trials the early-stopping rule ordered to stop, by rule.",
    ["rule"],
)
ERRORS = Counter(
    "kubetune_service_errors_total",
    "Requests answered with an error, by error code.",
    ["code"],
)
