"""The CRDs on a real API server: bad manifests refused, examples accepted.

The API server compiles every CEL rule when the CRD is applied (a rule that
does not compile, or whose estimated cost is over budget, fails the apply),
then runs schema validation, the rules and the kubetune admission policy
(for `values` and `when`, which CRD rules cannot see) on every request. So this file is
the authoritative test of crds/: each manifest in e2e/bad-manifests/ states
the field and the message it must be refused with, in two comment lines:

    # expect-field: spec.parameters[0].min
    # expect-message: must be less than max

and it must not exist afterwards (the operator never sees it). Every example
in examples/ must pass `kubectl apply --dry-run=server`. The CRDs and the
policy come from the `crds` fixture (conftest.py).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.helpers import Kube, KubectlError, wait_for

ROOT = Path(__file__).resolve().parents[1]
BAD = sorted((ROOT / "e2e" / "bad-manifests").glob("*.yaml"))
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CRDS = ("experiments.kubetune.io", "trials.kubetune.io")


def _expectation(path: Path) -> tuple[str, str]:
    text = path.read_text()
    field = re.search(r"^# expect-field: (.+)$", text, re.M)
    message = re.search(r"^# expect-message: (.+)$", text, re.M)
    assert field and message, f"{path.name}: needs # expect-field: and # expect-message: lines"
    return field.group(1).strip(), message.group(1).strip()


@pytest.fixture(scope="module")
def ns(crds: Kube) -> Iterator[str]:
    """One namespace for the module (each bad manifest must leave it empty)."""
    name = f"crd-validation-{uuid.uuid4().hex[:5]}"
    crds.kubectl("create", "namespace", name)
    yield name
    crds.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")


def test_crds_are_established_with_their_names(crds: Kube) -> None:
    for name in CRDS:
        crd = crds.get("crd", name)
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions.get("Established") == "True"
        assert conditions.get("NamesAccepted") == "True"
        assert crd["spec"]["names"]["categories"] == ["kubetune"]


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_manifest_is_refused_naming_the_field(crds: Kube, ns: str, path: Path) -> None:
    field, message = _expectation(path)
    with pytest.raises(KubectlError) as refused:
        crds.kubectl("apply", "-n", ns, "-f", str(path))
    stderr = refused.value.stderr
    assert field in stderr, f"{path.name}: the error does not name {field}:\n{stderr}"
    assert message in stderr, f"{path.name}: the error does not say {message!r}:\n{stderr}"
    name = yaml.safe_load(path.read_text())["metadata"]["name"]
    assert crds.try_get("experiment", "-n", ns, name) is None, "a refused manifest was stored"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_is_accepted(crds: Kube, ns: str, path: Path) -> None:
    out = crds.kubectl("apply", "--dry-run=server", "-n", ns, "-f", str(path), "-o", "json")
    stored = json.loads(out)
    assert stored["kind"] == "Experiment"
    # Defaults were applied by the API server, as the operator will read them.
    assert stored["spec"]["algorithm"]["name"]
    assert stored["spec"]["earlyStopping"]["name"]
    assert stored["spec"]["objective"]["strategy"]


def _suspended_experiment(name: str) -> dict[str, Any]:
    example = yaml.safe_load((ROOT / "examples" / "random.yaml").read_text())
    example["metadata"] = {"name": name}
    # Suspended: an operator running in this cluster starts no trial for it.
    example["spec"]["suspend"] = True
    return dict(example)


def test_mixed_type_values_follow_the_engine(crds: Kube, ns: str) -> None:
    """Categorical values mix types; 1 and 1.0 are the same value, true and 1 are not."""
    body = _suspended_experiment("mixed")
    body["spec"]["parameters"].append(
        {"name": "choice", "type": "categorical", "values": ["a", 1, 0.5, True]}
    )
    body["spec"]["parameters"].append(
        {"name": "sub", "type": "int", "min": 1, "max": 3, "when": {"choice": [1, True]}}
    )
    crds.kubectl("create", "--dry-run=server", "-n", ns, "-f", "-", input=json.dumps(body))
    body["spec"]["parameters"][-2]["values"] = ["a", 1, 1.0]
    with pytest.raises(KubectlError) as refused:
        crds.kubectl("create", "--dry-run=server", "-n", ns, "-f", "-", input=json.dumps(body))
    assert "spec.parameters[3].values" in refused.value.stderr
    assert "duplicate value" in refused.value.stderr


def test_escaped_and_shell_references_are_accepted(crds: Kube, ns: str) -> None:
    body = _suspended_experiment("escapes")
    container = body["spec"]["template"]["spec"]["containers"][0]
    container["args"] += ["--note=$${params.literal}", "--home=${HOME}"]
    container["env"] = [{"name": "LR", "value": "${params.lr}"}, {"name": "X", "value": "${X}"}]
    crds.kubectl("create", "--dry-run=server", "-n", ns, "-f", "-", input=json.dumps(body))


def test_defaults_fill_a_minimal_spec(crds: Kube, ns: str) -> None:
    body = _suspended_experiment("defaults")
    for key in ("algorithm", "maxTrials", "parallelism", "maxFailedTrials"):
        body["spec"].pop(key, None)
    out = crds.kubectl(
        "create", "--dry-run=server", "-n", ns, "-f", "-", "-o", "json", input=json.dumps(body)
    )
    spec = json.loads(out)["spec"]
    assert spec["algorithm"]["name"] == "tpe"
    assert spec["earlyStopping"] == {
        "name": "none",
        "minResource": 1,
        "reductionFactor": 3,
        "warmupSteps": 0,
        "minTrials": 5,
    }
    assert spec["maxTrials"] == 10 and spec["parallelism"] == 1 and spec["suspend"] is True
    assert spec["objective"]["strategy"] == "last"
    assert "log" not in spec["parameters"][1]  # not defaulted into the int parameter


def test_search_space_is_immutable_and_budget_is_not(crds: Kube, ns: str) -> None:
    crds.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(_suspended_experiment("edits")))
    try:
        with pytest.raises(KubectlError) as refused:
            crds.kubectl(
                "patch",
                "-n",
                ns,
                "experiment",
                "edits",
                "--type=json",
                "-p",
                '[{"op": "replace", "path": "/spec/parameters/0/max", "value": 0.5}]',
            )
        assert "spec.parameters" in refused.value.stderr
        assert "immutable" in refused.value.stderr
        with pytest.raises(KubectlError) as refused:
            crds.kubectl(
                "patch",
                "-n",
                ns,
                "experiment",
                "edits",
                "--type=merge",
                "-p",
                '{"spec": {"objective": {"direction": "maximize"}}}',
            )
        assert "spec.objective" in refused.value.stderr
        # maxTrials, parallelism and suspend take effect on a running experiment.
        crds.kubectl(
            "patch",
            "-n",
            ns,
            "experiment",
            "edits",
            "--type=merge",
            "-p",
            '{"spec": {"maxTrials": 20, "parallelism": 2}}',
        )
        assert crds.get("experiment", "-n", ns, "edits")["spec"]["maxTrials"] == 20
    finally:
        crds.kubectl("delete", "-n", ns, "experiment", "edits", "--ignore-not-found")


def test_kubectl_get_shows_the_columns_and_the_category(crds: Kube, ns: str) -> None:
    crds.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(_suspended_experiment("cols")))
    try:
        table = crds.kubectl("get", "experiments", "-n", ns)
        header = table.splitlines()[0].split()
        assert header == ["NAME", "PHASE", "BEST", "TRIALS", "RUNNING", "PRUNED", "AGE"], table
        wide = crds.kubectl("get", "kte", "-n", ns, "-o", "wide").splitlines()[0].split()
        assert {"METRIC", "ALGORITHM", "STOPPING"} <= set(wide)
        listed = crds.kubectl("get", "kubetune", "-n", ns)
        assert "experiment.kubetune.io/cols" in listed
        trials = crds.kubectl("get", "trials", "-n", ns, "--field-selector", "spec.experiment=cols")
        assert "No resources found" in trials or trials.strip() == "" or "NAME" in trials
    finally:
        crds.kubectl("delete", "-n", ns, "experiment", "cols", "--ignore-not-found")


def test_status_is_a_subresource_and_fills_the_columns(crds: Kube, ns: str) -> None:
    name = "status"
    body = _suspended_experiment(name)
    crds.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(body))
    try:
        # A status in the body of a spec update is ignored...
        crds.kubectl(
            "patch",
            "-n",
            ns,
            "experiment",
            name,
            "--type=merge",
            "-p",
            '{"status": {"phase": "Bogus"}}',
        )
        assert crds.get("experiment", "-n", ns, name).get("status", {}).get("phase") != "Bogus"
        # ...and written through the status subresource. An operator may be
        # reconciling this experiment too; the values it writes win, so
        # only the column layout is checked when it does.
        status = {
            "phase": "Running",
            "trialsSummary": "3/10",
            "bestObjective": 0.25,
            "running": 2,
            "pruned": 1,
        }
        crds.kubectl(
            "patch",
            "-n",
            ns,
            "experiment",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": status}),
        )
        row = wait_for(
            lambda: crds.kubectl("get", "experiment", "-n", ns, name, "--no-headers").split(),
            10,
            "the experiment row",
        )
        assert row[0] == name and len(row) == 7, row
    finally:
        crds.kubectl("delete", "-n", ns, "experiment", name, "--ignore-not-found")
