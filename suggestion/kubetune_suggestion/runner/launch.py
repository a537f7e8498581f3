"""A trial's process as ``kubetune run`` starts it: from the template's first container.

Each trial runs in the manifest's directory (relative paths in ``command``
and ``args`` resolve there), with this process's environment plus the
container's ``env`` values (``valueFrom`` entries need a cluster and are
skipped) and the trial's identity (``KUBETUNE_TRIAL_NUMBER``,
``KUBETUNE_PARAMS``, ``KUBETUNE_METRICS_FILE``...). ``python`` and ``python3``
mean the interpreter running kubetune. ``image``, ``resources`` and
``workingDir`` only matter in a cluster.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from typing import Any, Final

from kubetune_suggestion.runner.manifest import Manifest
from kubetune_suggestion.runner.process import missing_executable, resolve_command
from kubetune_suggestion.template import TemplateError, render_container

__all__ = ["trial_argv", "trial_container", "trial_environment"]

# The manifest field trial processes are started from.
_CONTAINER: Final = "spec.template.spec.containers[0]"


def trial_container(manifest: Manifest) -> Mapping[str, Any]:
    """The container a trial process is started from, once its program is known to exist.

    Checked before any trial starts: a missing program would fail every trial
    within a second.

    Raises:
        TemplateError: Naming the field: no command, or a program that cannot start.
    """
    containers = (manifest.spec.template.get("spec") or {}).get("containers") or []
    container = containers[0]
    if not isinstance(container, Mapping):
        raise TemplateError(_CONTAINER, "must be a container")
    argv = [*(container.get("command") or []), *(container.get("args") or [])]
    if not argv:
        raise TemplateError(
            f"{_CONTAINER}.command",
            "kubetune run needs a command: an image's entrypoint does not exist locally",
        )
    program = resolve_command(argv)[0]
    if "${" in program:
        return container  # a parameter picks the program: each trial finds out
    env = {e.get("name"): e.get("value") for e in container.get("env") or [] if "value" in e}
    search_path = env.get("PATH") or os.environ.get("PATH")
    problem = missing_executable(program, manifest.directory, search_path)
    if problem is not None:
        where = "command[0]" if container.get("command") else "args[0]"
        raise TemplateError(f"{_CONTAINER}.{where}", problem)
    return container


def trial_argv(
    container: Mapping[str, Any], params: Mapping[str, Any], declared: Collection[str]
) -> tuple[dict[str, Any], list[str]]:
    """The container rendered for one trial's ``params``, and the command line it runs.

    Raises:
        TemplateError: Naming the field with an unknown reference.
    """
    rendered = render_container(container, params, declared, _CONTAINER)
    argv = resolve_command([*(rendered.get("command") or []), *(rendered.get("args") or [])])
    return rendered, argv


def trial_environment(rendered: Mapping[str, Any], identity: Mapping[str, str]) -> dict[str, str]:
    """A trial process's environment: this one's, the container's values, the trial's ``identity``.

    ``identity`` is what :func:`~kubetune_suggestion.template.trial_env` gives every trial.
    """
    env = dict(os.environ)
    env.update({e["name"]: e["value"] for e in rendered.get("env") or [] if "value" in e})
    env.update(identity)
    # Live logs: Python buffers stdout when it is not a terminal.
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
