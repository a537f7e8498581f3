"""Settings read from environment variables: the one reader the service and the operator share.

A component declares its settings as a frozen dataclass whose fields carry
:func:`env` metadata (the variable and how its text is parsed), and builds
them with :func:`from_env`. An empty (or blank) variable counts as unset; a
value that does not parse, or is out of range, is refused at startup with a
:class:`SettingsError` naming the variable, rather than failing later.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


class SettingsError(ValueError):
    """An environment variable whose value cannot be used; the message names it."""


def env(name: str, parse: Callable[[str], Any]) -> dict[str, Any]:
    """A field's metadata: the variable it is read from and how its text is parsed."""
    return {"env": name, "parse": parse}


def from_env(cls: Callable[..., T], environ: Mapping[str, str] | None = None) -> T:
    """``cls`` (a dataclass of :func:`env` fields) from ``environ`` (``os.environ`` if omitted).

    Raises:
        SettingsError: If a variable's value does not parse or is out of
            range; the message names the variable.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        name = f.metadata["env"]
        text = environ.get(name, "")
        if not text.strip():
            continue
        try:
            values[f.name] = f.metadata["parse"](text)
        except ValueError as exc:
            raise SettingsError(f"{name}={text!r}: {exc}") from None
    return cls(**values)


# -- parsers: each turns a variable's text into a field's value, or raises
# ValueError saying what was expected.


def port(value: str) -> int:
    """A TCP port, 1 to 65535."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= 65535:
        raise ValueError("expected a port, 1 to 65535")
    return number


def flag(value: str) -> bool:
    """A yes/no switch."""
    answer = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
    try:
        return answer[value.lower()]
    except KeyError:
        raise ValueError("expected 1, true, yes, 0, false or no") from None


def names(value: str) -> frozenset[str]:
    """A comma-separated list of names (blanks around each are dropped)."""
    out = frozenset(n.strip() for n in value.split(",") if n.strip())
    if not out:
        raise ValueError("expected comma-separated names")
    return out


def integer(minimum: int) -> Callable[[str], int]:
    """A parser of whole numbers of at least ``minimum``."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"expected an integer >= {minimum}") from None
        if number < minimum:
            raise ValueError(f"expected an integer >= {minimum}")
        return number

    return parse


def seconds(*, zero: bool) -> Callable[[str], float]:
    """A parser of seconds: ``zero`` allows 0 (a delay or window); else > 0 (a period)."""
    expected = "a number of seconds >= 0" if zero else "a number of seconds > 0"

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"expected {expected}") from None
        if not math.isfinite(number) or number < 0 or (number == 0 and not zero):
            raise ValueError(f"expected {expected}")
        return number

    return parse
