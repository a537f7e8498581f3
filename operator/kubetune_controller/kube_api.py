"""What the operator does to the Kubernetes API: one typed interface, :class:`KubeApi`.

Kopf watches Experiments; every other call the operator makes to the API
server is one of the operations below. :class:`~kubetune_controller.kube.Kube`
carries them out over HTTP (the only module that speaks it to the API
server); the controller tests' in-memory cluster implements the same
interface, so the code above it is checked against one contract, the one
the RBAC rules in the Helm chart mirror.

Objects go in and come out as the plain dicts the API server sends and the
pure builders (:mod:`~kubetune_controller.pods`) return.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from typing import Any, Protocol

Obj = dict[str, Any]


class KubeError(Exception):
    """A non-2xx answer the operator did not expect.

    Attributes:
        status: The HTTP status.
        reason: The Status object's reason (``AlreadyExists``, ``Invalid``...).
        message: The Status object's message.
    """

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class KubeUnreachable(Exception):
    """A LIST or WATCH got no answer: connection refused or reset, or a read timed out."""


class KubeApi(Protocol):
    """The operator's operations on the Kubernetes API.

    Writes are idempotent: creates treat "already exists" as success and
    return the existing object, deletes treat "not found" as success, status
    writes are JSON merge patches of the operator's own fields.
    """

    async def create_trial(self, body: Obj) -> tuple[Obj, bool]:
        """Create a Trial, or return the existing one of that name; and whether it was new."""
        ...

    async def create_pod(self, body: Obj) -> Obj:
        """Create a Pod, or return the existing one of that name."""
        ...

    async def create_secret(self, body: Obj) -> bool:
        """Create a Secret; ``False`` if one of that name exists (it is not read back).

        The operator never reads Secrets: a trial's token Secret has a name
        only its Trial's (see :func:`~kubetune_controller.pods.token_secret_name`).
        """
        ...

    async def get_pod(self, namespace: str, name: str) -> Obj | None:
        """Read a Pod directly from the API server; ``None`` if it does not exist."""
        ...

    async def delete_pod(self, namespace: str, name: str, grace_seconds: int) -> bool:
        """Delete a Pod with a grace period; ``False`` if it was already gone."""
        ...

    async def pod_logs(self, namespace: str, name: str, container: str, lines: int) -> str | None:
        """The last ``lines`` log lines of a container, or ``None`` if unavailable."""
        ...

    async def patch_trial_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> Obj:
        """Merge-patch a Trial's status; the Trial as written."""
        ...

    async def patch_experiment_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> Obj:
        """Merge-patch an Experiment's status (lists such as conditions are replaced)."""
        ...

    async def create_event(self, body: Obj) -> None:
        """Record an Event; failures are logged, never raised (events are best effort)."""
        ...

    async def list_page(self, path: str, params: Mapping[str, str]) -> Obj:
        """One page of a LIST of the collection at ``path`` (e.g. ``/api/v1/pods``).

        Raises:
            KubeError: On an error answer (403 where RBAC forbids the list).
            KubeUnreachable: When the API server does not answer.
        """
        ...

    def watch(
        self, path: str, params: Mapping[str, str], read_timeout: float
    ) -> AsyncGenerator[Obj, None]:
        """The events of a WATCH of ``path``, decoded, until the server ends it.

        Each is a ``{"type": ..., "object": ...}`` watch event, bookmarks and
        ERROR events included. The caller closes the generator when it stops
        early (:func:`contextlib.aclosing`), which closes the connection.

        Args:
            path: The collection.
            params: The query (``watch``, ``resourceVersion``, ``labelSelector``...).
            read_timeout: Seconds of silence after which the watch counts as broken.

        Raises:
            KubeError: On an error answer (410 when the version is too old).
            KubeUnreachable: When the API server does not answer or goes silent.
        """
        ...

    async def close(self) -> None:
        """Release the connections."""
        ...
