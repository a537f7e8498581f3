"""A deliberately small Kubernetes REST client for the harness.

The harness needs only a handful of calls (get, list, watch, create, patch,
delete) with client-certificate credentials, so plain httpx with an SSL
context is clearer than the generated client and keeps every request visible.
Objects are plain JSON dicts, exactly as the API server sends them.
"""

from __future__ import annotations

import base64
import json
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

Obj = dict[str, Any]


class ApiError(Exception):
    """A non-2xx answer from the API server.

    Attributes:
        status: The HTTP status code.
        body: The decoded response body (a ``Status`` object when possible).
    """

    def __init__(self, status: int, body: Any, method: str, path: str) -> None:
        self.status = status
        self.body = body
        message = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"{method} {path}: {status} {message}")


def _materialise(data_b64: str | None, path: str | None, suffix: str) -> str | None:
    """Return a file path for inline kubeconfig data (ssl wants files)."""
    if path:
        return path
    if not data_b64:
        return None
    f = tempfile.NamedTemporaryFile(prefix="kubetune-e2e-", suffix=suffix, delete=False)  # noqa: SIM115
    f.write(base64.b64decode(data_b64))
    f.close()
    return f.name


class Api:
    """An authenticated connection to one API server.

    Args:
        server: Base URL, e.g. ``https://127.0.0.1:6443``.
        ca_file: CA bundle that signed the server's certificate.
        cert_file: Client certificate (optional when ``token`` is given).
        key_file: Client key.
        token: Bearer token, used instead of a client certificate.
        timeout: Default request timeout in seconds.
    """

    def __init__(
        self,
        server: str,
        ca_file: str | None,
        cert_file: str | None = None,
        key_file: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.server = server.rstrip("/")
        self.ca_file = ca_file
        self.cert_file = cert_file
        self.key_file = key_file
        self.token = token
        self.timeout = timeout
        self._client = self._new_client(timeout)

    def ssl_context(self) -> ssl.SSLContext:
        """Build the TLS context carrying the CA and client credentials."""
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file and self.key_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def _new_client(self, timeout: float | None) -> httpx.Client:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return httpx.Client(
            base_url=self.server,
            verify=self.ssl_context(),
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
        )

    @classmethod
    def from_kubeconfig(cls, path: str | Path, context: str | None = None) -> Api:
        """Connect with the credentials of a kubeconfig's (current) context.

        Only client certificates and static tokens are supported: that is all
        the local cluster issues, and the tests themselves use kubectl.
        """
        cfg = yaml.safe_load(Path(path).read_text())
        ctx_name = context or cfg["current-context"]
        ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == ctx_name)
        cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
        user = next(u["user"] for u in cfg["users"] if u["name"] == ctx["user"])
        return cls(
            cluster["server"],
            _materialise(
                cluster.get("certificate-authority-data"),
                cluster.get("certificate-authority"),
                ".crt",
            ),
            _materialise(
                user.get("client-certificate-data"), user.get("client-certificate"), ".crt"
            ),
            _materialise(user.get("client-key-data"), user.get("client-key"), ".key"),
            user.get("token"),
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        """Send one request and decode the JSON answer.

        Raises:
            ApiError: On any non-2xx status.
        """
        content = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": content_type} if content is not None else {}
        resp = self._client.request(method, path, content=content, params=params, headers=headers)
        try:
            data = resp.json()
        except ValueError:
            data = resp.text
        if resp.status_code >= 300:
            raise ApiError(resp.status_code, data, method, path)
        return data

    def get(self, path: str, **params: Any) -> Any:
        """GET a path; keyword arguments become query parameters."""
        return self.request("GET", path, params=params or None)

    def create(self, path: str, body: Obj) -> Any:
        """POST an object to a collection path."""
        return self.request("POST", path, body)

    def put(self, path: str, body: Obj) -> Any:
        """PUT (replace) an object."""
        return self.request("PUT", path, body)

    def merge_patch(self, path: str, patch: Obj) -> Any:
        """Apply an RFC 7386 JSON merge patch (lists are replaced whole)."""
        return self.request("PATCH", path, patch, content_type="application/merge-patch+json")

    def strategic_patch(self, path: str, patch: Obj) -> Any:
        """Apply a Kubernetes strategic merge patch."""
        return self.request(
            "PATCH", path, patch, content_type="application/strategic-merge-patch+json"
        )

    def delete(self, path: str, body: Obj | None = None) -> Any:
        """DELETE an object, optionally with ``DeleteOptions``."""
        return self.request("DELETE", path, body)

    def watch(
        self, path: str, resource_version: str, timeout_seconds: int = 240, **params: Any
    ) -> Iterator[Obj]:
        """Stream watch events (``{"type": ..., "object": ...}``) for a collection.

        The server closes the stream after ``timeout_seconds``; callers re-list
        and watch again, which is also how they recover from ``410 Gone``.
        """
        query = dict(params)
        query.update(
            watch="true",
            resourceVersion=resource_version,
            timeoutSeconds=str(timeout_seconds),
            allowWatchBookmarks="true",
        )
        # A dedicated client per stream: a long-lived response must not hold
        # one of the pooled connections other threads use for short calls.
        with (
            self._new_client(None) as client,
            client.stream("GET", path, params=query, timeout=timeout_seconds + 30) as resp,
        ):
            if resp.status_code >= 300:
                resp.read()
                raise ApiError(resp.status_code, resp.text, "WATCH", path)
            for line in resp.iter_lines():
                if line.strip():
                    yield json.loads(line)
