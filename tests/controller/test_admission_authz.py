"""The admission policy's checks of the Experiment's author, evaluated with cel-python.

The policy's variables and its authorization validations are run here as the
API server runs them, with a recording stand-in for CEL's ``authorizer``
that allows exactly the rights a test grants. So these tests pin what is
asked (which verb, resource, namespace and name) and when it refuses
(create; an update only when it changes the template). cel-python evaluates
both sides of `||` where the API server's CEL may stop early, so which
rights were asked is checked with `in`, never as the whole list. Whether the
real authorizer answers as RBAC says is e2e/test_admission_authz.py's job.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from kubetune_controller import crdgen

celpy = pytest.importorskip("celpy", reason="cel-python not installed; e2e runs the policy")

POLICY = crdgen.admission_policy()[0]["spec"]
AUTHZ = POLICY["validations"][: len(crdgen.AUTHORIZATION_RULES)]

# One right: (verb, resource, namespace, name or "").
Right = tuple[str, str, str, str]
CREATE_PODS: Right = ("create", "pods", "team", "")


@dataclass(frozen=True)
class FakeAuthorizer:
    """CEL's ``authorizer``: a builder of one request's attributes, then ``allowed()``."""

    granted: frozenset[Right]
    asked: list[Right]
    attrs: dict[str, str] = field(default_factory=dict)

    def with_(self, key: str, value: Any) -> FakeAuthorizer:
        return replace(self, attrs={**self.attrs, key: str(value)})

    def allowed(self) -> Any:
        assert self.attrs["group"] == "", self.attrs
        right = (
            self.attrs["verb"],
            self.attrs["resource"],
            self.attrs["namespace"],
            self.attrs.get("name", ""),
        )
        self.asked.append(right)
        return celpy.celtypes.BoolType(right in self.granted)


FUNCTIONS = {
    key: (lambda k: lambda a, v: a.with_(k, v))(key)
    for key in ("group", "resource", "namespace", "name")
} | {"check": lambda a, v: a.with_("verb", v), "allowed": lambda a: a.allowed()}


def _experiment(**pod_spec: Any) -> dict[str, Any]:
    containers = [{"name": "trial", "image": "trial:1"}]
    return {
        "metadata": {"name": "e", "namespace": "team"},
        "spec": {
            "maxTrials": 4,
            "parameters": [{"name": "lr", "type": "float", "min": 0.1, "max": 1.0}],
            "template": {"spec": {"containers": containers, **pod_spec}},
        },
    }


def _refusals(
    obj: dict[str, Any],
    *granted: Right,
    old: dict[str, Any] | None = None,
) -> tuple[list[str], list[Right]]:
    """The messages of the author checks that refuse ``obj``, and the rights asked about."""
    env = celpy.Environment()
    request = {
        "operation": "UPDATE" if old else "CREATE",
        "namespace": "team",
        "userInfo": {"username": "alice"},
    }
    activation: dict[str, Any] = {
        "object": celpy.json_to_cel(obj),
        "oldObject": celpy.json_to_cel(old) if old else None,
        "request": celpy.json_to_cel(request),
    }
    variables: dict[str, Any] = {}
    for variable in POLICY["variables"]:
        activation["variables"] = celpy.celtypes.MapType(
            {celpy.celtypes.StringType(k): v for k, v in variables.items()}
        )
        program = env.program(env.compile(variable["expression"]))
        variables[variable["name"]] = program.evaluate(activation)
    activation["variables"] = celpy.celtypes.MapType(
        {celpy.celtypes.StringType(k): v for k, v in variables.items()}
    )
    asked: list[Right] = []
    activation["authorizer"] = FakeAuthorizer(frozenset(granted), asked)
    refused = []
    for validation in AUTHZ:
        ok = env.program(env.compile(validation["expression"]), functions=FUNCTIONS)
        if not ok.evaluate(activation):
            message = env.program(env.compile(validation["messageExpression"]))
            refused.append(str(message.evaluate(activation)))
    return refused, asked


def test_author_checks_come_first_and_are_forbidden() -> None:
    # The API server reports the first failing validation: "you may not"
    # before any field error, for a user who may not.
    assert [v["reason"] for v in AUTHZ] == ["Forbidden", "Forbidden"]
    assert all(v["reason"] == "Invalid" for v in POLICY["validations"][len(AUTHZ) :])
    assert POLICY["failurePolicy"] == "Fail"


def test_an_author_who_may_not_create_pods_is_refused_naming_the_template() -> None:
    refused, asked = _refusals(_experiment())
    assert refused == [
        'spec.template: user "alice" may not create Pods in namespace "team", so may not'
        " create or change an Experiment whose trials run as Pods there"
    ]
    assert CREATE_PODS in asked


def test_an_author_who_may_create_pods_may_create_an_experiment() -> None:
    assert _refusals(_experiment(), CREATE_PODS)[0] == []


def test_the_right_must_be_in_the_experiments_namespace() -> None:
    refused, _ = _refusals(_experiment(), ("create", "pods", "other", ""))
    assert len(refused) == 1 and "Pods" in refused[0]


def test_a_named_service_account_needs_impersonate_on_it() -> None:
    refused, asked = _refusals(_experiment(serviceAccountName="deployer"), CREATE_PODS)
    assert refused == [
        'spec.template.spec.serviceAccountName: user "alice" may not act as ServiceAccount'
        ' "deployer" (impersonate serviceaccounts) in namespace "team", so may not create or'
        " change an Experiment whose trials run as it"
    ]
    assert ("impersonate", "serviceaccounts", "team", "deployer") in asked
    # Impersonating another ServiceAccount is not enough.
    other = ("impersonate", "serviceaccounts", "team", "builder")
    assert _refusals(_experiment(serviceAccountName="deployer"), CREATE_PODS, other)[0]
    granted = ("impersonate", "serviceaccounts", "team", "deployer")
    assert _refusals(_experiment(serviceAccountName="deployer"), CREATE_PODS, granted)[0] == []


@pytest.mark.parametrize(
    "pod_spec", [{}, {"serviceAccountName": "default"}, {"serviceAccountName": ""}]
)
def test_the_default_service_account_needs_only_create_pods(pod_spec: dict[str, str]) -> None:
    assert _refusals(_experiment(**pod_spec), CREATE_PODS)[0] == []


@pytest.mark.parametrize(
    "pod_spec",
    [{"serviceAccount": "deployer"}, {"serviceAccountName": "", "serviceAccount": "deployer"}],
)
def test_the_deprecated_service_account_field_is_checked_too(pod_spec: dict[str, str]) -> None:
    # A Pod runs as serviceAccount when serviceAccountName is empty.
    (message,) = _refusals(_experiment(**pod_spec), CREATE_PODS)[0]
    assert message.startswith('spec.template.spec.serviceAccount: user "alice"')
    assert '"deployer"' in message


def test_service_account_name_wins_over_the_deprecated_field() -> None:
    spec = {"serviceAccountName": "deployer", "serviceAccount": "other"}
    (message,) = _refusals(_experiment(**spec), CREATE_PODS)[0]
    assert message.startswith("spec.template.spec.serviceAccountName:")
    assert '"deployer"' in message


def test_an_update_that_keeps_the_template_is_not_checked() -> None:
    # maxTrials, suspend, labels: the operator's own writes go to the status
    # subresource, which the policy does not match, but a user's do not.
    old = _experiment(serviceAccountName="deployer")
    new = _experiment(serviceAccountName="deployer")
    new["spec"]["maxTrials"] = 40
    new["metadata"]["labels"] = {"team": "a"}
    assert _refusals(new, old=old)[0] == []


def test_an_update_that_changes_the_template_is_checked() -> None:
    old = _experiment()
    new = _experiment(serviceAccountName="deployer")
    refused, _ = _refusals(new, old=old)
    assert len(refused) == 2
    assert _refusals(new, CREATE_PODS, old=old)[0][0].startswith(
        "spec.template.spec.serviceAccountName:"
    )
    changed_image = _experiment()
    changed_image["spec"]["template"]["spec"]["containers"][0]["image"] = "other:2"
    assert len(_refusals(changed_image, old=old)[0]) == 1
