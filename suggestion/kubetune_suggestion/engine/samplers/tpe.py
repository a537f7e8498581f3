"""Tree-structured Parzen Estimator (TPE), parallel-aware.

TPE ranks the finished trials, splits them into the best ``gamma`` share
("below", the good ones) and the rest ("above"), fits a Parzen estimator
``l(x)`` to the good ones and ``g(x)`` to the others, draws candidates from
``l`` and proposes the one that maximises ``l(x) / g(x)`` (Bergstra et al.,
2011; Watanabe, 2023). The estimator lives in :mod:`.tpe_parzen`, the encoding
of configurations in :mod:`.tpe_encoding`.

Ranking, from best to worst: succeeded trials by objective; pruned trials, the
ones that got further first, then by their last reported value (as Optuna
does); then failed trials and NaN/inf results, which never join the good group
but keep their region from looking unexplored; then, for a parallel request,
running trials and the earlier members of the same batch ("constant liar":
they count as bad observations, so that the batch spreads out instead of
collapsing on the current best point).

Conditional parameters stay in one joint model: a trial in which a parameter
was inactive contributes a kernel that is flat along it, and a candidate that
leaves it inactive has it integrated out (see :mod:`.tpe_parzen`). Categorical
parameters get smoothed one-hot kernels, integers and stepped floats are
snapped to their cells. Independent (``multivariate: false``) TPE fits each
parameter on the trials where it was active, as Optuna does.

Options (``spec.algorithm.settings``):
    multivariate (bool, default True): one joint estimator over all
        parameters instead of one per parameter; better on correlated
        problems and the default, as in Optuna 4+.
    n_startup_trials (int, default 10): finished trials before the model is used.
    startup (``random`` | ``sobol``, default ``random``): how startup points are
        drawn (in bench/samplers.py Sobol startup did not help at 100 trials).
    n_ei_candidates (int, default 64): candidates drawn from ``l(x)`` per
        suggestion (Optuna: 24; more candidates exploit more, which won on
        the benchmark problems; the cost is in the time budget).
    gamma (float, default 0.1) and gamma_max (int, default 25): the good group
        is the best ``min(ceil(gamma * n), gamma_max)`` of ``n`` finished trials.
    prior_weight (float, default 1.0): weight of the prior kernel.
    bandwidth (``neighbor`` | ``scott``, default ``neighbor``), magic_clip (bool,
        default True), consider_endpoints (bool, default False): kernel widths,
        see :class:`.tpe_parzen.Bandwidth`.
    constant_liar (bool, default True): treat running trials as bad observations.
    max_kernels (int, default 200; 0: no limit): most kernels per estimator;
        older observations beyond it are thinned (see :func:`thin`), which keeps
        a suggestion's cost flat in the model and linear only in reading the history.
    clip_by_history (float in [0, 1], default 0.3): how much the magic clip's
        kernel count leans towards the number of finished trials instead of
        the group's own size (geometric interpolation; Optuna's clip is 0).
        Above 0 the good group's kernels may be narrower than Optuna allows,
        i.e. more exploitation; 1 won sequential runs but lost batches and
        multimodal problems, 0.3 was the best compromise measured.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from operator import attrgetter, is_
from typing import Any

import numpy as np
from scipy.stats import qmc

from kubetune_suggestion.engine.history import Direction, RecordState, TrialRecord
from kubetune_suggestion.engine.samplers.base import JsonState, Sampler, Suggestions
from kubetune_suggestion.engine.samplers.tpe_encoding import Encoder
from kubetune_suggestion.engine.samplers.tpe_parzen import (
    Bandwidth,
    Dims,
    ParzenEstimator,
    candidates,
)
from kubetune_suggestion.engine.space import Config, SearchSpace, SpaceError

_MAX_DEDUP_TRIES = 32


@dataclass(frozen=True)
class TPEOptions:
    """Validated TPE settings; see the module docstring for their meaning."""

    multivariate: bool = True
    n_startup_trials: int = 10
    startup: str = "random"
    n_ei_candidates: int = 64
    gamma: float = 0.1
    gamma_max: int = 25
    prior_weight: float = 1.0
    bandwidth: str = "neighbor"
    magic_clip: bool = True
    consider_endpoints: bool = False
    constant_liar: bool = True
    max_kernels: int = 200
    clip_by_history: float = 0.3

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> TPEOptions:
        """Options from ``spec.algorithm.settings``, whose keys the sampler checked.

        Raises:
            SpaceError: Naming the setting with a bad value.
        """
        values: dict[str, Any] = {}
        for key, raw in options.items():
            where = f"algorithm.settings.{key}"
            default = getattr(cls, key)
            if isinstance(default, bool):
                if not isinstance(raw, bool):
                    raise SpaceError(where, f"must be true or false, got {raw!r}")
            elif isinstance(default, int):
                if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
                    raise SpaceError(where, f"must be a non-negative integer, got {raw!r}")
            elif isinstance(default, float):
                if (
                    isinstance(raw, bool)
                    or not isinstance(raw, int | float)
                    or not math.isfinite(raw)
                    or raw < 0
                ):
                    raise SpaceError(where, f"must be a non-negative number, got {raw!r}")
                raw = float(raw)
            values[key] = raw
        parsed = cls(**values)
        checks = {
            "startup": parsed.startup in ("sobol", "random"),
            "bandwidth": parsed.bandwidth in ("neighbor", "scott"),
            "gamma": 0 < parsed.gamma <= 1,
            "gamma_max": parsed.gamma_max >= 1,
            "n_ei_candidates": parsed.n_ei_candidates >= 1,
            "clip_by_history": 0 <= parsed.clip_by_history <= 1,
        }
        for key, ok in checks.items():
            if not ok:
                raise SpaceError(
                    f"algorithm.settings.{key}", f"invalid value {getattr(parsed, key)!r}"
                )
        return parsed


def default_weights(n: int) -> np.ndarray:
    """Kernel weights by age (oldest first): the newest 25 count fully, older ones ramp down.

    The ramp is ``np.linspace(1 / n, 1, n - 25)``, computed as linspace does
    (the same values to the bit) without its argument handling, which cost
    more than the arithmetic: the group of bad trials grows by one per call,
    so these are computed for a new ``n`` every time.
    """
    weights = np.ones(n)
    num = n - 25
    if num <= 0:
        return weights
    start = 1.0 / n
    ramp = np.arange(num, dtype=float)
    if num > 1:
        ramp *= (1.0 - start) / (num - 1)
    ramp += start
    weights[:num] = ramp
    if num > 1:
        weights[num - 1] = 1.0  # linspace ends exactly at its stop
    return weights


def thin(n: int, max_kernels: int) -> tuple[np.ndarray, np.ndarray]:
    """Which of ``n`` observations (oldest first) become kernels, and their weights.

    Up to ``max_kernels`` every observation is a kernel, weighted by
    :func:`default_weights`. Beyond, the newest half of the budget is kept as
    is and the older observations are thinned by a regular stride, each kept
    one carrying the weight of the run it stands for: the mixture keeps its
    shape and total weight while its cost stops growing with the history.
    """
    weights = default_weights(n)
    if max_kernels <= 0 or n <= max_kernels:
        return np.arange(n), weights
    recent = max_kernels // 2
    old = n - recent
    stride = math.ceil(old / (max_kernels - recent))
    # Runs end at the newest old observation, so the kept ones are run ends.
    ends = np.arange(old - 1, -1, -stride)[::-1]
    starts = np.concatenate([[0], ends[:-1] + 1])
    run_weights = np.add.reduceat(weights[:old], starts)
    keep = np.concatenate([ends, np.arange(old, n)])
    return keep, np.concatenate([run_weights, weights[old:]])


@dataclass(frozen=True)
class _Rows:
    """Per-trial columns of a history, in its order; rows of ``x`` follow ``records``.

    Kept by the sampler between calls: a record object already seen is not
    read or encoded again (records are immutable values).
    """

    records: list[TrialRecord]
    state_ids: np.ndarray  # (n,) id() of each record's state (enum singletons)
    values: np.ndarray  # (n,) objective values, NaN where None
    numbers: np.ndarray  # (n,) trial numbers
    x: np.ndarray  # (n, d) encoded configurations
    floors: np.ndarray  # (n, d) cell widths along discrete columns, 0 elsewhere
    ascending: bool  # numbers never decrease from row to row (the usual order)


@dataclass(frozen=True)
class _Observed:
    """The history as arrays, split; rows of ``x`` follow ``numbers``."""

    x: np.ndarray  # (n, d) encoded configurations
    floors: np.ndarray  # (n, d) cell widths along discrete columns, 0 elsewhere
    numbers: np.ndarray  # (n,) trial numbers, for age weights
    ascending: bool  # numbers never decrease from row to row: rows are in age order
    below: np.ndarray  # (n,) bool: in the good group
    running: list[Mapping[str, Any]]  # configurations of running trials
    n_finished: int  # trials with a usable value (good or pruned)
    bandwidth: Bandwidth  # kernel widths for this history (the clip leans on n_finished)


class TPESampler(Sampler):
    """TPE with a constant liar for parallel requests; see the module docstring.

    Between calls it keeps the last history's columns (encoded
    configurations, states, values), so that a call reads only the records
    it has not seen: a cache, which never changes a suggestion.
    """

    name = "tpe"
    settings_names = frozenset(TPEOptions.__dataclass_fields__)

    def __init__(
        self,
        space: SearchSpace,
        direction: Direction = Direction.MINIMIZE,
        seed: int | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(space, direction, seed, options)
        self.settings = TPEOptions.parse(self.options)
        self.encoder = Encoder(space)
        self.bandwidth = Bandwidth(
            rule=self.settings.bandwidth,
            magic_clip=self.settings.magic_clip,
            consider_endpoints=self.settings.consider_endpoints,
        )
        # The last history's columns. Replaced, never changed in place, so
        # that concurrent calls on one instance each see a consistent one.
        self._rows: _Rows | None = None
        # The last (finished count, bandwidth): the clip leans on that count.
        self._clip: tuple[int, Bandwidth] | None = None

    def suggest(
        self, history: Sequence[TrialRecord], n: int, state: JsonState | None = None
    ) -> Suggestions:
        """Propose ``n`` configurations, spread out against running trials and each other."""
        rng = self.rng(state)
        observed = self._observe(history)
        if observed.n_finished < self.settings.n_startup_trials:
            configs = self._startup(rng, len(history), n)
            return Suggestions(configs=configs, state=self.next_state(state))
        taken = {_config_key(params) for params in observed.running}
        configs = []
        pending: list[np.ndarray] = []
        below, above = self._fit_both(observed)
        for i in range(n):
            if i:
                above = self._above(observed, pending)
            row, config = self._propose(rng, below, above, taken)
            configs.append(config)
            taken.add(_config_key(config))
            pending.append(row)
        return Suggestions(configs=configs, state=self.next_state(state))

    # -- data ----------------------------------------------------------------

    def _observe(self, history: Sequence[TrialRecord]) -> _Observed:
        trials = list(history)
        if not self.settings.constant_liar:
            trials = [t for t in trials if t.state is not RecordState.RUNNING]
        rows = self._rows_of(trials)
        loss = -rows.values if self.direction is Direction.MAXIMIZE else rows.values
        finite = np.isfinite(loss)
        ids = rows.state_ids
        good = ((ids == id(RecordState.SUCCEEDED)) & finite).nonzero()[0]
        pruned = ((ids == id(RecordState.PRUNED)) & finite).nonzero()[0]
        n_finished = len(good) + len(pruned)
        bandwidth = self.bandwidth
        if self.settings.clip_by_history:
            clip = self._clip
            if clip is None or clip[0] != n_finished:
                lean = self.settings.clip_by_history
                clip = (n_finished, replace(bandwidth, clip_count=n_finished, clip_lean=lean))
                self._clip = clip
            bandwidth = clip[1]
        return _Observed(
            x=rows.x,
            floors=rows.floors,
            numbers=rows.numbers,
            ascending=rows.ascending,
            below=self._split(trials, loss, good, pruned, self._n_below(n_finished)),
            running=[trials[i].params for i in (ids == id(RecordState.RUNNING)).nonzero()[0]],
            n_finished=n_finished,
            bandwidth=bandwidth,
        )

    def _rows_of(self, trials: list[TrialRecord]) -> _Rows:
        """The columns of ``trials``, reading only the records the last call did not see.

        A history grows at its end and changes a few records in place (a
        trial finishing is a new record at the same position), so the rows of
        the last call are reused wherever the record is the same object.
        A row's encoding depends on its record alone, so the columns are those
        a fresh read would give, to the bit.
        """
        last = self._rows
        n = len(trials)
        if last is None or not last.records:
            rows = self._read(trials)
        elif n >= len(last.records) and all(map(is_, trials, last.records)):
            # The usual call: the same records, new ones appended (or none).
            m = len(last.records)
            if n == m:
                return last
            fresh = self._read(trials[m:])
            rows = _Rows(
                records=trials,
                state_ids=np.concatenate([last.state_ids, fresh.state_ids]),
                values=np.concatenate([last.values, fresh.values]),
                numbers=np.concatenate([last.numbers, fresh.numbers]),
                x=np.concatenate([last.x, fresh.x]),
                floors=np.concatenate([last.floors, fresh.floors]),
                ascending=last.ascending
                and fresh.ascending
                and float(fresh.numbers[0]) >= float(last.numbers[-1]),
            )
        else:
            m = min(n, len(last.records))
            same = np.fromiter(map(is_, trials[:m], last.records[:m]), dtype=bool, count=m)
            if m == n == len(last.records) and same.all():
                return last
            changed = np.concatenate([np.flatnonzero(~same), np.arange(m, n)]).tolist()
            fresh = self._read([trials[i] for i in changed])
            numbers = _patched(last.numbers[:m], fresh.numbers, changed, n)
            rows = _Rows(
                records=trials,
                state_ids=_patched(last.state_ids[:m], fresh.state_ids, changed, n),
                values=_patched(last.values[:m], fresh.values, changed, n),
                numbers=numbers,
                x=_patched(last.x[:m], fresh.x, changed, n),
                floors=_patched(last.floors[:m], fresh.floors, changed, n),
                ascending=_ascending(numbers),
            )
        self._rows = rows
        return rows

    def _read(self, trials: Sequence[TrialRecord]) -> _Rows:
        n = len(trials)
        # One C-level pass per field; everything after is numpy.
        x = self.encoder.encode(list(map(attrgetter("params"), trials)))
        numbers = np.fromiter(map(attrgetter("number"), trials), dtype=float, count=n)
        return _Rows(
            records=list(trials),
            # States are enum singletons: comparing identities is exact and avoids
            # the enum's Python-level hash, the slowest part of a 10,000-trial read.
            state_ids=np.fromiter(
                map(id, map(attrgetter("state"), trials)), dtype=np.int64, count=n
            ),
            values=np.array(list(map(attrgetter("value"), trials)), dtype=float).reshape(n),
            numbers=numbers,
            x=x,
            floors=self.encoder.cell_widths(x),
            ascending=_ascending(numbers),
        )

    @staticmethod
    def _split(
        trials: Sequence[TrialRecord],
        loss: np.ndarray,
        good: np.ndarray,
        pruned: np.ndarray,
        n_below: int,
    ) -> np.ndarray:
        """The good group: the best succeeded trials, topped up with the best pruned ones."""
        below = np.zeros(len(trials), dtype=bool)
        if n_below <= 0:
            return below
        if len(good) >= n_below:
            # A partial sort: only the boundary matters, which keeps this O(n).
            below[good[np.argpartition(loss[good], n_below - 1)[:n_below]]] = True
            return below
        below[good] = True
        # Pruned trials that got further first, then by their last value (as Optuna).
        depth = np.array([-max(trials[i].steps, default=0) for i in pruned], dtype=float)
        order = np.lexsort((loss[pruned], depth))
        below[pruned[order[: n_below - len(good)]]] = True
        return below

    def _n_below(self, n_finished: int) -> int:
        return min(math.ceil(self.settings.gamma * n_finished), self.settings.gamma_max, n_finished)

    def _fit_both(
        self, obs: _Observed
    ) -> tuple[ParzenEstimator | _Univariate, ParzenEstimator | _Univariate]:
        """The estimators of the good and of the bad group (no pending points), fitted together."""
        below = self._group(obs, obs.below.nonzero()[0], [])
        above = self._group(obs, (~obs.below).nonzero()[0], [])
        fitted = self._fit(obs, [below, above])
        return fitted[0], fitted[1]

    def _above(self, obs: _Observed, pending: list[np.ndarray]) -> ParzenEstimator | _Univariate:
        """The bad group's estimator with ``pending`` points (a batch's later members)."""
        (above,) = self._fit(obs, [self._group(obs, (~obs.below).nonzero()[0], pending)])
        return above

    def _group(
        self, obs: _Observed, rows: np.ndarray, pending: list[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Kernels over history ``rows`` plus ``pending`` points (the newest of all).

        Returns:
            The kept observations (oldest first), their cell widths and weights.
        """
        # Oldest first; rows in age order already are what the stable sort returns.
        order = rows if obs.ascending else rows[obs.numbers[rows].argsort(kind="stable")]
        keep, weights = _thinned(len(order) + len(pending), self.settings.max_kernels)
        if not pending:
            kept = order if len(keep) == len(order) else order[keep]
            return obs.x[kept], obs.floors[kept], weights
        # Pending points are the newest, so the tail of ``keep``.
        kept = order[keep[keep < len(order)]]
        extra = np.vstack(pending)[keep[keep >= len(order)] - len(order)]
        x = np.vstack([obs.x[kept], extra])
        floors = np.vstack([obs.floors[kept], self.encoder.cell_widths(extra)])
        return x, floors, weights

    def _fit(
        self, obs: _Observed, groups: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    ) -> list[ParzenEstimator | _Univariate]:
        """One estimator per group of :meth:`_group`, fitted together where the model allows."""
        prior = self.settings.prior_weight
        bandwidth = obs.bandwidth
        if not self.settings.multivariate:
            return [_Univariate(x, f, w, self.encoder, prior, bandwidth) for x, f, w in groups]
        if len(groups) == 1:
            x, floors, _ = groups[0]
        else:
            x = np.concatenate([x for x, _, _ in groups])
            floors = np.concatenate([f for _, f, _ in groups])
        weights = [w for _, _, w in groups]
        dims = self.encoder.dims
        return list(ParzenEstimator.fit_groups(x, weights, dims, prior, bandwidth, floors))

    # -- proposals -----------------------------------------------------------

    def _startup(self, rng: np.random.Generator, start: int, n: int) -> list[Config]:
        d = self.encoder.n_dims
        if self.settings.startup == "sobol":
            # One scrambled sequence per experiment, walked by trial count, so
            # that startup points fill the space whatever the batch sizes.
            sobol = qmc.Sobol(d, scramble=True, seed=np.random.default_rng([self.seed, 0x50B0]))
            points = sobol.random_base2(max(1, math.ceil(math.log2(start + n))))[start : start + n]
        else:
            points = rng.random((n, d))
        return [
            self.space.decode({p.name: float(u[j]) for j, p in enumerate(self.space)})
            for u in points
        ]

    def _propose(
        self,
        rng: np.random.Generator,
        below: ParzenEstimator | _Univariate,
        above: ParzenEstimator | _Univariate,
        taken: set[Hashable],
    ) -> tuple[np.ndarray, Config]:
        m = self.settings.n_ei_candidates
        x = self.encoder.snap(below.sample(rng, m))
        active = self.encoder.active(x)
        rows: Iterable[np.ndarray]
        if isinstance(below, ParzenEstimator) and isinstance(above, ParzenEstimator):
            # Both estimators read the same prepared candidates.
            cands = candidates(x, active, self.encoder.dims)
            score = below.log_pdf_of(cands) - above.log_pdf_of(cands)
            # Candidates best first, taken one at a time (the first usually does).
            rows = (x[i] for i in _best_first(score))
        else:
            score = below.log_pdf(x, active) - above.log_pdf(x, active)
            # Each parameter takes its own best candidate value.
            rows = [x[np.argmax(score, axis=0), np.arange(x.shape[1])]]
        first: tuple[np.ndarray, Config] | None = None
        for row in rows:
            config = self.encoder.decode(row)
            first = first or (row, config)
            if _config_key(config) not in taken:
                return row, config
        assert first is not None
        # Every candidate repeats a running or batch configuration: the model
        # is sure of itself, so look elsewhere rather than run a twin.
        for _ in range(_MAX_DEDUP_TRIES):
            raw = _categorical_from_unit(rng.random(self.encoder.n_dims), self.encoder)
            row = self.encoder.snap(raw[None, :])[0]
            config = self.encoder.decode(row)
            if _config_key(config) not in taken:
                return row, config
        return first


