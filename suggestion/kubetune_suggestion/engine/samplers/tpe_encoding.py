"""Vectorised encoding of configurations for the model-based samplers (TPE, CMA-ES).

Numeric parameters map to the unit interval exactly as
:meth:`~kubetune_suggestion.engine.space.FloatParam.to_unit` and
:meth:`~kubetune_suggestion.engine.space.IntParam.to_unit` do, categorical ones
to the index of their choice, inactive ones to NaN. Encoding a history of ten
thousand trials must take milliseconds, so each column is converted with one
pass over the configurations and numpy arithmetic, never one ``to_unit`` call
per value.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from itertools import chain
from operator import itemgetter
from typing import Any

import numpy as np

from kubetune_suggestion.engine.samplers.tpe_parzen import Dims
from kubetune_suggestion.engine.space import (
    CategoricalParam,
    Config,
    FloatParam,
    IntParam,
    Param,
    SearchSpace,
)

# At most this many rows have their cell widths looked up rather than computed.
_FEW_ROWS = 8
# Cell widths remembered per column (a wide integer range need not fill memory).
_MEMO_SIZE = 4096


def _choice_key(value: Any) -> tuple[bool, bool, Any]:
    # Keeps True apart from 1 and "1" apart from 1, while 1 and 1.0 still meet,
    # the same equality the search space uses.
    return (isinstance(value, bool), isinstance(value, str), value)


class Encoder:
    """Encodes configurations of one space as rows of a float matrix.

    Args:
        space: The search space; columns follow ``space.params``.
    """

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self.params: tuple[Param, ...] = space.params
        self.dims = Dims(
            n_choices=np.array(
                [len(p.choices) if isinstance(p, CategoricalParam) else 0 for p in self.params],
                dtype=int,
            ),
            discrete=np.array(
                [
                    isinstance(p, IntParam) or (isinstance(p, FloatParam) and p.step is not None)
                    for p in self.params
                ],
                dtype=bool,
            ),
        )
        self._index = [
            {_choice_key(c): i for i, c in enumerate(p.choices)}
            if isinstance(p, CategoricalParam)
            else {}
            for p in self.params
        ]
        self._position = {p.name: j for j, p in enumerate(self.params)}
        # Columns whose values have cells (ints and stepped floats).
        self._discrete_cols = [j for j, discrete in enumerate(self.dims.discrete) if discrete]
        self._flat_cols = [
            j
            for j, p in enumerate(self.params)
            if not isinstance(p, CategoricalParam) and not p.when
        ]
        names = [self.params[j].name for j in self._flat_cols]
        # Always a tuple, even for one parameter (itemgetter of one name is not).
        self._getter: Any = itemgetter(*names) if len(names) > 1 else lambda c: (c[names[0]],)
        # The flat columns' maps to the unit interval, ``(log(v) or v - shift) / scale``,
        # applied to all of them at once (the constants of :func:`_numeric_to_unit`).
        flat = [
            p
            for p in (self.params[j] for j in self._flat_cols)
            if not isinstance(p, CategoricalParam)
        ]
        self._flat_log = [i for i, p in enumerate(flat) if p.log]
        self._other_cols = [j for j in range(len(self.params)) if j not in self._flat_cols]
        cols = self._flat_cols
        # A slice where the columns are consecutive: assigning to it is cheaper.
        consecutive = bool(cols) and cols[-1] - cols[0] == len(cols) - 1
        self._flat_target: slice | list[int] = slice(cols[0], cols[-1] + 1) if consecutive else cols
        affine = [_unit_affine(p) for p in flat]
        self._flat_shift = np.array([shift for shift, _ in affine])
        self._flat_scale = np.array([scale for _, scale in affine])
        # Cell widths by encoded value, per discrete column: a history grows by
        # a row or two per call, and a discrete column takes few values.
        self._width_memo: dict[int, dict[float, float]] = {j: {} for j in self._discrete_cols}
        # With only strings as choices a plain lookup is exact and much faster.
        self._plain = [
            {c: i for i, c in enumerate(p.choices)}
            if isinstance(p, CategoricalParam) and all(isinstance(c, str) for c in p.choices)
            else None
            for p in self.params
        ]

    @property
    def n_dims(self) -> int:
        """Number of columns."""
        return len(self.params)

    def encode(self, configs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """An ``(n, d)`` matrix; NaN where a parameter is absent or not a valid value."""
        out = np.empty((len(configs), self.n_dims))
        out.fill(np.nan)
        # Logs of invalid values give NaN, which is what absent values are.
        with np.errstate(divide="ignore", invalid="ignore"):
            rest = self._encode_flat(out, configs)
            self._encode_columns(out, configs, rest)
        return out

    def _encode_flat(self, out: np.ndarray, configs: Sequence[Mapping[str, Any]]) -> list[int]:
        """Unconditional numeric columns in one pass; returns the columns left to do."""
        cols = self._flat_cols
        if not cols or not configs:
            return list(range(self.n_dims))
        try:
            values = chain.from_iterable(map(self._getter, configs))
            raw = np.fromiter(values, dtype=float, count=len(configs) * len(cols))
        except (KeyError, TypeError, ValueError):
            # A missing or non-numeric value somewhere: column by column.
            return list(range(self.n_dims))
        raw = raw.reshape(len(configs), len(cols))
        # Column by column this is :func:`_numeric_to_unit`, to the bit.
        for i in self._flat_log:
            np.log(raw[:, i], out=raw[:, i])
        raw -= self._flat_shift
        raw /= self._flat_scale
        np.maximum(raw, 0.0, out=raw)
        np.minimum(raw, 1.0, out=raw)
        out[:, self._flat_target] = raw
        return self._other_cols

    def _encode_columns(
        self, out: np.ndarray, configs: Sequence[Mapping[str, Any]], columns: list[int]
    ) -> None:
        for j in columns:
            param = self.params[j]
            raw = _column(configs, param.name, optional=bool(param.when))
            if isinstance(param, CategoricalParam):
                plain, index = self._plain[j], self._index[j]
                try:
                    if plain is None:
                        raise TypeError("choices that are not all strings")
                    # A missing or unknown value looks up None, which numpy reads as NaN.
                    looked_up: list[Any] = list(map(plain.get, raw))
                    out[:, j] = np.array(looked_up, dtype=float)
                except TypeError:
                    out[:, j] = [index.get(_choice_key(v), math.nan) for v in raw]
            else:
                out[:, j] = _numeric_to_unit(param, _as_floats(raw))

    def snap(self, units: np.ndarray) -> np.ndarray:
        """Snap numeric columns of ``(m, d)`` raw points to the centre of their value's cell.

        Continuous columns and categorical ones (indices) pass through.
        """
        x = np.array(units, dtype=float)
        for j in self._discrete_cols:
            param = self.params[j]
            if isinstance(param, IntParam):
                x[:, j] = _int_centre(param, x[:, j])
            else:
                assert isinstance(param, FloatParam)
                x[:, j] = _step_cells(param, x[:, j])[0]
        return x

    def cell_widths(self, x: np.ndarray) -> np.ndarray:
        """Widths of the cells of encoded points along discrete columns; 0 elsewhere or if NaN."""
        out = np.zeros(x.shape)
        # A few rows (a call's new trials) are looked up; a whole history is computed.
        few = x.shape[0] <= _FEW_ROWS
        for j in self._discrete_cols:
            memo = self._width_memo[j]
            if few:
                known = [memo.get(u) for u in x[:, j].tolist()]
                if None not in known:
                    out[:, j] = known
                    continue
            param = self.params[j]
            missing = np.isnan(x[:, j])
            # Encoded values lie in [0, 1] or are NaN: NaN is the only value to stand in for.
            u = np.where(missing, 0.5, x[:, j])
            if isinstance(param, IntParam):
                widths = _int_width(param, u)
            else:
                assert isinstance(param, FloatParam)
                _, low, high = _step_cells(param, u)
                widths = high - low
            out[:, j] = np.where(missing, 0.0, widths)
            if few and len(memo) < _MEMO_SIZE:
                # Not NaN: a NaN key would never be found again.
                memo.update(
                    (u, w)
                    for u, w in zip(x[:, j].tolist(), out[:, j].tolist(), strict=True)
                    if u == u
                )
        return out

    def decode(self, row: np.ndarray) -> Config:
        """The configuration of one encoded row (inactive columns are ignored)."""
        units: dict[str, float] = {}
        for param, v in zip(self.params, row.tolist(), strict=True):
            if isinstance(param, CategoricalParam):
                units[param.name] = (int(v) + 0.5) / len(param.choices)
            else:
                units[param.name] = 0.5 if math.isnan(v) else v
        return self.space.decode(units)

    def active(self, x: np.ndarray) -> np.ndarray:
        """``(m, d)`` mask of the columns each encoded row's configuration uses."""
        act = np.ones(x.shape, dtype=bool)
        for j, k, allowed, parent, values in self._conditions:
            if allowed is not None:
                # Choice indices are whole numbers: equality is exact.
                holds = np.zeros(x.shape[0], dtype=bool)
                for index in allowed:
                    holds |= x[:, k] == index
            else:
                # Numeric parents are rare: decode their values one by one.
                holds = np.array([parent.from_unit(u) in values for u in x[:, k]], dtype=bool)
            # Parents come first, so their own activity is already known.
            act[:, j] &= act[:, k] & holds
        return act

    @functools.cached_property
    def _conditions(self) -> list[tuple[int, int, list[int] | None, Param, tuple[Any, ...]]]:
        """Each ``when`` condition: (column, parent column, allowed choices, parent, values).

        The allowed choices are indices for a categorical parent, None for a numeric one.
        """
        out: list[tuple[int, int, list[int] | None, Param, tuple[Any, ...]]] = []
        for j, param in enumerate(self.params):
            for cond in param.when:
                k = self._position[cond.parent]
                parent = self.params[k]
                allowed = (
                    [parent.index(v) for v in cond.values]
                    if isinstance(parent, CategoricalParam)
                    else None
                )
                out.append((j, k, allowed, parent, cond.values))
        return out


