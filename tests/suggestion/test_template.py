from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune_suggestion.template import (
    TemplateError,
    check_pod_spec,
    format_value,
    render_container,
    render_pod_spec,
    substitute,
    trial_env,
)

DECLARED = ["lr", "layers", "optimizer", "momentum", "augment"]
CONTAINER: dict[str, Any] = {
    "name": "train",
    "image": "registry.example/trial:1",
    "command": ["python", "train.py"],
    "args": [
        "--lr=${params.lr}",
        "--layers=${params.layers}",
        "--optimizer=${params.optimizer}",
        "--momentum=${params.momentum}",
    ],
    "env": [
        {"name": "OPT", "value": "${params.optimizer}"},
        {"name": "MOMENTUM", "value": "${params.momentum}"},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ],
    "resources": {"limits": {"nvidia.com/gpu": 1}},
}


def test_substitutes_command_args_and_env_values() -> None:
    params = {"lr": 0.001, "layers": 3, "optimizer": "sgd", "momentum": 0.9}
    out = render_container(CONTAINER, params, DECLARED)
    assert out["command"] == ["python", "train.py"]
    assert out["args"] == ["--lr=0.001", "--layers=3", "--optimizer=sgd", "--momentum=0.9"]
    assert out["env"][:2] == [{"name": "OPT", "value": "sgd"}, {"name": "MOMENTUM", "value": "0.9"}]
    assert out["env"][2] == CONTAINER["env"][2]  # valueFrom untouched
    assert out["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    assert CONTAINER["args"][0] == "--lr=${params.lr}"  # the template is not modified


def test_an_inactive_conditional_parameter_leaves_its_element_out() -> None:
    params = {"lr": 0.01, "layers": 2, "optimizer": "adam"}
    out = render_container(CONTAINER, params, DECLARED)
    assert out["args"] == ["--lr=0.01", "--layers=2", "--optimizer=adam"]
    assert [e["name"] for e in out["env"]] == ["OPT", "POD"]


def test_an_unknown_name_is_an_error_naming_the_field() -> None:
    container = {
        "name": "c",
        "command": ["train"],
        "args": ["--lr=${params.lr}", "--x=${params.lrr}"],
    }
    with pytest.raises(TemplateError) as info:
        render_container(container, {"lr": 0.1}, ["lr"], "spec.template.spec.containers[0]")
    assert info.value.field == "spec.template.spec.containers[0].args[1]"
    assert "unknown parameter 'lrr'" in info.value.problem
    assert "the parameters are: lr" in info.value.problem


def test_unknown_names_in_env_and_command_name_their_field() -> None:
    with pytest.raises(TemplateError) as info:
        render_container({"name": "c", "env": [{"name": "A", "value": "${params.nope}"}]}, {}, [])
    assert info.value.field == "template.spec.containers[0].env[0].value"
    with pytest.raises(TemplateError) as info:
        render_container({"name": "c", "command": ["x", "${params.nope}"]}, {}, ["lr"])
    assert info.value.field == "template.spec.containers[0].command[1]"


def test_escapes_and_other_dollar_forms_are_kept() -> None:
    text = "echo $${params.lr} ${HOME} $(POD_NAME) ${params.lr}"
    assert substitute(text, {"lr": 0.5}, ["lr"], "f") == "echo ${params.lr} ${HOME} $(POD_NAME) 0.5"


def test_several_references_in_one_string() -> None:
    assert substitute("${params.a}x${params.b}", {"a": 1, "b": True}, ["a", "b"], "f") == "1xtrue"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.001, "0.001"),
        (1e-05, "1e-05"),
        (1.0, "1.0"),
        (3, "3"),
        (True, "true"),
        (False, "false"),
        ("adam", "adam"),
    ],
)
def test_value_formatting(value: object, text: str) -> None:
    assert format_value(value) == text
    if isinstance(value, float):
        assert float(format_value(value)) == value


def test_malformed_fields_are_errors() -> None:
    with pytest.raises(TemplateError, match=r"containers\[0\].args: must be a list"):
        render_container({"args": "--lr=1"}, {}, [])
    with pytest.raises(TemplateError, match=r"args\[0\]: must be a string"):
        render_container({"args": [1]}, {}, [])
    with pytest.raises(TemplateError, match=r"env\[0\]: must be an entry"):
        render_container({"env": ["A=1"]}, {}, [])
    with pytest.raises(TemplateError, match=r"env\[0\].value: must be a string"):
        render_container({"env": [{"name": "A", "value": 3}]}, {}, [])


def test_pod_spec_renders_init_containers_and_containers() -> None:
    pod = {
        "initContainers": [{"name": "prep", "args": ["--n=${params.layers}"]}],
        "containers": [{"name": "train", "args": ["--lr=${params.lr}"]}],
        "restartPolicy": "Never",
    }
    out = render_pod_spec(pod, {"lr": 0.1, "layers": 2}, ["lr", "layers"])
    assert out["initContainers"][0]["args"] == ["--n=2"]
    assert out["containers"][0]["args"] == ["--lr=0.1"]
    assert out["restartPolicy"] == "Never"
    with pytest.raises(TemplateError) as info:
        check_pod_spec(
            {"containers": [{"name": "a"}, {"name": "b", "args": ["${params.q}"]}]}, ["lr"]
        )
    assert info.value.field == "spec.template.spec.containers[1].args[0]"
    check_pod_spec(pod, ["lr", "layers"])  # every reference known: no error


def test_trial_env_carries_identity_and_active_params_but_no_token() -> None:
    env = trial_env(
        experiment="mlp",
        experiment_uid="uid-1",
        trial_number=4,
        params={"optimizer": "adam", "lr": 0.01},
        metrics_file="/tmp/m",
    )
    assert env["KUBETUNE_EXPERIMENT"] == "mlp"
    assert env["KUBETUNE_EXPERIMENT_UID"] == "uid-1"
    assert env["KUBETUNE_TRIAL_NUMBER"] == "4"
    assert env["KUBETUNE_TRIAL_NAME"] == "mlp-4"
    assert json.loads(env["KUBETUNE_PARAMS"]) == {"optimizer": "adam", "lr": 0.01}
    assert env["KUBETUNE_METRICS_FILE"] == "/tmp/m"
    assert not any("TOKEN" in name for name in env)
