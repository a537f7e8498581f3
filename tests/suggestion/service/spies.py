"""Recording calls of a method while still running it (for tests that count statements)."""

from __future__ import annotations

from typing import Any

import pytest


def record_calls(monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> list[tuple[Any, ...]]:
    """Patch ``owner.name`` to record each call's arguments (without ``self``) and then run it.

    Returns:
        The list the calls are appended to, in order; clear it to count afresh.
    """
    calls: list[tuple[Any, ...]] = []
    method = getattr(owner, name)

    def recorded(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return method(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, recorded)
    return calls
