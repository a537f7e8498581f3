"""`python -m kubetune_controller` (the chart's command) ends promptly at SIGTERM.

Also as a container's PID 1, where a signal without a handler is ignored:
once running (kopf's own shutdown, with its watches open) and while still
starting (imports), before kopf has a handler. The API server is a stand-in
that answers discovery, lists nothing and keeps every watch open.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from kubetune_suggestion.service.testing import free_port
from tests.sigterm import PROMPT_SECONDS, catches_sigterm, start, wait_until


def _resource(name: str, kind: str, namespaced: bool = True) -> dict[str, Any]:
    return {
        "name": name,
        "singularName": kind.lower(),
        "namespaced": namespaced,
        "kind": kind,
        "verbs": ["get", "list", "watch", "create", "patch", "delete"],
    }


DISCOVERY: dict[str, Any] = {
    "/api": {"kind": "APIVersions", "versions": ["v1"]},
    "/apis": {
        "kind": "APIGroupList",
        "groups": [
            {
                "name": "kubetune.io",
                "versions": [{"groupVersion": "kubetune.io/v1alpha1", "version": "v1alpha1"}],
                "preferredVersion": {"groupVersion": "kubetune.io/v1alpha1", "version": "v1alpha1"},
            }
        ],
    },
    "/api/v1": {
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            _resource("pods", "Pod"),
            _resource("events", "Event"),
            _resource("namespaces", "Namespace", namespaced=False),
        ],
    },
    "/apis/kubetune.io/v1alpha1": {
        "kind": "APIResourceList",
        "groupVersion": "kubetune.io/v1alpha1",
        "resources": [
            _resource("experiments", "Experiment"),
            _resource("experiments/status", "Experiment"),
            _resource("trials", "Trial"),
            _resource("trials/status", "Trial"),
        ],
    },
}


@pytest.fixture
def api_server() -> Iterator[str]:
    """A stand-in API server: discovery, empty lists, watches that stay open."""
    closing = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _json(self, body: Any, status: int = 200) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            if url.path in DISCOVERY:
                return self._json(DISCOVERY[url.path])
            if parse_qs(url.query).get("watch", [""])[0] in ("true", "1"):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.flush()
                closing.wait()
                return None
            return self._json({"kind": "List", "metadata": {"resourceVersion": "1"}, "items": []})

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._json({}, 201)

        do_PATCH = do_POST

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        closing.set()
        server.shutdown()
        server.server_close()


def _operator(tmp_path: Path, api: str) -> list[str]:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": api}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    return [
        sys.executable,
        "-m",
        "kubetune_controller",
        f"--kubeconfig={kubeconfig}",
        "--all-namespaces",
        # Nothing listens there: the operator retries, which must not delay the stop.
        f"--service-url=http://127.0.0.1:{free_port()}",
        f"--metrics-port={free_port()}",
        f"--health-port={free_port()}",
    ]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("KUBETUNE_", "KUBERNETES_"))}


def test_running_operator_stops_promptly_at_sigterm(tmp_path: Path, api_server: str) -> None:
    log = tmp_path / "operator.log"
    with log.open("w") as out:
        operator = start(_operator(tmp_path, api_server), env=_env(), stdout=out, stderr=out)
        try:
            wait_until(
                lambda: "operator started" in log.read_text() or operator.popen.poll() is not None,
                60,
                "the operator to start",
            )
            assert operator.popen.poll() is None, log.read_text()
            time.sleep(0.5)  # its watches are open now
            code, seconds = operator.sigterm()
        finally:
            operator.kill()
    assert code == 0, log.read_text()
    assert seconds < PROMPT_SECONDS


def test_starting_operator_stops_promptly_at_sigterm(tmp_path: Path, api_server: str) -> None:
    # The signal arrives during the imports: the handler is there before them.
    log = tmp_path / "operator.log"
    with log.open("w") as out:
        operator = start(_operator(tmp_path, api_server), env=_env(), stdout=out, stderr=out)
        try:
            wait_until(lambda: catches_sigterm(operator.pid), 30, "the SIGTERM handler")
            code, seconds = operator.sigterm()
        finally:
            operator.kill()
    # 128 + SIGTERM: the early handler ended it (kopf's own would exit 0).
    assert code == 143, log.read_text()
    assert seconds < PROMPT_SECONDS
