"""The process kubelet's pure logic: no I/O, unit tested in ``tests/e2e_harness``.

Each function mirrors a piece of the real kubelet closely enough that a pod
behaves here as it would on a node: ``$(VAR)`` expansion follows
``third_party/forked/golang/expansion``, phase derivation follows
``getPhase`` in ``pkg/kubelet/kubelet_pods.go``, restart decisions and
crash-loop back-off follow the kubelet's container restart rules.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

Obj = dict[str, Any]

GPU_RESOURCE = "nvidia.com/gpu"


# --- $(VAR) expansion ------------------------------------------------------
def expand(text: str, lookup: Callable[[str], str | None]) -> str:
    """Expand ``$(VAR)`` references the way Kubernetes does.

    ``$$`` escapes a dollar sign, an unknown ``$(VAR)`` is left as is, and an
    unterminated ``$(`` is copied literally.

    Args:
        text: The string from the pod spec.
        lookup: Returns a variable's value, or None when it is not defined.

    Returns:
        The expanded string.
    """
    out: list[str] = []
    checkpoint = 0
    cursor = 0
    n = len(text)
    while cursor < n:
        if text[cursor] == "$" and cursor + 1 < n:
            out.append(text[checkpoint:cursor])
            nxt = text[cursor + 1]
            if nxt == "$":
                out.append("$")
                advance = 1
            elif nxt == "(":
                close = text.find(")", cursor + 2)
                if close == -1:
                    out.append("$(")
                    advance = 1
                else:
                    name = text[cursor + 2 : close]
                    value = lookup(name)
                    out.append(value if value is not None else f"$({name})")
                    advance = close - cursor
            else:
                out.append("$" + nxt)
                advance = 1
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    out.append(text[checkpoint:])
    return "".join(out)


# --- quantities ------------------------------------------------------------
_SUFFIXES = {
    "": Decimal(1),
    "m": Decimal("0.001"),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)$")


def parse_quantity(value: str | int | float) -> Decimal:
    """Parse a Kubernetes resource quantity (``500m``, ``2Gi``, ``1e3``).

    Raises:
        ValueError: For a malformed quantity.
    """
    if isinstance(value, int | float):
        return Decimal(str(value))
    match = _QUANTITY.match(value.strip())
    if not match or match.group(2) not in _SUFFIXES:
        raise ValueError(f"invalid quantity {value!r}")
    return Decimal(match.group(1)) * _SUFFIXES[match.group(2)]


# --- env -------------------------------------------------------------------
class EnvError(Exception):
    """A required env source (secret, configMap, key) is missing.

    The kubelet reports it as ``CreateContainerConfigError`` and retries.
    """


_LABEL_PATH = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def field_ref(pod: Obj, path: str) -> str:
    """Resolve a downward-API ``fieldRef.fieldPath`` against a pod.

    Raises:
        EnvError: For an unsupported path.
    """
    meta = pod.get("metadata", {})
    status = pod.get("status", {})
    match = _LABEL_PATH.match(path)
    if match:
        return str(meta.get(match.group(1), {}).get(match.group(2), ""))
    simple: dict[str, Any] = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": pod.get("spec", {}).get("nodeName"),
        "spec.serviceAccountName": pod.get("spec", {}).get("serviceAccountName"),
        "status.hostIP": status.get("hostIP", "127.0.0.1"),
        "status.hostIPs": status.get("hostIP", "127.0.0.1"),
        "status.podIP": status.get("podIP", "127.0.0.1"),
        "status.podIPs": status.get("podIP", "127.0.0.1"),
    }
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1], {})
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    if path not in simple:
        raise EnvError(f"unsupported fieldPath {path!r}")
    return "" if simple[path] is None else str(simple[path])


def resource_field_ref(container: Obj, ref: Obj, node_allocatable: Mapping[str, str]) -> str:
    """Resolve ``resourceFieldRef`` (``limits.cpu``, ``requests.memory`` ...).

    An unset limit falls back to the node's allocatable amount, as the kubelet
    does; the result is rounded up in units of ``divisor``.
    """
    kind, _, resource = ref["resource"].partition(".")
    resources = container.get("resources", {})
    raw = resources.get(kind, {}).get(resource)
    if raw is None and kind == "limits":
        raw = node_allocatable.get(resource, "0")
    if raw is None:
        raw = "0"
    divisor = parse_quantity(ref.get("divisor", "1") or "1")
    if divisor == 0:
        divisor = Decimal(1)
    return str(math.ceil(parse_quantity(raw) / divisor))


def _decode(data: Mapping[str, str], binary: bool) -> dict[str, str]:
    import base64

    if not binary:
        return dict(data)
    return {k: base64.b64decode(v).decode(errors="replace") for k, v in data.items()}


def container_env(
    pod: Obj,
    container: Obj,
    base: Mapping[str, str],
    get_secret: Callable[[str], Obj | None],
    get_configmap: Callable[[str], Obj | None],
    node_allocatable: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Compute a container's environment.

    ``envFrom`` sources come first, then ``env`` entries in order; each value
    may reference any variable defined before it (and the ``base``
    variables, e.g. ``KUBERNETES_SERVICE_HOST``).

    Args:
        pod: The pod object.
        container: One of its containers.
        base: Variables the kubelet always sets; the pod's own win over them.
        get_secret: Returns a Secret by name in the pod's namespace, or None.
        get_configmap: Returns a ConfigMap by name, or None.
        node_allocatable: Node allocatable, for ``resourceFieldRef`` limits.

    Returns:
        The final variable mapping (base included).

    Raises:
        EnvError: A non-optional source or key is missing.
    """
    env: dict[str, str] = dict(base)
    for source in container.get("envFrom", []) or []:
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            ref = source["configMapRef"]
            obj = get_configmap(ref["name"])
            if obj is None:
                if ref.get("optional"):
                    continue
                raise EnvError(f'configmap "{ref["name"]}" not found')
            data = _decode(obj.get("data", {}) or {}, False)
        else:
            ref = source["secretRef"]
            obj = get_secret(ref["name"])
            if obj is None:
                if ref.get("optional"):
                    continue
                raise EnvError(f'secret "{ref["name"]}" not found')
            data = _decode(obj.get("data", {}) or {}, True)
        for key, value in data.items():
            env[prefix + key] = value

    for var in container.get("env", []) or []:
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand(var.get("value", ""), env.get)
            continue
        src = var["valueFrom"]
        if "fieldRef" in src:
            env[name] = field_ref(pod, src["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in src:
            ref = src["resourceFieldRef"]
            target = container
            if ref.get("containerName"):
                everything = pod["spec"].get("containers", []) + pod["spec"].get(
                    "initContainers", []
                )
                target = next(c for c in everything if c["name"] == ref["containerName"])
            env[name] = resource_field_ref(target, ref, node_allocatable or {})
        elif "secretKeyRef" in src or "configMapKeyRef" in src:
            is_secret = "secretKeyRef" in src
            ref = src["secretKeyRef" if is_secret else "configMapKeyRef"]
            kind = "secret" if is_secret else "configmap"
            obj = (get_secret if is_secret else get_configmap)(ref["name"])
            if obj is None:
                if ref.get("optional"):
                    continue
                raise EnvError(f'{kind} "{ref["name"]}" not found')
            data = _decode(obj.get("data", {}) or {}, is_secret)
            if not is_secret and ref["key"] in (obj.get("binaryData") or {}):
                data[ref["key"]] = _decode(obj["binaryData"], True)[ref["key"]]
            if ref["key"] not in data:
                if ref.get("optional"):
                    continue
                raise EnvError(f"couldn't find key {ref['key']} in {kind} {ref['name']}")
            env[name] = data[ref["key"]]
        else:
            raise EnvError(f"unsupported valueFrom for {name}")
    return env


def container_argv(container: Obj, env: Mapping[str, str]) -> list[str]:
    """The process argv: ``command`` + ``args`` with ``$(VAR)`` expanded.

    Raises:
        EnvError: The container has no command (we cannot read an image's
            entrypoint; every pod run here must name its command).
    """
    command = list(container.get("command") or [])
    args = list(container.get("args") or [])
    if not command:
        raise EnvError(
            "container has no command: the process kubelet cannot read image entrypoints"
        )
    return [expand(a, env.get) for a in command + args]


# --- GPUs ------------------------------------------------------------------
def gpu_limit(container: Obj) -> int:
    """The container's ``nvidia.com/gpu`` count (extended resources: limit == request)."""
    res = container.get("resources", {}) or {}
    raw = (res.get("limits") or {}).get(GPU_RESOURCE) or (res.get("requests") or {}).get(
        GPU_RESOURCE
    )
    return int(parse_quantity(raw)) if raw else 0


def is_sidecar(container: Obj) -> bool:
    """A native sidecar: an init container with ``restartPolicy: Always``."""
    return container.get("restartPolicy") == "Always"


def pod_gpu_request(spec: Obj) -> int:
    """Devices a pod holds: max(main containers + sidecars, any single init container).

    Regular init containers run one at a time before the main containers, so
    their devices can be reused by the main containers (as the device
    manager does); sidecars run alongside the main containers.
    """
    inits = spec.get("initContainers", []) or []
    long_running = sum(gpu_limit(c) for c in spec.get("containers", [])) + sum(
        gpu_limit(c) for c in inits if is_sidecar(c)
    )
    init_max = max((gpu_limit(c) for c in inits if not is_sidecar(c)), default=0)
    return max(long_running, init_max)


def assign_gpus(spec: Obj, devices: list[int]) -> dict[str, list[int]]:
    """Split a pod's allocated device indices among its containers.

    Sidecars and main containers get disjoint slices (they run together);
    a regular init container takes the first devices it needs.
    """
    result: dict[str, list[int]] = {}
    offset = 0
    inits = spec.get("initContainers", []) or []
    for c in [*(c for c in inits if is_sidecar(c)), *spec.get("containers", [])]:
        n = gpu_limit(c)
        result[c["name"]] = devices[offset : offset + n]
        offset += n
    for c in inits:
        if not is_sidecar(c):
            result[c["name"]] = devices[: gpu_limit(c)]
    return result


class GpuAllocator:
    """Hands out fake GPU indices ``0..count-1`` to pods, lowest free first.

    Args:
        count: Devices on the node.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.assigned: dict[str, list[int]] = {}

    def free(self) -> list[int]:
        """Indices not held by any pod."""
        used = {d for devs in self.assigned.values() for d in devs}
        return [d for d in range(self.count) if d not in used]

    def allocate(self, pod_uid: str, n: int) -> list[int] | None:
        """Reserve ``n`` devices for a pod (idempotent per pod).

        Returns:
            The indices, or None when not enough are free (the kubelet then
            rejects the pod with ``UnexpectedAdmissionError``).
        """
        if pod_uid in self.assigned:
            return self.assigned[pod_uid]
        free = self.free()
        if n > len(free):
            return None
        self.assigned[pod_uid] = free[:n]
        return self.assigned[pod_uid]

    def release(self, pod_uid: str) -> None:
        """Give a pod's devices back (when it is terminal or gone)."""
        self.assigned.pop(pod_uid, None)


# --- restarts ----------------------------------------------------------------
def should_restart(pod_policy: str, container: Obj, exit_code: int, init: bool) -> bool:
    """Whether a container that exited with ``exit_code`` is started again.

    Sidecars always restart; a regular init container restarts on failure
    unless the pod's policy is ``Never`` (``Always`` acts as ``OnFailure``);
    main containers follow the pod's ``restartPolicy``.
    """
    if init and is_sidecar(container):
        return True
    policy = container.get("restartPolicy") or pod_policy
    if init:
        return policy != "Never" and exit_code != 0
    if policy == "Always":
        return True
    if policy == "OnFailure":
        return exit_code != 0
    return False


def crash_backoff(restart_count: int, base: float = 10.0, cap: float = 300.0) -> float:
    """Seconds to wait before restart number ``restart_count + 1``.

    The first restart is immediate; then 10 s, 20 s, 40 s ... capped at
    five minutes, as the kubelet's CrashLoopBackOff.
    """
    if restart_count <= 0:
        return 0.0
    return float(min(base * 2 ** (restart_count - 1), cap))


# --- phase -------------------------------------------------------------------
def _state(status: Obj | None) -> str:
    if not status:
        return "unknown"
    state = status.get("state") or {}
    for key in ("running", "terminated", "waiting"):
        if key in state:
            return key
    return "unknown"


def pod_phase(spec: Obj, init_statuses: list[Obj], statuses: list[Obj], terminal: bool) -> str:
    """Derive the pod phase from container statuses (kubelet ``getPhase``).

    Args:
        spec: The pod spec.
        init_statuses: ``status.initContainerStatuses``.
        statuses: ``status.containerStatuses``.
        terminal: The pod is being torn down for good (deleted or all its
            containers are done and will not restart): a still-running count
            no longer keeps it ``Running``.

    Returns:
        One of ``Pending``, ``Running``, ``Succeeded``, ``Failed``.
    """
    by_name = {s["name"]: s for s in init_statuses}
    policy = spec.get("restartPolicy", "Always")
    pending_init = failed_init = 0
    for c in spec.get("initContainers", []) or []:
        st = by_name.get(c["name"])
        kind = _state(st)
        if is_sidecar(c):
            if kind != "running" and not (st or {}).get("started") and not terminal:
                pending_init += 1
            continue
        if kind == "running" or kind == "unknown":
            pending_init += 1
        elif kind == "terminated":
            if st and st["state"]["terminated"].get("exitCode", 0) != 0:
                failed_init += 1
        else:  # waiting
            last = ((st or {}).get("lastState") or {}).get("terminated")
            if last is not None:
                if last.get("exitCode", 0) != 0:
                    failed_init += 1
            else:
                pending_init += 1

    by_name = {s["name"]: s for s in statuses}
    unknown = running = waiting = stopped = succeeded = 0
    for c in spec.get("containers", []):
        st = by_name.get(c["name"])
        kind = _state(st)
        if kind == "running":
            running += 1
        elif kind == "terminated":
            stopped += 1
            if st and st["state"]["terminated"].get("exitCode", 0) == 0:
                succeeded += 1
        elif kind == "waiting":
            last = ((st or {}).get("lastState") or {}).get("terminated")
            if last is not None:
                stopped += 1
                if last.get("exitCode", 0) == 0:
                    succeeded += 1
            else:
                waiting += 1
        else:
            unknown += 1

    if failed_init > 0 and policy == "Never":
        return "Failed"
    if pending_init > 0 or waiting > 0:
        if terminal and failed_init > 0:
            return "Failed"
        return "Pending"
    if running > 0 and unknown == 0:
        return "Running"
    if running == 0 and stopped > 0 and unknown == 0:
        if terminal:
            return "Succeeded" if stopped == succeeded else "Failed"
        if policy == "Always":
            return "Running"
        if stopped == succeeded:
            return "Succeeded"
        if policy == "Never":
            return "Failed"
        return "Running"
    return "Pending"
