"""The service's own calls to the Kubernetes API, from inside a cluster.

Two, both with the Pod's ServiceAccount token: TokenReviews of the tokens
callers show (:mod:`.auth`), and the Secret that keeps the trial-token secret
(:meth:`InCluster.token_secret`). The chart grants exactly these: the
``system:auth-delegator`` ClusterRole (create TokenReviews), and get and
create of Secrets in the service's namespace.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import httpx

from kubetune_suggestion.env_settings import SettingsError
from kubetune_suggestion.service.auth import Review, Reviewer
from kubetune_suggestion.service.errors import Unavailable

log = logging.getLogger(__name__)

ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
SECRET_KEY = "secret"


def in_cluster_reviewer(audience: str) -> Reviewer:
    """TokenReviews for ``audience`` by the API server of the cluster the service runs in.

    Raises:
        SettingsError: Outside a Pod with a ServiceAccount token.
    """
    cluster = InCluster.from_environment()
    return lambda token: cluster.review(token, audience)


class InCluster:
    """A client of the API server of the cluster the service runs in.

    Args:
        server: The API server's URL.
        account_dir: The Pod's ServiceAccount files (token, ca.crt, namespace).
    """

    def __init__(self, server: str, account_dir: Path = ACCOUNT_DIR) -> None:
        self.server = server
        self.account_dir = account_dir
        self.namespace = (account_dir / "namespace").read_text().strip()
        self._http = httpx.Client(base_url=server, verify=str(account_dir / "ca.crt"), timeout=10.0)

    @classmethod
    def from_environment(cls) -> InCluster:
        """The client of this Pod's cluster.

        Raises:
            SettingsError: Outside a Pod, or without a mounted ServiceAccount token.
        """
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host or not (ACCOUNT_DIR / "token").is_file():
            raise SettingsError(
                "KUBETUNE_TOKEN_AUDIENCE and KUBETUNE_SECRET_NAME need the Kubernetes API:"
                " run the service in a Pod with its ServiceAccount token mounted"
            )
        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}")

    def _request(self, method: str, path: str, body: Any = None) -> httpx.Response:
        # Read per call: the kubelet rotates the projected token.
        token = (self.account_dir / "token").read_text().strip()
        return self._http.request(
            method, path, json=body, headers={"Authorization": f"Bearer {token}"}
        )

    def review(self, token: str, audience: str) -> Review:
        """The user ``token`` authenticates for ``audience`` (a TokenReview).

        Raises:
            Unavailable: If the API server did not answer the review.
        """
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [audience]},
        }
        try:
            resp = self._request("POST", "/apis/authentication.k8s.io/v1/tokenreviews", body)
        except httpx.HTTPError as exc:
            raise Unavailable(f"cannot review the token: {type(exc).__name__}: {exc}") from exc
        if resp.status_code != 201:
            raise Unavailable(f"cannot review the token: the API server said {resp.status_code}")
        status = resp.json().get("status", {})
        if not status.get("authenticated"):
            return Review(None, status.get("error") or "not authenticated")
        if audience not in (status.get("audiences") or [audience]):
            return Review(None, f"not issued for the audience {audience!r}")
        return Review(status.get("user", {}).get("username"))

    def token_secret(self, name: str) -> str:
        """The trial-token secret kept in Secret ``name``, created with a new one if absent.

        Two replicas starting at once both try to create it; the one refused
        (409) reads the winner's.
        """
        path = f"/api/v1/namespaces/{self.namespace}/secrets"
        for _ in range(3):
            resp = self._request("GET", f"{path}/{name}")
            if resp.status_code == 200:
                data = resp.json().get("data") or {}
                if SECRET_KEY not in data:
                    raise SettingsError(f"Secret {self.namespace}/{name} has no {SECRET_KEY!r} key")
                return base64.b64decode(data[SECRET_KEY]).decode()
            if resp.status_code != 404:
                raise SettingsError(
                    f"cannot read Secret {self.namespace}/{name}: {resp.status_code} {resp.text}"
                )
            body = {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": name,
                    "labels": {"app.kubernetes.io/part-of": "kubetune"},
                },
                "type": "Opaque",
                "stringData": {SECRET_KEY: secrets.token_hex(32)},
            }
            created = self._request("POST", path, body)
            if created.status_code == 201:
                log.info("created Secret %s/%s with a new trial-token secret", self.namespace, name)
                continue  # read it back, as a replica that lost the race does
            if created.status_code != 409:
                raise SettingsError(
                    f"cannot create Secret {self.namespace}/{name}:"
                    f" {created.status_code} {created.text}"
                )
        raise SettingsError(f"Secret {self.namespace}/{name} vanished while it was created")
