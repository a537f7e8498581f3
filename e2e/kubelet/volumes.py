"""Materialise a pod's volumes as directories under the pod's directory.

Each volume becomes ``<pod dir>/volumes/<name>``; containers later see it at
their ``mountPath`` through a bind mount in their own mount namespace. Files
are replaced atomically (write + rename) so a refreshed token never appears
half-written to a reader, as with the kubelet's atomic writer.
"""

from __future__ import annotations

import base64
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e2e.kube import Api, ApiError
from e2e.kubelet.logic import field_ref, resource_field_ref

Obj = dict[str, Any]

# A projected token is rewritten once 80% of its lifetime has passed (the
# kubelet's rule) or after 24 h, whichever comes first.
_REFRESH_FRACTION = 0.8


class VolumeError(Exception):
    """A volume cannot be set up yet (missing object, unsupported type)."""


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    tmp.replace(path)


@dataclass
class TokenFile:
    """A projected service-account token the kubelet keeps fresh."""

    path: Path
    audience: str | None
    expiration: int
    mode: int
    refresh_at: float = 0.0


@dataclass
class PodVolumes:
    """The materialised volumes of one pod.

    Attributes:
        paths: Volume name -> host directory (or file, for hostPath files).
        tokens: Token files to refresh.
    """

    paths: dict[str, Path] = field(default_factory=dict)
    tokens: list[TokenFile] = field(default_factory=list)


class VolumeManager:
    """Sets up and refreshes volumes for the pods of one node.

    Args:
        api: Node-credentialed API client (the Node authorizer lets it read
            exactly the secrets, configMaps and tokens its pods reference).
        allocatable: Node allocatable, for downward-API resource fields.
    """

    def __init__(self, api: Api, allocatable: dict[str, str]) -> None:
        self.api = api
        self.allocatable = allocatable

    def _get(self, kind: str, namespace: str, name: str) -> Obj | None:
        try:
            obj: Obj = self.api.get(f"/api/v1/namespaces/{namespace}/{kind}/{name}")
            return obj
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def get_secret(self, namespace: str) -> Callable[[str], Obj | None]:
        """A ``name -> Secret`` lookup in one namespace."""
        return lambda name: self._get("secrets", namespace, name)

    def get_configmap(self, namespace: str) -> Callable[[str], Obj | None]:
        """A ``name -> ConfigMap`` lookup in one namespace."""
        return lambda name: self._get("configmaps", namespace, name)

    def setup(self, pod: Obj, pod_dir: Path) -> PodVolumes:
        """Create every volume of ``pod`` under ``pod_dir/volumes``.

        Raises:
            VolumeError: A referenced object is missing or a type unsupported.
        """
        result = PodVolumes()
        for vol in pod["spec"].get("volumes", []) or []:
            name = vol["name"]
            target = pod_dir / "volumes" / name
            if "hostPath" in vol:
                hp = vol["hostPath"]
                path = Path(hp["path"])
                if hp.get("type") in ("DirectoryOrCreate", None, "") and not path.exists():
                    path.mkdir(parents=True, exist_ok=True)
                elif hp.get("type") == "FileOrCreate" and not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.touch()
                result.paths[name] = path
                continue
            target.mkdir(parents=True, exist_ok=True)
            result.paths[name] = target
            if "emptyDir" in vol:
                continue
            if "configMap" in vol or "secret" in vol:
                self._project_object(pod, vol, target)
            elif "downwardAPI" in vol:
                self._project_downward(pod, vol["downwardAPI"], target)
            elif "projected" in vol:
                mode = vol["projected"].get("defaultMode", 0o644)
                for src in vol["projected"].get("sources", []) or []:
                    if "serviceAccountToken" in src:
                        t = src["serviceAccountToken"]
                        token = TokenFile(
                            target / t["path"],
                            t.get("audience"),
                            int(t.get("expirationSeconds", 3600)),
                            mode,
                        )
                        self.write_token(pod, token)
                        result.tokens.append(token)
                    elif "configMap" in src or "secret" in src:
                        self._project_object(pod, {**src, "defaultMode": mode}, target)
                    elif "downwardAPI" in src:
                        self._project_downward(
                            pod, {**src["downwardAPI"], "defaultMode": mode}, target
                        )
                    else:
                        raise VolumeError(f"unsupported projected source in volume {name}")
            else:
                kinds = sorted(k for k in vol if k != "name")
                raise VolumeError(
                    f"volume {name}: type {kinds} not supported by the process kubelet"
                )
        return result

    def _project_object(self, pod: Obj, vol: Obj, target: Path) -> None:
        ns = pod["metadata"]["namespace"]
        is_secret = "secret" in vol
        src = vol["secret" if is_secret else "configMap"]
        name = src["secretName"] if is_secret and "secretName" in src else src.get("name")
        assert name, "configMap/secret volume without a name"
        obj = self._get("secrets" if is_secret else "configmaps", ns, name)
        if obj is None:
            if src.get("optional"):
                return
            raise VolumeError(f'{"secret" if is_secret else "configmap"} "{name}" not found')
        data: dict[str, bytes] = {}
        for k, v in (obj.get("data") or {}).items():
            data[k] = base64.b64decode(v) if is_secret else v.encode()
        for k, v in (obj.get("binaryData") or {}).items():
            data[k] = base64.b64decode(v)
        mode = src.get("defaultMode", vol.get("defaultMode", 0o644))
        items = src.get("items")
        if items:
            for item in items:
                if item["key"] not in data:
                    if src.get("optional"):
                        continue
                    raise VolumeError(f"key {item['key']} not found in {name}")
                _write(target / item["path"], data[item["key"]], item.get("mode", mode))
        else:
            for k, v in data.items():
                _write(target / k, v, mode)

    def _project_downward(self, pod: Obj, src: Obj, target: Path) -> None:
        mode = src.get("defaultMode", 0o644)
        for item in src.get("items", []) or []:
            if "fieldRef" in item:
                value = field_ref(pod, item["fieldRef"]["fieldPath"])
            else:
                ref = item["resourceFieldRef"]
                container = next(
                    c for c in pod["spec"]["containers"] if c["name"] == ref.get("containerName")
                )
                value = resource_field_ref(container, ref, self.allocatable)
            _write(target / item["path"], value.encode(), item.get("mode", mode))

    def write_token(self, pod: Obj, token: TokenFile) -> None:
        """Mint a pod-bound token with the TokenRequest API and write it."""
        meta = pod["metadata"]
        sa = pod["spec"].get("serviceAccountName") or "default"
        spec: Obj = {
            "expirationSeconds": token.expiration,
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "uid": meta["uid"],
            },
        }
        if token.audience:
            spec["audiences"] = [token.audience]
        try:
            resp = self.api.create(
                f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{sa}/token",
                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
            )
        except ApiError as exc:
            raise VolumeError(f"token request for service account {sa}: {exc}") from exc
        _write(token.path, resp["status"]["token"].encode(), token.mode)
        lifetime = min(token.expiration, 24 * 3600)
        token.refresh_at = time.time() + lifetime * _REFRESH_FRACTION

    def refresh(self, pod: Obj, volumes: PodVolumes) -> None:
        """Rotate tokens that reached their refresh time (errors retried later)."""
        now = time.time()
        for token in volumes.tokens:
            if now >= token.refresh_at:
                try:
                    self.write_token(pod, token)
                except VolumeError:
                    token.refresh_at = now + 10