class _Univariate:
    """One independent Parzen estimator per parameter, behind the same calls.

    ``log_pdf`` returns one column per parameter instead of a joint score, so
    that each parameter can pick its own best candidate.
    """

    def __init__(
        self,
        x: np.ndarray,
        floors: np.ndarray,
        weights: np.ndarray,
        encoder: Encoder,
        prior_weight: float,
        bandwidth: Bandwidth,
    ) -> None:
        self.encoder = encoder
        self.parts: list[ParzenEstimator] = []
        for j in range(encoder.n_dims):
            # Only trials where the parameter was active say anything about it.
            act = ~np.isnan(x[:, j])
            cols = slice(j, j + 1)
            dims = Dims(encoder.dims.n_choices[cols], encoder.dims.discrete[cols])
            self.parts.append(
                ParzenEstimator(
                    x[act, cols], weights[act], dims, prior_weight, bandwidth, floors[act, cols]
                )
            )

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return np.hstack([part.sample(rng, size) for part in self.parts])

    def log_pdf(self, x: np.ndarray, active: np.ndarray) -> np.ndarray:
        ones = np.ones((x.shape[0], 1), dtype=bool)
        return np.column_stack(
            [part.log_pdf(x[:, j : j + 1], ones) for j, part in enumerate(self.parts)]
        )


