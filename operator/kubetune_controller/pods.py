"""Pure builders of the objects the operator creates: Trials, their Pods, Events.

A trial Pod is the user's Pod template with these additions and nothing else:

- ``${params.NAME}`` substituted in every container's command, args and env
  values (:mod:`kubetune_suggestion.template`, shared with ``kubetune run``);
- a shared ``emptyDir`` mounted in every container, and ``KUBETUNE_METRICS_FILE``
  (plus the trial's identity) in every container's env;
- the metrics collector as a native sidecar (an init container with
  ``restartPolicy: Always``): it starts before the trial, tails the metrics
  file, streams reports to the service with the per-trial token, and is
  stopped by the kubelet once the trial's containers finish;
- ``automountServiceAccountToken: false`` unless the template sets it: a
  training script has no business calling the Kubernetes API.

The per-trial token is not in the Pod spec (anyone who may read Pods, the
built-in ``view`` role included, would read it there): it is in a Secret of
its own (:func:`build_token_secret`, owned by the Trial, so it goes with it),
mounted into the collector only. The collector meets the ``restricted`` Pod
Security profile, so a namespace that enforces it runs trials whose own
containers do.

The user's command is run as written (not wrapped in a shell or a launcher)
and its stdout/stderr are not redirected, so ``kubectl logs`` shows exactly
what the training code printed. Resources (GPU requests included) are kept.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from kubetune_controller.model import ExperimentResource, label_value, trial_name
from kubetune_controller.settings import (
    API_VERSION,
    COMPONENT,
    LABEL_EXPERIMENT,
    LABEL_NUMBER,
    LABEL_TRIAL,
    OperatorSettings,
)
from kubetune_suggestion.template import (
    ENV_EXPERIMENT_UID,
    ENV_METRICS_FILE,
    ENV_TRIAL_NUMBER,
    TemplateError,
    render_pod_spec,
    trial_env,
)

__all__ = [
    "COLLECTOR_NAME",
    "COLLECTOR_UID",
    "METRICS_VOLUME",
    "TOKEN_VOLUME",
    "TemplateError",
    "build_event",
    "build_token_secret",
    "build_trial",
    "build_trial_pod",
    "owner_reference",
    "token_secret_name",
]

# Names the operator adds to a trial Pod; a template using them is refused.
COLLECTOR_NAME = "kubetune-collector"
METRICS_VOLUME = "kubetune-metrics"
TOKEN_VOLUME = "kubetune-trial-token"
METRICS_FILE_NAME = "metrics.jsonl"
# Where the collector finds the token (a Secret volume) and the key it is under.
TOKEN_DIR = "/var/run/secrets/kubetune.io/trial"
TOKEN_KEY = "token"
ENV_TOKEN_FILE = "KUBETUNE_TRIAL_TOKEN_FILE"
# The collector's user: the kubetune image's non-root user (any non-root uid
# would do; a number, so the kubelet can check runAsNonRoot without /etc/passwd).
COLLECTOR_UID = 65532
# Mode of the token file: readable by the collector's uid whatever the Pod's
# fsGroup. Only the collector mounts the volume, so no other container sees it.
TOKEN_FILE_MODE = 0o444


def owner_reference(
    kind: str, name: str, uid: str, api_version: str = API_VERSION
) -> dict[str, Any]:
    """A controller owner reference: garbage collection deletes the child with its owner."""
    return {
        "apiVersion": api_version,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _labels(experiment: str, number: int) -> dict[str, str]:
    return {
        LABEL_EXPERIMENT: label_value(experiment),
        LABEL_TRIAL: label_value(trial_name(experiment, number)),
        LABEL_NUMBER: str(number),
    }


def build_trial(
    experiment: ExperimentResource, number: int, params: Mapping[str, Any]
) -> dict[str, Any]:
    """The Trial object for one configuration, owned by its Experiment.

    Args:
        experiment: The owning Experiment.
        number: The trial number the service allocated.
        params: The configuration.
    """
    name = trial_name(experiment.name, number)
    return {
        "apiVersion": API_VERSION,
        "kind": "Trial",
        "metadata": {
            "name": name,
            "namespace": experiment.namespace,
            "labels": _labels(experiment.name, number),
            "ownerReferences": [owner_reference("Experiment", experiment.name, experiment.uid)],
        },
        "spec": {
            "experiment": experiment.name,
            "number": number,
            "params": dict(params),
            "podName": name,
        },
    }


def build_trial_pod(
    experiment: ExperimentResource,
    trial_uid: str,
    number: int,
    params: Mapping[str, Any],
    settings: OperatorSettings,
    pod_name: str | None = None,
) -> dict[str, Any]:
    """The Pod that runs one trial, owned by its Trial.

    Its collector reads the trial's token from the Secret
    :func:`build_token_secret` makes, which must exist before the Pod starts.

    Args:
        experiment: The Experiment (its ``spec.template`` and identity).
        trial_uid: The Trial's uid (for the owner reference and the Secret's name).
        number: The trial number.
        params: The configuration to substitute.
        settings: Collector image, service address, metrics directory.
        pod_name: The Pod's name: the Trial's, or a retry's own.

    Raises:
        TemplateError: If the template references an unknown parameter or
            collides with a name the operator adds.
    """
    name = pod_name or trial_name(experiment.name, number)
    template: Mapping[str, Any] = experiment.spec.get("template") or {}
    declared = [str(p.get("name")) for p in experiment.spec.get("parameters") or []]
    spec = render_pod_spec(template.get("spec") or {}, params, declared)
    _check_reserved_names(spec)

    metrics_file = f"{settings.metrics_dir.rstrip('/')}/{METRICS_FILE_NAME}"
    mount = {"name": METRICS_VOLUME, "mountPath": settings.metrics_dir}
    identity = trial_env(
        experiment=experiment.name,
        experiment_uid=experiment.uid,
        trial_number=number,
        params=params,
        metrics_file=metrics_file,
    )
    collector = _collector_container(experiment, number, settings, metrics_file, mount)
    token_volume = {
        "name": TOKEN_VOLUME,
        "secret": {
            "secretName": token_secret_name(trial_name(experiment.name, number), trial_uid),
            "items": [{"key": TOKEN_KEY, "path": TOKEN_KEY}],
            "defaultMode": TOKEN_FILE_MODE,
        },
    }

    if spec.get("containers"):
        spec["containers"] = [_with_metrics(c, identity, mount) for c in spec["containers"]]
    spec["initContainers"] = [collector, *(spec.get("initContainers") or [])]
    spec["volumes"] = [
        *(spec.get("volumes") or []),
        {"name": METRICS_VOLUME, "emptyDir": {}},
        token_volume,
    ]
    # The Pod's ServiceAccount token is not mounted unless the template asks:
    # nothing kubetune runs in the Pod uses it.
    spec.setdefault("automountServiceAccountToken", False)
    # A trial runs once: a restarted container would report its steps again
    # from zero and corrupt the learning curve early stopping compares.
    spec["restartPolicy"] = "Never"
    deadline = _active_deadline(
        experiment.spec.get("trialTimeoutSeconds"), spec.get("activeDeadlineSeconds")
    )
    if deadline is not None:
        spec["activeDeadlineSeconds"] = deadline

    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _trial_pod_metadata(experiment, number, name, trial_uid, template),
        "spec": spec,
    }


def _check_reserved_names(spec: Mapping[str, Any]) -> None:
    """Refuse a rendered Pod spec that uses a name the operator adds.

    Raises:
        TemplateError: Naming the first offending field.
    """
    reserved = (METRICS_VOLUME, TOKEN_VOLUME)
    for i, container in enumerate(spec.get("containers") or []):
        for mount in container.get("volumeMounts") or []:
            if mount.get("name") in reserved:
                raise TemplateError(
                    f"template.spec.containers[{i}].volumeMounts",
                    f"the volume name {mount.get('name')} is reserved",
                )
    for container in spec.get("initContainers") or []:
        if container.get("name") == COLLECTOR_NAME:
            raise TemplateError(
                "template.spec.initContainers", f"the name {COLLECTOR_NAME} is reserved"
            )
    for volume in spec.get("volumes") or []:
        if volume.get("name") in reserved:
            raise TemplateError(
                "template.spec.volumes", f"the volume name {volume.get('name')} is reserved"
            )


def _with_metrics(
    container: Mapping[str, Any], identity: Mapping[str, str], mount: Mapping[str, str]
) -> dict[str, Any]:
    """A trial container with the metrics volume and the trial's identity in its env."""
    out = {
        **container,
        "env": _with_env(container.get("env") or [], identity),
        "volumeMounts": [*(container.get("volumeMounts") or []), dict(mount)],
    }
    # On failure the kubelet copies the log tail into the termination
    # message, so the Trial can show why even where logs are unreachable.
    out.setdefault("terminationMessagePolicy", "FallbackToLogsOnError")
    return out


