"""The structural OpenAPI v3 schemas of kubetune's CRDs, from pydantic's JSON schemas.

The API server requires a *structural* schema: no ``$ref``, no ``anyOf``
carrying types, a ``type`` on every node except the int-or-string and
preserve-unknown-fields escapes. :func:`structural` turns a pydantic JSON
schema into one, and :func:`structural_problems` checks the result the way the
API server would, so a schema it would refuse fails here, in a test.

Pydantic cannot say everything a CRD can, so :data:`EXPERIMENT_OVERLAY` adds
it by path below ``Experiment.spec``: CEL rules from
:mod:`kubetune_controller.crd_rules`, the bounds the API server's CEL cost
estimator needs, list semantics, defaults and ``kubectl explain`` text; and
:func:`pod_template_schema` gives the structural subset of the Pod template.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping
from typing import Any, Final

from kubetune_controller.crd_rules import (
    EARLY_STOPPING_RULES,
    IMMUTABLE,
    OBJECTIVE_RULES,
    PARAMETER_RULES,
    SPEC_RULES,
)
from kubetune_suggestion.spec import MAX_PARAMETERS, MAX_VALUES, MAX_WHEN

Schema = dict[str, Any]

# --------------------------------------------------------------------------
# JSON schema -> structural schema.
# --------------------------------------------------------------------------

# Keywords a structural schema may carry over from pydantic's JSON schema.
_KEPT: Final = frozenset(
    {
        "type",
        "description",
        "enum",
        "default",
        "format",
        "pattern",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "minLength",
        "maxLength",
        "minItems",
        "maxItems",
        "minProperties",
        "maxProperties",
    }
)
_SCALARS: Final = frozenset({"string", "integer", "number", "boolean"})


class SchemaError(ValueError):
    """A JSON schema construct the generator cannot turn into a structural schema."""


def _resolve(node: Schema, defs: Mapping[str, Schema]) -> Schema:
    """Inline a ``$ref`` (keeping sibling keywords such as a field's description)."""
    if "$ref" not in node:
        return node
    name = node["$ref"].rsplit("/", 1)[-1]
    if name not in defs:
        raise SchemaError(f"unresolved $ref {node['$ref']}")
    merged = dict(_resolve(defs[name], defs))
    merged.update({k: v for k, v in node.items() if k != "$ref"})
    return merged


def structural(node: Schema, defs: Mapping[str, Schema]) -> Schema:
    """Turn one pydantic JSON-schema node into a structural OpenAPI v3 node.

    Args:
        node: The JSON-schema node (may hold ``$ref`` into ``defs``).
        defs: pydantic's ``$defs``.

    Returns:
        A new schema node: typed, ``$ref``-free, with optional fields'
        ``anyOf [X, null]`` collapsed to ``X`` (the API server prunes nulls).

    Raises:
        SchemaError: For a construct with no structural equivalent.
    """
    node = _resolve(node, defs)
    if "anyOf" in node:
        branches = [_resolve(b, defs) for b in node["anyOf"] if b.get("type") != "null"]
        outer = {k: v for k, v in node.items() if k != "anyOf"}
        types = {b.get("type") for b in branches}
        if len(branches) == 1:
            return structural({**branches[0], **outer}, defs)
        if types == {"integer", "number"}:
            return structural({**outer, "type": "number"}, defs)
        if types == {"integer", "string"}:
            scalar = {k: v for k, v in outer.items() if k in _KEPT and k != "type"}
            return {
                **scalar,
                "anyOf": [{"type": "integer"}, {"type": "string"}],
                "x-kubernetes-int-or-string": True,
            }
        # A union of scalars (and lists of them): structural schemas cannot
        # type it, so keep the value as written; CEL rules constrain it.
        if types <= _SCALARS | {"array"}:
            return _keep_any(outer)
        raise SchemaError(f"anyOf over {sorted(map(str, types))} has no structural form")
    for key in ("oneOf", "allOf", "not", "$ref"):
        if key in node:
            raise SchemaError(f"{key} has no structural form here")
    out: Schema = {k: v for k, v in node.items() if k in _KEPT}
    if "description" in out:
        out["description"] = _plain(out["description"])
    if out.get("default") is None:
        out.pop("default", None)
    if out.get("type") == "string" and "enum" in out and "maxLength" not in out:
        # Bounded strings keep the estimated cost of CEL rules over them low;
        # 64 rather than the longest value, so a typo gets only "Unsupported
        # value", not also "Too long".
        out["maxLength"] = max(64, *(len(str(v)) for v in out["enum"]))
    kind = node.get("type")
    if kind is None:
        return _keep_any(out)
    if kind == "array":
        out["items"] = (
            structural(node.get("items", {}), defs) if node.get("items") else _keep_any({})
        )
    elif kind == "object":
        props = node.get("properties")
        extra = node.get("additionalProperties")
        if props:
            out["properties"] = {name: structural(sub, defs) for name, sub in props.items()}
            if node.get("required"):
                out["required"] = list(node["required"])
        elif isinstance(extra, dict) and extra:
            out["additionalProperties"] = structural(extra, defs)
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def _plain(text: str) -> str:
    """A docstring as `kubectl explain` shows it: no Sphinx roles or double backticks."""
    text = re.sub(r"\s*\(see :\w+:`[^`]*`\)", "", text)
    text = re.sub(r":\w+:`([^`]*)`", r"`\1`", text)
    return text.replace("``", "`")


def _keep_any(out: Schema) -> Schema:
    kept = {k: v for k, v in out.items() if k in ("description",)}
    return {**kept, "x-kubernetes-preserve-unknown-fields": True}


def _children(node: Schema) -> Iterator[tuple[str, Schema]]:
    for name, sub in (node.get("properties") or {}).items():
        yield f".{name}", sub
    if isinstance(node.get("items"), dict):
        yield "[]", node["items"]
    if isinstance(node.get("additionalProperties"), dict):
        yield "{}", node["additionalProperties"]


def _find(root: Schema, path: str) -> Schema:
    node = root
    for part in path.replace("[]", ".[]").split("."):
        if not part:
            continue
        node = node["items"] if part == "[]" else node["properties"][part]
    return node


def apply_overlay(root: Schema, overlay: Mapping[str, Schema]) -> None:
    """Merge ``overlay`` (keywords by path below ``root``) into ``root`` in place.

    ``x-kubernetes-validations`` (a sequence of :class:`~kubetune_controller.crd_rules.Rule`)
    are appended to the node's own, ``None`` removes a keyword, and any other
    value replaces it (copied, so overlays can share values).
    """
    for path, extra in overlay.items():
        node = _find(root, path)
        for key, value in extra.items():
            if key == "x-kubernetes-validations":
                node[key] = [*node.get(key, []), *(r.to_openapi() for r in value)]
            elif value is None:
                node.pop(key, None)
            else:
                node[key] = copy.deepcopy(value)


def structural_problems(node: Schema, path: str = "") -> list[str]:
    """List the ways a schema breaks the API server's structural-schema rules.

    Checks what the API server checks: no ``$ref``/``oneOf``/``allOf``/``not``,
    ``anyOf`` only for int-or-string, a type on every node except the
    int-or-string and preserve-unknown-fields escapes, ``properties`` and
    ``additionalProperties`` never together, ``additionalProperties: false``
    never, list-map keys that exist and are required or defaulted.

    Args:
        node: A schema node.
        path: Its path, for the messages.

    Returns:
        One line per problem; empty when the schema is structural.
    """
    problems: list[str] = []
    where = path or "<root>"
    for key in ("$ref", "oneOf", "allOf", "not", "definitions", "$defs", "title", "nullable"):
        if key in node and not (key == "nullable" and node[key] is True):
            problems.append(f"{where}: {key} is not allowed")
    int_or_string = node.get("x-kubernetes-int-or-string") is True
    if "anyOf" in node and not int_or_string:
        problems.append(f"{where}: anyOf only allowed with x-kubernetes-int-or-string")
    if int_or_string:
        branches = node.get("anyOf", [])
        if any(set(b) - {"type"} for b in branches):
            problems.append(f"{where}: int-or-string anyOf branches may only carry a type")
    if (
        "type" not in node
        and not int_or_string
        and node.get("x-kubernetes-preserve-unknown-fields") is not True
    ):
        problems.append(f"{where}: missing type")
    if node.get("additionalProperties") is False:
        problems.append(
            f"{where}: additionalProperties: false is not allowed (unknown fields are pruned)"
        )
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{where}: properties and additionalProperties are mutually exclusive")
    if node.get("type") == "array" and "items" not in node:
        problems.append(f"{where}: an array needs items")
    if node.get("x-kubernetes-list-type") == "map":
        item = node.get("items", {})
        for key in node.get("x-kubernetes-list-map-keys", []):
            sub = item.get("properties", {}).get(key)
            if sub is None:
                problems.append(f"{where}: list-map key {key} is not a property of the items")
            elif key not in item.get("required", []) and "default" not in sub:
                problems.append(f"{where}: list-map key {key} must be required or defaulted")
    for rule in node.get("x-kubernetes-validations", []):
        if not rule.get("rule") or not (rule.get("message") or rule.get("messageExpression")):
            problems.append(f"{where}: a validation rule needs rule and message")
    for suffix, sub in _children(node):
        problems.extend(structural_problems(sub, path + suffix))
    return problems


def cel_rules(node: Schema, path: str = "") -> Iterator[tuple[str, Schema]]:
    """Every ``x-kubernetes-validations`` entry under ``node`` with its path."""
    for rule in node.get("x-kubernetes-validations", []):
        yield path or "<root>", rule
    for suffix, sub in _children(node):
        yield from cel_rules(sub, path + suffix)


# --------------------------------------------------------------------------
# Schema overlays: what pydantic cannot say, by path below spec.
# ``[]`` stands for the items of a list.
# --------------------------------------------------------------------------

# Kubernetes' own pattern for resource quantities (k8s.io/apimachinery's
# resource.Quantity OpenAPI definition), so `nvidia.com/gpu: one` is refused.
_DECIMAL: Final = r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
QUANTITY_PATTERN: Final = rf"^(\+|-)?{_DECIMAL}(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?{_DECIMAL}))?$"


EXPERIMENT_OVERLAY: Final[Mapping[str, Schema]] = {
    "": {"x-kubernetes-validations": SPEC_RULES},
    "objective": {"x-kubernetes-validations": (IMMUTABLE, *OBJECTIVE_RULES)},
    "objective.additionalMetrics": {"maxItems": 32, "x-kubernetes-list-type": "set"},
    "objective.additionalMetrics[]": {"maxLength": 128, "minLength": 1},
    "parameters": {
        "description": "The search space: one entry per hyperparameter, names unique.",
        "maxItems": MAX_PARAMETERS,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["name"],
        "x-kubernetes-validations": (IMMUTABLE,),
    },
    "parameters[]": {"x-kubernetes-validations": PARAMETER_RULES},
    "parameters[].name": {
        "description": "Parameter name; ${params.NAME} in the template is replaced by its value."
    },
    "parameters[].type": {"description": "float, int or categorical."},
    "parameters[].min": {"description": "Lower bound (float and int), inclusive."},
    "parameters[].max": {"description": "Upper bound (float and int), inclusive."},
    "parameters[].log": {
        "description": "Sample on a log scale (needs min > 0).",
        # An absent `log` means false; defaulting it would write `log: false`
        # into categorical parameters, where it does not apply.
        "default": None,
    },
    "parameters[].step": {
        "description": "Grid spacing from min (float and int); required by grid for floats."
    },
    "parameters[].values": {
        "description": "The choices of a categorical parameter: strings, numbers or booleans.",
        "minItems": 1,
        "maxItems": MAX_VALUES,
    },
    "parameters[].when": {
        "description": (
            "Sample this parameter only when every named parameter took the given value "
            "(or one of a list of values)."
        ),
        "maxProperties": MAX_WHEN,
    },
    # A defaulted block lets the API server apply the nested defaults when
    # the user leaves it out. It names the choice explicitly because the API
    # server checks a default against the CEL rules before nested defaulting.
    "algorithm": {
        "description": "The sampler that proposes configurations.",
        "default": {"name": "tpe"},
        "x-kubernetes-validations": (IMMUTABLE,),
    },
    "algorithm.name": {"description": "random, grid, sobol, tpe or cmaes."},
    "algorithm.seed": {"description": "Seed for reproducible suggestions."},
    "earlyStopping": {
        "description": "The rule that stops unpromising trials, in units of the reported `step`.",
        "default": {"name": "none"},
        "x-kubernetes-validations": (IMMUTABLE, *EARLY_STOPPING_RULES),
    },
    "earlyStopping.name": {"description": "none, asha, median or hyperband."},
    "earlyStopping.minResource": {"description": "The first step at which a trial can be stopped."},
    "earlyStopping.maxResource": {
        "description": "The last step a trial reports (its budget); needed by asha and hyperband."
    },
    "earlyStopping.reductionFactor": {
        "description": "asha/hyperband: keep 1 in reductionFactor at each rung."
    },
    "maxTrials": {
        "description": "Trials to run in total; editing it on a running experiment takes effect."
    },
    "parallelism": {
        "description": "Trials running at once; editing it on a running experiment takes effect."
    },
    "maxFailedTrials": {
        "description": "End the experiment as Failed after this many failed trials (unset: never)."
    },
    "suspend": {
        "description": "true pauses the experiment: no new trials start, running ones finish."
    },
    "trialTimeoutSeconds": {
        "description": "A trial running longer than this is stopped and ends Failed (TimedOut)."
    },
    "maxRetries": {
        "description": (
            "Run a trial again, same params and number, when its Pod was evicted, preempted or "
            "lost with its node, up to this many times. Exit codes, OOMKilled and timeouts are "
            "not retried."
        )
    },
}


def pod_template_schema() -> Schema:
    """A structural subset of ``PodTemplateSpec``: the fields users get wrong.

    Everything else is kept as written (``x-kubernetes-preserve-unknown-fields``)
    and validated by the API server when the operator creates the Pod.
    """
    # One node for every plain string field: the CRD's YAML writes it once
    # (an anchor) and refers to it from each of them.
    string: Schema = {"type": "string"}
    return {
        "type": "object",
        "description": (
            "A Pod template for one trial. ${params.NAME} is substituted in command, args and env "
            "values; "
            "kubetune adds a metrics-collector sidecar and a shared volume for the metrics file."
        ),
        "required": ["spec"],
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {
            "metadata": _template_metadata_schema(string),
            "spec": _template_pod_spec_schema(_container_schema(string)),
        },
    }


def _template_metadata_schema(string: Schema) -> Schema:
    """The template's metadata: string labels and annotations, the rest as written."""
    return {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {
            "labels": {"type": "object", "additionalProperties": string},
            "annotations": {"type": "object", "additionalProperties": string},
        },
    }


def _template_pod_spec_schema(container: Schema) -> Schema:
    """The template's Pod spec: its containers, and ``restartPolicy`` (only Never)."""
    return {
        "type": "object",
        "required": ["containers"],
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {
            "containers": {
                "type": "array",
                "minItems": 1,
                "maxItems": 16,
                "items": container,
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["name"],
                "description": "The trial's containers; at least one.",
            },
            "restartPolicy": {
                "type": "string",
                "enum": ["Never"],
                "description": "Never: kubetune runs each trial once (and sets it).",
            },
        },
    }


def _container_schema(string: Schema) -> Schema:
    """A container: name, image, command, args, env and resources checked, the rest as written."""
    strings: Schema = {"type": "array", "items": {"type": "string"}}
    quantities = _quantities_schema()
    return {
        "type": "object",
        "required": ["name", "image"],
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {
            "name": {
                "type": "string",
                "minLength": 1,
                "maxLength": 63,
                "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                "description": "Container name (a DNS label).",
            },
            "image": {"type": "string", "minLength": 1, "description": "The trial image."},
            "command": {**strings, "description": "Entrypoint; ${params.NAME} is substituted."},
            "args": {**strings, "description": "Arguments; ${params.NAME} is substituted."},
            "env": {
                "type": "array",
                "items": _env_var_schema(),
                "description": "Environment; ${params.NAME} is substituted in values.",
            },
            "resources": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "properties": {
                    "limits": {**quantities, "description": "e.g. nvidia.com/gpu: 1"},
                    "requests": quantities,
                },
            },
            "workingDir": string,
        },
    }


def _env_var_schema() -> Schema:
    """One ``env`` entry: a name, and a string value (where parameters are substituted)."""
    return {
        "type": "object",
        "required": ["name"],
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "value": {
                "type": "string",
                "description": "${params.NAME} is substituted. Quote numbers.",
            },
        },
    }


def _quantities_schema() -> Schema:
    """Resource limits or requests: each a Kubernetes quantity (``nvidia.com/gpu: one`` fails)."""
    return {
        "type": "object",
        "additionalProperties": {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        },
    }
