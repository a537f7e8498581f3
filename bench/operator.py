"""Operator throughput: 1,000 one-second trials at parallelism 50 on the harness.

    eval "$(python -m e2e.cluster up)"
    python bench/operator.py [--trials 1000] [--parallelism 50] [--seconds 1]

Trial Pods run on kwok's fake nodes: kwok's default stages mark each Pod
Running at once, and one more stage (written by this script) marks a trial
Pod Succeeded ``--seconds`` after it runs, as its kubelet would. This script
plays the sidecar's part: when a Pod runs, it posts one observation with the
trial's own token. So the run measures the operator's bookkeeping (Trials,
Pods, service calls, status) and the control plane, not training.

The suggestion service and the operator run as host processes (see
``e2e/host_stack.py``). Printed: total time against the ideal
``trials / parallelism * seconds``, apply-to-first-trial-Running, and the
peak number of trial Pods running at once. Then, with kubetune stopped, the
floor (``--no-floor`` skips it): the same number of copies of a trial Pod
kept ``--parallelism`` at a time by a minimal loop, and kubetune's time over it.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from e2e.cluster import Cluster, bin_dir  # noqa: E402
from e2e.helpers import Kube, Samples, find_kubectl, wait_for  # noqa: E402
from e2e.host_stack import HostStack  # noqa: E402
from e2e.kube import Api  # noqa: E402
from e2e.operator_helpers import ChartStack, synthetic_experiment  # noqa: E402
from kubetune_controller.pods import COLLECTOR_NAME, TOKEN_KEY, TOKEN_VOLUME  # noqa: E402
from kubetune_suggestion.store import testing  # noqa: E402

NAMESPACE = f"kubetune-bench-{uuid.uuid4().hex[:5]}"
TAINT = "kwok.x-k8s.io/node"


def fake_nodes(count: int, pods_each: int) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": f"kwok-bench-{i}",
                "annotations": {TAINT: "fake"},
                "labels": {"type": "kwok", "kubernetes.io/hostname": f"kwok-bench-{i}"},
            },
            "spec": {"taints": [{"key": TAINT, "value": "fake", "effect": "NoSchedule"}]},
            "status": {
                "allocatable": {"cpu": "64", "memory": "256Gi", "pods": str(pods_each)},
                "capacity": {"cpu": "64", "memory": "256Gi", "pods": str(pods_each)},
            },
        }
        for i in range(count)
    ]


# One entry of a kwok status template (Go text/template): the container
# ``$item`` terminated with exit code 0 at ``$now``.
_TERMINATED_ENTRY = """\
- image: {{ $item.image | Quote }}
  name: {{ $item.name | Quote }}
  ready: false
  restartCount: 0
  started: false
  state:
    terminated:
      exitCode: 0
      finishedAt: {{ $now | Quote }}
      reason: Completed
      startedAt: {{ $now | Quote }}
