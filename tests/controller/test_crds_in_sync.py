"""The checked-in CRDs match the generator, are structural, and their CEL rules agree with pydantic.

The authoritative check of the CEL rules is e2e/test_crd_validation.py (the
real API server compiles and runs them); here they are parsed and evaluated
with cel-python when it is installed, so a typo fails in seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_controller import crdgen
from kubetune_suggestion.spec import SpecError, parse_experiment

ROOT = Path(__file__).resolve().parents[2]


def _schema(crd: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_checked_in_crds_match_the_generator() -> None:
    stale = crdgen.stale_files(ROOT)
    assert not stale, (
        "crds/ or charts/kubetune/crds/ is stale; run `python -m kubetune_controller.crdgen`:\n"
        + "\n".join(stale.values())
    )


def test_check_flag_reports_stale_files(tmp_path: Path) -> None:
    assert crdgen.main(["--root", str(tmp_path), "--check"]) == 1
    assert crdgen.main(["--root", str(tmp_path)]) == 0
    assert crdgen.main(["--root", str(tmp_path), "--check"]) == 0
    (tmp_path / "crds" / "trials.kubetune.io.yaml").write_text("edited\n")
    assert crdgen.main(["--root", str(tmp_path), "--check"]) == 1


@pytest.mark.parametrize("name", ["experiments.kubetune.io.yaml", "trials.kubetune.io.yaml"])
def test_checked_in_crds_are_structural(name: str) -> None:
    crd = yaml.safe_load((ROOT / "crds" / name).read_text())
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crdgen.structural_problems(_schema(crd)) == []


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        ({"$ref": "#/x"}, "$ref"),
        (
            {
                "type": "object",
                "properties": {"a": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
            },
            "anyOf",
        ),
        ({"type": "object", "properties": {"a": {"description": "untyped"}}}, "missing type"),
        ({"type": "object", "additionalProperties": False}, "additionalProperties: false"),
        ({"type": "array"}, "needs items"),
        (
            {
                "type": "object",
                "properties": {"a": {"type": "string"}},
                "additionalProperties": {"type": "string"},
            },
            "mutually exclusive",
        ),
        (
            {
                "type": "array",
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["k"],
                "items": {"type": "object", "properties": {"k": {"type": "string"}}},
            },
            "required or defaulted",
        ),
    ],
)
def test_structural_checker_finds_forbidden_constructs(
    schema: dict[str, Any], problem: str
) -> None:
    problems = crdgen.structural_problems(schema)
    assert any(problem in p for p in problems), problems


def test_generated_schema_has_no_pydantic_leftovers() -> None:
    text = (ROOT / "crds" / "experiments.kubetune.io.yaml").read_text()
    for leftover in ("$ref", "$defs", "title:", "anyOf: [", "``", ":mod:"):
        assert leftover not in text


def test_experiment_crd_shape() -> None:
    crd = crdgen.experiment_crd()
    names = crd["spec"]["names"]
    assert names["categories"] == ["kubetune"]
    assert names["shortNames"] == ["kte"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if "priority" not in c]
    assert columns == ["Phase", "Best", "Trials", "Running", "Pruned", "Age"]
    spec = _schema(crd)["properties"]["spec"]
    assert set(spec["required"]) == {"objective", "parameters", "template"}
    assert spec["properties"]["maxTrials"]["default"] == 10
    assert spec["properties"]["algorithm"]["default"] == {"name": "tpe"}
    assert spec["properties"]["parameters"]["x-kubernetes-list-map-keys"] == ["name"]
    containers = spec["properties"]["template"]["properties"]["spec"]["properties"]["containers"]
    assert containers["minItems"] == 1


def test_trial_crd_shape() -> None:
    crd = crdgen.trial_crd()
    assert crd["spec"]["names"]["categories"] == ["kubetune"]
    version = crd["spec"]["versions"][0]
    columns = [c["name"] for c in version["additionalPrinterColumns"] if "priority" not in c]
    assert columns == ["Phase", "Objective", "Step", "Pod", "Age"]
    status = _schema(crd)["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True
    assert status["properties"]["conditions"]["x-kubernetes-list-map-keys"] == ["type"]


# --------------------------------------------------------------------------
# CEL: parse every rule; evaluate the spec rules against pydantic's verdicts.
# --------------------------------------------------------------------------


def _all_rules() -> list[tuple[str, str]]:
    policy = crdgen.admission_policy()[0]["spec"]
    out = [(f"variable {v['name']}", v["expression"]) for v in policy["variables"]]
    for i, validation in enumerate(policy["validations"]):
        out += [(f"policy {i} {k}", validation[k]) for k in ("expression", "messageExpression")]
    for crd in crdgen.build_crds().values():
        for path, rule in crdgen.cel_rules(_schema(crd)):
            out.extend(
                (f"{path} {key}", rule[key]) for key in ("rule", "messageExpression") if key in rule
            )
    return out


def test_every_rule_has_a_message_and_a_known_reason() -> None:
    reasons = {
        None,
        "FieldValueInvalid",
        "FieldValueRequired",
        "FieldValueForbidden",
        "FieldValueDuplicate",
    }
    for crd in crdgen.build_crds().values():
        for path, rule in crdgen.cel_rules(_schema(crd)):
            assert rule["message"], path
            assert rule.get("reason") in reasons, path
            assert rule.get("fieldPath", ".x").startswith("."), path


@pytest.mark.parametrize(("where", "expression"), _all_rules())
def test_every_cel_expression_parses(where: str, expression: str) -> None:
    celpy = pytest.importorskip("celpy", reason="cel-python not installed; e2e compiles the rules")
    celpy.Environment().compile(expression)


def _to_cel_input(value: Any, schema: dict[str, Any]) -> Any:
    """Mirror the API server: a `number` field is a CEL double even when written as 1."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        return {
            k: _to_cel_input(v, props.get(k) or (extra if isinstance(extra, dict) else {}))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_to_cel_input(v, schema.get("items", {})) for v in value]
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _cel_errors(spec: dict[str, Any]) -> list[str]:
    """Evaluate the spec's CEL rules the way the API server would (no transition rules).

    cel-python has no heterogeneous equality (`1 == 'a'` is an error, not
    false), so mixed-type categorical values are tested on the real API
    server only (e2e/test_crd_validation.py).
    """
    celpy = pytest.importorskip("celpy", reason="cel-python not installed; e2e runs the rules")
    root = _schema(crdgen.experiment_crd())["properties"]["spec"]
    env = celpy.Environment()
    errors: list[str] = []

    def walk(value: Any, schema: dict[str, Any], path: str) -> None:
        for rule in schema.get("x-kubernetes-validations", []):
            if "oldSelf" in rule["rule"]:
                continue
            activation = {"self": celpy.json_to_cel(_to_cel_input(value, schema))}
            try:
                ok = bool(env.program(env.compile(rule["rule"])).evaluate(activation))
            except Exception as exc:  # a CEL runtime error fails validation too
                ok, rule = False, {**rule, "message": f"{rule['message']} ({exc})"}
            if not ok:
                errors.append(f"{path}{rule.get('fieldPath', '')}: {rule['message']}")
        if isinstance(value, dict):
            for key, sub in value.items():
                if key in schema.get("properties", {}):
                    walk(sub, schema["properties"][key], f"{path}.{key}")
        elif isinstance(value, list) and "items" in schema:
            for i, sub in enumerate(value):
                walk(sub, schema["items"], f"{path}[{i}]")

    walk(spec, root, "spec")

    # The admission policy sees the object dynamically typed (values and when too).
    params = _to_cel_input(spec.get("parameters", []), root["properties"]["parameters"])
    variables = celpy.json_to_cel({"params": params, "names": [p["name"] for p in params]})
    for check in crdgen.ADMISSION_RULES:
        program = env.program(env.compile(check.ok))
        for i, param in enumerate(params):
            try:
                ok = bool(program.evaluate({"p": celpy.json_to_cel(param), "variables": variables}))
            except Exception:  # a runtime error refuses the request (failurePolicy: Fail)
                ok = False
            if not ok:
                errors.append(f"spec.parameters[{i}].{check.field}: admission policy")
                break
    return errors


