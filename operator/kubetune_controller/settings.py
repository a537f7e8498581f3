"""Operator configuration, read once at startup from flags and the environment.

Everything the builders and the reconciler need to know about the installation
(the service address, the collector image, the metrics mount) lives in one
frozen :class:`Settings`, injected where it is needed instead of being read
from ``os.environ`` deep inside the code, so tests build it directly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

# Group, version and plurals of the custom resources; the CRDs in ``crds/``
# define the same names.
GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
EXPERIMENTS = "experiments"
TRIALS = "trials"

# Labels the operator puts on every Trial and Pod it creates. Watches select on
# the experiment label server-side, so the operator never streams unrelated Pods.
LABEL_EXPERIMENT = f"{GROUP}/experiment"
LABEL_TRIAL = f"{GROUP}/trial"
LABEL_NUMBER = f"{GROUP}/trial-number"

# Name of the operator in Events (``source.component``) and field managers.
COMPONENT = "kubetune-operator"


@dataclass(frozen=True)
class Settings:
    """How this installation of the operator behaves."""

    # Where the operator reaches the suggestion service.
    service_url: str = "http://kubetune-suggestion:8000"
    # Where trial sidecars reach the service; differs from ``service_url`` only
    # when the operator runs outside the cluster (development).
    collector_service_url: str | None = None
    # Image and command of the metrics-collector sidecar.
    collector_image: str = "kubetune/kubetune:0.1.0"
    collector_command: tuple[str, ...] = ("python", "-m", "kubetune_suggestion.collector")
    # Resource requests/limits of the sidecar: small, so it never competes
    # with the trial for a node's capacity.
    collector_resources: Mapping[str, Mapping[str, str]] = field(
        default_factory=lambda: {
            "requests": {"cpu": "10m", "memory": "32Mi"},
            "limits": {"memory": "128Mi"},
        }
    )
    # Directory of the shared emptyDir in every container of a trial Pod.
    metrics_dir: str = "/kubetune"
    # Seconds a pruned trial's Pod gets to exit: short, because the
    # early-stopping decision makes the rest of its work useless.
    stop_grace_seconds: int = 1
    # Log lines of a failed trial copied into the Trial's message.
    log_tail_lines: int = 10
    # Concurrent reconciles (of different experiments; one experiment is never
    # reconciled twice at once).
    workers: int = 8
    # Trial operations (create, finish, stop) in progress at once.
    trial_concurrency: int = 64
    # An experiment is reconciled at most once per this many seconds: events
    # arriving meanwhile are handled together by the next reconcile.
    reconcile_interval_seconds: float = 0.1
    # Every experiment is reconciled at least this often, catching anything a
    # missed watch event or a service-side change would otherwise delay.
    resync_seconds: float = 30.0
    # Progress-only changes of an Experiment's status (counts, best so far)
    # are written at most this often; phase and condition changes at once.
    status_interval_seconds: float = 1.0
    # Events that come once per trial (TrialCreated, TrialPruned...) about one
    # experiment: the first is written at once, the next ones within this
    # many seconds are combined into one Event.
    event_window_seconds: float = 5.0
    # A Trial is marked Running once its Pod has run this long (counted from
    # the end of the whole second its startTime names: 1 to 2 s with the
    # default); a trial that ends sooner gets its final status only, one
    # write instead of two.
    trial_running_delay_seconds: float = 1.0
    # A watch stream (Trials, trial Pods) that has not listed its objects
    # after this long, and is failing, is reported on each Experiment's
    # Running condition (reason CannotWatch) until it lists.
    watch_grace_seconds: float = 10.0
    # How often running trials' last reported step is copied to their status.
    step_refresh_seconds: float = 10.0
    # Long-poll duration of ``GET /v1/stops``.
    stops_wait_seconds: float = 10.0
    # Pod lost (Trial running, Pod gone) only after this long without the Pod,
    # so a watch that lags behind our own create is never taken for a loss.
    lost_pod_grace_seconds: float = 15.0
    # HTTP retries against the service before an error is reported.
    service_retries: int = 4
    service_timeout_seconds: float = 15.0

    @property
    def sidecar_service_url(self) -> str:
        """The service address trial sidecars use."""
        return self.collector_service_url or self.service_url


def settings_from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Build settings from ``KUBETUNE_*`` environment variables.

    Args:
        env: The environment (``os.environ`` when omitted).

    Raises:
        ValueError: If a numeric variable does not parse.
    """
    env = os.environ if env is None else env
    defaults = Settings()
    command = env.get("KUBETUNE_COLLECTOR_COMMAND")
    return Settings(
        service_url=env.get("KUBETUNE_SERVICE_URL", defaults.service_url).rstrip("/"),
        collector_service_url=(env.get("KUBETUNE_COLLECTOR_SERVICE_URL") or None),
        collector_image=env.get("KUBETUNE_COLLECTOR_IMAGE", defaults.collector_image),
        collector_command=tuple(command.split()) if command else defaults.collector_command,
        metrics_dir=env.get("KUBETUNE_METRICS_DIR", defaults.metrics_dir),
        stop_grace_seconds=int(env.get("KUBETUNE_STOP_GRACE_SECONDS", defaults.stop_grace_seconds)),
        workers=int(env.get("KUBETUNE_WORKERS", defaults.workers)),
        resync_seconds=float(env.get("KUBETUNE_RESYNC_SECONDS", defaults.resync_seconds)),
        trial_running_delay_seconds=float(
            env.get("KUBETUNE_TRIAL_RUNNING_DELAY_SECONDS", defaults.trial_running_delay_seconds)
        ),
        stops_wait_seconds=float(
            env.get("KUBETUNE_STOPS_WAIT_SECONDS", defaults.stops_wait_seconds)
        ),
    )
