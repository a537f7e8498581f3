"""What the reconciler knows about cluster objects: small frozen records of them.

Watch events carry whole objects; the operator keeps only the few fields its
decisions need, parsed once into these records (:class:`ExperimentResource`,
:class:`TrialResource`, :class:`PodResource`). That keeps the in-memory cache
small at thousands of trials and gives the pure decision code typed inputs
that tests build in one line. (The suggestion service's own records of the
same experiments and trials are its wire models, ``ExperimentView`` and
``TrialView``.)
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubetune_controller.settings import LABEL_NUMBER

Obj = dict[str, Any]


class TrialPhase(enum.StrEnum):
    """A Trial's ``status.phase``; the last four are final."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    PRUNED = "Pruned"
    METRICS_UNAVAILABLE = "MetricsUnavailable"

    @property
    def final(self) -> bool:
        """Whether the trial has ended (it never changes again)."""
        return self not in (TrialPhase.PENDING, TrialPhase.RUNNING)


class ExperimentPhase(enum.StrEnum):
    """An Experiment's ``status.phase``."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    @property
    def final(self) -> bool:
        """Whether the experiment has ended."""
        return self in (ExperimentPhase.SUCCEEDED, ExperimentPhase.FAILED)


# Trial states of the suggestion service (CONTRACT.md) and the Trial phase each
# one is shown as.
SERVICE_STATE_PHASE: Mapping[str, TrialPhase] = {
    "pending": TrialPhase.PENDING,
    "running": TrialPhase.RUNNING,
    "succeeded": TrialPhase.SUCCEEDED,
    "failed": TrialPhase.FAILED,
    "pruned": TrialPhase.PRUNED,
    "metrics_unavailable": TrialPhase.METRICS_UNAVAILABLE,
}


def parse_time(value: object) -> datetime | None:
    """Parse an RFC 3339 timestamp as the API server writes it."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def format_time(moment: datetime) -> str:
    """Format a timestamp the way Kubernetes does (UTC, seconds, ``Z``)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def label_value(name: str) -> str:
    """A label value for an object name (names may be longer than 63 characters).

    Long names keep a readable prefix and a hash, so two long names never share
    a label value.
    """
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[:54].rstrip('-.')}-{digest}"


def trial_name(experiment: str, number: int) -> str:
    """The deterministic name of an experiment's trial (and of its Pod)."""
    return f"{experiment}-{number}"


@dataclass(frozen=True)
class ExperimentResource:
    """The fields of an Experiment the operator reads."""

    namespace: str
    name: str
    uid: str
    generation: int
    # The raw spec: parsed by ``kubetune_suggestion.spec`` where it is used, so
    # an invalid spec becomes a condition instead of an exception here.
    spec: Mapping[str, Any]
    status: Mapping[str, Any]
    deleting: bool = False
    resource_version: str = ""

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ExperimentResource:
        """Read an Experiment object as the API server sends it."""
        meta = body.get("metadata") or {}
        return cls(
            namespace=str(meta.get("namespace", "")),
            name=str(meta.get("name", "")),
            uid=str(meta.get("uid", "")),
            generation=int(meta.get("generation") or 0),
            spec=dict(body.get("spec") or {}),
            status=dict(body.get("status") or {}),
            deleting=bool(meta.get("deletionTimestamp")),
            resource_version=str(meta.get("resourceVersion") or ""),
        )

    @property
    def key(self) -> tuple[str, str]:
        """``(namespace, name)``."""
        return (self.namespace, self.name)

    @property
    def phase(self) -> ExperimentPhase | None:
        """The recorded phase, if any."""
        try:
            return ExperimentPhase(str(self.status.get("phase")))
        except ValueError:
            return None


