"""The CEL rules of the Experiment CRD and of its ValidatingAdmissionPolicy.

They mirror the checks the pydantic validators and
:mod:`kubetune_suggestion.engine.space` make, so ``kubectl apply`` refuses a
bad manifest with a message naming the field before anything reaches the
operator. Two kinds, because CEL on a CRD cannot see everything:

- :class:`Rule`: an ``x-kubernetes-validations`` entry on a node of the CRD
  schema (:mod:`kubetune_controller.crd_schema` says where each table goes);
- :class:`ParameterCheck` and :class:`TemplateCheck`: validations of the
  admission policy, which sees the request object dynamically typed, so it
  can read the mixed-type ``values`` and ``when`` that the structural schema
  leaves untyped, and check the Pod template's ``${params.NAME}`` references
  against the declared parameters;
- :class:`AuthorizationCheck`: validations of the admission policy about
  the request's author (may they create the Pods the Experiment's trials
  are, as the ServiceAccount it names?), which only a policy can ask.

Only data and CEL text here; :mod:`kubetune_controller.crdgen` writes them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final


@dataclass(frozen=True)
class Rule:
    """One ``x-kubernetes-validations`` entry.

    Attributes:
        rule: The CEL expression; ``self`` is the node the rule is attached to.
        message: Shown when the rule fails (and when ``message_expression`` errs).
        message_expression: A CEL string expression giving a more precise message.
        field_path: Where the error points, relative to the node (``.min``).
        reason: FieldValueInvalid, FieldValueRequired, FieldValueForbidden or
            FieldValueDuplicate; shapes the error text ("Required value: ...").
    """

    rule: str
    message: str
    message_expression: str | None = None
    field_path: str | None = None
    reason: str | None = None

    # A plain dict rather than crd_schema.Schema: crd_schema imports this
    # module for its overlay, and this one stays free of imports back.
    def to_openapi(self) -> dict[str, Any]:
        """The rule as the CRD schema writes it."""
        out: dict[str, Any] = {"rule": self.rule, "message": self.message}
        if self.message_expression:
            out["messageExpression"] = self.message_expression
        if self.field_path:
            out["fieldPath"] = self.field_path
        if self.reason:
            out["reason"] = self.reason
        return out


def _p(suffix: str) -> str:
    # messageExpression prefix naming the parameter, as the engine's errors do.
    # Values are not interpolated: string(double) has no size bound, and the
    # API server refuses messages whose estimated cost is unbounded.
    return "'parameter \"' + self.name + '\": " + suffix + "'"


_CATEGORICAL = "self.type == 'categorical'"

# Rules on one item of spec.parameters, mirroring
# kubetune_suggestion.engine.space._parse_param. CEL on a CRD cannot see
# `values` and `when` (their items mix strings, numbers and booleans, which a
# structural schema can only leave untyped): the rules about them are in
# ADMISSION_RULES below.
PARAMETER_RULES: Final = (
    Rule(
        f"{_CATEGORICAL} || has(self.min)",
        "a float or int parameter needs min",
        _p("a float or int parameter needs min"),
        ".min",
        "FieldValueRequired",
    ),
    Rule(
        f"{_CATEGORICAL} || has(self.max)",
        "a float or int parameter needs max",
        _p("a float or int parameter needs max"),
        ".max",
        "FieldValueRequired",
    ),
    Rule(
        "!has(self.min) || !has(self.max) || self.min < self.max",
        "min must be less than max",
        _p("min must be less than max"),
        ".min",
    ),
    Rule(
        "!has(self.log) || !self.log || !has(self.min) || self.min > 0.0",
        "a log-scale parameter needs min > 0",
        _p("a log-scale parameter needs min > 0"),
        ".min",
    ),
    Rule(
        "!has(self.step) || self.step > 0.0",
        "step must be positive",
        _p("step must be positive"),
        ".step",
    ),
    Rule(
        "!has(self.step) || !has(self.min) || !has(self.max) || self.step <= self.max - self.min",
        "step must not be larger than max - min",
        _p("step is larger than max - min"),
        ".step",
    ),
    Rule(
        "!has(self.step) || !has(self.log) || !self.log",
        "step and log cannot be combined",
        _p("`step` and `log` cannot be combined"),
        ".step",
        "FieldValueForbidden",
    ),
    *(
        Rule(
            f"self.type != 'int' || !has(self.{key}) || double(int(self.{key})) == self.{key}",
            f"an int parameter needs a whole number for {key}",
            _p(f"an int parameter needs a whole number for {key}"),
            f".{key}",
        )
        for key in ("min", "max", "step")
    ),
    *(
        Rule(
            f"self.type != 'categorical' || !has(self.{key})",
            f"{key} does not apply to a categorical parameter",
            _p(f"`{key}` does not apply to a categorical parameter (use values)"),
            f".{key}",
            "FieldValueForbidden",
        )
        for key in ("min", "max", "step")
    ),
    Rule(
        "self.type != 'categorical' || !has(self.log) || !self.log",
        "log does not apply to a categorical parameter",
        _p("`log` does not apply to a categorical parameter"),
        ".log",
        "FieldValueForbidden",
    ),
)

OBJECTIVE_RULES: Final = (
    Rule(
        "!has(self.additionalMetrics) || !(self.metric in self.additionalMetrics)",
        "additionalMetrics must not repeat the objective metric",
        "'additionalMetrics must not repeat the objective metric \"' + self.metric + '\"'",
        ".additionalMetrics",
    ),
)

EARLY_STOPPING_RULES: Final = (
    Rule(
        "!(self.name in ['asha', 'hyperband']) || has(self.maxResource)",
        "asha and hyperband need maxResource",
        "self.name + ' needs maxResource (the last step a trial reports)'",
        ".maxResource",
        "FieldValueRequired",
    ),
    Rule(
        "!has(self.maxResource) || !has(self.minResource) || self.maxResource > self.minResource",
        "maxResource must be greater than minResource",
        None,
        ".maxResource",
    ),
    Rule(
        "self.name == 'hyperband' || !has(self.brackets)",
        "brackets only applies to hyperband",
        "'brackets only applies to hyperband, not ' + self.name",
        ".brackets",
        "FieldValueForbidden",
    ),
)

# Rules on the whole Experiment. Its trials and their Pods are named
# "<experiment>-<number>", numbers below maxTrials' limit of 100,000, and
# must fit the 253 characters Kubernetes allows: refused at apply rather than
# a trial that can never be created.
EXPERIMENT_RULES: Final = (
    Rule(
        "self.metadata.name.size() <= 247",
        "metadata.name: at most 247 characters, so that the names of its trials and "
        "their Pods (<name>-<trial number>) fit Kubernetes' limit of 253",
    ),
)

SPEC_RULES: Final = (
    Rule(
        "!has(self.algorithm) || !has(self.algorithm.name) || self.algorithm.name != 'grid'"
        " || self.parameters.all(p, p.type != 'float' || has(p.step))",
        # No messageExpression naming the parameter: the API server's cost
        # estimate of a filter over the list in a message is over budget.
        "the grid algorithm needs a `step` on every float parameter"
        " (or use an int or categorical parameter)",
        None,
        ".parameters",
        "FieldValueRequired",
    ),
)


@dataclass(frozen=True)
class ParameterCheck:
    """A check of each parameter that CRD CEL cannot express, run by a ValidatingAdmissionPolicy.

    The policy sees the request object dynamically typed, so it can read the
    mixed-type ``values`` and ``when``. Its message names the field the way
    the CRD's own errors do: ``spec.parameters[2].when: parameter "m": ...``.

    Attributes:
        ok: CEL over one parameter ``p`` (``params`` is the whole list): true when valid.
        field: The offending field below the parameter (``when``).
        message: What is wrong (a CEL string expression over ``p`` and ``params``).
    """

    ok: str
    field: str
    message: str

    def expression(self) -> str:
        """The policy's validation expression."""
        return f"variables.params.all(p, {self.ok})"

    def message_expression(self) -> str:
        """The message naming the first offending parameter by index and name."""
        first = f"variables.params.filter(p, !({self.ok}))[0]"
        index = f"variables.params.map(p, p.name).indexOf({first}.name)"
        return (
            f"'spec.parameters[' + string({index}) + '].{self.field}: parameter \"'"
            f" + {first}.name + '\": ' + [{first}].map(p, {self.message})[0]"
        )


