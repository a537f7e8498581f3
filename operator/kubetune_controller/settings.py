"""Operator configuration: every environment variable the operator reads is read here.

:func:`settings_from_env` reads the ``KUBETUNE_*`` variables once at startup
into one frozen :class:`OperatorSettings` (``python -m kubetune_controller``'s flags
win over the variables they name), which is injected where it is needed:
nothing deeper reads ``os.environ``, and tests build :class:`OperatorSettings`
directly. Each field's comment names its variable; the table of variables,
defaults and meanings is in the chart's README (``charts/kubetune/README.md``,
"Settings"), and a test keeps it in step with this module.

An empty (or blank) variable counts as unset. A value that does not parse,
or is out of range (a negative interval, a port past 65535), is refused at
startup with a :class:`SettingsError` naming the variable, rather than
failing later.

Read elsewhere, by design: ``KUBECONFIG`` by kopf and the Kubernetes client
themselves (``--kubeconfig`` sets it); ``POD_NAME`` (else ``HOSTNAME``), the
instance named in the operator's Events, by ``recorder.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from kubetune_suggestion.env_settings import (
    env,
    from_env,
    integer,
    port,
    seconds,
)

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


# -- parsers of the operator's own kinds of value (the shared ones are in
# kubetune_suggestion.env_settings): each turns a variable's text into a
# field's value, or raises ValueError saying what was expected.


def _url(value: str) -> str:
    if not re.match(r"https?://[^/\s]+", value):
        raise ValueError("expected an http:// or https:// URL")
    return value.rstrip("/")


def _words(value: str) -> tuple[str, ...]:
    return tuple(value.split())


def _resources(value: str) -> Mapping[str, Mapping[str, str]]:
    try:
        data = json.loads(value)
    except ValueError:
        data = None
    if not isinstance(data, dict) or not all(
        isinstance(part, dict) and all(isinstance(q, str) for q in part.values())
        for part in data.values()
    ):
        raise ValueError(
            'expected a JSON object like {"requests": {"cpu": "10m"}, "limits": {...}}'
        )
    return data


_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def _namespaces(value: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    bad = [n for n in names if not _NAMESPACE.fullmatch(n)]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a namespace name (comma-separated names expected)")
    return names


@dataclass(frozen=True)
class OperatorSettings:
    """How this installation of the operator behaves: configuration only.

    Each field is read from the variable its metadata names (see the comments);
    the defaults here are the documented defaults.
    """

    # KUBETUNE_SERVICE_URL (--service-url): where the operator reaches the
    # suggestion service.
    service_url: str = field(
        default="http://kubetune-suggestion:8000", metadata=env("KUBETUNE_SERVICE_URL", _url)
    )
    # KUBETUNE_SERVICE_TOKEN_FILE: a ServiceAccount token issued for the
    # service's audience (the chart mounts a projected one), shown on every
    # call; read again for each call, as the kubelet rotates it.
    service_token_file: str | None = field(
        default=None, metadata=env("KUBETUNE_SERVICE_TOKEN_FILE", str)
    )
    # KUBETUNE_SERVICE_API_KEY: else, the service's API key (an operator
    # outside the cluster, in development).
    service_api_key: str | None = field(default=None, metadata=env("KUBETUNE_SERVICE_API_KEY", str))
    # KUBETUNE_COLLECTOR_SERVICE_URL: where trial sidecars reach the service;
    # unset, ``service_url``. Set it only when the operator runs outside the
    # cluster (development) and reaches the service by another address.
    collector_service_url: str | None = field(
        default=None, metadata=env("KUBETUNE_COLLECTOR_SERVICE_URL", _url)
    )
    # KUBETUNE_COLLECTOR_IMAGE: image of the metrics-collector sidecar (the
    # chart sets the operator's own image).
    collector_image: str = field(
        default="kubetune/kubetune:0.1.0", metadata=env("KUBETUNE_COLLECTOR_IMAGE", str)
    )
    # KUBETUNE_COLLECTOR_COMMAND: the sidecar's command, words separated by spaces.
    collector_command: tuple[str, ...] = field(
        default=("python", "-m", "kubetune_suggestion.collector"),
        metadata=env("KUBETUNE_COLLECTOR_COMMAND", _words),
    )
    # KUBETUNE_COLLECTOR_RESOURCES (JSON): the sidecar's requests and limits,
    # small so it never competes with the trial for a node. Configurable
    # because a namespace's LimitRange or ResourceQuota may demand others
    # (a CPU limit, say), or a chatty trial may need a larger memory limit.
    collector_resources: Mapping[str, Mapping[str, str]] = field(
        default_factory=lambda: {
            "requests": {"cpu": "10m", "memory": "32Mi"},
            "limits": {"memory": "128Mi"},
        },
        metadata=env("KUBETUNE_COLLECTOR_RESOURCES", _resources),
    )
    # KUBETUNE_METRICS_DIR: directory of the shared emptyDir in every
    # container of a trial Pod.
    metrics_dir: str = field(default="/kubetune", metadata=env("KUBETUNE_METRICS_DIR", str))
    # KUBETUNE_NAMESPACES (comma-separated; --namespace, --all-namespaces):
    # the namespaces watched; empty, every namespace.
    namespaces: tuple[str, ...] = field(
        default=(), metadata=env("KUBETUNE_NAMESPACES", _namespaces)
    )
    # KUBETUNE_METRICS_PORT (--metrics-port): port of the Prometheus /metrics endpoint.
    metrics_port: int = field(default=9090, metadata=env("KUBETUNE_METRICS_PORT", port))
    # KUBETUNE_HEALTH_PORT (--health-port): port of the /healthz endpoint.
    health_port: int = field(default=8080, metadata=env("KUBETUNE_HEALTH_PORT", port))
    # KUBETUNE_WORKERS: concurrent reconciles (of different experiments; one
    # experiment is never reconciled twice at once).
    workers: int = field(default=8, metadata=env("KUBETUNE_WORKERS", integer(1)))
    # KUBETUNE_TRIAL_CONCURRENCY: trial operations (create, finish, stop) in
    # progress at once. Configurable because it is what bounds the operator's
    # request rate in a burst: an API server with tighter flow-control limits
    # needs less, a large one takes more.
    trial_concurrency: int = field(
        default=64, metadata=env("KUBETUNE_TRIAL_CONCURRENCY", integer(1))
    )
    # KUBETUNE_STOP_GRACE_SECONDS: seconds a pruned trial's Pod gets to exit:
    # short, because the early-stopping decision makes the rest of its work
    # useless.
    stop_grace_seconds: int = field(
        default=1, metadata=env("KUBETUNE_STOP_GRACE_SECONDS", integer(0))
    )
    # KUBETUNE_LOG_TAIL_LINES: log lines of a failed trial copied into the
    # Trial's message (at most 4000 characters). Configurable because a
    # Python traceback is often longer than ten lines.
    log_tail_lines: int = field(default=10, metadata=env("KUBETUNE_LOG_TAIL_LINES", integer(1)))
    # KUBETUNE_RECONCILE_INTERVAL_SECONDS: an experiment is reconciled at most
    # once per this many seconds; events arriving meanwhile are handled
    # together by the next reconcile. Configurable: with thousands of short
    # trials a longer interval batches more events per reconcile (less CPU)
    # for a little latency.
    reconcile_interval_seconds: float = field(
        default=0.1, metadata=env("KUBETUNE_RECONCILE_INTERVAL_SECONDS", seconds(zero=True))
    )
    # KUBETUNE_RESYNC_SECONDS: every experiment is reconciled at least this
    # often, catching anything a missed watch event or a service-side change
    # would otherwise delay.
    resync_seconds: float = field(
        default=30.0, metadata=env("KUBETUNE_RESYNC_SECONDS", seconds(zero=False))
    )
    # KUBETUNE_STATUS_INTERVAL_SECONDS: progress-only changes of an
    # Experiment's status (counts, best so far) are written at most this
    # often; phase and condition changes at once. Configurable: it trades how
    # current `kubectl get experiments` is against status writes.
    status_interval_seconds: float = field(
        default=1.0, metadata=env("KUBETUNE_STATUS_INTERVAL_SECONDS", seconds(zero=True))
    )
    # KUBETUNE_EVENT_WINDOW_SECONDS: Events that come once per trial
    # (TrialCreated, TrialPruned...) about one experiment: the first is
    # written at once, the next ones within this many seconds are combined
    # into one Event. Configurable: 0 writes one Event per trial, for whoever
    # follows every trial through Events.
    event_window_seconds: float = field(
        default=5.0, metadata=env("KUBETUNE_EVENT_WINDOW_SECONDS", seconds(zero=True))
    )
    # KUBETUNE_TRIAL_RUNNING_DELAY_SECONDS: a Trial is marked Running once its
    # Pod has run this long (counted from the end of the whole second its
    # startTime names: 1 to 2 s with the default); a trial that ends sooner
    # gets its final status only, one write instead of two.
    trial_running_delay_seconds: float = field(
        default=1.0, metadata=env("KUBETUNE_TRIAL_RUNNING_DELAY_SECONDS", seconds(zero=True))
    )
    # KUBETUNE_WATCH_GRACE_SECONDS: a watch stream (Trials, trial Pods) that
    # has not listed its objects after this long, and is failing, is reported
    # on each Experiment's Running condition (reason CannotWatch) until it
    # lists. Configurable: an API server that takes longer to list thousands
    # of Pods is slow, not broken.
    watch_grace_seconds: float = field(
        default=10.0, metadata=env("KUBETUNE_WATCH_GRACE_SECONDS", seconds(zero=False))
    )
    # KUBETUNE_STEP_REFRESH_SECONDS: how often running trials' last reported
    # step is copied to their status. Configurable: it trades how current a
    # running Trial's step is against one status write per running trial.
    step_refresh_seconds: float = field(
        default=10.0, metadata=env("KUBETUNE_STEP_REFRESH_SECONDS", seconds(zero=False))
    )
    # KUBETUNE_STOPS_WAIT_SECONDS: long-poll duration of ``GET /v1/stops``.
    stops_wait_seconds: float = field(
        default=10.0, metadata=env("KUBETUNE_STOPS_WAIT_SECONDS", seconds(zero=False))
    )
    # KUBETUNE_LOST_POD_GRACE_SECONDS: a Pod is lost (Trial running, Pod gone)
    # only after this long without it, so a watch that lags behind the
    # operator's own create is never taken for a loss. Configurable: a loaded
    # API server's watches can lag longer.
    lost_pod_grace_seconds: float = field(
        default=15.0, metadata=env("KUBETUNE_LOST_POD_GRACE_SECONDS", seconds(zero=True))
    )
    # KUBETUNE_SERVICE_RETRIES: retries of a failed request to the service
    # before the error is reported. Configurable, with the timeout below,
    # for a service behind a slow network or database.
    service_retries: int = field(default=4, metadata=env("KUBETUNE_SERVICE_RETRIES", integer(0)))
    # KUBETUNE_SERVICE_TIMEOUT_SECONDS: timeout of one request to the service.
    service_timeout_seconds: float = field(
        default=15.0, metadata=env("KUBETUNE_SERVICE_TIMEOUT_SECONDS", seconds(zero=False))
    )

    def service_credentials(self) -> str | None:
        """The bearer token the operator shows the service now (None: none configured).

        Raises:
            OSError: If the token file cannot be read.
        """
        if self.service_token_file:
            with open(self.service_token_file) as f:
                return f.read().strip()
        return self.service_api_key

    @property
    def sidecar_service_url(self) -> str:
        """The service address trial sidecars use."""
        return self.collector_service_url or self.service_url


def settings_from_env(environ: Mapping[str, str] | None = None) -> OperatorSettings:
    """Build settings from the ``KUBETUNE_*`` environment variables (``os.environ`` if omitted).

    Raises:
        SettingsError: If a variable's value does not parse or is out of
            range; the message names the variable.
    """
    return from_env(OperatorSettings, environ)
