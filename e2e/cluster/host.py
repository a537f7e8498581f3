"""What a real node changes on the host, and how to undo it.

The upstream kubelet, kube-proxy, kube-router, containerd and the CNI plugins
change the machine, not only their state directory: iptables chains
(``KUBE-*`` from the kubelet, kube-proxy and kube-router, ``CNI-*`` from the
bridge and portmap plugins, IPv4 and IPv6), kube-router's ipsets, sysctls,
the ``cni0`` bridge, mounts (the kubelet bind-mounts its root directory onto
itself; pod volumes, overlay root filesystems and network namespaces are
mounts too), pod cgroups under ``kubepods`` and the sockets in
the kubelet's fixed ``/var/lib/kubelet/device-plugins``. So there can be one
real node per machine, and every ``down``, failed ``up`` or ``up`` after a
killed run must put the host back. :func:`clean` does that from what is on
the host, not from what a live process remembers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from e2e.cluster.processes import _start_ticks

# The sysctls the kubelet (kernel defaults it wants) and the bridge plugin
# (ip_forward) set; their earlier values are saved before the node starts.
SYSCTLS = ("vm.overcommit_memory", "kernel.panic", "kernel.panic_on_oops", "net.ipv4.ip_forward")
DEVICE_PLUGIN_DIR = Path("/var/lib/kubelet/device-plugins")
BRIDGE = "cni0"
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Records which state directory owns this machine's real node.
OWNER_FILE = Path("/run/kubetune-e2e-node.json")


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def save_sysctls(path: Path) -> None:
    """Write the current values of :data:`SYSCTLS` (once: a rerun keeps the first)."""
    if path.exists():
        return
    values = {}
    for name in SYSCTLS:
        with contextlib.suppress(OSError):
            values[name] = _sysctl_path(name).read_text().strip()
    path.write_text(json.dumps(values))


def restore_sysctls(path: Path) -> None:
    """Put back the values :func:`save_sysctls` wrote."""
    if not path.exists():
        return
    for name, value in json.loads(path.read_text()).items():
        with contextlib.suppress(OSError):
            _sysctl_path(name).write_text(value)
    path.unlink()


def kill_pod_processes() -> int:
    """SIGKILL every process in a pod cgroup (``kubepods``); how many there were."""
    pids: set[int] = set()
    for procs in CGROUP_ROOT.glob("*/kubepods/**/cgroup.procs"):
        with contextlib.suppress(OSError):
            pids.update(int(p) for p in procs.read_text().split())
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def kill_shims(address: Path) -> None:
    """SIGKILL the containerd shims started by the containerd at ``address``.

    Shims detach from containerd (their own session), so they outlive it.
    """
    needle = str(address).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes()
            if b"containerd-shim" in argv and needle in argv:
                os.kill(int(proc.name), signal.SIGKILL)


def remove_pod_cgroups() -> None:
    """Remove the (empty) ``kubepods`` cgroup trees, deepest first."""
    for controller in CGROUP_ROOT.iterdir():
        top = controller / "kubepods"
        if not top.is_dir():
            continue
        dirs = sorted((d for d in top.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts))
        for d in [*dirs, top]:
            for _ in range(20):  # a cgroup is busy for a moment after its last process died
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)


def mounts_under(roots: Iterable[Path], mountinfo: str | None = None) -> list[str]:
    """Mount points at or below any of ``roots``, deepest first.

    Args:
        roots: Directories whose mounts are wanted.
        mountinfo: The text of ``/proc/self/mountinfo`` (read when None).
    """
    prefixes = [str(r).rstrip("/") for r in roots]
    found = []
    text = Path("/proc/self/mountinfo").read_text() if mountinfo is None else mountinfo
    for line in text.splitlines():
        # Field 5 is the mount point, with spaces and such octal-escaped.
        point = re.sub(r"\\(\d{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
        if any(point == p or point.startswith(p + "/") for p in prefixes):
            found.append(point)
    return sorted(set(found), key=lambda p: -p.count("/"))


def unmount_all(roots: Iterable[Path]) -> None:
    """Lazily unmount everything mounted under ``roots``, several passes for stacked mounts."""
    roots = list(roots)
    for _ in range(5):
        points = mounts_under(roots)
        if not points:
            return
        for point in points:
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def _run(*argv: str) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout
    except OSError:
        return ""


def remove_chains(prefixes: tuple[str, ...] = ("KUBE-", "CNI-")) -> None:
    """Delete the iptables chains named with ``prefixes``, and the jumps to them, IPv4 and IPv6."""
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            rules = _run(tool, "-w", "-t", table, "-S").splitlines()
            ours = [
                r.split()[1]
                for r in rules
                if r.startswith("-N ") and r.split()[1].startswith(prefixes)
            ]
            if not ours:
                continue
            # Jumps from the built-in chains first, then flush, then delete.
            for rule in rules:
                # shlex: comments are quoted and have spaces (kube-router's
                # jumps carry one), and `-D` needs the rule's exact arguments.
                parts = shlex.split(rule)
                if (
                    parts[0] == "-A"
                    and not parts[1].startswith(prefixes)
                    and any(f"-j {c}" in rule for c in ours)
                ):
                    _run(tool, "-w", "-t", table, "-D", *parts[1:])
            for chain in ours:
                _run(tool, "-w", "-t", table, "-F", chain)
            for chain in ours:
                _run(tool, "-w", "-t", table, "-X", chain)


def remove_ipsets(prefixes: tuple[str, ...] = ("KUBE-", "inet6:KUBE-")) -> None:
    """Destroy kube-router's ipsets (the pods each NetworkPolicy selects).

    Only once the chains are gone: an ipset a rule still names cannot be
    destroyed. Without the ipset tool there is nothing of ours to remove.
    """
    for name in _run("ipset", "list", "-n").split():
        if name.startswith(prefixes):
            _run("ipset", "destroy", name)


def remove_bridge() -> None:
    """Delete the pod bridge (its veths went with the pods' network namespaces)."""
    _run("ip", "link", "delete", BRIDGE)


def remove_device_plugin_sockets() -> None:
    """Remove what a kubelet and our GPU plugin left in the fixed directory.

    The sockets, and the device manager's checkpoint: a next kubelet would
    otherwise restore allocations to Pods of this cluster.
    """
    for leftover in [
        *DEVICE_PLUGIN_DIR.glob("*.sock"),
        DEVICE_PLUGIN_DIR / "kubelet_internal_checkpoint",
    ]:
        with contextlib.suppress(OSError):
            leftover.unlink()


def clean(state: Path, containerd_address: Path) -> None:
    """Undo everything a real node of ``state`` changed on the host.

    Safe to run on a host with nothing to clean, and after a run that was
    killed: it works from the host's mounts, cgroups, chains and links.
    Call it with the node's processes stopped.
    """
    kill_pod_processes()
    kill_shims(containerd_address)
    unmount_all([state, Path("/var/lib/kubelet"), Path("/run/containerd"), Path("/run/netns")])
    remove_pod_cgroups()
    remove_chains()
    remove_ipsets()
    remove_bridge()
    remove_device_plugin_sockets()
    restore_sysctls(state / "sysctls.json")


def owner() -> dict[str, str]:
    """The real node this machine runs, as recorded (empty when none)."""
    try:
        data: dict[str, str] = json.loads(OWNER_FILE.read_text())
        return data
    except (OSError, ValueError):
        return {}


def claim(state: Path) -> None:
    """Record that the real node of ``state`` owns this machine."""
    OWNER_FILE.write_text(json.dumps({"state": str(state)}))


def release(state: Path) -> None:
    """Forget the claim of ``state`` (another state's claim stays)."""
    if owner().get("state") == str(state):
        with contextlib.suppress(OSError):
            OWNER_FILE.unlink()


def running_kubelets() -> list[str]:
    """Command lines of the kubelet processes running on this machine."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            # A zombie (stopped, not yet reaped by its parent) is not running.
            if (proc / "comm").read_text().strip() == "kubelet" and _start_ticks(int(proc.name)):
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip())
    return found
