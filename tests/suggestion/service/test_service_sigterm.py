"""`python -m kubetune_suggestion.service` (the chart's command) ends promptly at SIGTERM.

Also as a container's PID 1, where a signal without a handler is ignored:
once serving (uvicorn's graceful shutdown) and while still starting up
(importing, migrating the database), before uvicorn has a handler.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from kubetune_suggestion.service.testing import free_port
from tests.sigterm import PROMPT_SECONDS, catches_sigterm, start, wait_until


def _service(db: Path, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kubetune_suggestion.service",
        "--db",
        f"sqlite:///{db}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        str(free_port()),
    ]


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200
    except httpx.TransportError:
        return False


def test_serving_service_stops_promptly_at_sigterm(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    service = start(
        _service(tmp_path / "store.db", port),
        env={**os.environ, "KUBETUNE_SECRET": "s", "KUBETUNE_API_KEY": "k"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: _healthy(url) or service.popen.poll() is not None, 60, "/healthz")
        assert service.popen.poll() is None
        # An idle keep-alive connection must not hold the shutdown up.
        client = httpx.Client(base_url=url)
        assert client.get("/healthz").status_code == 200
        code, seconds = service.sigterm()
        client.close()
    finally:
        service.kill()
    out = service.popen.stdout.read() if service.popen.stdout else ""
    # uvicorn shuts down, then raises the signal again: 128 + SIGTERM.
    assert code == 143, out
    assert seconds < PROMPT_SECONDS
    assert "Shutting down" in out


def test_starting_service_stops_promptly_at_sigterm(tmp_path: Path) -> None:
    # The signal arrives during the imports: the handler is there before them.
    service = start(
        _service(tmp_path / "store.db", free_port()),
        env={**os.environ, "KUBETUNE_SECRET": "s", "KUBETUNE_API_KEY": "k"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: catches_sigterm(service.pid), 30, "the SIGTERM handler")
        code, seconds = service.sigterm()
    finally:
        service.kill()
    out = service.popen.stdout.read() if service.popen.stdout else ""
    assert code == 143, out
    assert seconds < PROMPT_SECONDS
