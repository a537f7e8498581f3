"""Read an Experiment manifest from a YAML file for ``kubetune run``.

The same manifest a user applies with ``kubectl``: ``apiVersion:
kubetune.io/v1alpha1``, ``kind: Experiment``, ``metadata.name``, ``spec``.
Every problem is a :class:`~kubetune_suggestion.spec.SpecError` naming the
field, like the API server's validation would.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from kubetune_suggestion.spec import (
    API_GROUP,
    API_VERSION,
    ExperimentSpec,
    SpecError,
    parse_experiment,
)

__all__ = ["Manifest", "experiment_uid", "load_manifest", "parse_manifest"]

EXPECTED_API_VERSION: Final = f"{API_GROUP}/{API_VERSION}"
# A Kubernetes object name (DNS-1123 subdomain); it also names local files.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
# uuid5 namespace for local experiments: the same name always gives the same
# UID, so re-running a manifest continues its experiment in the store.
_LOCAL_NAMESPACE: Final = uuid.UUID("7d0b5f8e-1c1e-4b7a-9a51-6b7e3c0f9d21")


@dataclass(frozen=True)
class Manifest:
    """A validated Experiment manifest.

    Attributes:
        name: ``metadata.name``.
        spec: The validated spec.
        raw_spec: The spec as written (what the service stores).
        path: The file it came from; trials run in its directory.
    """

    name: str
    spec: ExperimentSpec
    raw_spec: dict[str, Any]
    path: Path

    @property
    def uid(self) -> str:
        """The experiment's UID in the local store."""
        return experiment_uid(self.name)

    @property
    def directory(self) -> Path:
        """The directory relative paths in the template resolve against."""
        return self.path.resolve().parent


def experiment_uid(name: str) -> str:
    """The UID of the local experiment called ``name`` (deterministic)."""
    return str(uuid.uuid5(_LOCAL_NAMESPACE, name))


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate the manifest at ``path``.

    Raises:
        SpecError: Naming the field at fault (``file`` when it cannot be read).
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError("file", f"cannot read {file}: {exc.strerror or exc}") from None
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError("file", f"{file} is not valid YAML{where}: {problem}") from None
    experiments = [d for d in documents if isinstance(d, dict) and d.get("kind") == "Experiment"]
    if len(documents) == 1:
        body = documents[0]
    elif len(experiments) == 1:
        body = experiments[0]  # a file with a ConfigMap or similar beside the Experiment
    elif not documents:
        raise SpecError("file", f"{file} is empty")
    else:
        raise SpecError(
            "kind", f"{file} must hold exactly one Experiment, found {len(experiments)}"
        )
    return parse_manifest(body, file)


def parse_manifest(body: Any, path: Path) -> Manifest:
    """Validate one manifest document.

    Raises:
        SpecError: Naming the field at fault.
    """
    if not isinstance(body, dict):
        raise SpecError("file", "the manifest must be a mapping (apiVersion, kind, metadata, spec)")
    api_version = body.get("apiVersion")
    if api_version != EXPECTED_API_VERSION:
        raise SpecError("apiVersion", f"must be {EXPECTED_API_VERSION}, got {api_version!r}")
    if body.get("kind") != "Experiment":
        raise SpecError("kind", f"must be Experiment, got {body.get('kind')!r}")
    metadata = body.get("metadata")
    if not isinstance(metadata, dict):
        raise SpecError("metadata", "must be a mapping with a name")
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        raise SpecError("metadata.name", "is required")
    if not _NAME.match(name):
        raise SpecError(
            "metadata.name",
            f"{name!r} must be lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit (at most 253 characters)",
        )
    raw_spec = body.get("spec")
    if not isinstance(raw_spec, dict):
        raise SpecError("spec", "is required and must be a mapping")
    spec = parse_experiment(raw_spec)
    return Manifest(name=name, spec=spec, raw_spec=raw_spec, path=path)
