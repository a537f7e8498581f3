"""The kubelet's HTTPS endpoint: container logs for ``kubectl logs``.

``kubectl logs`` asks the API server, which connects to the node's
``daemonEndpoints.kubeletEndpoint.Port`` at its InternalIP with its
``--kubelet-client-certificate``, and verifies this server's certificate
against ``--kubelet-certificate-authority``. Like the kubelet, the server
requires a client certificate from the cluster CA and authorizes it: the API
server's kubelet-client identity or a ``system:masters`` member.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlparse

if TYPE_CHECKING:
    from e2e.kubelet.kubelet import Kubelet
    from e2e.kubelet.pod import ContainerRun

ALLOWED_USERS = {"kube-apiserver-kubelet-client"}
ALLOWED_GROUPS = {"system:masters"}


def _subject(cert: Any) -> tuple[str, set[str]]:
    cn, orgs = "", set()
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                cn = value
            elif key == "organizationName":
                orgs.add(value)
    return cn, orgs


def tail_bytes(data: bytes, lines: int) -> bytes:
    """The last ``lines`` lines of ``data`` (``tailLines``)."""
    if lines <= 0:
        return b""
    parts = data.splitlines(keepends=True)
    return b"".join(parts[-lines:])


class _Handler(BaseHTTPRequestHandler):
    kubelet: Kubelet
    protocol_version = "HTTP/1.0"  # close-delimited bodies make following logs trivial

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _send(self, code: int, body: str, ctype: str = "text/plain") -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        cert = self.connection.getpeercert()
        cn, orgs = _subject(cert or {})
        if cn not in ALLOWED_USERS and not orgs & ALLOWED_GROUPS:
            self._send(403, f"Forbidden (user={cn}, verb=get, resource=nodes, subresource=proxy)")
            return
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = [p for p in url.path.split("/") if p]
        if url.path in ("/healthz", "/livez", "/readyz"):
            self._send(200, "ok")
        elif parts[:1] == ["containerLogs"] and len(parts) == 4:
            self._logs(parts[1], parts[2], parts[3], query)
        elif parts == ["pods"]:
            with self.kubelet.lock:
                pods = [w.pod for w in self.kubelet.workers.values()]
            body = {"kind": "PodList", "apiVersion": "v1", "items": pods}
            self._send(200, json.dumps(body), "application/json")
        else:
            self._send(404, "404 page not found")

    def _logs(self, namespace: str, pod: str, container: str, query: dict[str, str]) -> None:
        worker = self.kubelet.find_worker(namespace, pod)
        run: ContainerRun | None = None
        if worker is not None:
            run = next((c for c in worker.containers() if c.name == container), None)
        if worker is None or run is None:
            self._send(404, f'container "{container}" in pod "{pod}" not found')
            return
        if run.log_path is None:
            self._send(400, f'container "{container}" in pod "{pod}" is waiting to start')
            return
        path = run.log_path
        if query.get("previous") in ("true", "1"):
            if run.restart_count == 0:
                self._send(400, f'previous terminated container "{container}" not found')
                return
            path = path.with_name(f"{run.restart_count - 1}.log")
        data = path.read_bytes() if path.exists() else b""
        if "tailLines" in query:
            data = tail_bytes(data, int(query["tailLines"]))
        limit = int(query["limitBytes"]) if "limitBytes" in query else None
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        if limit is not None:
            self.wfile.write(data[:limit])
            return
        self.wfile.write(data)
        self.wfile.flush()
        if query.get("follow") not in ("true", "1") or path != run.log_path:
            return
        self._follow(path, len(path.read_bytes()) if "tailLines" in query else len(data), run)

    def _follow(self, path: Path, offset: int, run: ContainerRun) -> None:
        # Stream appended bytes until this run of the container has exited
        # and its output is drained.
        with path.open("rb") as f:
            f.seek(offset)
            while True:
                chunk = f.read(65536)
                if chunk:
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    continue
                if run.log_path != path or not run.running:
                    rest = f.read()
                    if rest:
                        self.wfile.write(rest)
                    return
                time.sleep(0.2)


def serve(kubelet: Kubelet, host: str, port: int, cert: str, key: str, client_ca: str) -> None:
    """Serve the kubelet API in a daemon thread.

    Args:
        kubelet: The kubelet whose pods are served.
        host: Listen address (the node's InternalIP).
        port: Listen port.
        cert: Serving certificate (signed by the cluster CA).
        key: Its key.
        client_ca: CA that signs the clients we accept.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(client_ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    handler = type("Handler", (_Handler,), {"kubelet": kubelet})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, name="kubelet-server", daemon=True).start()
