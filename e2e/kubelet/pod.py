"""One pod's lifecycle on the process kubelet: a worker thread per pod.

The worker admits the pod (GPU devices, volumes), runs init containers in
order, native sidecars alongside, then the main containers, restarts them per
policy with crash-loop back-off, runs probes, writes the pod status, and on
deletion stops everything within the grace period before removing the pod
with grace 0 and a UID precondition, like the real kubelet.

Each container is a local process started as::

    unshare --mount --propagation private -- /bin/sh -c '<bind mounts>; exec "$@"' ...

so volumes, the service-account token and ``/etc/hosts`` appear at their
paths for that container only. The shell execs the command: the
container's PID is the command's PID, and SIGTERM reaches it directly.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from e2e.kube import ApiError
from e2e.kubelet import logic
from e2e.kubelet.volumes import PodVolumes, VolumeError, ensure_mountpoint

if TYPE_CHECKING:
    from e2e.kubelet.kubelet import Kubelet

Obj = dict[str, Any]

MIN_GRACE_SECONDS = 2  # the kubelet's minimumGracePeriodInSeconds


def now_rfc3339() -> str:
    """The current time in the API's RFC 3339 format (second precision)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _proc_ticks(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :].split()[19]
    except (OSError, IndexError):
        return "0"


@dataclass
class ProbeState:
    """Progress of one probe of one container."""

    next_at: float = 0.0
    successes: int = 0
    failures: int = 0


@dataclass
class ContainerRun:
    """The runtime record of one container (across its restarts)."""

    spec: Obj
    init: bool
    proc: subprocess.Popen[bytes] | None = None
    restart_count: int = 0
    runs: int = 0
    state: Obj = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: Obj = field(default_factory=dict)
    next_start: float = 0.0
    started_mono: float = 0.0
    ready: bool = False
    started: bool = False
    finished: bool = False
    stopping: bool = False
    container_id: str = ""
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    probes: dict[str, ProbeState] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The container name."""
        name: str = self.spec["name"]
        return name

    @property
    def sidecar(self) -> bool:
        """Whether this is a native sidecar (restartable init container)."""
        return self.init and logic.is_sidecar(self.spec)

    @property
    def running(self) -> bool:
        """Whether the process is (believed to be) alive."""
        return self.proc is not None

    def exit_code(self) -> int | None:
        """The last termination's exit code, if the container terminated."""
        term = self.state.get("terminated") or self.last_state.get("terminated")
        return None if term is None else int(term["exitCode"])