@functools.lru_cache(maxsize=64)
def _thinned(n: int, max_kernels: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`thin`, read-only and cached: the good group keeps its size from call to call."""
    keep, weights = thin(n, max_kernels)
    keep.flags.writeable = weights.flags.writeable = False
    return keep, weights


def _best_first(score: np.ndarray) -> Iterator[int]:
    """Indices by decreasing score, ties in index order, NaN last (a stable sort of ``-score``).

    The best comes from one ``argmax`` (without a NaN it is the sort's first);
    the rest are sorted only if the best is refused.
    """
    best = int(score.argmax())
    if math.isnan(score[best]):
        yield from (-score).argsort(kind="stable").tolist()
        return
    yield best
    yield from (-score).argsort(kind="stable")[1:].tolist()


def _ascending(numbers: np.ndarray) -> bool:
    if len(numbers) < 2:
        return True
    return bool(np.all(numbers[1:] >= numbers[:-1]))


def _patched(kept: np.ndarray, fresh: np.ndarray, at: Sequence[int], n: int) -> np.ndarray:
    """``kept`` extended to ``n`` rows, rows ``at`` (in order) replaced by those of ``fresh``."""
    out = np.empty((n, *kept.shape[1:]), dtype=kept.dtype)
    out[: len(kept)] = kept
    out[at] = fresh
    return out


def _categorical_from_unit(row: np.ndarray, encoder: Encoder) -> np.ndarray:
    """Turn unit coordinates of categorical columns into choice indices."""
    out = row.copy()
    for j, c in enumerate(encoder.dims.n_choices):
        if c > 0:
            out[j] = min(c - 1, math.floor(row[j] * c))
    return out


def _config_key(config: Mapping[str, Any]) -> Hashable:
    # Booleans are kept apart from 0/1, as the search space does.
    return frozenset((k, isinstance(v, bool), v) for k, v in config.items())
