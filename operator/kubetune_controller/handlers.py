"""Kopf handlers: they only translate watch events and delegate.

Every decision lives in :mod:`~kubetune_controller.reconcile`, every action in
:mod:`~kubetune_controller.controller`. Handlers are registered on a registry
of their own (not kopf's global one) so the operator's wiring is explicit and
a test can build it without side effects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import kopf
from prometheus_client import start_http_server

from kubetune_controller.cache import ClusterCache
from kubetune_controller.controller import Controller
from kubetune_controller.kube import Kube, load_configuration
from kubetune_controller.metrics import OperatorMetrics
from kubetune_controller.model import ExperimentView, PodView, TrialView
from kubetune_controller.service_client import ServiceClient
from kubetune_controller.settings import (
    COMPONENT,
    EXPERIMENTS,
    GROUP,
    LABEL_EXPERIMENT,
    TRIALS,
    VERSION,
    Settings,
)

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
class App:
    """The operator's dependencies, built at startup."""

    settings: Settings
    kubeconfig: str | None = None
    metrics_port: int | None = 9090
    controller: Controller | None = None


def build_registry(app: App) -> kopf.OperatorRegistry:
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
        # Only trial Pods are streamed: selected server-side by label.
        settings.watching.label_selectors["v1", "pods"] = LABEL_EXPERIMENT
        settings.watching.label_selectors[GROUP, TRIALS] = LABEL_EXPERIMENT
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
        if app.metrics_port is not None:
            start_http_server(app.metrics_port, registry=metrics.registry)
        app.controller = Controller(
            app.settings,
            Kube(load_configuration(app.kubeconfig)),
            ServiceClient(
                app.settings.service_url,
                app.settings.service_retries,
                app.settings.service_timeout_seconds,
            ),
            cache,
            metrics,
        )
        app.controller.start()
        log.info("kubetune operator started; suggestion service at %s", app.settings.service_url)

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        if app.controller is not None:
            await app.controller.stop()

    @kopf.on.event(GROUP, VERSION, EXPERIMENTS, registry=registry)
    async def experiment_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        if app.controller is not None:
            app.controller.on_experiment(ExperimentView.from_body(body), type == "DELETED")

    @kopf.on.event(
        GROUP, VERSION, TRIALS, labels={LABEL_EXPERIMENT: kopf.PRESENT}, registry=registry
    )
    async def trial_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        if app.controller is not None:
            app.controller.on_trial(TrialView.from_body(body), type == "DELETED")

    @kopf.on.event("v1", "pods", labels={LABEL_EXPERIMENT: kopf.PRESENT}, registry=registry)
    async def pod_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        if app.controller is not None:
            meta = body.get("metadata") or {}
            label = (meta.get("labels") or {}).get(LABEL_EXPERIMENT, "")
            name = (meta.get("annotations") or {}).get(LABEL_EXPERIMENT) or label
            app.controller.on_pod(label, name, PodView.from_body(body), type == "DELETED")

    return registry