def _column(configs: Sequence[Mapping[str, Any]], name: str, optional: bool) -> list[Any]:
    if optional:
        return [c.get(name) for c in configs]
    try:
        # C-level iteration: three times faster than a comprehension, and
        # every configuration has every unconditional parameter.
        return list(map(itemgetter(name), configs))
    except (KeyError, TypeError):
        return [c.get(name) for c in configs]


def _as_floats(raw: list[Any]) -> np.ndarray:
    try:
        # None becomes NaN; this one C-level pass is the common case.
        return np.array(raw, dtype=float)
    except (TypeError, ValueError):
        # A value of the wrong type (a space changed under a running experiment)
        # is treated as absent rather than failing the whole suggestion.
        return np.array(
            [v if isinstance(v, int | float) and not isinstance(v, bool) else math.nan for v in raw]
        )


def _unit_affine(param: FloatParam | IntParam) -> tuple[float, float]:
    """``(shift, scale)``: ``u = (t - shift) / scale``, ``t`` the value (its log if ``log``)."""
    if isinstance(param, IntParam):
        lo, hi = param.low - 0.5 * param.step, param.high + 0.5 * param.step
        if param.log:
            lo = max(lo, 0.5)
            return math.log(lo), math.log(hi) - math.log(lo)
        return lo, hi - lo
    if param.log:
        return math.log(param.low), math.log(param.high) - math.log(param.low)
    return param.low, param.high - param.low