def _spec(*parameters: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "objective": {"metric": "loss", "direction": "minimize"},
        "parameters": list(parameters),
        "template": {"spec": {"containers": [{"name": "t", "image": "i"}]}},
        **extra,
    }


CASES: list[tuple[str, dict[str, Any], str | None]] = [
    (
        "float ok",
        _spec({"name": "lr", "type": "float", "min": 1e-5, "max": 0.1, "log": True}),
        None,
    ),
    ("int ok", _spec({"name": "n", "type": "int", "min": 1, "max": 6, "step": 1}), None),
    (
        "categorical ok",
        _spec({"name": "o", "type": "categorical", "values": ["a", "b"]}),
        None,
    ),
    (
        "when ok",
        _spec(
            {"name": "o", "type": "categorical", "values": ["sgd", "adam"]},
            {"name": "m", "type": "float", "min": 0.5, "max": 0.9, "when": {"o": "sgd"}},
        ),
        None,
    ),
    (
        "grid ok",
        _spec(
            {"name": "x", "type": "float", "min": 0, "max": 1, "step": 0.25},
            algorithm={"name": "grid"},
        ),
        None,
    ),
    (
        "asha ok",
        _spec(
            {"name": "n", "type": "int", "min": 1, "max": 3},
            earlyStopping={"name": "asha", "minResource": 1, "maxResource": 9},
        ),
        None,
    ),
    (
        "min >= max",
        _spec({"name": "lr", "type": "float", "min": 1, "max": 0.5}),
        "parameters[0].min",
    ),
    ("min == max", _spec({"name": "n", "type": "int", "min": 2, "max": 2}), "parameters[0].min"),
    (
        "log min 0",
        _spec({"name": "lr", "type": "float", "min": 0, "max": 1, "log": True}),
        "parameters[0].min",
    ),
    ("float no max", _spec({"name": "lr", "type": "float", "min": 0}), "parameters[0].max"),
    ("int no min", _spec({"name": "n", "type": "int", "max": 3}), "parameters[0].min"),
    (
        "int fraction",
        _spec({"name": "n", "type": "int", "min": 1.5, "max": 3}),
        "parameters[0].min",
    ),
    (
        "step negative",
        _spec({"name": "x", "type": "float", "min": 0, "max": 1, "step": -0.1}),
        "parameters[0].step",
    ),
    (
        "step too big",
        _spec({"name": "x", "type": "float", "min": 0, "max": 1, "step": 2}),
        "parameters[0].step",
    ),
    (
        "step and log",
        _spec({"name": "x", "type": "float", "min": 1, "max": 10, "step": 1, "log": True}),
        "parameters[0].step",
    ),
    ("categorical no values", _spec({"name": "o", "type": "categorical"}), "parameters[0].values"),
    (
        "categorical with min",
        _spec({"name": "o", "type": "categorical", "values": ["a"], "min": 1}),
        "parameters[0].min",
    ),
    (
        "numeric with values",
        _spec({"name": "x", "type": "int", "min": 0, "max": 3, "values": [1]}),
        "parameters[0].values",
    ),
    (
        "object value",
        _spec({"name": "o", "type": "categorical", "values": [{"a": 1}]}),
        "parameters[0].values",
    ),
    (
        "when unknown",
        _spec({"name": "m", "type": "float", "min": 0, "max": 1, "when": {"opt": "sgd"}}),
        "parameters",
    ),
    (
        "when self",
        _spec({"name": "o", "type": "categorical", "values": ["a"], "when": {"o": "a"}}),
        "parameters[0].when",
    ),
    (
        "when list ok",
        _spec(
            {"name": "o", "type": "categorical", "values": ["sgd", "adam", "rms"]},
            {"name": "m", "type": "float", "min": 0.5, "max": 0.9, "when": {"o": ["sgd", "rms"]}},
        ),
        None,
    ),
    (
        "duplicate value",
        _spec({"name": "o", "type": "categorical", "values": ["a", "b", "a"]}),
        "parameters[0].values",
    ),
    (
        "when value not a choice",
        _spec(
            {"name": "o", "type": "categorical", "values": ["sgd", "adam"]},
            {"name": "m", "type": "float", "min": 0.5, "max": 0.9, "when": {"o": "SGD"}},
        ),
        "parameters[1].when",
    ),
    (
        "grid float without step",
        _spec({"name": "x", "type": "float", "min": 0, "max": 1}, algorithm={"name": "grid"}),
        "spec.parameters",
    ),
    (
        "asha no maxResource",
        _spec({"name": "n", "type": "int", "min": 1, "max": 3}, earlyStopping={"name": "asha"}),
        "earlyStopping.maxResource",
    ),
    (
        "maxResource <= minResource",
        _spec(
            {"name": "n", "type": "int", "min": 1, "max": 3},
            earlyStopping={"name": "median", "minResource": 5, "maxResource": 5},
        ),
        "earlyStopping.maxResource",
    ),
]


@pytest.mark.parametrize(("label", "spec", "field"), CASES, ids=[c[0] for c in CASES])
def test_cel_rules_agree_with_pydantic(label: str, spec: dict[str, Any], field: str | None) -> None:
    errors = _cel_errors(spec)
    try:
        parse_experiment(spec)
        accepted = True
    except SpecError:
        accepted = False
    if field is None:
        assert accepted, f"{label}: pydantic rejects a spec the test calls valid"
        assert errors == [], errors
    else:
        assert errors, f"{label}: no CEL rule refuses it"
        assert any(field in e for e in errors), errors
        # Content-only checks (e.g. an object among categorical values) may be
        # stricter in the CRD than in pydantic, never looser.
        if label != "object value":
            assert not accepted, f"{label}: the CRD refuses what pydantic accepts"
