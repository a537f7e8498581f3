"""Every manifest in ``examples/`` runs to ``Succeeded`` on the real cluster.

The examples double as tests (as kopf's ``examples/`` do): kubetune is
installed once for the module by its Helm chart (:class:`ChartStack`, the
user's path), each example is applied as a user applies it, into a namespace
of its own, and the test waits for the Experiment's ``Succeeded`` condition
with ``kubectl wait``, then checks the trial count and the best trial.
``test_crd_validation.py`` only dry-runs them.

An example is changed only where the test cluster needs it; each change is
in :data:`FITS` with its reason. A GPU example runs on the nodes' (here: fake)
``nvidia.com/gpu`` capacity, and is skipped, saying so, on a cluster without.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from e2e.helpers import APP_VERSION, REPO, Kube, Obj, node_ready
from e2e.operator_helpers import ChartStack, trials_of, wait_condition

GPU = "nvidia.com/gpu"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
# Each example finishes in well under a minute here (examples/README.md); the
# rest is headroom for a slow, shared machine.
TIMEOUT_S = 600


def _fit_quickstart(example: Obj) -> list[Obj]:
    """Give the quickstart an image that holds its script; a smaller budget.

    Its image, ``kubetune/quickstart``, is a placeholder ("runs in a cluster
    once `image` holds the script"): no image of ``scripts/images.sh`` holds
    ``train.py``. The kubetune image has what it imports (numpy, the
    ``kubetune`` SDK), so the trial runs there with ``train.py`` mounted from
    a ConfigMap at ``/quickstart``: its command, ``python
    quickstart/train.py``, is kept, run from ``/``. Each trial requests a
    whole CPU, so on the 2-CPU test node they run one at a time, a few
    seconds each: 8 trials instead of 40 keep the test short (still enough
    for ASHA's rungs at 1, 3 and 9 epochs to stop some).
    """
    example["spec"]["maxTrials"] = 8
    pod = example["spec"]["template"]["spec"]
    pod.setdefault("volumes", []).append(
        {"name": "quickstart", "configMap": {"name": "quickstart-train"}}
    )
    train = pod["containers"][0]
    train["image"] = f"kubetune/kubetune:{APP_VERSION}"
    train["workingDir"] = "/"
    train.setdefault("volumeMounts", []).append(
        {"name": "quickstart", "mountPath": "/quickstart", "readOnly": True}
    )
    script = (REPO / "examples" / "quickstart" / "train.py").read_text()
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "quickstart-train"},
            "data": {"train.py": script},
        }
    ]


# Example file stem -> what changes it needs on the test cluster (in place),
# returning the objects it needs besides. Examples not listed run unchanged.
FITS: dict[str, Callable[[Obj], list[Obj]]] = {"quickstart": _fit_quickstart}


def _gpus_requested(example: Obj) -> bool:
    containers = example["spec"]["template"]["spec"]["containers"]
    return any(
        GPU in ((c.get("resources") or {}).get("limits") or {})
        or GPU in ((c.get("resources") or {}).get("requests") or {})
        for c in containers
    )


def _cluster_gpus(kube: Kube) -> int:
    """``nvidia.com/gpu`` allocatable on the Ready nodes (kwok's fake ones left out)."""
    return sum(
        int(n["status"].get("allocatable", {}).get(GPU, 0))
        for n in kube.get("nodes")["items"]
        if node_ready(n) and not n["metadata"].get("annotations", {}).get("kwok.x-k8s.io/node")
    )


@pytest.fixture(scope="module")
def chart(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChartStack]:
    """kubetune installed by its chart, once for every example."""
    stack = ChartStack(kube, Path(tmp_path_factory.mktemp("examples-chart")))
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def _assert_best_trial_reported(exp: Obj, trials: list[Obj]) -> None:
    """The reported best is a Succeeded trial of the experiment, and no other one beats it."""
    status = exp["status"]
    best = status["bestTrial"]
    objective = exp["spec"]["objective"]
    succeeded = {
        t["metadata"]["name"]: t["status"]["objective"]
        for t in trials
        if t["status"].get("phase") == "Succeeded"
    }
    assert best["name"] in succeeded, (best, sorted(succeeded))
    assert best["params"], best
    assert status["bestObjective"] == pytest.approx(succeeded[best["name"]])
    better = max if objective.get("direction") == "maximize" else min
    assert status["bestObjective"] == pytest.approx(better(succeeded.values()))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_succeeds(kube: Kube, namespace: str, chart: ChartStack, path: Path) -> None:
    example = yaml.safe_load(path.read_text())
    if _gpus_requested(example) and not _cluster_gpus(kube):
        pytest.skip(
            f"{path.name} needs {GPU}: no Ready node of this cluster advertises it "
            "(the local cluster's fake device plugin, e2e/cluster/gpu-plugin, does)"
        )
    fit = FITS.get(path.stem)
    extra = fit(example) if fit else []
    name = example["metadata"]["name"]
    max_trials = example["spec"]["maxTrials"]

    started = time.monotonic()
    kube.apply(*extra, example, namespace=namespace)
    wait_condition(kube, namespace, name, "Succeeded", TIMEOUT_S)
    print(f"{path.name}: Succeeded in {time.monotonic() - started:.1f}s")

    exp = kube.get("experiment", "-n", namespace, name)
    trials = trials_of(kube, namespace, name)
    assert len(trials) == max_trials
    assert sorted(t["spec"]["number"] for t in trials) == list(range(max_trials))
    assert exp["status"]["trialsSummary"] == f"{max_trials}/{max_trials}"
    # An example whose trials fail is a broken example: every trial ends
    # Succeeded, or Pruned where the example stops trials early.
    ends = {"Succeeded", "Pruned"} if example["spec"].get("earlyStopping") else {"Succeeded"}
    assert {t["status"]["phase"] for t in trials} <= ends, [
        (t["metadata"]["name"], t["status"]) for t in trials if t["status"]["phase"] not in ends
    ]
    _assert_best_trial_reported(exp, trials)