def ensure_mountpoint(path: str, is_file: bool) -> list[Path]:
    """Create the mount point on the host (mkdir is not namespaced).

    Containers share the host's root filesystem, so a mount path that does
    not exist (``/metrics``) is created as an empty directory or file; the
    bind mount itself stays private to the container's namespace.

    Returns:
        The paths created, outermost first (``down`` removes them again).
    """
    p = Path(path)
    missing: list[Path] = []
    probe = p
    while not probe.exists() and probe != probe.parent:
        missing.insert(0, probe)
        probe = probe.parent
    if not missing:
        return []
    if is_file:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
    else:
        os.makedirs(p, exist_ok=True)
    return missing


def remove_created_mountpoints(listings: list[Path]) -> None:
    """Remove the empty mount points recorded in ``created-mountpoints`` files.

    A path still used as a mount point by any process (a pod of another
    cluster on this machine) is kept: removing it would detach that mount.
    """
    created: set[Path] = set()
    for listing in listings:
        with contextlib.suppress(OSError):
            created.update(Path(line) for line in listing.read_text().split() if line)
    if not created:
        return
    in_use: set[str] = set()
    for mountinfo in Path("/proc").glob("[0-9]*/mountinfo"):
        with contextlib.suppress(OSError):
            in_use.update(line.split()[4] for line in mountinfo.read_text().splitlines())
    # Deepest first, so parents are empty by the time they are checked.
    for path in sorted(created, key=lambda p: len(p.parts), reverse=True):
        if str(path) in in_use:
            continue
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                path.rmdir()  # fails (and the path is kept) unless empty
            elif path.is_file() and path.stat().st_size == 0:
                path.unlink()
