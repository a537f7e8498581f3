"""The operator's view of the cluster, kept current by the watch streams.

Reconciles read this cache instead of listing objects, so their cost does not
grow with the number of trials an experiment has had. The cache may lag
behind the API server (or our own writes until their watch events arrive);
that is safe because every decision based on it is idempotent and the count
of trials to start comes from the suggestion service, never from here. The
operator's own writes go through :meth:`ClusterCache.put_trial` /
:meth:`ClusterCache.put_pod` too, so the next reconcile sees them at once.

The Prometheus scrape thread reads it while the event loop writes: a lock
makes each snapshot consistent.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import TypeVar

from kubetune_controller.metrics import ClusterSnapshot
from kubetune_controller.model import (
    ExperimentResource,
    PodResource,
    TrialResource,
    is_older,
    label_value,
)

Key = tuple[str, str]
_V = TypeVar("_V", TrialResource, PodResource)


class ClusterCache:
    """Experiments, their Trials and their trial Pods."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._experiments: dict[Key, ExperimentResource] = {}
        self._by_uid: dict[str, Key] = {}
        self._trials: dict[Key, dict[str, TrialResource]] = defaultdict(dict)
        # Pods are found by their experiment label, which is the experiment
        # name, hashed when longer than a label value may be.
        self._pods: dict[Key, dict[str, PodResource]] = defaultdict(dict)

    # -- experiments ----------------------------------------------------------------------

    def put_experiment(self, view: ExperimentResource) -> None:
        """Record an Experiment's latest state."""
        with self._lock:
            old = self._experiments.get(view.key)
            if (
                old is not None
                and old.uid == view.uid
                and is_older(view.resource_version, old.resource_version)
            ):
                return
            self._experiments[view.key] = view
            self._by_uid[view.uid] = view.key

    def drop_experiment(self, key: Key) -> ExperimentResource | None:
        """Forget a deleted Experiment (its Trials and Pods go with it by GC)."""
        with self._lock:
            view = self._experiments.pop(key, None)
            if view is not None:
                self._by_uid.pop(view.uid, None)
            return view

    def experiment(self, key: Key) -> ExperimentResource | None:
        """The Experiment, if known."""
        return self._experiments.get(key)

    def key_for_uid(self, uid: str) -> Key | None:
        """The Experiment with this uid, if this operator watches it."""
        return self._by_uid.get(uid)

    def experiment_keys(self) -> list[Key]:
        """Every known Experiment."""
        with self._lock:
            return list(self._experiments)

    # -- trials and pods ------------------------------------------------------------------

    def put_trial(self, view: TrialResource) -> None:
        """Record a Trial's latest state."""
        with self._lock:
            bucket = self._trials[(view.namespace, view.experiment)]
            old = bucket.get(view.name)
            if (
                old is not None
                and old.uid == view.uid
                and is_older(view.resource_version, old.resource_version)
            ):
                return
            bucket[view.name] = view

    def drop_trial(self, view: TrialResource) -> None:
        """Forget a deleted Trial."""
        with self._lock:
            bucket = self._trials.get((view.namespace, view.experiment))
            if bucket is not None:
                bucket.pop(view.name, None)
                if not bucket:
                    del self._trials[(view.namespace, view.experiment)]

    def replace_trials(self, views: list[TrialResource], namespace: str | None) -> None:
        """After a LIST: the Trials in ``namespace`` (every one if ``None``) become ``views``."""
        with self._lock:
            _replace(self._trials, [(view.experiment, view) for view in views], namespace)

    def trial(self, key: Key, name: str) -> TrialResource | None:
        """One of an experiment's Trials, by name."""
        with self._lock:
            return self._trials.get(key, {}).get(name)

    def trials(self, key: Key) -> dict[str, TrialResource]:
        """An experiment's Trials by name (a copy)."""
        with self._lock:
            return dict(self._trials.get(key, {}))

    def put_pod(self, experiment_label: str, view: PodResource) -> None:
        """Record a trial Pod's latest state."""
        with self._lock:
            bucket = self._pods[(view.namespace, experiment_label)]
            old = bucket.get(view.name)
            if (
                old is not None
                and old.uid == view.uid
                and is_older(view.resource_version, old.resource_version)
            ):
                return
            bucket[view.name] = view

    def drop_pod(self, experiment_label: str, view: PodResource) -> None:
        """Forget a deleted Pod."""
        key = (view.namespace, experiment_label)
        with self._lock:
            bucket = self._pods.get(key)
            if bucket is not None:
                bucket.pop(view.name, None)
                if not bucket:
                    del self._pods[key]

    def replace_pods(self, pods: list[tuple[str, PodResource]], namespace: str | None) -> None:
        """After a LIST: the trial Pods in ``namespace`` (all if ``None``) become ``pods``.

        Args:
            pods: ``(experiment label, Pod)`` pairs.
            namespace: The LIST's namespace, ``None`` for a cluster-wide one.
        """
        with self._lock:
            _replace(self._pods, pods, namespace)

    def pod(self, key: Key, name: str) -> PodResource | None:
        """One of an experiment's trial Pods, by name."""
        namespace, experiment = key
        with self._lock:
            return self._pods.get((namespace, label_value(experiment)), {}).get(name)

    def pods(self, key: Key) -> dict[str, PodResource]:
        """An experiment's trial Pods by name (a copy)."""
        namespace, name = key
        with self._lock:
            return dict(self._pods.get((namespace, label_value(name)), {}))

    # -- metrics --------------------------------------------------------------------------

    def snapshot(self) -> ClusterSnapshot:
        """Counts for the scrape-time gauges."""
        experiments: dict[tuple[str, str], int] = defaultdict(int)
        trials: dict[tuple[str, str], int] = defaultdict(int)
        best: dict[tuple[str, str], float] = {}
        with self._lock:
            for (ns, name), exp in self._experiments.items():
                experiments[(ns, str(exp.status.get("phase") or "Pending"))] += 1
                value = exp.status.get("bestObjective")
                if isinstance(value, int | float):
                    best[(ns, name)] = float(value)
            for (ns, _), bucket in self._trials.items():
                for trial in bucket.values():
                    trials[(ns, trial.phase.value if trial.phase else "Pending")] += 1
        return ClusterSnapshot(dict(experiments), dict(trials), best)


def _replace(
    buckets: dict[Key, dict[str, _V]],
    entries: list[tuple[str, _V]],
    namespace: str | None,
) -> None:
    """Make the buckets of ``namespace`` (all if ``None``) hold exactly ``entries``.

    Each entry is (the bucket's second key part, an object with ``namespace``
    and ``name``): buckets are keyed by (namespace, experiment name or label).
    """
    for key in [k for k in buckets if namespace is None or k[0] == namespace]:
        del buckets[key]
    for part, view in entries:
        buckets.setdefault((view.namespace, part), {})[view.name] = view
