"""Test helpers: the real HTTP service on a free local port, and a small valid spec."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

# The API key of test services (``ServiceSettings(api_key=API_KEY)``) and the
# header a client shows with it.
API_KEY = "test-api-key"
CLIENT_HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def serve_in_thread(
    app: Callable[[Any, Any, Any], Awaitable[None]], timeout: float = 30.0
) -> Iterator[str]:
    """Serve the ASGI ``app`` with uvicorn until the block ends; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the test server on port {port} did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def example_spec(**overrides: Any) -> dict[str, Any]:
    """A small valid spec (random search, three parameters) with top-level ``overrides``."""
    spec: dict[str, Any] = {
        "objective": {"metric": "loss", "direction": "minimize"},
        "parameters": [
            {"name": "lr", "type": "float", "min": 1e-4, "max": 1e-1, "log": True},
            {"name": "layers", "type": "int", "min": 1, "max": 4},
            {"name": "opt", "type": "categorical", "values": ["adam", "sgd"]},
        ],
        "algorithm": {"name": "random", "seed": 7},
        "maxTrials": 10,
        "parallelism": 2,
        "template": {"spec": {"containers": [{"name": "train", "image": "trial:1"}]}},
    }
    spec.update(overrides)
    return spec


# ASHA with rungs at steps 1 and 3 (of 9).
EXAMPLE_ASHA = {"name": "asha", "minResource": 1, "maxResource": 9, "reductionFactor": 3}
