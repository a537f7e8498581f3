"""No privilege escalation through an Experiment: the admission policy asks RBAC about its author.

The operator creates each trial's Pod from the Experiment's template with its
own rights. The policy (crds/experiments.kubetune.io-admission-policy.yaml)
refuses an Experiment whose author may not create Pods in its namespace, or
may not act as (``impersonate``) the ServiceAccount its template names. Here
the real API server's authorizer answers, for users the admin kubeconfig
impersonates (``kubectl --as``), with Roles bound in a fresh namespace:

- ``author``: may create, get and patch Experiments, nothing else;
- ``runner``: that, and may create Pods;
- ``runner`` again after a Role lets him impersonate one ServiceAccount.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.helpers import Kube, KubectlError, wait_for
from e2e.operator_helpers import POLICY_NAME

ROOT = Path(__file__).resolve().parents[1]
POLICY_FILE = ROOT / "crds" / "experiments.kubetune.io-admission-policy.yaml"
RBAC = "rbac.authorization.k8s.io"


def _role(name: str, *rules: dict[str, Any], user: str | None = None) -> list[dict[str, Any]]:
    """A Role and its binding to ``user`` (default: the user of the same name)."""
    return [
        {"apiVersion": f"{RBAC}/v1", "kind": "Role", "metadata": {"name": name}, "rules": rules},
        {
            "apiVersion": f"{RBAC}/v1",
            "kind": "RoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": RBAC, "kind": "Role", "name": name},
            "subjects": [{"apiGroup": RBAC, "kind": "User", "name": user or name}],
        },
    ]


EXPERIMENTS = {
    "apiGroups": ["kubetune.io"],
    "resources": ["experiments"],
    "verbs": ["create", "get", "patch"],
}
PODS = {"apiGroups": [""], "resources": ["pods"], "verbs": ["create"]}


def _experiment(name: str, **pod_spec: Any) -> dict[str, Any]:
    body = yaml.safe_load((ROOT / "examples" / "random.yaml").read_text())
    body["metadata"] = {"name": name}
    # Suspended: an operator running in this cluster starts no trial for it.
    body["spec"]["suspend"] = True
    body["spec"]["template"]["spec"].update(pod_spec)
    return dict(body)


def _create_as(kube: Kube, user: str, ns: str, body: dict[str, Any]) -> str:
    return kube.kubectl(
        "create", f"--as={user}", "-n", ns, "-f", "-", "-o", "name", input=json.dumps(body)
    )


def _refusal(kube: Kube, user: str, ns: str, body: dict[str, Any]) -> str:
    with pytest.raises(KubectlError) as refused:
        _create_as(kube, user, ns, body)
    stderr = refused.value.stderr
    assert "ValidatingAdmissionPolicy" in stderr, stderr
    assert kube.try_get("experiment", "-n", ns, body["metadata"]["name"]) is None
    return stderr


def _one_line(text: str) -> str:
    # A message is compared as one line, however kubectl prints it.
    return re.sub(r"\s+", " ", text)


@pytest.fixture(scope="module")
def policy(crds: Kube) -> Kube:
    """The installed admission policy, which must be crds/'s (author checks included)."""
    installed = crds.get("validatingadmissionpolicy", POLICY_NAME)["spec"]["validations"]
    checked_in = next(d for d in yaml.safe_load_all(POLICY_FILE.read_text()) if d)
    expressions = [v["expression"] for v in installed]
    assert expressions == [v["expression"] for v in checked_in["spec"]["validations"]], (
        "the installed kubetune admission policy is not the generated one (a Helm release of"
        " another version installed it?)"
    )
    return crds


@pytest.fixture
def users(policy: Kube, namespace: str) -> str:
    """Roles for ``author`` and ``runner`` in the test's namespace; RBAC is caught up."""
    policy.apply(
        *_role("author", EXPERIMENTS),
        *_role("runner", EXPERIMENTS, PODS),
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "deployer"}},
        namespace=namespace,
    )

    def can(user: str, *what: str) -> bool:
        try:
            policy.kubectl("auth", "can-i", f"--as={user}", "-n", namespace, *what)
        except KubectlError:
            return False
        return True

    wait_for(lambda: can("runner", "create", "pods"), 30, "runner's Role to take effect")
    wait_for(lambda: can("author", "create", "experiments"), 30, "author's Role to take effect")
    assert not can("author", "create", "pods")
    return namespace


def test_an_author_who_may_not_create_pods_is_refused(policy: Kube, users: str) -> None:
    stderr = _refusal(policy, "author", users, _experiment("no-pods"))
    assert (
        f'spec.template: user "author" may not create Pods in namespace "{users}", so may not'
        " create or change an Experiment whose trials run as Pods there"
    ) in _one_line(stderr), stderr