def _numeric_to_unit(param: FloatParam | IntParam, v: np.ndarray) -> np.ndarray:
    shift, scale = _unit_affine(param)
    u = ((np.log(v) if param.log else v) - shift) / scale
    # NaN passes through minimum/maximum unchanged: absent stays absent.
    return np.asarray(np.minimum(np.maximum(u, 0.0), 1.0))


def _int_index(param: IntParam, u: np.ndarray) -> np.ndarray:
    """Per unit coordinate, the index of the value whose cell holds it."""
    n, s = param.n_values, param.step
    u = np.minimum(np.maximum(u, 0.0), 1.0)
    if not param.log:
        return np.asarray(np.minimum(np.maximum(np.floor(u * n), 0), n - 1))
    log_lo, log_hi = _int_log_range(param)
    raw = np.exp(log_lo + u * (log_hi - log_lo))
    return np.asarray(np.minimum(np.maximum(np.round((raw - param.low) / s), 0), n - 1))


def _int_log_range(param: IntParam) -> tuple[float, float]:
    s = param.step
    return math.log(max(param.low - 0.5 * s, 0.5)), math.log(param.high + 0.5 * s)


def _int_log_unit(param: IntParam, w: np.ndarray) -> np.ndarray:
    """Unit coordinates of values ``w`` of a log-scaled integer (clipped to its range)."""
    log_lo, log_hi = _int_log_range(param)
    return np.asarray(
        (np.log(np.minimum(np.maximum(w, math.exp(log_lo)), math.exp(log_hi))) - log_lo)
        / (log_hi - log_lo)
    )


def _int_centre(param: IntParam, u: np.ndarray) -> np.ndarray:
    """The centre of the cell of the value each unit coordinate falls in."""
    k = _int_index(param, u)
    if not param.log:
        return np.asarray((k + 0.5) / param.n_values)
    return _int_log_unit(param, param.low + k * param.step)


def _int_width(param: IntParam, u: np.ndarray) -> np.ndarray:
    """The width of the cell of the value each unit coordinate falls in."""
    k = _int_index(param, u)
    if not param.log:
        n = param.n_values
        return np.asarray((k + 1) / n - k / n)
    v = param.low + k * param.step
    high = _int_log_unit(param, v + 0.5 * param.step)
    return np.asarray(high - _int_log_unit(param, v - 0.5 * param.step))


def _step_cells(param: FloatParam, u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    assert param.step is not None
    span = param.high - param.low
    n = math.floor(span / param.step + 1e-9) + 1
    u = np.minimum(np.maximum(u, 0.0), 1.0)
    k = np.minimum(np.maximum(np.round(u * span / param.step), 0), n - 1)
    h = 0.5 * param.step / span
    centre = k * param.step / span
    return centre, np.maximum(centre - h, 0.0), np.minimum(centre + h, 1.0)
