"""A :class:`~kubetune_controller.service_client.Sender` over an httpx transport.

For tests: the operator's service client against an in-process ASGI app or
an ``httpx.MockTransport``, with the client's retry logic unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from kubetune_controller.service_client import TransportError, describe


class HttpxSender:
    """Requests through ``transport``, as the operator's aiohttp sender makes them."""

    def __init__(self, base_url: str, transport: httpx.AsyncBaseTransport) -> None:
        self._client = httpx.AsyncClient(base_url=base_url, transport=transport)

    async def send(
        self,
        method: str,
        path: str,
        body: Any,
        params: Mapping[str, str] | None,
        timeout: float,
        headers: Mapping[str, str],
    ) -> tuple[int, bytes]:
        try:
            resp = await self._client.request(
                method, path, json=body, params=params, timeout=timeout, headers=headers
            )
        except httpx.TransportError as exc:
            raise TransportError(describe(exc)) from exc
        return resp.status_code, resp.content

    async def close(self) -> None:
        await self._client.aclose()

    async def reset(self) -> None:
        return None