def _collector_container(
    experiment: ExperimentResource,
    number: int,
    settings: OperatorSettings,
    metrics_file: str,
    mount: Mapping[str, str],
) -> dict[str, Any]:
    """The metrics collector, as a native sidecar (an init container that keeps running).

    It meets the ``restricted`` Pod Security profile whatever the Pod's own
    security context. It only reads: the metrics file (created by the trial
    with the usual umask, so readable by any uid) and the token file.
    """
    env = {
        "KUBETUNE_SERVICE_URL": settings.sidecar_service_url,
        ENV_EXPERIMENT_UID: experiment.uid,
        ENV_TRIAL_NUMBER: str(number),
        # The token only authorises reports for this one trial; the file is
        # mounted into the collector only, so training code cannot read it.
        ENV_TOKEN_FILE: f"{TOKEN_DIR}/{TOKEN_KEY}",
        ENV_METRICS_FILE: metrics_file,
    }
    return {
        "name": COLLECTOR_NAME,
        "image": settings.collector_image,
        "command": list(settings.collector_command),
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "volumeMounts": [
            dict(mount),
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
        ],
        "restartPolicy": "Always",
        "resources": copy.deepcopy(dict(settings.collector_resources)),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": COLLECTOR_UID,
            "runAsGroup": COLLECTOR_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }


