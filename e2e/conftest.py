"""Fixtures for end-to-end tests: one cluster per test session.

Target selection, in order:

1. ``KUBETUNE_E2E_KUBECONFIG`` (or ``KUBECONFIG``) pointing at an existing
   file: the tests use that cluster as is (kind, a real cluster, or a process
   cluster started with ``python -m e2e.cluster up``) and leave it running.
2. Otherwise the process cluster is started from the pinned binaries (built by
   ``e2e/cluster/build.sh``) and stopped when the session ends.

Without binaries the e2e tests are skipped, unless ``KUBETUNE_E2E_REQUIRE``
is set (CI sets it): then missing binaries fail the session, loudly.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.cluster import Cluster, bin_dir, missing_binaries
from e2e.helpers import Kube, KubectlError, find_kubectl, wait_for

E2E_DIR = Path(__file__).parent
ROOT = E2E_DIR.parent
CRDS = ("experiments.kubetune.io", "trials.kubetune.io")
POLICY = "experiments.kubetune.io"
POLICY_FILE = ROOT / "crds" / "experiments.kubetune.io-admission-policy.yaml"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under ``e2e/`` with ``e2e`` (select with ``-m e2e``)."""
    for item in items:
        if Path(str(item.fspath)).is_relative_to(E2E_DIR):
            item.add_marker(pytest.mark.e2e)


def _external_kubeconfig() -> Path | None:
    for var in ("KUBETUNE_E2E_KUBECONFIG", "KUBECONFIG"):
        value = os.environ.get(var, "")
        # KUBECONFIG may be a path list; the first existing file decides.
        for candidate in filter(None, value.split(os.pathsep)):
            if Path(candidate).is_file():
                return Path(candidate)
    return None


@pytest.fixture(scope="session")
def kube() -> Iterator[Kube]:
    """The cluster under test (started for the session when none is given)."""
    binaries = bin_dir()
    external = _external_kubeconfig()
    if external is not None:
        local = Cluster().kubeconfig.resolve() == external.resolve()
        yield Kube(external, find_kubectl(binaries), local=local, bin_dir=binaries)
        return
    missing = missing_binaries(binaries)
    if missing:
        reason = (
            f"e2e binaries missing in {binaries} ({', '.join(missing)}): "
            "run e2e/cluster/build.sh, or point KUBETUNE_E2E_KUBECONFIG at a cluster"
        )
        if os.environ.get("KUBETUNE_E2E_REQUIRE"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    cluster = Cluster()
    if cluster.is_up():
        # Started by hand (python -m e2e.cluster up): use it, leave it running.
        yield Kube(cluster.kubeconfig, find_kubectl(binaries), local=True, bin_dir=binaries)
        return
    kubeconfig = cluster.up()
    try:
        yield Kube(kubeconfig, find_kubectl(binaries), local=True, bin_dir=binaries)
    finally:
        cluster.down()


@pytest.fixture
def namespace(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards (without waiting)."""
    # A DNS label: a parametrized test's id ("test_x[a-b]") becomes "test-x-a-b".
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower().replace("_", "-"))[:40].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:5]}"
    kube.kubectl("create", "namespace", name)
    # Pods are refused until the namespace's default ServiceAccount exists.
    wait_for(
        lambda: kube.try_get("serviceaccount", "-n", name, "default"),
        60,
        f"default ServiceAccount in {name}",
    )
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")


@pytest.fixture(scope="module")
def crds(kube: Kube) -> Iterator[Kube]:
    """The generated CRDs and admission policy, applied server-side.

    Server-side: the CRDs are too big for a last-applied annotation. The
    admission policy is applied only when no Helm release installed it, and
    removed again afterwards, so a later `helm install` of the chart in the
    same cluster can own it.
    """
    kube.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=kubetune-e2e",
        *(arg for name in CRDS for arg in ("-f", str(ROOT / "crds" / f"{name}.yaml"))),
    )
    for name in CRDS:
        kube.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    ours = kube.try_get("validatingadmissionpolicy", POLICY) is None
    if ours:
        kube.kubectl(
            "apply", "--server-side", "--field-manager=kubetune-e2e", "-f", str(POLICY_FILE)
        )

    # The admission policy is compiled asynchronously: wait until it refuses.
    probe = str(ROOT / "e2e" / "bad-manifests" / "when-undeclared-parent.yaml")

    def refused() -> bool:
        try:
            kube.kubectl("create", "--dry-run=server", "-n", "default", "-f", probe)
        except KubectlError as exc:
            return "ValidatingAdmissionPolicy" in exc.stderr
        return False

    wait_for(refused, 60, "the kubetune admission policy to be active")
    yield kube
    if ours:
        kube.kubectl("delete", "--ignore-not-found", "-f", str(POLICY_FILE))