@dataclass(frozen=True)
class TrialResource:
    """The fields of a Trial the operator reads."""

    namespace: str
    name: str
    uid: str
    experiment: str
    number: int
    pod_name: str
    phase: TrialPhase | None
    created: datetime | None
    objective: float | None = None
    stop_reason: str | None = None
    message: str | None = None
    last_step: int | None = None
    resource_version: str = ""
    # status.startTime: when its Pod started, once recorded.
    started: datetime | None = None
    # spec.params: the configuration (what the service is re-seeded with
    # after it lost its database).
    params: Mapping[str, Any] = field(default_factory=dict, compare=False)
    # status.attempt: 1, then one more per retry.
    attempt: int = 1
    # The reason of its Failed condition, once it failed (TrialPodForbidden...).
    failure_reason: str | None = None

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> TrialResource:
        """Read a Trial object as the API server sends it."""
        meta = body.get("metadata") or {}
        spec = body.get("spec") or {}
        status = body.get("status") or {}
        name = str(meta.get("name", ""))
        try:
            phase: TrialPhase | None = TrialPhase(str(status.get("phase")))
        except ValueError:
            phase = None
        objective = status.get("objective")
        last_step = status.get("lastStep")
        return cls(
            namespace=str(meta.get("namespace", "")),
            name=name,
            uid=str(meta.get("uid", "")),
            experiment=str(spec.get("experiment", "")),
            number=int(spec.get("number", (meta.get("labels") or {}).get(LABEL_NUMBER, -1))),
            # A retried trial runs in a Pod of its own (status.podName).
            pod_name=str(status.get("podName") or spec.get("podName") or name),
            phase=phase,
            created=parse_time(meta.get("creationTimestamp")),
            objective=float(objective) if isinstance(objective, int | float) else None,
            stop_reason=status.get("stopReason") or None,
            message=status.get("message") or None,
            last_step=int(last_step) if isinstance(last_step, int) else None,
            resource_version=str(meta.get("resourceVersion") or ""),
            started=parse_time(status.get("startTime")),
            params=dict(spec.get("params") or {}),
            attempt=int(status.get("attempt") or 1),
            failure_reason=next(
                (
                    str(c.get("reason"))
                    for c in status.get("conditions") or []
                    if c.get("type") == "Failed" and c.get("status") == "True"
                ),
                None,
            ),
        )

    @property
    def final(self) -> bool:
        """Whether the Trial has ended."""
        return self.phase is not None and self.phase.final


@dataclass(frozen=True)
class ContainerEnd:
    """How a container terminated."""

    name: str
    exit_code: int
    reason: str | None
    message: str | None


@dataclass(frozen=True)
class PodResource:
    """The fields of a trial Pod the operator reads."""

    namespace: str
    name: str
    uid: str
    phase: str
    deleting: bool
    started: datetime | None = None
    # Why the Pod is not running yet (e.g. "0/2 nodes are available: 2
    # Insufficient nvidia.com/gpu."), shown on the Trial while it waits.
    waiting_message: str | None = None
    # Terminated non-sidecar containers, in spec order.
    ended_containers: tuple[ContainerEnd, ...] = field(default=())
    # Whether a sidecar (the metrics collector) still runs. The Pod is
    # Succeeded once its main containers are; its sidecars are stopped after
    # that, and the collector delivers the reports it has not sent yet then.
    sidecar_running: bool = False
    # Why the Pod as a whole failed (e.g. DeadlineExceeded, Evicted).
    reason: str | None = None
    resource_version: str = ""
    # Its trial's number (label kubetune.io/number); -1 without one. A
    # retried trial runs in a Pod named apart from the Trial.
    number: int = -1
    # The reason of its DisruptionTarget condition (EvictionByEvictionAPI,
    # PreemptionByScheduler, DeletionByTaintManager...): the Pod was (or is
    # being) evicted, preempted or removed with its node, through no fault of
    # its own. None without one.
    disruption: str | None = None

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> PodResource:
        """Read a Pod object as the API server sends it."""
        meta = body.get("metadata") or {}
        status = body.get("status") or {}
        waiting = None
        disruption = None
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                waiting = cond.get("message") or cond.get("reason")
            if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
                disruption = str(cond.get("reason") or "DisruptionTarget")
        number = str((meta.get("labels") or {}).get(LABEL_NUMBER, ""))
        ended = []
        for cs in status.get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated")
            if term:
                ended.append(
                    ContainerEnd(
                        name=str(cs.get("name")),
                        exit_code=int(term.get("exitCode", 0)),
                        reason=term.get("reason"),
                        message=term.get("message"),
                    )
                )
        return cls(
            namespace=str(meta.get("namespace", "")),
            name=str(meta.get("name", "")),
            uid=str(meta.get("uid", "")),
            phase=str(status.get("phase") or "Pending"),
            deleting=bool(meta.get("deletionTimestamp")),
            started=parse_time(status.get("startTime")),
            waiting_message=waiting,
            ended_containers=tuple(ended),
            sidecar_running=any(
                "running" in (cs.get("state") or {})
                for cs in status.get("initContainerStatuses") or []
            ),
            reason=status.get("reason"),
            resource_version=str(meta.get("resourceVersion") or ""),
            number=int(number) if number.isdigit() else -1,
            disruption=disruption,
        )

    @property
    def ended(self) -> bool:
        """Whether the Pod's main containers have all finished."""
        return self.phase in ("Succeeded", "Failed")


def is_older(new: str, old: str) -> bool:
    """Whether resource version ``new`` is older than ``old`` (of one object).

    The operator's own writes reach its cache before their watch events do,
    and an event queued earlier may arrive after a write: it must not undo it.
    Resource versions are opaque strings by contract, but etcd-backed servers
    issue increasing integers; anything else is never called older.
    """
    if new.isdigit() and old.isdigit():
        return int(new) < int(old)
    return False