def token_secret_name(trial: str, trial_uid: str) -> str:
    """The name of a trial's token Secret: its Trial's, and a piece of the Trial's uid.

    The uid makes the name the Trial's own: a Secret left by a deleted Trial
    of the same name (garbage collection takes a moment) is never taken for
    this one's, without the operator reading Secrets to check.
    """
    return f"{trial}-token-{trial_uid.replace('-', '')[:8]}"


def build_token_secret(
    experiment: ExperimentResource,
    number: int,
    trial_uid: str,
    token: str,
) -> dict[str, Any]:
    """The Secret holding a trial's token, owned by its Trial (it goes with it).

    Every attempt of the trial (a retry runs in a Pod of its own) mounts the
    same Secret: the token depends on the trial, not the attempt.

    Args:
        experiment: The Experiment (namespace, name).
        number: The trial number.
        trial_uid: The Trial's uid.
        token: The per-trial token the service issued.
    """
    name = trial_name(experiment.name, number)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": token_secret_name(name, trial_uid),
            "namespace": experiment.namespace,
            "labels": _labels(experiment.name, number),
            "ownerReferences": [owner_reference("Trial", name, trial_uid)],
        },
        "type": "Opaque",
        # Never changes: the kubelet need not watch it for updates.
        "immutable": True,
        "stringData": {TOKEN_KEY: token},
    }


def _active_deadline(trial_timeout: Any, template_deadline: Any) -> int | None:
    """The Pod's ``activeDeadlineSeconds``: the trial timeout, or the template's if sooner.

    The kubelet enforces it (stops the containers, the Pod fails with reason
    DeadlineExceeded), also while the operator is down. ``None``: leave the
    template's own value (if any) as it is.
    """
    if not trial_timeout:
        return None
    if template_deadline:
        return min(int(trial_timeout), int(template_deadline))
    return int(trial_timeout)


def _trial_pod_metadata(
    experiment: ExperimentResource,
    number: int,
    name: str,
    trial_uid: str,
    template: Mapping[str, Any],
) -> dict[str, Any]:
    """The trial Pod's metadata: the template's labels and annotations plus the operator's."""
    meta: Mapping[str, Any] = template.get("metadata") or {}
    return {
        "name": name,
        "namespace": experiment.namespace,
        "labels": {**(meta.get("labels") or {}), **_labels(experiment.name, number)},
        "annotations": {
            **(meta.get("annotations") or {}),
            # The full name: the label holds a hash for names over 63 characters.
            LABEL_EXPERIMENT: experiment.name,
        },
        # The Trial's name, not the Pod's: a retry's Pod (<trial>-retryN)
        # naming itself would point at no Trial, and the garbage collector
        # deletes a Pod whose owner does not exist within milliseconds.
        "ownerReferences": [
            owner_reference("Trial", trial_name(experiment.name, number), trial_uid)
        ],
    }


def _with_env(env: list[dict[str, Any]], extra: Mapping[str, str]) -> list[dict[str, Any]]:
    """``env`` with ``extra`` set (the operator's values win over the template's)."""
    kept = [e for e in env if e.get("name") not in extra]
    return [*kept, *({"name": k, "value": v} for k, v in extra.items())]


def build_event(
    involved: Mapping[str, str],
    reason: str,
    message: str,
    now: datetime,
    warning: bool = False,
    instance: str = "",
    first: datetime | None = None,
    count: int = 1,
) -> dict[str, Any]:
    """A core/v1 Event about an object, as ``kubectl describe`` shows it.

    Args:
        involved: ``apiVersion``, ``kind``, ``name``, ``namespace`` and ``uid``
            of the object the event is about.
        reason: One CamelCase word (TrialCreated, TrialPruned, GoalReached...).
        message: What happened, for a person.
        now: The event time (the last one, for an Event that stands for several).
        warning: ``Warning`` instead of ``Normal``.
        instance: The reporting instance (the operator's pod name).
        first: When the first of several happened (kubectl: "x3 over 4s").
        count: How many events this one stands for.
    """
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    first_stamp = (first or now).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "name": f"{involved['name']}.{uuid.uuid4().hex[:16]}",
            "namespace": involved["namespace"],
        },
        "involvedObject": dict(involved),
        "reason": reason,
        "message": message[:1024],
        "type": "Warning" if warning else "Normal",
        "firstTimestamp": first_stamp,
        "lastTimestamp": stamp,
        "count": count,
        "source": {"component": COMPONENT},
        "reportingComponent": f"kubetune.io/{COMPONENT}",
        "reportingInstance": instance or COMPONENT,
    }