_SCALAR = "(type(v) == string || type(v) == int || type(v) == double || type(v) == bool)"
_WHEN_VALUES = "(type(p.when[k]) == list ? p.when[k] : [p.when[k]])"

# Mirroring the rest of kubetune_suggestion.engine.space._parse_param and
# _parse_space, in the order the engine checks.
ADMISSION_RULES: Final = (
    ParameterCheck(
        "p.type != 'categorical' || (has(p.values) && size(p.values) > 0)",
        "values",
        "'a categorical parameter needs a non-empty list of values'",
    ),
    ParameterCheck(
        "p.type == 'categorical' || !has(p.values)",
        "values",
        "'`values` only apply to a categorical parameter (use min and max)'",
    ),
    ParameterCheck(
        f"!has(p.values) || p.values.all(v, {_SCALAR})",
        "values",
        "'values must be strings, numbers or booleans'",
    ),
    ParameterCheck(
        "!has(p.values) || p.values.all(v, p.values.exists_one(w, w == v))",
        "values",
        "'duplicate value ' + string(p.values.filter(v, !p.values.exists_one(w, w == v))[0])",
    ),
    ParameterCheck(
        "!has(p.when) || !(p.name in p.when)",
        "when",
        "'a parameter cannot depend on itself'",
    ),
    ParameterCheck(
        "!has(p.when) || p.when.all(k, variables.names.exists(n, n == k))",
        "when",
        "'depends on \"' + p.when.filter(k, !variables.names.exists(n, n == k))[0]"
        " + '\", which is not declared in spec.parameters'",
    ),
    ParameterCheck(
        f"!has(p.when) || p.when.all(k, {_WHEN_VALUES}.size() > 0"
        f" && {_WHEN_VALUES}.all(v, {_SCALAR}))",
        "when",
        "'`when` maps a parameter to a value or a non-empty list of values'",
    ),
    ParameterCheck(
        "!has(p.when) || p.when.all(k, variables.params.all(q, q.name != k"
        " || q.type != 'categorical' || !has(q.values)"
        f" || {_WHEN_VALUES}.all(v, v in q.values)))",
        "when",
        "'a `when` value is not one of the values of the parameter it depends on'",
    ),
)

