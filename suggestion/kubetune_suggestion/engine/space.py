"""Search spaces: the parameters a user declares, validated, and their numeric encoding.

A space is built from the ``parameters`` list users write in an Experiment::

    - {name: lr, type: float, min: 1.0e-5, max: 1.0e-1, log: true}
    - {name: layers, type: int, min: 1, max: 6}
    - {name: optimizer, type: categorical, values: [adam, sgd]}
    - {name: momentum, type: float, min: 0.5, max: 0.99, when: {optimizer: sgd}}

Every problem is reported as a :class:`SpaceError` naming the field
(``parameters[3].when``) and the parameter, never as a traceback.

Samplers work on an internal representation: each numeric parameter maps to
``[0, 1]`` (log-scaled where asked, snapped to its step on the way back) and a
categorical to the index of its choice. Conditional parameters are active only
when every ``when`` condition holds and the parents themselves are active, so
chains work; :attr:`SearchSpace.params` is in topological order (parents first).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

CategoricalValue: TypeAlias = str | int | float | bool
ParamValue: TypeAlias = CategoricalValue
Config: TypeAlias = dict[str, ParamValue]


class SpaceError(ValueError):
    """A search space (or a configuration) that the engine rejects.

    Attributes:
        field: Where the problem is, as a user would find it in the manifest,
            e.g. ``parameters[2].min``.
        problem: What is wrong, in words.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class Condition:
    """``when: {parent: value}``: active only if ``parent`` took one of ``values``."""

    parent: str
    values: tuple[CategoricalValue, ...]


@dataclass(frozen=True)
class FloatParam:
    """A real-valued parameter in ``[low, high]``."""

    name: str
    low: float
    high: float
    log: bool = False
    # Grid spacing; values are ``low + k * step``. None means continuous.
    step: float | None = None
    when: tuple[Condition, ...] = ()
    type: Literal["float"] = "float"

    def to_unit(self, value: float) -> float:
        """Map a value to ``[0, 1]`` (on the log scale when ``log``)."""
        if self.log:
            lo, hi, v = math.log(self.low), math.log(self.high), math.log(value)
        else:
            lo, hi, v = self.low, self.high, value
        return min(1.0, max(0.0, (v - lo) / (hi - lo)))

    def from_unit(self, u: float) -> float:
        """Map a point of ``[0, 1]`` back to a valid value (snapped to ``step``)."""
        u = min(1.0, max(0.0, float(u)))
        if self.log:
            value = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        else:
            value = self.low + u * (self.high - self.low)
        if self.step is not None:
            k = round((value - self.low) / self.step)
            value = self.low + k * self.step
            # Rounding the step count can step past ``high`` when the range is
            # not a whole number of steps.
            if value > self.high + 1e-12:
                value -= self.step
            # Repeated additions leave float noise (0.30000000000000004).
            value = round(value, 12)
        return min(self.high, max(self.low, value))

    def grid(self) -> list[float]:
        """Every value on the step grid; the space rejects grids without ``step``."""
        assert self.step is not None
        n = math.floor((self.high - self.low) / self.step + 1e-9)
        return [round(self.low + k * self.step, 12) for k in range(n + 1)]

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is a valid value of this parameter."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if not (self.low - 1e-12 <= value <= self.high + 1e-12):
            return False
        if self.step is not None:
            k = (value - self.low) / self.step
            return abs(k - round(k)) < 1e-6
        return True


