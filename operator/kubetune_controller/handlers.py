"""Kopf handlers and the watch streams: they only translate watch events and delegate.

Every decision lives in the pure modules (:mod:`~kubetune_controller.reconcile`,
:mod:`~kubetune_controller.trial_plan`, :mod:`~kubetune_controller.status`), every
action in :mod:`~kubetune_controller.controller` and the modules it coordinates.
Handlers are registered on a registry of their own (not kopf's global one) so
the operator's wiring is explicit and
a test can build it without side effects. Kopf watches Experiments; Trials
and trial Pods, which change by the thousand, come from the lighter streams of
:mod:`~kubetune_controller.watch`, started at kopf's startup. Kopf's
``/healthz`` (the liveness and readiness probes) asks the probe handler here
whether every one of those streams is up, since kopf does not watch them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import kopf
from prometheus_client import start_http_server

from kubetune_controller.cache import ClusterCache
from kubetune_controller.controller import Controller
from kubetune_controller.kube import Kube, load_configuration
from kubetune_controller.kube_api import KubeApi, Obj
from kubetune_controller.metrics import OperatorMetrics
from kubetune_controller.model import ExperimentResource, PodResource, TrialResource
from kubetune_controller.service_client import ServiceClient
from kubetune_controller.settings import (
    COMPONENT,
    EXPERIMENTS,
    GROUP,
    LABEL_EXPERIMENT,
    TRIALS,
    VERSION,
    OperatorSettings,
)
from kubetune_controller.watch import STREAM_DOWN_LIMIT_SECONDS, ObjectStream, stalled_streams

log = logging.getLogger(__name__)


class NoDiffBase(kopf.DiffBaseStorage):
    """A diff base that keeps nothing: the operator has only event handlers.

    Kopf builds an object's "essence" on every event, for change-detecting
    handlers (on.create/update) that this operator does not register; the
    default storage deep-copies the whole body to do it, which was the
    single largest cost of a trial Pod's event.
    """

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        """An empty essence: nothing compares it."""
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        """No stored essence."""
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        """Store nothing (no annotation written on the object)."""
        return None


@dataclass
class OperatorApp:
    """The operator's dependencies, built at startup."""

    settings: OperatorSettings
    # A kubeconfig file (--kubeconfig); None: the in-cluster account, else
    # the kubeconfig the Kubernetes client finds (KUBECONFIG, ~/.kube/config).
    kubeconfig: str | None = None
    controller: Controller | None = None
    # The Trial and trial-Pod streams, once started (the probe checks them).
    streams: list[ObjectStream] = field(default_factory=list)
    # Seconds a stream may stay down before the probe fails.
    stream_down_limit_seconds: float = STREAM_DOWN_LIMIT_SECONDS


def build_registry(app: OperatorApp) -> kopf.OperatorRegistry:
    """Register the operator's handlers for ``app``.

    The watch handlers are coroutines on purpose: kopf runs plain functions in
    a thread pool, and the controller's queue belongs to the event loop.
    """
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # The same loaders as kube.py: the in-cluster account, else the
        # kubeconfig. (A registry of our own has none of kopf's defaults.)
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Standalone: one replica, and every action is idempotent anyway.
        settings.peering.standalone = True
        # Our own Events say what happened; kopf's per-handler ones are noise.
        settings.posting.level = logging.WARNING
        settings.posting.reporting_component = COMPONENT
        settings.persistence.diffbase_storage = NoDiffBase()
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        cache = ClusterCache()
        metrics = OperatorMetrics(cache.snapshot)
        start_http_server(app.settings.metrics_port, registry=metrics.registry)
        kube = Kube(load_configuration(app.kubeconfig))
        app.controller = Controller(
            app.settings,
            kube,
            ServiceClient(
                app.settings.service_url,
                app.settings.service_retries,
                app.settings.service_timeout_seconds,
                credentials=app.settings.service_credentials,
            ),
            cache,
            metrics,
        )
        app.controller.start()
        app.streams = watch_streams(kube, app.controller, app.settings.namespaces)
        for stream in app.streams:
            app.controller.adopt(
                stream.run(), f"watch {stream.path}", stream.synced, stream.failing
            )
        log.info("kubetune operator started; suggestion service at %s", app.settings.service_url)

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        if app.controller is not None:
            await app.controller.stop()

    @kopf.on.probe(id="watch-streams", registry=registry)
    async def watch_streams_probe(**_: Any) -> dict[str, str]:
        # Failing (permanently, so kopf does not retry it within the request)
        # makes /healthz answer 500: the kubelet restarts an operator whose
        # Trials or Pods it no longer sees change.
        now = time.monotonic()
        stalled = stalled_streams(app.streams, now, app.stream_down_limit_seconds)
        if stalled:
            raise kopf.PermanentError("watch streams down: " + "; ".join(stalled))
        return {
            s.path: "up" if s.down_since is None else f"down for {s.down_for(now):.0f} s"
            for s in app.streams
        }

    @kopf.on.event(GROUP, VERSION, EXPERIMENTS, registry=registry)
    async def experiment_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        if app.controller is not None:
            app.controller.on_experiment(ExperimentResource.from_body(body), type == "DELETED")

    return registry


def watch_streams(
    kube: KubeApi, controller: Controller, namespaces: Sequence[str]
) -> list[ObjectStream]:
    """The Trial and trial-Pod streams: one pair per namespace, or one cluster-wide."""
    scopes: list[str | None] = list(namespaces) or [None]
    streams = []
    for namespace in scopes:
        prefix = f"/namespaces/{namespace}" if namespace else ""

        def trial_snapshot(items: list[Obj], namespace: str | None = namespace) -> None:
            controller.on_trial_snapshot([TrialResource.from_body(o) for o in items], namespace)

        def pod_snapshot(items: list[Obj], namespace: str | None = namespace) -> None:
            controller.on_pod_snapshot(
                [(_pod(o)[0], PodResource.from_body(o)) for o in items], namespace
            )

        def trial_event(kind: str, obj: Obj) -> None:
            controller.on_trial(TrialResource.from_body(obj), kind == "DELETED")

        def pod_event(kind: str, obj: Obj) -> None:
            label, name = _pod(obj)
            controller.on_pod(label, name, PodResource.from_body(obj), kind == "DELETED")

        streams.append(
            ObjectStream(
                kube,
                f"/apis/{GROUP}/{VERSION}{prefix}/{TRIALS}",
                LABEL_EXPERIMENT,
                trial_snapshot,
                trial_event,
            )
        )
        streams.append(
            ObjectStream(kube, f"/api/v1{prefix}/pods", LABEL_EXPERIMENT, pod_snapshot, pod_event)
        )
    return streams


def _pod(obj: Obj) -> tuple[str, str]:
    """A trial Pod's experiment label and its experiment's full name.

    The label is hashed when the name is too long for a label value; the
    annotation of the same key keeps the name itself.
    """
    meta = obj.get("metadata") or {}
    label = str((meta.get("labels") or {}).get(LABEL_EXPERIMENT, ""))
    name = str((meta.get("annotations") or {}).get(LABEL_EXPERIMENT) or label)
    return label, name