def test_an_author_who_may_create_pods_may_create_it(policy: Kube, users: str) -> None:
    assert _create_as(policy, "runner", users, _experiment("pods")).strip() == (
        "experiment.kubetune.io/pods"
    )
    # The default ServiceAccount, named or not, needs nothing more.
    body = _experiment("named-default", serviceAccountName="default")
    _create_as(policy, "runner", users, body)


def test_a_service_account_needs_impersonate_on_it(policy: Kube, users: str) -> None:
    body = _experiment("as-deployer", serviceAccountName="deployer")
    stderr = _refusal(policy, "runner", users, body)
    assert (
        'spec.template.spec.serviceAccountName: user "runner" may not act as ServiceAccount'
        f' "deployer" (impersonate serviceaccounts) in namespace "{users}"'
    ) in _one_line(stderr), stderr
    # The deprecated alias runs the Pod as that ServiceAccount too.
    legacy = _experiment("as-deployer-legacy", serviceAccount="deployer")
    assert "spec.template.spec.serviceAccount: " in _refusal(policy, "runner", users, legacy)

    impersonate_deployer = {
        "apiGroups": [""],
        "resources": ["serviceaccounts"],
        "resourceNames": ["deployer"],
        "verbs": ["impersonate"],
    }
    policy.apply(*_role("act-as-deployer", impersonate_deployer, user="runner"), namespace=users)
    wait_for(
        lambda: _can_create(policy, "runner", users, body), 30, "runner's new Role to take effect"
    )
    stored = policy.get("experiment", "-n", users, "as-deployer")
    assert stored["spec"]["template"]["spec"]["serviceAccountName"] == "deployer"


def _can_create(kube: Kube, user: str, ns: str, body: dict[str, Any]) -> bool:
    try:
        _create_as(kube, user, ns, body)
    except KubectlError as exc:
        # Refused by the policy until RBAC's cache has the new binding.
        if "ValidatingAdmissionPolicy" not in exc.stderr:
            raise
        return False
    return True


def test_only_an_update_of_the_template_is_checked(policy: Kube, users: str) -> None:
    # An admin's Experiment; the author may change its budget, not its Pods.
    policy.create(_experiment("admins"), namespace=users)
    policy.kubectl(
        "patch", "--as=author", "-n", users, "experiment", "admins", "--type=merge",
        "-p", '{"spec": {"maxTrials": 20}}',
    )  # fmt: skip
    assert policy.get("experiment", "-n", users, "admins")["spec"]["maxTrials"] == 20
    patch = {"spec": {"template": {"spec": {"serviceAccountName": "deployer"}}}}
    with pytest.raises(KubectlError) as refused:
        policy.kubectl(
            "patch", "--as=author", "-n", users, "experiment", "admins", "--type=merge",
            "-p", json.dumps(patch),
        )  # fmt: skip
    assert 'spec.template: user "author" may not create Pods' in refused.value.stderr
    template = policy.get("experiment", "-n", users, "admins")["spec"]["template"]
    assert "serviceAccountName" not in template["spec"]


def test_an_admins_bad_manifest_still_names_its_field(policy: Kube, users: str) -> None:
    # The author checks come first, but pass for an admin: the field error shows.
    path = ROOT / "e2e" / "bad-manifests" / "when-undeclared-parent.yaml"
    with pytest.raises(KubectlError) as refused:
        policy.kubectl("create", "-n", users, "-f", str(path))
    assert "spec.parameters[2].when" in refused.value.stderr
    # And a refused author is told why he is refused, not what else is wrong.
    body = yaml.safe_load(path.read_text())
    stderr = _refusal(policy, "author", users, body)
    assert "may not create Pods" in stderr and "spec.parameters[2]" not in stderr, stderr


def test_the_built_in_edit_rules_may_name_any_service_account(policy: Kube, users: str) -> None:
    # `edit` lets its users run Pods as any ServiceAccount of the namespace
    # (it grants impersonate on serviceaccounts): they are not refused. The
    # rules are bound from system:aggregate-to-edit, which holds them itself;
    # `edit` is their aggregation, which a cluster without the aggregation
    # controller (this harness) leaves empty.
    policy.apply(
        *_role("editor", EXPERIMENTS),
        {
            "apiVersion": f"{RBAC}/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "editor-edit"},
            "roleRef": {
                "apiGroup": RBAC,
                "kind": "ClusterRole",
                "name": "system:aggregate-to-edit",
            },
            "subjects": [{"apiGroup": RBAC, "kind": "User", "name": "editor"}],
        },
        namespace=users,
    )
    body = _experiment("editors", serviceAccountName="deployer")
    wait_for(
        lambda: _can_create(policy, "editor", users, body), 30, "editor's Roles to take effect"
    )
