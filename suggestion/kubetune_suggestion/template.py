"""Render a trial's containers from the Experiment's Pod template.

Shared by the operator (which renders Pods) and ``kubetune run`` (which starts
local processes), so a manifest means the same thing in both places.

``${params.NAME}`` is substituted in a container's ``command``, ``args`` and
``env[].value``; nothing else is touched (``image``, ``resources``, volume
mounts...). ``$${params.NAME}`` is an escape for a literal ``${params.NAME}``,
as ``$$(VAR)`` is for Kubernetes' own ``$(VAR)`` expansion.

Values are written the way a command line would: integers as ``3``, floats in
Python's shortest round-trip form (``0.001``, ``1e-05``), booleans as ``true``
and ``false``, strings as they are.

Conditional parameters: a parameter whose ``when`` condition does not hold in
a configuration has no value, and it is *left out* rather than written empty.
A ``command`` or ``args`` element that references it is dropped, and so is an
``env`` entry whose value references it. So ``--momentum=${params.momentum}``
simply disappears for an ``adam`` trial and the script falls back to its own
default, the way sweep tools pass only the parameters a configuration has.
Write such a flag as one element (``--momentum=${params.momentum}``, not
``--momentum`` followed by ``${params.momentum}``), and do not reference a
conditional parameter inside a shell script string; read ``KUBETUNE_PARAMS``
(a JSON object of the active parameters) there instead.

A reference to a name that is not a declared parameter is an error naming the
container field (``template.spec.containers[0].args[1]``), never a silent
empty string.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Collection, Mapping
from typing import Any, Final

__all__ = [
    "ENV_EXPERIMENT",
    "ENV_EXPERIMENT_UID",
    "ENV_METRICS_FILE",
    "ENV_PARAMS",
    "ENV_TRIAL_NAME",
    "ENV_TRIAL_NUMBER",
    "TemplateError",
    "check_pod_spec",
    "format_value",
    "render_container",
    "render_pod_spec",
    "substitute",
    "trial_env",
]

ENV_EXPERIMENT: Final = "KUBETUNE_EXPERIMENT"
ENV_EXPERIMENT_UID: Final = "KUBETUNE_EXPERIMENT_UID"
ENV_TRIAL_NUMBER: Final = "KUBETUNE_TRIAL_NUMBER"
ENV_TRIAL_NAME: Final = "KUBETUNE_TRIAL_NAME"
ENV_PARAMS: Final = "KUBETUNE_PARAMS"
ENV_METRICS_FILE: Final = "KUBETUNE_METRICS_FILE"

# ``$${...}`` (escaped) or ``${params.NAME}``; anything else with ``${`` is left
# alone so shell scripts keep their own ``${VAR}``.
_REFERENCE = re.compile(r"\$(\$)?\{params\.([^}]*)\}")


class TemplateError(ValueError):
    """A template that cannot be rendered for a configuration.

    Attributes:
        field: The template field, e.g. ``template.spec.containers[0].args[1]``.
        problem: What is wrong, in words.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class _Inactive(Exception):
    """A referenced parameter has no value in this configuration."""


