"""The Helm chart lints clean and renders what the operator and the service need.

Needs the `helm` binary: $KUBETUNE_HELM, `helm` on PATH, or the e2e build cache
(e2e/cluster/build.sh puts it in ~/.cache/kubetune-e2e/<version>/bin). Without
it the tests skip, except in CI (CI=true), where a missing helm is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubetune"
KUBE_VERSION = "1.36.0"

Obj = dict[str, Any]


def _find_helm() -> str | None:
    if os.environ.get("KUBETUNE_HELM"):
        return os.environ["KUBETUNE_HELM"]
    on_path = shutil.which("helm")
    if on_path:
        return on_path
    cache = Path(os.environ.get("KUBETUNE_E2E_CACHE", Path.home() / ".cache" / "kubetune-e2e"))
    found = sorted(cache.glob("*/bin/helm"))
    return str(found[-1]) if found else None


@pytest.fixture(scope="module")
def helm() -> str:
    path = _find_helm()
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("helm not found in CI: run e2e/cluster/build.sh or set KUBETUNE_HELM")
        pytest.skip("helm not found (set KUBETUNE_HELM or run e2e/cluster/build.sh)")
    return path


def _run(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120, check=False)


def render(helm: str, *sets: str, release: str = "kt", namespace: str = "kubetune") -> list[Obj]:
    args = ["template", release, str(CHART), "-n", namespace, "--kube-version", KUBE_VERSION]
    for s in sets:
        args += ["--set", s]
    result = _run(helm, *args)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def by_kind(docs: list[Obj], kind: str) -> list[Obj]:
    return [d for d in docs if d["kind"] == kind]


def deployment(docs: list[Obj], component: str) -> Obj:
    (dep,) = [
        d
        for d in by_kind(docs, "Deployment")
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    return dep


def env_of(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container.get("env", [])}


def test_lint_is_clean(helm: str) -> None:
    result = _run(helm, "lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


def test_default_render(helm: str) -> None:
    docs = render(helm)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["ServiceAccount"] * 2
        + ["PersistentVolumeClaim", "Service", "Service", "Deployment", "Deployment"]
        + ["ClusterRole"] * 2
        + ["ClusterRoleBinding"] * 3
        + ["Role", "RoleBinding", "NetworkPolicy"]
        + ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    )
    op = deployment(docs, "operator")["spec"]["template"]["spec"]
    svc = deployment(docs, "suggestion")["spec"]["template"]["spec"]
    (op_c,) = op["containers"]
    (svc_c,) = svc["containers"]
    # The kubetune image runs each component by command (one image for all).
    assert op_c["command"] == ["python", "-m", "kubetune_controller"]
    assert op_c["args"] == ["--all-namespaces"]
    assert svc_c["command"] == ["python", "-m", "kubetune_suggestion.service"]
    assert (
        env_of(op_c)["KUBETUNE_SERVICE_URL"]["value"]
        == "http://kt-kubetune-suggestion.kubetune.svc:8000"
    )
    assert env_of(svc_c)["KUBETUNE_DB_URL"]["value"] == "sqlite:////data/kubetune.db"
    assert env_of(svc_c)["KUBETUNE_SECRET_NAME"]["value"] == "kt-kubetune-token"
    assert svc["volumes"][1]["persistentVolumeClaim"]["claimName"] == "kt-kubetune-data"
    for pod, container in ((op, op_c), (svc, svc_c)):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]
        assert container["resources"]["requests"]
    assert svc_c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    (service,) = [
        s for s in by_kind(docs, "Service") if s["metadata"]["name"] == "kt-kubetune-suggestion"
    ]
    assert service["spec"]["ports"][0]["port"] == 8000


def _rights_of(docs: list[Obj], account: str) -> list[tuple[str, ...]]:
    """(binding kind, role) of every binding naming ``account``."""
    return sorted(
        (b["kind"], b["roleRef"]["name"])
        for b in by_kind(docs, "ClusterRoleBinding") + by_kind(docs, "RoleBinding")
        if any(s["name"] == account for s in b["subjects"])
    )


def test_suggestion_service_may_only_review_tokens_and_keep_its_key(helm: str) -> None:
    docs = render(helm)
    account = "kt-kubetune-suggestion"
    assert _rights_of(docs, account) == [
        ("ClusterRoleBinding", "system:auth-delegator"),
        ("RoleBinding", "kt-kubetune-suggestion"),
    ]
    (role,) = by_kind(docs, "Role")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["kt-kubetune-token"],
            "verbs": ["get"],
        },
    ]
    # With a Secret of the user's, not even that.
    docs = render(helm, "suggestion.tokenSecret.existingSecret=mine")
    assert _rights_of(docs, account) == [("ClusterRoleBinding", "system:auth-delegator")]
    (svc_c,) = deployment(docs, "suggestion")["spec"]["template"]["spec"]["containers"]
    assert env_of(svc_c)["KUBETUNE_SECRET"]["valueFrom"]["secretKeyRef"] == {
        "name": "mine",
        "key": "secret",
    }


def test_the_operator_shows_the_service_a_token_only_the_service_accepts(helm: str) -> None:
    docs = render(helm, "suggestion.auth.extraUsers={alice}")
    op = deployment(docs, "operator")["spec"]["template"]["spec"]
    (op_c,) = op["containers"]
    (volume,) = [v for v in op["volumes"] if v["name"] == "service-token"]
    (source,) = volume["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "kubetune-suggestion"
    (mount,) = [m for m in op_c["volumeMounts"] if m["name"] == "service-token"]
    token_file = f"{mount['mountPath']}/{source['serviceAccountToken']['path']}"
    assert env_of(op_c)["KUBETUNE_SERVICE_TOKEN_FILE"]["value"] == token_file
    (svc_c,) = deployment(docs, "suggestion")["spec"]["template"]["spec"]["containers"]
    env = env_of(svc_c)
    assert env["KUBETUNE_TOKEN_AUDIENCE"]["value"] == "kubetune-suggestion"
    assert env["KUBETUNE_ALLOWED_USERS"]["value"] == (
        "system:serviceaccount:kubetune:kt-kubetune-operator,alice"
    )
    assert "KUBETUNE_API_KEY" not in env
    docs = render(helm, "suggestion.auth.apiKey.existingSecret=keys")
    (svc_c,) = deployment(docs, "suggestion")["spec"]["template"]["spec"]["containers"]
    assert env_of(svc_c)["KUBETUNE_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "keys",
        "key": "key",
    }


def test_a_render_is_the_same_every_time(helm: str) -> None:
    """Nothing random in the chart: helm template, Argo CD or Flux never replace a key."""
    assert render(helm) == render(helm)
    assert not by_kind(render(helm), "Secret")


def test_the_network_policy_opens_the_api_to_the_operator_and_trials_and_metrics_apart(
    helm: str,
) -> None:
    docs = render(helm)
    (policy,) = by_kind(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == (
        "suggestion"
    )
    api, metrics = policy["spec"]["ingress"]
    assert api["ports"] == [{"port": "http", "protocol": "TCP"}]
    operator, trials = api["from"]
    assert operator["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
    assert "namespaceSelector" not in operator  # the release's namespace only
    assert trials == {
        "namespaceSelector": {},
        "podSelector": {"matchExpressions": [{"key": "kubetune.io/trial", "operator": "Exists"}]},
    }
    assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert metrics["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    (svc_c,) = deployment(docs, "suggestion")["spec"]["template"]["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in svc_c["ports"]} == {
        "http": 8000,
        "metrics": 9090,
    }
    assert "--metrics-port=9090" in svc_c["args"]
    assert not by_kind(render(helm, "networkPolicy.enabled=false"), "NetworkPolicy")


# What the operator does to the cluster, each (apiGroup, resource, verb) with
# the call that needs it: kopf's (it watches Experiments) and those of
# operator/kubetune_controller/kube.py (everything else the operator does).
OPERATOR_NEEDS: dict[tuple[str, str, str], str] = {
    # kopf: CustomResourceDefinitions, to notice the kubetune CRDs change.
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"): "kopf's resource observer",
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"): "kopf's resource observer",
    # kopf: Experiments, for the on.event handler (no finalizer, no diff base:
    # kopf writes nothing on them).
    ("kubetune.io", "experiments", "list"): "kopf.on.event",
    ("kubetune.io", "experiments", "watch"): "kopf.on.event",
    ("kubetune.io", "experiments/status", "patch"): "Kube.patch_experiment_status",
    # Trials: created, then read back when the create says it already exists.
    ("kubetune.io", "trials", "create"): "Kube.create_trial",
    ("kubetune.io", "trials", "get"): "Kube.create_trial (409)",
    ("kubetune.io", "trials", "list"): "the Trial stream (watch.py)",
    ("kubetune.io", "trials", "watch"): "the Trial stream (watch.py)",
    ("kubetune.io", "trials/status", "patch"): "Kube.patch_trial_status",
    # Owner references with blockOwnerDeletion (Trial -> Experiment, Pod ->
    # Trial) need update on the owner's finalizers subresource where the
    # OwnerReferencesPermissionEnforcement admission plugin is on.
    ("kubetune.io", "experiments/finalizers", "update"): "a Trial's owner reference",
    ("kubetune.io", "trials/finalizers", "update"): "a trial Pod's owner reference",
    # Trial Pods.
    ("", "pods", "create"): "Kube.create_pod",
    ("", "pods", "get"): "Kube.get_pod, Kube.create_pod (409)",
    ("", "pods", "list"): "the trial-Pod stream (watch.py)",
    ("", "pods", "watch"): "the trial-Pod stream (watch.py)",
    ("", "pods", "delete"): "Kube.delete_pod (a trial stopped early)",
    ("", "pods/log", "get"): "Kube.pod_logs (MetricsUnavailable messages)",
    # Trial tokens: created, never read back (the name is the Trial's own).
    ("", "secrets", "create"): "Kube.create_secret",
    # core/v1 Events: the operator's own and kopf's warnings.
    ("", "events", "create"): "Kube.create_event, kopf's posting",
}


# Watching some namespaces (operator.watchNamespaces), kopf also lists and
# watches the namespaces to match them; cluster-wide it never does.
WATCHING_NAMESPACES_NEEDS: dict[tuple[str, str, str], str] = {
    ("", "namespaces", "list"): "kopf's namespace observer",
    ("", "namespaces", "watch"): "kopf's namespace observer",
}


def test_operator_rbac_is_least_privilege(helm: str) -> None:
    """The operator's roles grant exactly OPERATOR_NEEDS, cluster-wide or per namespace."""
    for sets, needs in (
        ((), OPERATOR_NEEDS),
        (("operator.watchNamespaces={team-a}",), {**OPERATOR_NEEDS, **WATCHING_NAMESPACES_NEEDS}),
    ):
        docs = render(helm, *sets)
        operator_roles = [
            role
            for role in by_kind(docs, "ClusterRole") + by_kind(docs, "Role")
            if role["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
        ]
        granted = {
            (group, resource, verb)
            for role in operator_roles
            for rule in role["rules"]
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for verb in rule["verbs"]
        }
        assert sorted(granted - needs.keys()) == [], "granted but not needed"
        assert sorted(needs.keys() - granted) == [], "needed but not granted"


def test_watching_namespaces_binds_roles_there_only(helm: str) -> None:
    docs = render(helm, "operator.watchNamespaces={team-a,team-b}")
    op_c = deployment(docs, "operator")["spec"]["template"]["spec"]["containers"][0]
    assert op_c["args"] == ["--namespace=team-a", "--namespace=team-b"]
    bindings = [
        b
        for b in by_kind(docs, "RoleBinding")
        if b["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    ]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    # Only the read-only discovery role stays cluster-wide (and the service's TokenReviews).
    assert sorted(b["roleRef"]["name"] for b in by_kind(docs, "ClusterRoleBinding")) == [
        "kt-kubetune-operator-discovery",
        "system:auth-delegator",
    ]


def test_external_postgres_from_secret(helm: str) -> None:
    docs = render(helm, "database.external.existingSecret=pg", "suggestion.replicas=3")
    assert not by_kind(docs, "PersistentVolumeClaim")
    dep = deployment(docs, "suggestion")
    assert dep["spec"]["replicas"] == 3
    assert "strategy" not in dep["spec"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    ref = env_of(c)["KUBETUNE_DB_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "pg", "key": "url"}
    assert [m["name"] for m in c["volumeMounts"]] == ["tmp"]


def test_sqlite_without_persistence_uses_empty_dir(helm: str) -> None:
    docs = render(helm, "persistence.enabled=false")
    assert not by_kind(docs, "PersistentVolumeClaim")
    volumes = deployment(docs, "suggestion")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "data", "emptyDir": {}} in volumes


def test_sqlite_refuses_several_replicas(helm: str) -> None:
    result = _run(
        helm,
        "template",
        "kt",
        str(CHART),
        "--kube-version",
        KUBE_VERSION,
        "--set",
        "suggestion.replicas=2",
    )
    assert result.returncode != 0
    assert "database.external.existingSecret" in result.stderr


def _images(docs: list[Obj]) -> set[str]:
    """Every container image and the collector image the operator hands to trials."""
    found: set[str] = set()
    for dep in by_kind(docs, "Deployment"):
        for container in dep["spec"]["template"]["spec"]["containers"]:
            found.add(container["image"])
            collector = env_of(container).get("KUBETUNE_COLLECTOR_IMAGE")
            if collector:
                found.add(collector["value"])
    return found


def test_image_is_the_repository_behind_the_optional_registry(helm: str) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = chart["appVersion"]
    # Default: no registry host, the name scripts/images.sh builds.
    assert _images(render(helm)) == {f"kubetune/kubetune:{version}"}
    # The registry the images were pushed to prefixes the repository (a
    # trailing slash is not doubled); the tag overrides the appVersion.
    for registry in ("registry.example:5000", "registry.example:5000/"):
        docs = render(helm, f"image.registry={registry}", "image.tag=1.2.3")
        assert _images(docs) == {"registry.example:5000/kubetune/kubetune:1.2.3"}
    docs = render(helm, "image.registry=registry.example/team", "image.repository=acme/kt")
    assert _images(docs) == {f"registry.example/team/acme/kt:{version}"}
    # A URL is not a registry: the schema refuses it.
    result = _run(
        helm,
        "template",
        "kt",
        str(CHART),
        "--kube-version",
        KUBE_VERSION,
        "--set",
        "image.registry=https://registry.example",
    )
    assert result.returncode != 0
    assert "/image/registry" in result.stderr


def test_values_schema_refuses_typos(helm: str) -> None:
    result = _run(
        helm,
        "template",
        "kt",
        str(CHART),
        "--kube-version",
        KUBE_VERSION,
        "--set",
        "operator.watchNamspaces={a}",
    )
    assert result.returncode != 0
    assert "watchNamspaces" in result.stderr


def test_names_fit_in_63_characters(helm: str) -> None:
    release = "a-long-release-name-for-the-tuning-setup-of-team-abc"  # helm's maximum: 53
    for docs in (
        render(helm, "serviceMonitor.enabled=true", release=release),
        render(helm, "fullnameOverride=" + "x" * 63),
    ):
        names = [(d["kind"], d["metadata"]["name"]) for d in docs]
        for kind, name in names:
            assert len(name) <= 63, (kind, name)
            assert not name.endswith("-"), name
        # Component suffixes survive the truncation, so names stay distinct.
        assert len(set(names)) == len(names), names
        assert any(name.endswith("-operator-metrics") for _, name in names)


def test_service_monitors_and_admission_policy_are_optional(helm: str) -> None:
    docs = render(helm, "serviceMonitor.enabled=true")
    assert len(by_kind(docs, "ServiceMonitor")) == 2
    assert by_kind(docs, "ValidatingAdmissionPolicy")
    docs = render(helm, "admissionPolicy.enabled=false")
    assert not by_kind(docs, "ValidatingAdmissionPolicy")
    assert not by_kind(docs, "ValidatingAdmissionPolicyBinding")


def test_admission_policy_matches_the_generated_one(helm: str) -> None:
    (policy,) = by_kind(render(helm), "ValidatingAdmissionPolicy")
    generated = yaml.safe_load_all(
        (ROOT / "crds" / "experiments.kubetune.io-admission-policy.yaml").read_text()
    )
    assert policy == next(d for d in generated if d)


def test_chart_ships_the_generated_crds(helm: str) -> None:
    result = _run(helm, "show", "crds", str(CHART))
    assert result.returncode == 0, result.stderr
    shipped = {d["metadata"]["name"]: d for d in yaml.safe_load_all(result.stdout) if d}
    for name in ("experiments.kubetune.io", "trials.kubetune.io"):
        generated = yaml.safe_load((ROOT / "crds" / f"{name}.yaml").read_text())
        assert shipped[name] == generated