# ``${params.NAME}`` or the escape ``$${params.NAME}``, as
# kubetune_suggestion.template._REFERENCE matches them (RE2 syntax).
_REFERENCE_RE = "[$][$]?[{]params[.][^}]*[}]"


def _references_ok(text: str) -> str:
    """CEL: every reference in the string ``text`` names a declared parameter."""
    return (
        f"{text}.findAll('{_REFERENCE_RE}').all(m, m.startsWith('$$')"
        " || variables.names.exists(n, m == '${params.' + n + '}'))"
    )


@dataclass(frozen=True)
class TemplateCheck:
    """A check that a container field references only declared parameters.

    The operator would refuse such a template too, but only once the
    experiment exists; here `kubectl apply` refuses it.

    Attributes:
        field: command, args or env.
        ok: CEL over one container ``c``: true when every reference is declared.
    """

    field: str
    ok: str

    def expression(self) -> str:
        """The policy's validation expression."""
        return f"variables.containers.all(c, {self.ok})"

    def message_expression(self) -> str:
        """The message naming the container field and the declared parameters."""
        first = f"variables.containers.filter(c, !({self.ok}))[0]"
        index = f"variables.containers.map(c, c.name).indexOf({first}.name)"
        return (
            f"'spec.template.spec.containers[' + string({index}) + '].{self.field}:"
            " a ${params.NAME} reference names no declared parameter; the parameters are: '"
            " + variables.names.join(', ')"
        )


TEMPLATE_RULES: Final = (
    TemplateCheck("command", f"!has(c.command) || c.command.all(s, {_references_ok('s')})"),
    TemplateCheck("args", f"!has(c.args) || c.args.all(s, {_references_ok('s')})"),
    TemplateCheck(
        "env", f"!has(c.env) || c.env.all(e, !has(e.value) || {_references_ok('e.value')})"
    ),
)