def format_value(value: Any) -> str:
    """A parameter value as text for a command line or an env var."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        # repr is the shortest text that reads back as the same float, and 1.0
        # stays "1.0" so a float parameter still parses as a float.
        return repr(value)
    return str(value)


def substitute(
    text: str, params: Mapping[str, Any], declared: Collection[str], field: str
) -> str | None:
    """Substitute ``${params.NAME}`` references in one string.

    Args:
        text: The template string.
        params: The configuration (active parameters only).
        declared: Every parameter name of the search space, active or not.
        field: Where ``text`` is in the manifest, for error messages.

    Returns:
        The rendered string, or None when it references a parameter that is
        inactive in this configuration (the caller leaves the element out).

    Raises:
        TemplateError: For a reference to an undeclared name.
    """
    if "${" not in text:
        return text

    def replace(match: re.Match[str]) -> str:
        escaped, name = match.group(1), match.group(2)
        if escaped:
            return match.group(0)[1:]
        if name in params:
            return format_value(params[name])
        if name in declared:
            raise _Inactive(name)
        known = ", ".join(sorted(declared)) or "none"
        raise TemplateError(
            field, f"unknown parameter {name!r} in ${{params.{name}}}; the parameters are: {known}"
        )

    try:
        return _REFERENCE.sub(replace, text)
    except _Inactive:
        return None


def render_container(
    container: Mapping[str, Any],
    params: Mapping[str, Any],
    declared: Collection[str],
    field: str = "template.spec.containers[0]",
) -> dict[str, Any]:
    """A copy of ``container`` with parameters substituted in command, args and env values.

    Raises:
        TemplateError: Naming the field with an unknown reference or a
            malformed command/args/env.
    """
    out = copy.deepcopy(dict(container))
    for key in ("command", "args"):
        if key not in out or out[key] is None:
            continue
        items = out[key]
        if not isinstance(items, list):
            raise TemplateError(f"{field}.{key}", "must be a list of strings")
        rendered: list[str] = []
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise TemplateError(f"{field}.{key}[{i}]", f"must be a string, got {item!r}")
            text = substitute(item, params, declared, f"{field}.{key}[{i}]")
            if text is not None:
                rendered.append(text)
        out[key] = rendered
    if out.get("env") is not None:
        env = out["env"]
        if not isinstance(env, list):
            raise TemplateError(f"{field}.env", "must be a list of {name, value} entries")
        rendered_env: list[Any] = []
        for i, entry in enumerate(env):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise TemplateError(f"{field}.env[{i}]", "must be an entry with a `name`")
            value = entry.get("value")
            if value is None:
                rendered_env.append(entry)  # valueFrom and friends are the cluster's business
                continue
            if not isinstance(value, str):
                raise TemplateError(f"{field}.env[{i}].value", f"must be a string, got {value!r}")
            text = substitute(value, params, declared, f"{field}.env[{i}].value")
            if text is not None:
                rendered_env.append({**entry, "value": text})
        out["env"] = rendered_env
    return out


def render_pod_spec(
    pod_spec: Mapping[str, Any],
    params: Mapping[str, Any],
    declared: Collection[str],
    field: str = "template.spec",
) -> dict[str, Any]:
    """A copy of a Pod spec with every container and init container rendered.

    Raises:
        TemplateError: As :func:`render_container`.
    """
    out = copy.deepcopy(dict(pod_spec))
    for key in ("initContainers", "containers"):
        containers = out.get(key)
        if containers is None:
            continue
        if not isinstance(containers, list):
            raise TemplateError(f"{field}.{key}", "must be a list of containers")
        out[key] = [
            render_container(c, params, declared, f"{field}.{key}[{i}]")
            for i, c in enumerate(containers)
        ]
    return out


def check_pod_spec(
    pod_spec: Mapping[str, Any], declared: Collection[str], field: str = "spec.template.spec"
) -> None:
    """Check every reference in a Pod spec names a declared parameter, before any trial runs.

    Raises:
        TemplateError: Naming the first field with an unknown reference.
    """
    # With no active parameter every known reference is simply left out, so
    # only unknown names and malformed fields can raise.
    render_pod_spec(pod_spec, {}, declared, field)


def trial_env(
    *,
    experiment: str,
    experiment_uid: str,
    trial_number: int,
    params: Mapping[str, Any],
    metrics_file: str,
) -> dict[str, str]:
    """The identity variables every trial's process gets.

    The trial token is deliberately not among them: only the collector needs
    it, and training code that never sees it cannot leak it into logs.
    """
    return {
        ENV_EXPERIMENT: experiment,
        ENV_EXPERIMENT_UID: experiment_uid,
        ENV_TRIAL_NUMBER: str(trial_number),
        ENV_TRIAL_NAME: f"{experiment}-{trial_number}",
        ENV_PARAMS: json.dumps(dict(params), sort_keys=True, separators=(",", ":")),
        ENV_METRICS_FILE: metrics_file,
    }