class PodWorker(threading.Thread):
    """Runs one pod until it is deleted.

    Args:
        kubelet: The owning kubelet (API client, allocator, settings).
        pod: The pod as last seen from the API.
    """

    def __init__(self, kubelet: Kubelet, pod: Obj) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.k = kubelet
        self.pod = pod
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.dir: Path = kubelet.root / "pods" / self.uid
        self.wake = threading.Event()
        self.deleted = False
        spec = pod["spec"]
        self.inits = [ContainerRun(c, True) for c in spec.get("initContainers", []) or []]
        self.mains = [ContainerRun(c, False) for c in spec.get("containers", [])]
        self.admitted = False
        self.rejection: tuple[str, str] | None = None
        self.sandbox_error = ""
        self.volumes: PodVolumes | None = None
        self.gpus: dict[str, list[int]] = {}
        self.gpus_assigned = False
        self.done = False
        self.start_time = pod.get("status", {}).get("startTime") or now_rfc3339()
        self.last_status: Obj | None = None
        self.cond_times: dict[str, tuple[str, str]] = {}
        self.hosts_version = -1
        self.restored = False
        phase = pod.get("status", {}).get("phase")
        if phase in ("Succeeded", "Failed"):
            # Seen after a kubelet restart: a finished pod is never run again.
            self.done = True
            self.admitted = True
            self.restored = True

    # --- events from the kubelet's watch -------------------------------------
    def update(self, pod: Obj) -> None:
        """Hand the worker a newer version of its pod."""
        self.pod = pod
        self.wake.set()

    def gone(self) -> None:
        """The pod object no longer exists (force deletion)."""
        self.deleted = True
        self.wake.set()

    def containers(self) -> list[ContainerRun]:
        """All containers, init first."""
        return [*self.inits, *self.mains]

    # --- main loop -----------------------------------------------------------
    def run(self) -> None:
        """Thread body: drive the pod until it is deleted or the kubelet stops."""
        try:
            self._loop()
        except Exception:
            self.k.log(f"{self.name}: worker crashed:\n{traceback.format_exc()}")
            self.stop(list(self.containers()), 0)
            # Not finished: the next event for this pod starts a new worker.
            self.k.forget(self, finished=False)
        else:
            self.k.forget(self)

    def _loop(self) -> None:
        while not self.k.stopping.is_set():
            pod = self.pod
            if self.deleted:
                # Force-deleted (gone from the API): still SIGTERM first, with
                # the kubelet's minimum grace period.
                self.stop(self.containers(), MIN_GRACE_SECONDS)
                self.cleanup()
                return
            if pod["metadata"].get("deletionTimestamp"):
                self.terminate(pod)
                return
            if not self.done:
                if not self.admitted:
                    self.admit(pod)
                if self.admitted and not self.rejection:
                    self.step(pod)
                    self.run_probes()
                    if self.volumes:
                        self.k.volumes.refresh(pod, self.volumes)
                    self.refresh_hosts()
            self.sync_status(pod)
            active = any(c.running for c in self.containers()) or not self.done
            self.wake.wait(0.25 if active else 5.0)
            self.wake.clear()
        # The kubelet is shutting down (``down``): a node going away kills its
        # processes; the pods stay in the API as on a real node.
        self.stop(self.containers(), 1)

    # --- admission -----------------------------------------------------------
    def admit(self, pod: Obj) -> None:
        """Reserve devices and set the pod's sandbox (dirs, volumes, hosts) up."""
        spec = pod["spec"]
        if not self.gpus_assigned:
            need = logic.pod_gpu_request(spec)
            with self.k.lock:
                devices = self.k.gpus.allocate(self.uid, need)
                available = len(self.k.gpus.free())
            if devices is None:
                self.rejection = (
                    "UnexpectedAdmissionError",
                    "Allocate failed due to requested number of devices unavailable for "
                    f"{logic.GPU_RESOURCE}. Requested: {need}, Available: {available}, "
                    "which is unexpected",
                )
                self.done = True
                self.admitted = True
                self.k.event(pod, "Warning", *self.rejection)
                return
            self.gpus = logic.assign_gpus(spec, devices)
            self.gpus_assigned = True
        (self.dir / "containers").mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        try:
            self.volumes = self.k.volumes.setup(pod, self.dir)
        except (VolumeError, ApiError) as exc:
            if self.sandbox_error != str(exc):
                self.k.event(pod, "Warning", "FailedMount", str(exc))
            self.sandbox_error = str(exc)
            for c in self.containers():
                c.state = {"waiting": {"reason": "ContainerCreating", "message": str(exc)}}
            time.sleep(1.0)
            return
        self.sandbox_error = ""
        for c in self.containers():
            reason = "PodInitializing" if not c.init and self.inits else "ContainerCreating"
            c.state = {"waiting": {"reason": reason}}
        self.refresh_hosts(force=True)
        self.admitted = True
        self.k.log(f"admitted {self.namespace}/{self.pod_name} gpus={self.gpus}")

    def refresh_hosts(self, force: bool = False) -> None:
        """(Re)write the pod's hosts file when the Service set changed.

        The file is rewritten in place: containers bind-mount this inode at
        ``/etc/hosts``, and a rename would leave them with the old one.
        """
        if self.k.services_version == self.hosts_version and not force:
            return
        version, text = self.k.hosts_file(self.pod)
        path = self.dir / "etc-hosts"
        with path.open("a+") as f:
            f.seek(0)
            f.truncate()
            f.write(text)
        self.hosts_version = version

    # --- container state machine -----------------------------------------------
    def step(self, pod: Obj) -> None:
        """Reap exited processes and start whatever should run now."""
        now = time.monotonic()
        for c in self.containers():
            self.reap(c)
        if self.pod_finished():
            sidecars = [c for c in self.inits if c.sidecar]
            # Main containers are done: sidecars are stopped, last first.
            for c in reversed(sidecars):
                self.stop([c], self.grace(pod))
            for c in self.containers():
                c.finished = c.finished or not c.running
            self.finish()
            return
        for c in self.inits:
            if c.sidecar:
                if not c.running and now >= c.next_start:
                    self.start_container(pod, c)
                if not c.running:
                    return
                if not c.started:
                    return  # wait for its startup probe before the next one
                continue
            if c.finished and c.exit_code() == 0:
                continue
            if not c.running and not c.finished and now >= c.next_start:
                self.start_container(pod, c)
            return
        for c in self.mains:
            if not c.running and not c.finished and now >= c.next_start:
                self.start_container(pod, c)

    def pod_finished(self) -> bool:
        """No main container will run again (or a regular init failed for good)."""
        if any(c.finished and not c.sidecar and (c.exit_code() or 0) != 0 for c in self.inits):
            return True
        return all(c.finished for c in self.mains)

    def finish(self) -> None:
        """Mark the pod terminal and give its devices back."""
        self.done = True
        with self.k.lock:
            self.k.gpus.release(self.uid)

    def reap(self, c: ContainerRun) -> None:
        """Record the exit of a container's process and decide about a restart."""
        if c.proc is None:
            return
        code = c.proc.poll()
        if code is None:
            return
        # The container's other processes die with it, as with a PID namespace.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(c.proc.pid, signal.SIGKILL)
        exit_code = 128 - code if code < 0 else code
        terminated = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": c.state.get("running", {}).get("startedAt", now_rfc3339()),
            "finishedAt": now_rfc3339(),
            "containerID": c.container_id,
        }
        if exit_code != 0 and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            terminated["message"] = self._log_tail(c)
        msg = self._termination_message(c)
        if msg:
            terminated["message"] = msg
        if exit_code < 0:
            terminated["signal"] = -code
        c.proc = None
        c.ready = False
        policy = self.pod["spec"].get("restartPolicy", "Always")
        if not c.stopping and logic.should_restart(policy, c.spec, exit_code, c.init):
            c.last_state = {"terminated": terminated}
            delay = logic.crash_backoff(c.restart_count, base=self.k.backoff_base)
            c.next_start = time.monotonic() + delay
            if delay > 0:
                self.k.event(
                    self.pod, "Warning", "BackOff", f"Back-off restarting failed container {c.name}"
                )
                c.state = {
                    "waiting": {
                        "reason": "CrashLoopBackOff",
                        "message": f"back-off {delay:.0f}s restarting failed container="
                        f"{c.name} pod={self.pod_name}_{self.namespace}({self.uid})",
                    }
                }
            else:
                c.state = {"terminated": terminated}
        else:
            c.state = {"terminated": terminated}
            c.finished = True
        self.k.log(f"{self.namespace}/{self.pod_name}/{c.name} exited {exit_code}")

    def _log_tail(self, c: ContainerRun) -> str:
        if not c.log_path or not c.log_path.exists():
            return ""
        data = c.log_path.read_bytes()[-2048:].decode(errors="replace")
        return "\n".join(data.splitlines()[-80:])

    def _termination_message(self, c: ContainerRun) -> str:
        path = self.dir / "containers" / f"{c.name}.termination-log"
        try:
            text: str = path.read_text()
            return text[:4096]
        except OSError:
            return ""

    def grace(self, pod: Obj) -> int:
        """The pod's termination grace period in seconds."""
        g = pod["metadata"].get("deletionGracePeriodSeconds")
        if g is None:
            g = pod["spec"].get("terminationGracePeriodSeconds", 30)
        return max(int(g), MIN_GRACE_SECONDS)

    def start_container(self, pod: Obj, c: ContainerRun) -> None:
        """Start (or restart) one container as a local process."""
        assert self.volumes is not None
        spec = c.spec
        ns = self.namespace
        try:
            env = logic.container_env(
                pod,
                spec,
                self.k.base_env(pod),
                self.k.volumes.get_secret(ns),
                self.k.volumes.get_configmap(ns),
                self.k.allocatable,
            )
            devices = self.gpus.get(c.name, [])
            if devices:
                # What the NVIDIA device plugin hands a container: its
                # device indices, so a trial can see which GPUs it got.
                ids = ",".join(str(d) for d in devices)
                env["NVIDIA_VISIBLE_DEVICES"] = ids
                env["CUDA_VISIBLE_DEVICES"] = ids
            argv = logic.container_argv(spec, env)
            mounts = self._mounts(c, env)
        except (logic.EnvError, VolumeError, ApiError) as exc:
            if c.state.get("waiting", {}).get("message") != str(exc):
                self.k.event(pod, "Warning", "Failed", f"Error: {exc}")
            c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
            c.next_start = time.monotonic() + 2.0
            return
        if c.runs > 0:
            c.restart_count += 1
        c.runs += 1
        log_dir = self.dir / "logs" / c.name
        log_dir.mkdir(parents=True, exist_ok=True)
        c.log_path = log_dir / f"{c.restart_count}.log"
        workdir = spec.get("workingDir") or str(self.dir / "containers" / c.name / "cwd")
        Path(workdir).mkdir(parents=True, exist_ok=True)
        lines = ["set -e"]
        for src, dst, ro in mounts:
            self.k.record_mountpoints(ensure_mountpoint(dst, Path(src).is_file()))
            lines.append(f"mount --bind {shlex.quote(src)} {shlex.quote(dst)}")
            if ro:
                lines.append(f"mount -o remount,bind,ro {shlex.quote(dst)}")
        lines.append(f"cd {shlex.quote(workdir)}")
        lines.append('exec "$@"')
        wrapper = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "/bin/sh",
            "-c",
            "\n".join(lines),
            c.name,
            *argv,
        ]
        with c.log_path.open("ab") as out:
            c.proc = subprocess.Popen(
                wrapper,
                env=env,
                cwd=str(self.dir),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        (self.dir / "containers" / f"{c.name}.pid").write_text(
            f"{c.proc.pid} {_proc_ticks(c.proc.pid)}"
        )
        c.env = env
        c.container_id = f"process://{self.k.node_name}/{c.proc.pid}"
        c.started_mono = time.monotonic()
        c.stopping = False
        c.state = {"running": {"startedAt": now_rfc3339()}}
        c.started = "startupProbe" not in spec
        c.ready = "readinessProbe" not in spec
        c.probes = {}
        self.k.log(f"started {ns}/{self.pod_name}/{c.name} pid={c.proc.pid}: {argv}")
        self.k.event(pod, "Normal", "Started", f"Started container {c.name}")

    def _mounts(self, c: ContainerRun, env: dict[str, str]) -> list[tuple[str, str, bool]]:
        assert self.volumes is not None
        mounts: list[tuple[str, str, bool]] = []
        for vm in c.spec.get("volumeMounts", []) or []:
            if vm["name"] not in self.volumes.paths:
                raise VolumeError(f"volume {vm['name']} not found")
            src = self.volumes.paths[vm["name"]]
            sub = vm.get("subPath") or logic.expand(vm.get("subPathExpr", ""), env.get)
            if sub:
                src = src / sub
                if not src.exists():
                    src.mkdir(parents=True, exist_ok=True)
            mounts.append((str(src), vm["mountPath"], bool(vm.get("readOnly"))))
        term_path = c.spec.get("terminationMessagePath", "/dev/termination-log")
        term_file = self.dir / "containers" / f"{c.name}.termination-log"
        term_file.write_text("")
        if Path(term_path).parent.is_dir():
            mounts.append((str(term_file), term_path, False))
        mounts.append((str(self.dir / "etc-hosts"), "/etc/hosts", False))
        # Parents before children, so a nested mount lands inside its parent.
        mounts.sort(key=lambda m: m[1].count("/"))
        return mounts

    # --- probes ------------------------------------------------------------------
    def run_probes(self) -> None:
        """Run due startup/readiness/liveness probes of running containers."""
        now = time.monotonic()
        for c in self.containers():
            if not c.running:
                continue
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.spec.get(kind)
                if not probe or (kind != "startupProbe" and not c.started):
                    continue
                if kind == "startupProbe" and c.started:
                    continue
                st = c.probes.setdefault(
                    kind, ProbeState(c.started_mono + probe.get("initialDelaySeconds", 0))
                )
                if now < st.next_at:
                    continue
                st.next_at = now + probe.get("periodSeconds", 10)
                ok = self._probe(c, probe)
                if ok:
                    st.successes += 1
                    st.failures = 0
                else:
                    st.failures += 1
                    st.successes = 0
                if kind == "startupProbe":
                    if ok:
                        c.started = True
                    elif st.failures >= probe.get("failureThreshold", 3):
                        self._kill_for_probe(c, kind)
                elif kind == "readinessProbe":
                    if ok and st.successes >= probe.get("successThreshold", 1):
                        c.ready = True
                    elif not ok and st.failures >= probe.get("failureThreshold", 3):
                        c.ready = False
                elif not ok and st.failures >= probe.get("failureThreshold", 3):
                    self._kill_for_probe(c, kind)

    def _kill_for_probe(self, c: ContainerRun, kind: str) -> None:
        self.k.log(f"{self.namespace}/{self.pod_name}/{c.name}: {kind} failed, restarting")
        proc = c.proc
        assert proc is not None
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(self.grace(self.pod))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.reap(c)

    def _port(self, c: ContainerRun, port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in c.spec.get("ports", []) or []:
            if p.get("name") == port:
                return int(p["containerPort"])
        raise ValueError(f"unknown named port {port}")

    def _probe(self, c: ContainerRun, probe: Obj) -> bool:
        """One probe attempt; pods listen on loopback, so probes target 127.0.0.1."""
        timeout = float(probe.get("timeoutSeconds", 1))
        try:
            if "exec" in probe:
                assert c.proc is not None
                res = subprocess.run(
                    ["nsenter", "-t", str(c.proc.pid), "-m", "--", *probe["exec"]["command"]],
                    env=c.env,
                    capture_output=True,
                    timeout=timeout,
                    check=False,
                )
                return res.returncode == 0
            if "httpGet" in probe:
                g = probe["httpGet"]
                scheme = g.get("scheme", "HTTP").lower()
                host = g.get("host") or "127.0.0.1"
                url = f"{scheme}://{host}:{self._port(c, g['port'])}{g.get('path', '/')}"
                headers = {h["name"]: h["value"] for h in g.get("httpHeaders", []) or []}
                verify: bool | ssl.SSLContext = False
                r = httpx.get(url, headers=headers, timeout=timeout, verify=verify)
                return 200 <= r.status_code < 400
            if "tcpSocket" in probe:
                t = probe["tcpSocket"]
                with socket.create_connection(
                    (t.get("host") or "127.0.0.1", self._port(c, t["port"])), timeout=timeout
                ):
                    return True
        except (OSError, httpx.HTTPError, subprocess.TimeoutExpired, ValueError):
            return False
        return True  # grpc probes are not implemented: treated as passing

    # --- stopping ----------------------------------------------------------------
    def stop(self, containers: list[ContainerRun], grace: float) -> None:
        """SIGTERM the running containers, SIGKILL what is left after ``grace`` seconds."""
        running = [c for c in containers if c.running]
        for c in running:
            c.stopping = True
            assert c.proc is not None
            with contextlib.suppress(ProcessLookupError):
                # The container's main process, as a runtime signals PID 1.
                c.proc.send_signal(signal.SIGTERM if grace > 0 else signal.SIGKILL)
        deadline = time.monotonic() + grace
        while any(c.proc is not None and c.proc.poll() is None for c in running):
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        for c in running:
            if c.proc is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
                c.proc.wait()
            self.reap(c)
        for c in containers:
            c.finished = True

    def terminate(self, pod: Obj) -> None:
        """Graceful deletion: stop within the grace period, report, delete with grace 0."""
        grace = self.grace(pod)
        deadline = time.monotonic() + grace
        self.k.log(f"terminating {self.namespace}/{self.pod_name} (grace {grace}s)")
        for c in self.containers():
            if c.running:
                self.k.event(pod, "Normal", "Killing", f"Stopping container {c.name}")
        # Main containers first, then sidecars in reverse order, all within
        # the one grace period (KEP-753 ordering).
        self.stop(self.mains, grace)
        self.stop(list(reversed(self.inits)), max(deadline - time.monotonic(), 0))
        self.finish()
        self.sync_status(pod)
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}}
        try:
            self.k.api.delete(f"/api/v1/namespaces/{self.namespace}/pods/{self.pod_name}", body)
        except ApiError as exc:
            if exc.status not in (404, 409):
                self.k.log(f"final delete of {self.pod_name} failed: {exc}")
        self.cleanup()

    def cleanup(self) -> None:
        """Release devices and remove the pod's directory (logs included)."""
        with self.k.lock:
            self.k.gpus.release(self.uid)
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- status ------------------------------------------------------------------
    def _condition(self, ctype: str, ok: bool, reason: str = "") -> Obj:
        status = "True" if ok else "False"
        prev = self.cond_times.get(ctype)
        if prev is None or prev[0] != status:
            self.cond_times[ctype] = (status, now_rfc3339())
        cond: Obj = {
            "type": ctype,
            "status": status,
            "lastProbeTime": None,
            "lastTransitionTime": self.cond_times[ctype][1],
        }
        if reason and not ok:
            cond["reason"] = reason
        return cond

    def container_status(self, c: ContainerRun) -> Obj:
        """The container's entry in ``containerStatuses``."""
        image = c.spec.get("image", "")
        st: Obj = {
            "name": c.name,
            "image": image,
            "imageID": f"process-kubelet://{image}",
            "state": c.state,
            "lastState": c.last_state,
            "ready": c.ready and c.running,
            "restartCount": c.restart_count,
            "started": c.started and c.running,
        }
        if c.container_id:
            st["containerID"] = c.container_id
        return st

    def build_status(self, pod: Obj) -> Obj:
        """The pod status this kubelet reports now."""
        spec = pod["spec"]
        if self.rejection:
            reason, message = self.rejection
            return {
                "phase": "Failed",
                "reason": reason,
                "message": message,
                "startTime": self.start_time,
                "conditions": self._keep_foreign_conditions(pod),
            }
        init_st = [self.container_status(c) for c in self.inits]
        main_st = [self.container_status(c) for c in self.mains]
        phase = logic.pod_phase(spec, init_st, main_st, terminal=self.done)
        initialized = all(
            (c.sidecar and c.started and c.running) or (not c.sidecar and c.exit_code() == 0)
            for c in self.inits
        ) or (self.done and not any(c.exit_code() for c in self.inits if not c.sidecar))
        containers_ready = all(c.ready and c.running for c in self.mains) and all(
            c.ready and c.running for c in self.inits if c.sidecar
        )
        gates_ok = all(
            any(
                cond.get("type") == g["conditionType"] and cond.get("status") == "True"
                for cond in pod.get("status", {}).get("conditions", []) or []
            )
            for g in spec.get("readinessGates", []) or []
        )
        conditions = [
            *self._keep_foreign_conditions(pod),
            self._condition("PodReadyToStartContainers", self.admitted and not self.done),
            self._condition("Initialized", initialized, "ContainersNotInitialized"),
            self._condition(
                "Ready", containers_ready and gates_ok and not self.done, "ContainersNotReady"
            ),
            self._condition(
                "ContainersReady", containers_ready and not self.done, "ContainersNotReady"
            ),
        ]
        if phase in ("Succeeded", "Failed"):
            for cond in conditions:
                if cond["type"] in ("Ready", "ContainersReady") and cond["status"] == "False":
                    cond["reason"] = "PodCompleted"
        ip = self.k.node_ip
        status: Obj = {
            "phase": phase,
            "conditions": conditions,
            "hostIP": ip,
            "hostIPs": [{"ip": ip}],
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": self.start_time,
            "containerStatuses": main_st,
        }
        if init_st:
            status["initContainerStatuses"] = init_st
        if self.sandbox_error:
            status["message"] = self.sandbox_error
        return status

    def _keep_foreign_conditions(self, pod: Obj) -> list[Obj]:
        # Conditions other components own (PodScheduled from the scheduler,
        # DisruptionTarget, readiness gates) must survive the merge patch.
        mine = {"PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady"}
        return [
            c
            for c in pod.get("status", {}).get("conditions", []) or []
            if c.get("type") not in mine
        ]

    def sync_status(self, pod: Obj) -> None:
        """Write the status when it changed (a JSON merge patch of ``status``)."""
        if self.restored:
            return  # a finished pod from before a kubelet restart: its status stands
        status = self.build_status(pod)
        if status == self.last_status:
            return
        try:
            self.k.api.merge_patch(
                f"/api/v1/namespaces/{self.namespace}/pods/{self.pod_name}/status",
                {"status": status},
            )
            self.last_status = status
        except ApiError as exc:
            if exc.status == 404:
                self.deleted = True
            else:
                self.k.log(f"status update of {self.pod_name} failed: {exc}")
        except httpx.HTTPError as exc:
            self.k.log(f"status update of {self.pod_name} failed: {exc}")
