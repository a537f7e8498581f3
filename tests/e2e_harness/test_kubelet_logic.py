"""Unit tests for the process kubelet's pure logic (no cluster needed)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from e2e.kubelet import logic
from e2e.kubelet.logic import EnvError, GpuAllocator

Obj = dict[str, Any]

# --- $(VAR) expansion ------------------------------------------------------------
VARS = {"A": "alpha", "B": "beta", "EMPTY": ""}


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("$(A)", "alpha"),
        ("x-$(A)-$(B)-y", "x-alpha-beta-y"),
        ("$(MISSING)", "$(MISSING)"),  # unknown stays as written
        ("$$(A)", "$(A)"),  # $$ escapes
        ("$$$(A)", "$alpha"),
        ("$(A", "$(A"),  # unterminated
        ("$A", "$A"),  # not a reference
        ("price: 5$", "price: 5$"),  # trailing $
        ("$(EMPTY)x", "x"),
        ("", ""),
        ("$()", "$()"),
    ],
)
def test_expand_matches_kubernetes_rules(text: str, want: str) -> None:
    assert logic.expand(text, VARS.get) == want


# --- env -----------------------------------------------------------------------------
POD: Obj = {
    "metadata": {
        "name": "p1",
        "namespace": "ns1",
        "uid": "u-1",
        "labels": {"app": "demo"},
        "annotations": {"note": "hi"},
    },
    "spec": {"nodeName": "n0", "serviceAccountName": "sa1", "containers": []},
    "status": {"podIP": "10.0.0.7", "hostIP": "10.0.0.1"},
}


def _secret(data: dict[str, str]) -> Obj:
    return {"data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


SECRETS = {"creds": _secret({"user": "bob", "pass": "s3cr3t"})}
CONFIGMAPS = {"cfg": {"data": {"mode": "fast", "level": "3"}}}


def env_of(container: Obj, base: dict[str, str] | None = None) -> dict[str, str]:
    return logic.container_env(
        POD,
        container,
        base or {},
        SECRETS.get,
        CONFIGMAPS.get,
        {"cpu": "8", "memory": "16Gi"},
    )


def test_env_values_refs_and_expansion_order() -> None:
    env = env_of(
        {
            "name": "c",
            "env": [
                {"name": "FIRST", "value": "1"},
                {"name": "REF", "value": "$(FIRST)-$(LATER)"},  # LATER not yet defined
                {"name": "LATER", "value": "2"},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {
                    "name": "APP",
                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}},
                },
                {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {
                    "name": "USER",
                    "valueFrom": {"secretKeyRef": {"name": "creds", "key": "user"}},
                },
                {
                    "name": "MODE",
                    "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}},
                },
                {"name": "BASE", "value": "$(KUBERNETES_SERVICE_HOST):x"},
            ],
        },
        base={"KUBERNETES_SERVICE_HOST": "127.0.0.1"},
    )
    assert env["REF"] == "1-$(LATER)"
    assert env["POD"] == "p1"
    assert env["NS"] == "ns1"
    assert env["APP"] == "demo"
    assert env["NODE"] == "n0"
    assert env["IP"] == "10.0.0.7"
    assert env["USER"] == "bob"
    assert env["MODE"] == "fast"
    assert env["BASE"] == "127.0.0.1:x"


def test_env_from_with_prefix_optional_and_override() -> None:
    env = env_of(
        {
            "name": "c",
            "envFrom": [
                {"configMapRef": {"name": "cfg"}, "prefix": "CFG_"},
                {"secretRef": {"name": "creds"}},
                {"configMapRef": {"name": "absent", "optional": True}},
            ],
            "env": [{"name": "user", "value": "override"}],
        }
    )
    assert env["CFG_mode"] == "fast"
    assert env["CFG_level"] == "3"
    assert env["pass"] == "s3cr3t"
    assert env["user"] == "override"  # env wins over envFrom


@pytest.mark.parametrize(
    "var",
    [
        {"name": "X", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k"}}},
        {"name": "X", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "nokey"}}},
        {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k"}}},
    ],
)
def test_env_missing_required_source_is_an_error(var: Obj) -> None:
    with pytest.raises(EnvError):
        env_of({"name": "c", "env": [var]})


def test_env_missing_optional_key_is_skipped() -> None:
    ref = {"name": "creds", "key": "nokey", "optional": True}
    env = env_of({"name": "c", "env": [{"name": "X", "valueFrom": {"secretKeyRef": ref}}]})
    assert "X" not in env


def test_resource_field_ref_uses_limits_or_node_allocatable() -> None:
    container = {
        "name": "c",
        "resources": {"limits": {"memory": "2Gi"}, "requests": {"cpu": "250m"}},
        "env": [
            {
                "name": "MEM_MI",
                "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}},
            },
            {"name": "CPU_LIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
            {
                "name": "CPU_REQ_M",
                "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1m"}},
            },
        ],
    }
    env = env_of(container)
    assert env["MEM_MI"] == "2048"
    assert env["CPU_LIMIT"] == "8"  # no limit: node allocatable
    assert env["CPU_REQ_M"] == "250"


def test_argv_expands_command_and_args() -> None:
    c = {"command": ["python", "-c"], "args": ["print('$(MSG)')", "$$(MSG)"]}
    assert logic.container_argv(c, {"MSG": "hi"}) == ["python", "-c", "print('hi')", "$(MSG)"]


def test_argv_requires_a_command() -> None:
    with pytest.raises(EnvError, match="no command"):
        logic.container_argv({"args": ["x"]}, {})


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("500m", "0.5"),
        ("2", "2"),
        ("1Ki", "1024"),
        ("1k", "1000"),
        ("1e3", "1000"),
        ("2Gi", str(2 * 2**30)),
    ],
)
def test_parse_quantity(text: str, value: str) -> None:
    assert logic.parse_quantity(text) == logic.parse_quantity(value)


def test_parse_quantity_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        logic.parse_quantity("12XB")


# --- GPUs ------------------------------------------------------------------------------
def gpu(n: int) -> Obj:
    return {"limits": {"nvidia.com/gpu": str(n)}}


def test_gpu_allocator_lowest_free_and_release() -> None:
    alloc = GpuAllocator(4)
    assert alloc.allocate("a", 1) == [0]
    assert alloc.allocate("b", 2) == [1, 2]
    assert alloc.allocate("a", 1) == [0]  # idempotent per pod
    assert alloc.allocate("c", 2) is None  # only one left
    alloc.release("a")
    assert alloc.allocate("c", 2) == [0, 3]
    assert alloc.free() == []


def test_gpu_allocator_zero_request() -> None:
    alloc = GpuAllocator(0)
    assert alloc.allocate("a", 0) == []
    assert alloc.allocate("b", 1) is None


def test_pod_gpu_request_and_assignment() -> None:
    spec = {
        "initContainers": [
            {"name": "prep", "resources": gpu(3)},
            {"name": "side", "restartPolicy": "Always", "resources": gpu(1)},
        ],
        "containers": [
            {"name": "train", "resources": gpu(1)},
            {"name": "cpu-only"},
        ],
    }
    # Sidecar + main run together (2); the init container needs 3 alone.
    assert logic.pod_gpu_request(spec) == 3
    assigned = logic.assign_gpus(spec, [4, 5, 6])
    assert assigned["side"] == [4]
    assert assigned["train"] == [5]
    assert assigned["cpu-only"] == []
    assert assigned["prep"] == [4, 5, 6]


# --- restarts ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("policy", "code", "want"),
    [
        ("Always", 0, True),
        ("Always", 1, True),
        ("OnFailure", 0, False),
        ("OnFailure", 2, True),
        ("Never", 1, False),
    ],
)
def test_should_restart_main(policy: str, code: int, want: bool) -> None:
    assert logic.should_restart(policy, {"name": "c"}, code, init=False) is want


def test_should_restart_init_and_sidecar() -> None:
    assert logic.should_restart("Always", {"name": "i"}, 1, init=True)  # acts as OnFailure
    assert not logic.should_restart("Always", {"name": "i"}, 0, init=True)
    assert not logic.should_restart("Never", {"name": "i"}, 1, init=True)
    side = {"name": "s", "restartPolicy": "Always"}
    assert logic.should_restart("Never", side, 0, init=True)


def test_crash_backoff_doubles_and_caps() -> None:
    assert [logic.crash_backoff(n) for n in range(7)] == [0, 10, 20, 40, 80, 160, 300]
    assert logic.crash_backoff(3, base=1) == 4


# --- phase ------------------------------------------------------------------------------
def running(name: str) -> Obj:
    return {"name": name, "state": {"running": {"startedAt": "t"}}}


def terminated(name: str, code: int) -> Obj:
    return {"name": name, "state": {"terminated": {"exitCode": code}}}


def waiting(name: str, last_code: int | None = None) -> Obj:
    st: Obj = {"name": name, "state": {"waiting": {"reason": "X"}}}
    if last_code is not None:
        st["lastState"] = {"terminated": {"exitCode": last_code}}
    return st


def spec(policy: str = "Always", inits: list[Obj] | None = None, n: int = 1) -> Obj:
    return {
        "restartPolicy": policy,
        "initContainers": inits or [],
        "containers": [{"name": f"c{i}"} for i in range(n)],
    }


def test_phase_pending_until_started() -> None:
    assert logic.pod_phase(spec(), [], [waiting("c0")], False) == "Pending"
    assert logic.pod_phase(spec(), [], [], False) == "Pending"


def test_phase_running_and_completion_per_policy() -> None:
    assert logic.pod_phase(spec(), [], [running("c0")], False) == "Running"
    assert logic.pod_phase(spec("Never"), [], [terminated("c0", 0)], False) == "Succeeded"
    assert logic.pod_phase(spec("Never"), [], [terminated("c0", 3)], False) == "Failed"
    assert logic.pod_phase(spec("OnFailure"), [], [terminated("c0", 0)], False) == "Succeeded"
    # OnFailure with a failure: it will restart, so still Running.
    assert logic.pod_phase(spec("OnFailure"), [], [waiting("c0", 1)], False) == "Running"
    # Always: a terminated container comes back.
    assert logic.pod_phase(spec("Always"), [], [terminated("c0", 0)], False) == "Running"


def test_phase_terminal_pod_is_decided_by_exit_codes() -> None:
    assert logic.pod_phase(spec("Always"), [], [terminated("c0", 0)], True) == "Succeeded"
    assert logic.pod_phase(spec("Always"), [], [terminated("c0", 143)], True) == "Failed"


def test_phase_multi_container() -> None:
    s = spec("Never", n=2)
    assert logic.pod_phase(s, [], [running("c0"), terminated("c1", 0)], False) == "Running"
    assert logic.pod_phase(s, [], [terminated("c0", 0), terminated("c1", 1)], False) == "Failed"


def test_phase_init_containers() -> None:
    inits = [{"name": "i0"}]
    assert (
        logic.pod_phase(spec("Never", inits), [running("i0")], [waiting("c0")], False) == "Pending"
    )
    assert (
        logic.pod_phase(spec("Never", inits), [terminated("i0", 1)], [waiting("c0")], False)
        == "Failed"
    )
    # OnFailure: a failed init container is retried, the pod stays Pending.
    assert (
        logic.pod_phase(spec("OnFailure", inits), [waiting("i0", 1)], [waiting("c0")], False)
        == "Pending"
    )
    assert (
        logic.pod_phase(spec("Never", inits), [terminated("i0", 0)], [running("c0")], False)
        == "Running"
    )


def test_phase_ignores_sidecars_for_completion() -> None:
    inits = [{"name": "side", "restartPolicy": "Always"}]
    s = spec("Never", inits)
    side_running = {**running("side"), "started": True}
    assert logic.pod_phase(s, [side_running], [running("c0")], False) == "Running"
    # Main done, sidecar still running (about to be stopped): Succeeded.
    assert logic.pod_phase(s, [side_running], [terminated("c0", 0)], False) == "Succeeded"
    # Sidecar killed by SIGTERM (143) after the main container: still Succeeded.
    assert logic.pod_phase(s, [terminated("side", 143)], [terminated("c0", 0)], True) == "Succeeded"
    # Sidecar not started yet: the pod is initializing.
    assert logic.pod_phase(s, [waiting("side")], [waiting("c0")], False) == "Pending"


# --- field refs --------------------------------------------------------------------------
def test_field_ref_paths() -> None:
    assert logic.field_ref(POD, "metadata.uid") == "u-1"
    assert logic.field_ref(POD, "metadata.annotations['note']") == "hi"
    assert logic.field_ref(POD, "metadata.labels['missing']") == ""
    assert logic.field_ref(POD, "spec.serviceAccountName") == "sa1"
    assert logic.field_ref(POD, "metadata.labels") == 'app="demo"'
    with pytest.raises(EnvError):
        logic.field_ref(POD, "spec.bogus")
