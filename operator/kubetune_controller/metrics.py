"""Prometheus metrics of the operator, served on ``:9090/metrics``.

Gauges that describe the cluster (experiments and trials by phase, best
objective per experiment) are computed at scrape time from the operator's
cache of watched objects, so a scrape always agrees with ``kubectl get`` and
survives operator restarts. Counters and histograms describe what this
process did since it started (trials it finished, reconciles, errors).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


@dataclass(frozen=True)
class ClusterSnapshot:
    """What the scrape-time gauges show, taken from the cache in one go."""

    # (namespace, phase) -> experiments
    experiments: dict[tuple[str, str], int]
    # (namespace, phase) -> trials
    trials: dict[tuple[str, str], int]
    # (namespace, experiment) -> best objective
    best: dict[tuple[str, str], float]


class _ClusterCollector(Collector):
    def __init__(self, snapshot: Callable[[], ClusterSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        snap = self._snapshot()
        experiments = GaugeMetricFamily(
            "kubetune_experiments", "Experiments by phase.", labels=["namespace", "phase"]
        )
        for (ns, phase), n in sorted(snap.experiments.items()):
            experiments.add_metric([ns, phase], n)
        trials = GaugeMetricFamily(
            "kubetune_trials", "Trials by phase.", labels=["namespace", "phase"]
        )
        for (ns, phase), n in sorted(snap.trials.items()):
            trials.add_metric([ns, phase], n)
        best = GaugeMetricFamily(
            "kubetune_experiment_best_objective",
            "Best objective value of each experiment so far.",
            labels=["namespace", "experiment"],
        )
        for (ns, name), value in sorted(snap.best.items()):
            best.add_metric([ns, name], value)
        return [experiments, trials, best]


class OperatorMetrics:
    """The operator's metrics, in their own registry (no process-global state).

    Args:
        snapshot: Returns the cluster state for the scrape-time gauges.
    """

    def __init__(self, snapshot: Callable[[], ClusterSnapshot]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_ClusterCollector(snapshot))
        self.trials_finished = Counter(
            "kubetune_trials_finished_total",
            "Trials this operator recorded as ended, by final phase.",
            ["namespace", "phase"],
            registry=self.registry,
        )
        self.trials_pruned = Counter(
            "kubetune_trials_pruned_total",
            "Trials stopped early by the early-stopping rule.",
            ["namespace"],
            registry=self.registry,
        )
        self.trials_failed = Counter(
            "kubetune_trials_failed_total",
            "Trials that failed or never reported their objective.",
            ["namespace"],
            registry=self.registry,
        )
        self.trials_created = Counter(
            "kubetune_trials_created_total",
            "Trials (with their Pods) this operator created.",
            ["namespace"],
            registry=self.registry,
        )
        self.trial_duration = Histogram(
            "kubetune_trial_duration_seconds",
            "From a Trial's creation to its end, by final phase.",
            ["phase"],
            buckets=(1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400),
            registry=self.registry,
        )
        self.stop_latency = Histogram(
            "kubetune_stop_latency_seconds",
            "From receiving a stop order to its Pod's deletion being accepted.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
            registry=self.registry,
        )
        self.reconciles = Counter(
            "kubetune_reconciles_total", "Experiment reconciles.", registry=self.registry
        )
        self.reconcile_errors = Counter(
            "kubetune_reconcile_errors_total",
            "Reconciles that ended in an error, by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.reconcile_latency = Histogram(
            "kubetune_reconcile_duration_seconds",
            "Time one experiment reconcile takes.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.service_errors = Counter(
            "kubetune_service_errors_total",
            "Requests to the suggestion service that failed after every retry.",
            registry=self.registry,
        )