# Admission-policy variables: the parameter list and the containers (empty
# when absent, so every check can iterate), the parameter names, and what the
# author checks below need (see AUTHORIZATION_RULES).
ADMISSION_VARIABLES: Final = (
    ("params", "has(object.spec.parameters) ? object.spec.parameters : []"),
    ("names", "variables.params.map(p, p.name)"),
    (
        "containers",
        "has(object.spec.template) && has(object.spec.template.spec)"
        " && has(object.spec.template.spec.containers)"
        " ? object.spec.template.spec.containers : []",
    ),
    # Whether the author's rights are checked: on every create, and on an
    # update only when it changes the template. An update that leaves the
    # template alone (maxTrials, suspend, labels) runs more of the Pods an
    # authorised author already wrote, as scaling a Deployment does; and the
    # operator itself writes only experiments/status, which the policy does not
    # match, so none of its writes can be refused here.
    (
        "authorChecked",
        "request.operation != 'UPDATE' || !has(oldObject.spec.template)"
        " || !has(object.spec.template) || oldObject.spec.template != object.spec.template",
    ),
    (
        "podSpec",
        "has(object.spec.template) && has(object.spec.template.spec)"
        " ? object.spec.template.spec : {}",
    ),
    # The ServiceAccount the trial Pods run as, as the API server resolves a
    # Pod's: serviceAccountName, else the deprecated alias serviceAccount,
    # else "default".
    (
        "serviceAccount",
        "has(variables.podSpec.serviceAccountName) && variables.podSpec.serviceAccountName != ''"
        " ? variables.podSpec.serviceAccountName"
        " : has(variables.podSpec.serviceAccount) && variables.podSpec.serviceAccount != ''"
        " ? variables.podSpec.serviceAccount : 'default'",
    ),
    # The field that names it, for the message.
    (
        "serviceAccountField",
        "has(variables.podSpec.serviceAccountName) && variables.podSpec.serviceAccountName != ''"
        " ? 'serviceAccountName' : 'serviceAccount'",
    ),
)


@dataclass(frozen=True)
class AuthorizationCheck:
    """A check of the request's author, run by the admission policy with CEL's ``authorizer``.

    The operator creates each trial's Pod from the Experiment's template with
    its own rights, so without these checks an Experiment would be a way to
    run Pods (as any ServiceAccount of the namespace) for a user who may not
    create them. ``authorizer`` asks the API server's authorizers (RBAC, ...)
    about the request's user, as ``kubectl auth can-i --as`` does.

    Attributes:
        allowed: CEL: true when the author may do what the Experiment's trials do.
        message: CEL string expression: the field and why it is refused.
        fallback: Shown when ``message`` itself fails to evaluate.
    """

    allowed: str
    message: str
    fallback: str

    def expression(self) -> str:
        """The policy's validation expression."""
        return f"!variables.authorChecked || {self.allowed}"


AUTHORIZATION_RULES: Final = (
    # Every trial is a Pod made from spec.template in the Experiment's
    # namespace: its author must be allowed to create that Pod himself.
    AuthorizationCheck(
        "authorizer.group('').resource('pods').namespace(request.namespace)"
        ".check('create').allowed()",
        "'spec.template: user \"' + request.userInfo.username + '\" may not create Pods in"
        " namespace \"' + request.namespace + '\", so may not create or change an Experiment"
        " whose trials run as Pods there'",
        "spec.template: you may not create Pods in this namespace, so you may not create"
        " or change an Experiment whose trials run as Pods there",
    ),
    # A named ServiceAccount: its author must be allowed to act as it.
    # Kubernetes has no "use" verb for ServiceAccounts; `impersonate` on the
    # ServiceAccount by name is the right that means "may act as it", and the
    # one the built-in `edit` and `admin` roles grant on every ServiceAccount
    # of their namespace (so their users, who may run Pods as any of them
    # today, are not refused), while a Role granting only `create pods` does
    # not. It is also what the API server itself asks before it lets anyone
    # act as system:serviceaccount:<namespace>:<name> (kubectl --as), so an
    # admin grants it per ServiceAccount with resourceNames. (`create
    # serviceaccounts/token`, the other candidate, is about minting
    # credentials for it, a narrower meaning than running as it.)
    # "default" is not checked: a Pod that names no ServiceAccount runs as
    # it, which the check above already allows.
    AuthorizationCheck(
        "variables.serviceAccount == 'default'"
        " || authorizer.group('').resource('serviceaccounts').namespace(request.namespace)"
        ".name(variables.serviceAccount).check('impersonate').allowed()",
        "'spec.template.spec.' + variables.serviceAccountField + ': user \"'"
        " + request.userInfo.username + '\" may not act as ServiceAccount \"'"
        " + variables.serviceAccount + '\" (impersonate serviceaccounts) in namespace \"'"
        " + request.namespace + '\", so may not create or change an Experiment whose trials"
        " run as it'",
        "spec.template.spec.serviceAccountName: you may not act as (impersonate) this"
        " ServiceAccount, so you may not create or change an Experiment whose trials run as it",
    ),
)


# The experiment's definition of the problem cannot change under a running
# study: the stored observations would silently belong to another search.
IMMUTABLE: Final = Rule(
    "self == oldSelf",
    "is immutable: create a new Experiment to change the objective or the search space",
)