@dataclass(frozen=True)
class IntParam:
    """An integer parameter in ``[low, high]``, on a ``step`` grid from ``low``."""

    name: str
    low: int
    high: int
    log: bool = False
    step: int = 1
    when: tuple[Condition, ...] = ()
    type: Literal["int"] = "int"

    @property
    def n_values(self) -> int:
        """How many distinct values the parameter has."""
        return (self.high - self.low) // self.step + 1

    def to_unit(self, value: int) -> float:
        """Map a value to ``[0, 1]``; each integer owns an equal cell (log-scaled if ``log``)."""
        # Widening the range by half a step on each side gives the end values
        # the same share of the unit interval as the inner ones.
        lo, hi = self.low - 0.5 * self.step, self.high + 0.5 * self.step
        if self.log:
            lo, hi = max(lo, 0.5), hi
            return min(
                1.0, max(0.0, (math.log(value) - math.log(lo)) / (math.log(hi) - math.log(lo)))
            )
        return min(1.0, max(0.0, (value - lo) / (hi - lo)))

    def from_unit(self, u: float) -> int:
        """Map a point of ``[0, 1]`` back to the nearest valid integer."""
        u = min(1.0, max(0.0, float(u)))
        lo, hi = self.low - 0.5 * self.step, self.high + 0.5 * self.step
        if self.log:
            lo = max(lo, 0.5)
            raw = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
        else:
            raw = lo + u * (hi - lo)
        k = round((raw - self.low) / self.step)
        k = min(self.n_values - 1, max(0, k))
        return int(self.low + k * self.step)

    def grid(self) -> list[int]:
        """Every valid value, ascending."""
        return list(range(self.low, self.high + 1, self.step))

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is a valid value of this parameter."""
        if isinstance(value, bool) or not isinstance(value, int):
            return False
        return self.low <= value <= self.high and (value - self.low) % self.step == 0


@dataclass(frozen=True)
class CategoricalParam:
    """A parameter taking one of a list of values (strings, numbers, booleans)."""

    name: str
    choices: tuple[CategoricalValue, ...]
    when: tuple[Condition, ...] = ()
    type: Literal["categorical"] = "categorical"

    def index(self, value: Any) -> int:
        """The position of ``value`` among the choices (booleans never equal 0/1 here)."""
        for i, choice in enumerate(self.choices):
            if _same_value(choice, value):
                return i
        raise SpaceError(self.name, f"{value!r} is not one of {list(self.choices)!r}")

    def to_unit(self, value: CategoricalValue) -> float:
        """The centre of the value's cell in ``[0, 1]``."""
        return (self.index(value) + 0.5) / len(self.choices)

    def from_unit(self, u: float) -> CategoricalValue:
        """The choice whose cell contains ``u``."""
        i = int(min(len(self.choices) - 1, max(0, math.floor(float(u) * len(self.choices)))))
        return self.choices[i]

    def grid(self) -> list[CategoricalValue]:
        """Every choice, in declaration order."""
        return list(self.choices)

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one of the choices."""
        return any(_same_value(choice, value) for choice in self.choices)


Param: TypeAlias = FloatParam | IntParam | CategoricalParam


def _same_value(a: Any, b: Any) -> bool:
    # ``True == 1`` in Python; a categorical [true, 1] must keep them apart.
    return (type(a) is type(b) and a == b) or (
        not isinstance(a, bool | str) and not isinstance(b, bool | str) and a == b
    )


@dataclass(frozen=True)
class SearchSpace:
    """A validated, topologically ordered set of parameters."""

    params: tuple[Param, ...]
    _by_name: Mapping[str, Param] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {p.name: p for p in self.params})

    @classmethod
    def from_spec(cls, items: Sequence[Mapping[str, Any]]) -> SearchSpace:
        """Build and validate a space from the manifest's ``parameters`` list.

        Raises:
            SpaceError: Naming the field and the problem.
        """
        return _parse_space(items)

    def __getitem__(self, name: str) -> Param:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Param]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    @property
    def names(self) -> list[str]:
        """Parameter names in topological order."""
        return [p.name for p in self.params]

    @property
    def is_conditional(self) -> bool:
        """Whether any parameter has a ``when`` condition."""
        return any(p.when for p in self.params)

    def is_active(self, param: Param, config: Mapping[str, Any]) -> bool:
        """Whether ``param`` is sampled given the (partial) config of its parents."""
        for cond in param.when:
            if cond.parent not in config:
                return False
            if not any(_same_value(v, config[cond.parent]) for v in cond.values):
                return False
        return True

    def check_config(self, config: Mapping[str, Any]) -> None:
        """Check that a configuration has exactly the active parameters, each valid.

        Raises:
            SpaceError: Naming the first parameter that is missing, extra or invalid.
        """
        for param in self.params:
            active = self.is_active(param, config)
            if active and param.name not in config:
                raise SpaceError(param.name, "missing from the configuration")
            if not active and param.name in config:
                raise SpaceError(param.name, "present although its `when` condition does not hold")
            if active and not param.contains(config[param.name]):
                raise SpaceError(param.name, f"{config[param.name]!r} is not a valid value")
        for name in config:
            if name not in self._by_name:
                raise SpaceError(name, "not a parameter of this search space")

    def decode(self, units: Mapping[str, float]) -> Config:
        """Turn unit-interval coordinates into a configuration with only active params."""
        config: Config = {}
        for param in self.params:
            if self.is_active(param, config):
                config[param.name] = param.from_unit(units[param.name])
        return config

    def check_grid(self) -> None:
        """Raise :class:`SpaceError` if the space has no finite grid (a float without ``step``)."""
        for i, param in enumerate(self.params):
            if isinstance(param, FloatParam) and param.step is None:
                raise SpaceError(
                    f"parameters[{i}].step",
                    f'parameter "{param.name}": the grid algorithm needs a `step` for a '
                    "continuous float (or use an int or categorical parameter)",
                )

    def to_spec(self) -> list[dict[str, Any]]:
        """The space in the manifest's form (the inverse of :meth:`from_spec`)."""
        out: list[dict[str, Any]] = []
        for p in self.params:
            item: dict[str, Any] = {"name": p.name, "type": p.type}
            if isinstance(p, CategoricalParam):
                item["values"] = list(p.choices)
            else:
                item.update(min=p.low, max=p.high)
                if p.log:
                    item["log"] = True
                if p.step is not None and not (isinstance(p, IntParam) and p.step == 1):
                    item["step"] = p.step
            if p.when:
                item["when"] = {
                    c.parent: c.values[0] if len(c.values) == 1 else list(c.values) for c in p.when
                }
            out.append(item)
        return out