"""


def _terminated_statuses(containers: str) -> str:
    """The status-template lines that end every container of ``.spec.<containers>``.

    ``containers`` is a Pod spec's list (``containers``, ``initContainers``);
    its statuses are the list of the same name in the singular plus
    ``Statuses`` (``containerStatuses``, ``initContainerStatuses``).
    """
    statuses = f"{containers.removesuffix('s')}Statuses"
    loop = "{{ range $item := .spec." + containers + " }}"
    return f"{statuses}:\n{loop}\n" + _TERMINATED_ENTRY + "{{ end }}\n"


def trial_stages(base: Path, seconds: float, out: Path, parallelism: int) -> Path:
    """The kwok stages in ``base`` plus one that ends a Running trial Pod ``seconds`` later.

    ``parallelism`` is kwok's ``podPlayStageParallelism``: how many Pod
    status changes it makes at once, for all its fake nodes together (its
    default, 4, is fewer than the fake nodes' kubelets would make).
    """
    status = (
        "{{ $now := Now }}\n"
        + _terminated_statuses("containers")
        + "# The collector sidecar stops after the training, as the kubelet does it.\n"
        + _terminated_statuses("initContainers")
        + "phase: Succeeded\n"
    )
    stage = f"""
---
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokConfiguration
options:
  podPlayStageParallelism: {parallelism}
  # A configuration replaces every default: kwok's own for the rest.
  nodePlayStageParallelism: 4
  nodeLeaseParallelism: 4
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: kubetune-trial-complete
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'DoesNotExist'
    - key: '.status.phase'
      operator: 'In'
      values: ['Running']
    # Trial Pods and the floor run's bare Pods (see BarePods) alike.
    - key: '.spec.nodeSelector.type'
      operator: 'In'
      values: ['kwok']
  delay:
    durationMilliseconds: {round(seconds * 1000)}
  next:
    statusTemplate: |
{textwrap.indent(status, " " * 6)}"""
    out.write_text(base.read_text().rstrip() + "\n" + stage)
    return out


class PodTimeline:
    """Watches trial Pods: first Running time, peak concurrency, and fake-sidecar reports."""

    def __init__(self, kube: Kube, service_url: str, play: bool = True) -> None:
        self.api = Api.from_kubeconfig(kube.kubeconfig)
        self.service_url = service_url
        # On kwok's nodes no sidecar runs: this plays its part. A real node's
        # sidecars report for themselves.
        self.play = play
        self.first_running: float | None = None
        self.running: set[str] = set()
        self.peak = 0
        self.reported: set[str] = set()
        self.stop = threading.Event()
        # Reports go out concurrently, as fifty sidecars' would; enough threads
        # that a report is never still queued when kwok ends its Pod a second
        # later (that trial would end MetricsUnavailable).
        self.pool = ThreadPoolExecutor(50)
        # One keep-alive client for every report: a client per call would
        # build a TLS context each time and make this player, not the
        # operator, the busiest process on a 2-core machine.
        self.http = httpx.Client(timeout=10)
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        """Follow the trial Pods until stopped."""
        path = f"/api/v1/namespaces/{NAMESPACE}/pods"
        rv = self.api.get(path)["metadata"]["resourceVersion"]
        while not self.stop.is_set():
            # Only Running Pods: the API server filters, so this process
            # decodes two events per trial (in, out) instead of every change.
            for event in self.api.watch(
                path,
                rv,
                60,
                labelSelector="kubetune.io/experiment",
                fieldSelector="status.phase=Running",
            ):
                pod = event["object"]
                rv = pod["metadata"].get("resourceVersion", rv)
                if event["type"] == "BOOKMARK":
                    continue
                name = pod["metadata"]["name"]
                phase = (pod.get("status") or {}).get("phase")
                if event["type"] != "DELETED" and phase == "Running":
                    if self.first_running is None:
                        self.first_running = time.time()
                    self.running.add(name)
                    if self.play and name not in self.reported:
                        self.reported.add(name)
                        self.pool.submit(self.play_trial, pod)
                else:
                    self.running.discard(name)
                self.peak = max(self.peak, len(self.running))
                if self.stop.is_set():
                    return

    def play_trial(self, pod: dict[str, Any]) -> None:
        """What the sidecar would do: report the trial's objective with its token.

        The token is the one the sidecar would read: its Secret volume's.
        """
        env = {e["name"]: e.get("value") for e in pod["spec"]["initContainers"][0]["env"]}
        (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == TOKEN_VOLUME]
        secret = self.api.get(
            f"/api/v1/namespaces/{NAMESPACE}/secrets/{volume['secret']['secretName']}"
        )
        token = base64.b64decode(secret["data"][TOKEN_KEY]).decode()
        train_env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        params = json.loads(train_env["KUBETUNE_PARAMS"])
        loss = 0.05 + 0.08 * (abs(float(params["lr"])) ** 0.5)
        with contextlib.suppress(httpx.HTTPError):
            self.http.post(
                f"{self.service_url}/v1/experiments/{env['KUBETUNE_EXPERIMENT_UID']}"
                f"/trials/{env['KUBETUNE_TRIAL_NUMBER']}/observations",
                json={"step": 1, "metrics": {"val_loss": loss}},
                headers={"Authorization": f"Bearer {token}"},
            )


class BarePods:
    """The harness's floor: the same Pods kept ``parallelism`` at a time by a minimal loop.

    No Trials, no suggestion service, no status: a Pod is created from a
    copy of a real trial Pod less kubetune's collector sidecar, and each one
    that succeeds is replaced at once, until ``total`` have run. Its time
    against the ideal is what the control plane, the node and this machine
    cost without kubetune; the operator's own ratio is read against it.
    """

    LABEL = "kubetune-bench-floor"

    def __init__(self, api: Api, namespace: str, trial_pod: dict[str, Any], total: int) -> None:
        self.api = api
        self.namespace = namespace
        self.total = total
        spec = dict(trial_pod["spec"])
        spec.pop("nodeName", None)
        # The training alone: kubetune's collector sidecar is kubetune's cost.
        spec["initContainers"] = [
            c for c in spec.get("initContainers") or [] if c["name"] != COLLECTOR_NAME
        ]
        spec["volumes"] = [v for v in spec.get("volumes") or [] if v["name"] != TOKEN_VOLUME]
        self.spec = spec
        self.created = 0
        self.succeeded = 0
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(8)

    def _create(self) -> None:
        with self.lock:
            if self.created >= self.total:
                return
            number = self.created
            self.created += 1
        self.api.create(
            f"/api/v1/namespaces/{self.namespace}/pods",
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": f"floor-{number}", "labels": {self.LABEL: "1"}},
                "spec": self.spec,
            },
        )

    def run(self, parallelism: int, timeout: float) -> float:
        """Seconds from the first creation to the last Pod seen Succeeded."""
        path = f"/api/v1/namespaces/{self.namespace}/pods"
        rv = self.api.get(path)["metadata"]["resourceVersion"]
        start = time.time()
        for _ in range(parallelism):
            self.pool.submit(self._create)
        done: set[str] = set()
        while len(done) < self.total:
            if time.time() - start > timeout:
                raise RuntimeError(f"floor run: {len(done)} of {self.total} Pods after {timeout} s")
            for event in self.api.watch(path, rv, 30, labelSelector=self.LABEL):
                pod = event["object"]
                rv = pod["metadata"].get("resourceVersion", rv)
                if event["type"] == "BOOKMARK":
                    continue
                phase = (pod.get("status") or {}).get("phase")
                name = pod["metadata"]["name"]
                if phase != "Succeeded" or name in done:
                    continue
                done.add(name)
                self.pool.submit(self._create)
                if len(done) % 100 == 0:
                    print(f"  floor: {len(done)}/{self.total} Pods done", file=sys.stderr)
                if len(done) >= self.total:
                    break
        elapsed = time.time() - start
        self.pool.shutdown()
        return elapsed


def measure_floor(
    kube: Kube, api: Api, args: argparse.Namespace, cleanup: contextlib.ExitStack
) -> float:
    """Run ``args.trials`` bare copies of a trial Pod, ``args.parallelism`` at a time."""
    namespace = f"{NAMESPACE}-floor"
    kube.kubectl("create", "namespace", namespace)
    cleanup.callback(
        kube.kubectl, "delete", "namespace", namespace, "--wait=false", "--ignore-not-found"
    )
    wait_for(lambda: kube.try_get("sa", "-n", namespace, "default"), 60, "default SA")
    pods = api.get(f"/api/v1/namespaces/{NAMESPACE}/pods", limit=1)["items"]
    print(f"floor run: {args.trials} bare Pods, {args.parallelism} at a time", file=sys.stderr)
    bare = BarePods(api, namespace, pods[0], args.trials)
    return bare.run(args.parallelism, args.timeout)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--parallelism", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=1.0, help="duration of one trial")
    parser.add_argument("--nodes", type=int, default=5, help="kwok fake nodes")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument(
        "--kwok-parallelism",
        type=int,
        help="Pod status changes kwok makes at once (podPlayStageParallelism); default: "
        "--parallelism, as each trial Pod's own kubelet would work on it alone",
    )
    parser.add_argument(
        "--no-floor",
        action="store_true",
        help="skip the floor run (the same Pods kept running without kubetune)",
    )
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="service on PostgreSQL (KUBETUNE_TEST_POSTGRES_URL, .ci/postgres.sh) with 2 workers",
    )
    parser.add_argument(
        "--real-node",
        action="store_true",
        help="run the trials as real containers on the cluster's real node, kubetune installed "
        "by its chart (no kwok); e.g. --trials 200 --parallelism 20",
    )
    return parser.parse_args()


def _start_kwok(kube: Kube, work: Path, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    """Kwok with its fast stages and one that ends trial Pods after ``--seconds``."""
    binaries = bin_dir()
    stages = trial_stages(
        binaries / "kwok-stages.yaml",
        args.seconds,
        work / "stages.yaml",
        args.kwok_parallelism or args.parallelism,
    )
    return subprocess.Popen(
        [
            str(binaries / "kwok"),
            f"--kubeconfig={kube.kubeconfig}",
            # kwok's own "fast" stages (copied by e2e/cluster/build.sh) and
            # one that ends trial Pods.
            f"--config={stages}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={TAINT}=fake",
            "--cidr=10.128.0.0/16",
            "--node-lease-duration-seconds=40",
        ],
        stdout=(work / "kwok.log").open("w"),
        stderr=subprocess.STDOUT,
        env=kube.env(),
    )


def _bench_experiment(args: argparse.Namespace) -> dict[str, Any]:
    exp = synthetic_experiment(
        "bench", max_trials=args.trials, parallelism=args.parallelism, epochs=1, sleep=args.seconds
    )
    if not args.real_node:
        exp["spec"]["template"]["spec"].update(
            nodeSelector={"type": "kwok"},
            tolerations=[{"key": TAINT, "operator": "Exists", "effect": "NoSchedule"}],
        )
    return exp


def _wait_for_end(
    timeline: PodTimeline, kwok: subprocess.Popen[bytes] | None, work: Path, timeout: float
) -> str:
    """The experiment's final phase, with its progress shown every 5 s."""
    # Polled through the API client: a kubectl process four times a second
    # would cost more CPU than some of the parts measured.
    exp_path = f"/apis/kubetune.io/v1alpha1/namespaces/{NAMESPACE}/experiments/bench"
    shown = [time.time()]

    def finished() -> str | None:
        if kwok is not None and kwok.poll() is not None:
            raise RuntimeError(f"kwok exited with {kwok.returncode}: see {work}/kwok.log")
        status = timeline.api.get(exp_path).get("status") or {}
        if time.time() - shown[0] >= 5:
            shown[0] = time.time()
            done = status.get("trialsSummary", "0")
            print(f"  kubetune: {done} trials done", file=sys.stderr)
        phase = status.get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    phase: str = wait_for(finished, timeout, "the benchmark experiment to end", interval=0.25)
    return phase


def _rows(
    kube: Kube,
    args: argparse.Namespace,
    phase: str,
    total: float,
    first: float,
    timeline: PodTimeline,
    samples: Samples,
) -> list[tuple[str, str]]:
    """The result table's rows, kubetune's run only."""
    status = kube.get("experiment", "-n", NAMESPACE, "bench")["status"]
    trials = len(kube.get("trials", "-n", NAMESPACE)["items"])
    ideal = args.trials / args.parallelism * args.seconds
    reconciles = samples.get(("kubetune_reconcile_duration_seconds_count", ()), 0.0)
    busy = samples.get(("kubetune_reconcile_duration_seconds_sum", ()), 0.0)
    return [
        ("trials (created / max)", f"{trials} / {args.trials}"),
        ("parallelism", str(args.parallelism)),
        ("trial duration", f"{args.seconds:g} s"),
        ("nodes", "the real node (containerd)" if args.real_node else f"{args.nodes} kwok"),
        ("service database", "PostgreSQL, 2 workers" if args.postgres else "SQLite, 1 worker"),
        ("experiment phase", f"{phase} ({status.get('trialsSummary')})"),
        (
            "succeeded / metricsUnavailable",
            f"{status.get('succeeded')} / {status.get('metricsUnavailable')}",
        ),
        ("ideal total", f"{ideal:.1f} s"),
        ("measured total (apply -> phase final)", f"{total:.1f} s"),
        ("ratio (target <= 1.5)", f"{total / ideal:.2f}"),
        ("apply -> first trial Running (target <= 3 s)", f"{first:.2f} s"),
        ("peak trial Pods Running at once", str(timeline.peak)),
        (
            "operator reconciles (mean duration)",
            f"{reconciles:.0f} ({busy / max(reconciles, 1) * 1000:.0f} ms)",
        ),
    ]


def main() -> int:
    args = _arguments()
    cluster = Cluster()
    if not cluster.is_up():
        print('no cluster: run `eval "$(python -m e2e.cluster up)"` first', file=sys.stderr)
        return 2
    binaries = bin_dir()
    kube = Kube(cluster.kubeconfig, find_kubectl(binaries), local=True, bin_dir=binaries)
    work = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    kwok = None if args.real_node else _start_kwok(kube, work, args)
    stack: HostStack | ChartStack = (
        ChartStack(kube, work) if args.real_node else HostStack(kube, work)
    )
    cleanup = contextlib.ExitStack()
    if args.postgres:
        base = testing.postgres_base_url()
        if base is None:
            print("KUBETUNE_TEST_POSTGRES_URL is unset: source .ci/postgres.sh", file=sys.stderr)
            return 2
        assert isinstance(stack, HostStack), "--postgres is for the host stack"
        stack.db_url = cleanup.enter_context(testing.postgres_schema(base))
        stack.service_workers = 2
    timeline: PodTimeline | None = None
    try:
        if not args.real_node:
            kube.apply(*fake_nodes(args.nodes, args.parallelism * 2))
        kube.kubectl("create", "namespace", NAMESPACE)
        wait_for(lambda: kube.try_get("sa", "-n", NAMESPACE, "default"), 60, "default SA")
        stack.start()
        timeline = PodTimeline(kube, stack.service_url, play=not args.real_node)
        timeline.thread.start()
        time.sleep(1)
        applied = time.time()
        kube.apply(_bench_experiment(args), namespace=NAMESPACE)
        phase = _wait_for_end(timeline, kwok, work, args.timeout)
        total = time.time() - applied
        first = (timeline.first_running or float("nan")) - applied
        rows = _rows(kube, args, phase, total, first, timeline, stack.metrics())
        if not args.no_floor:
            # Everything of kubetune's stops first: the floor run has the
            # machine to itself but for the control plane and kwok.
            timeline.stop.set()
            stack.stop()
            floor = measure_floor(kube, timeline.api, args, cleanup)
            ideal = args.trials / args.parallelism * args.seconds
            rows += [
                ("floor: the same Pods without kubetune", f"{floor:.1f} s"),
                ("floor ratio (control plane, node(s), machine)", f"{floor / ideal:.2f}"),
                ("kubetune's time over the floor", f"{total / floor:.2f}x"),
            ]
        width = max(len(k) for k, _ in rows)
        print(f"\n{'metric'.ljust(width)} | value\n{'-' * width}-|------")
        for k, v in rows:
            print(f"{k.ljust(width)} | {v}")
        return 0
    finally:
        if timeline is not None:
            timeline.stop.set()
        stack.stop()
        cleanup.close()
        kube.kubectl("delete", "namespace", NAMESPACE, "--wait=false", "--ignore-not-found")
        for i in range(args.nodes):
            kube.kubectl("delete", "node", f"kwok-bench-{i}", "--ignore-not-found", "--wait=false")
        if kwok is not None:
            kwok.terminate()
            kwok.wait(10)
        print(f"logs: {work}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