_KEYS = {
    "float": {"name", "type", "min", "max", "log", "step", "when"},
    "int": {"name", "type", "min", "max", "log", "step", "when"},
    "categorical": {"name", "type", "values", "when"},
}


def _number(item: Mapping[str, Any], key: str, where: str, name: str) -> float:
    value = item.get(key)
    if value is None:
        raise SpaceError(f"{where}.{key}", f'parameter "{name}" needs `{key}`')
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SpaceError(
            f"{where}.{key}", f'parameter "{name}": `{key}` must be a finite number, got {value!r}'
        )
    return float(value)


def _parse_param(i: int, item: Mapping[str, Any]) -> tuple[Param, dict[str, Any]]:
    """Parameter ``i`` of the spec and its raw ``when`` (checked against the others later)."""
    where = f"parameters[{i}]"
    if not isinstance(item, Mapping):
        raise SpaceError(where, f"must be a mapping with name and type, got {item!r}")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise SpaceError(f"{where}.name", "every parameter needs a non-empty string `name`")
    kind = item.get("type")
    if kind not in _KEYS:
        raise SpaceError(
            f"{where}.type",
            f'parameter "{name}": type must be one of float, int, categorical, got {kind!r}',
        )
    unknown = sorted(set(item) - _KEYS[kind])
    if unknown:
        raise SpaceError(
            f"{where}.{unknown[0]}", f'parameter "{name}": unknown field for a {kind} parameter'
        )
    when_raw = item.get("when") or {}
    if not isinstance(when_raw, Mapping):
        raise SpaceError(
            f"{where}.when", f'parameter "{name}": `when` must map a parameter name to a value'
        )
    log = item.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError(f"{where}.log", f'parameter "{name}": `log` must be true or false')
    param: Param
    if kind == "categorical":
        param = _parse_categorical(item, where, name)
    else:
        param = _parse_numeric(item, where, name, is_int=kind == "int", log=log)
    return param, dict(when_raw)


def _parse_categorical(item: Mapping[str, Any], where: str, name: str) -> CategoricalParam:
    """A categorical parameter: a non-empty list of distinct strings, numbers or booleans."""
    values = item.get("values")
    if not isinstance(values, list) or not values:
        raise SpaceError(
            f"{where}.values", f'parameter "{name}": `values` must be a non-empty list'
        )
    for j, v in enumerate(values):
        if not isinstance(v, str | int | float) or (isinstance(v, float) and not math.isfinite(v)):
            raise SpaceError(
                f"{where}.values[{j}]",
                f'parameter "{name}": values must be strings, numbers or booleans',
            )
        if any(_same_value(v, w) for w in values[:j]):
            raise SpaceError(f"{where}.values[{j}]", f'parameter "{name}": duplicate value {v!r}')
    return CategoricalParam(name=name, choices=tuple(values))


def _parse_numeric(
    item: Mapping[str, Any], where: str, name: str, *, is_int: bool, log: bool
) -> IntParam | FloatParam:
    """An int or float parameter: ``min < max``, and an optional ``step`` or ``log``."""
    low = _number(item, "min", where, name)
    high = _number(item, "max", where, name)
    if low >= high:
        raise SpaceError(
            f"{where}.min",
            f'parameter "{name}": min ({low:g}) must be less than max ({high:g})',
        )
    if log and low <= 0:
        raise SpaceError(
            f"{where}.min",
            f'parameter "{name}": a log-scale parameter needs min > 0, got {low:g}',
        )
    step = _parse_step(item, where, name, span=high - low, log=log)
    if not is_int:
        return FloatParam(name=name, low=low, high=high, log=log, step=step)
    for key, v in (("min", low), ("max", high), ("step", step)):
        if v is not None and v != int(v):
            raise SpaceError(
                f"{where}.{key}",
                f'parameter "{name}": an int parameter needs whole numbers',
            )
    return IntParam(name=name, low=int(low), high=int(high), log=log, step=int(step or 1))


def _parse_step(
    item: Mapping[str, Any], where: str, name: str, *, span: float, log: bool
) -> float | None:
    """A numeric parameter's ``step``: positive, at most ``max - min``, never with ``log``."""
    if item.get("step") is None:
        return None
    step = _number(item, "step", where, name)
    if step <= 0:
        raise SpaceError(
            f"{where}.step", f'parameter "{name}": step must be positive, got {step:g}'
        )
    if step > span:
        raise SpaceError(
            f"{where}.step", f'parameter "{name}": step ({step:g}) is larger than max - min'
        )
    if log:
        raise SpaceError(
            f"{where}.step", f'parameter "{name}": `step` and `log` cannot be combined'
        )
    return step


def _parse_space(items: Sequence[Mapping[str, Any]]) -> SearchSpace:
    if not isinstance(items, Sequence) or isinstance(items, str | bytes):
        raise SpaceError("parameters", "must be a list of parameters")
    if not items:
        raise SpaceError("parameters", "declare at least one parameter")
    parsed: list[tuple[Param, dict[str, Any]]] = []
    index: dict[str, int] = {}
    for i, item in enumerate(items):
        param, when = _parse_param(i, item)
        if param.name in index:
            raise SpaceError(
                f"parameters[{i}].name",
                f'duplicate parameter name "{param.name}" '
                f"(first declared at parameters[{index[param.name]}])",
            )
        index[param.name] = i
        parsed.append((param, when))

    by_name = {p.name: p for p, _ in parsed}
    resolved: dict[str, Param] = {}
    for i, (param, when) in enumerate(parsed):
        conditions: list[Condition] = []
        for parent, raw in when.items():
            field_name = f"parameters[{i}].when.{parent}"
            if parent not in by_name:
                raise SpaceError(
                    field_name, f'parameter "{param.name}" depends on unknown parameter "{parent}"'
                )
            if parent == param.name:
                raise SpaceError(field_name, f'parameter "{param.name}" cannot depend on itself')
            values = tuple(raw) if isinstance(raw, list) else (raw,)
            if not values:
                raise SpaceError(
                    field_name, f'parameter "{param.name}": `when` needs at least one value'
                )
            target = by_name[parent]
            for v in values:
                if not target.contains(v):
                    allowed = (
                        f"one of {list(target.choices)!r}"
                        if isinstance(target, CategoricalParam)
                        else f"in [{target.low:g}, {target.high:g}]"
                    )
                    raise SpaceError(
                        field_name,
                        f'parameter "{param.name}": {v!r} is not a value of "{parent}" '
                        f"(must be {allowed})",
                    )
            conditions.append(Condition(parent=parent, values=values))
        resolved[param.name] = _with_when(param, tuple(conditions))

    return SearchSpace(params=tuple(_topological(resolved, index)))


def _with_when(param: Param, when: tuple[Condition, ...]) -> Param:
    if isinstance(param, FloatParam):
        return FloatParam(param.name, param.low, param.high, param.log, param.step, when)
    if isinstance(param, IntParam):
        return IntParam(param.name, param.low, param.high, param.log, param.step, when)
    return CategoricalParam(param.name, param.choices, when)


def _topological(params: Mapping[str, Param], index: Mapping[str, int]) -> list[Param]:
    """Parents before children, otherwise declaration order; cycles are errors."""
    order: list[Param] = []
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = [*path[path.index(name) :], name]
            raise SpaceError(
                f"parameters[{index[name]}].when",
                "cyclic `when` conditions: " + " -> ".join(f'"{n}"' for n in cycle),
            )
        state[name] = "visiting"
        for cond in params[name].when:
            visit(cond.parent, [*path, name])
        state[name] = "done"
        order.append(params[name])

    for name in sorted(params, key=lambda n: index[n]):
        visit(name, [])
    return order
