"""CMA-ES over the numeric parameters, a pure function of the history.

The evolution strategy itself is the ``cmaes`` package (``CMA``, or ``CMAwM``,
CMA-ES with margin, when some parameters are integers or stepped floats, so
that the search never freezes on one discrete value). Optimizer objects are
never stored: each call rebuilds the optimizer from the seed and replays the
closed generations, asking the same points again (the optimizer's random
stream is seeded, so the replay is exact) and telling them the objective
values found in the history. The JSON state only records how many points each
generation handed out and, when it differs from the default, which members
were told.

To keep a call's cost from growing with the history, a sampler object keeps
a copy of the optimizer after the closed generations it last replayed (the
service keeps one sampler per experiment). The next call starts from that
copy only if the state and the history agree with what was replayed: the
same handed-out counts and told members for those generations, and every
member matched to the same trial with the same state and value; otherwise it
replays from the start. The copy is an optimisation, never the record: a
restart of the process replays, and the result is the same either way.

A trial is matched to the member it came from by its configuration (the CMA
parameters, rounded to 12 significant digits), so the service's trial numbers
do not matter. Parallel requests get distinct members of the current
generation; when every member is out and still running, extra members of the
same generation are handed out and the generation is told its first
``population_size`` finished members, as Optuna does.

Failed, pruned and NaN/inf trials are told a value worse than every finite one
of their generation, so that they rank last. When the optimizer's own stopping
rules fire (the search stagnated), it restarts from a random mean with a
population twice as large (IPOP-CMA-ES, Auger & Hansen 2005).

Categorical and conditional parameters are outside the model: they are drawn
by an independent sampler (TPE by default, or random) and
:attr:`Suggestions.notes` says so. So is the whole space when fewer than two
numeric parameters remain (CMA-ES needs two dimensions).

Options (``spec.algorithm.settings``):
    sigma0 (float, default 0.12): initial step size in the unit cube (Optuna
        uses 1/6; 0.12 converged faster on the benchmark's 200-trial budgets).
    popsize (int, default ``4 + floor(3 ln d)``): first population size.
    restart (``ipop`` | ``none``, default ``ipop``); inc_popsize (int, default 2).
    independent (``tpe`` | ``random``, default ``tpe``): sampler for the
        parameters outside the model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from cmaes import CMA, CMAwM

from kubetune_suggestion.engine.history import Direction, RecordState, TrialRecord
from kubetune_suggestion.engine.samplers.base import JsonState, Sampler, Suggestions
from kubetune_suggestion.engine.samplers.random import RandomSampler
from kubetune_suggestion.engine.samplers.tpe import TPESampler
from kubetune_suggestion.engine.space import (
    Config,
    FloatParam,
    IntParam,
    SearchSpace,
    SpaceError,
)


@dataclass(frozen=True)
class CMAESOptions:
    """Validated CMA-ES settings; see the module docstring for their meaning."""

    sigma0: float = 0.12
    popsize: int = 0  # 0: the cmaes default, 4 + floor(3 ln d)
    restart: str = "ipop"
    inc_popsize: int = 2
    independent: str = "tpe"
    lr_adapt: bool = False

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> CMAESOptions:
        """Options from ``spec.algorithm.settings``, whose keys the sampler checked.

        Raises:
            SpaceError: Naming the setting with a bad value.
        """
        parsed = cls(**dict(options))
        checks = {
            "sigma0": _is_number(parsed.sigma0) and 0 < parsed.sigma0 <= 1,
            "popsize": _is_int(parsed.popsize) and (parsed.popsize == 0 or parsed.popsize >= 2),
            "restart": parsed.restart in ("ipop", "none"),
            "inc_popsize": _is_int(parsed.inc_popsize) and parsed.inc_popsize >= 1,
            "independent": parsed.independent in ("tpe", "random"),
            "lr_adapt": isinstance(parsed.lr_adapt, bool),
        }
        for key, ok in checks.items():
            if not ok:
                raise SpaceError(
                    f"algorithm.settings.{key}", f"invalid value {getattr(parsed, key)!r}"
                )
        return parsed


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class _Coordinate:
    """How one model parameter maps to the optimizer's coordinate."""

    low: float  # bounds of the coordinate
    high: float
    step: float  # > 0: discrete values low + k * step (CMA-ES with margin)


class Optimizer(Protocol):
    """What this module uses of ``cmaes.CMA`` and ``cmaes.CMAwM`` (an untyped package)."""

    @property
    def population_size(self) -> int:
        """Members per generation."""

    def ask(self) -> Any:
        """The next member (CMAwM: a pair, the point to evaluate and the one to tell)."""

    def tell(self, solutions: list[tuple[np.ndarray, float]]) -> None:
        """Close a generation with (point, loss) pairs."""

    def should_stop(self) -> bool:
        """Whether the optimizer's stopping rules fire."""


@dataclass(frozen=True)
class _Checkpoint:
    """The optimizer after replaying the first ``len(asks)`` generations.

    Attributes:
        asks: Members handed out per replayed generation.
        told: Which members each replayed generation was told (as in the state).
        restart: The restart the optimizer belongs to.
        optimizer: A private copy, never asked or told (copied before use).
        matched: For each member asked during the replay, in order: its
            matching key and the (number, state, value) of the trial it took.
    """

    asks: tuple[int, ...]
    told: tuple[tuple[int, ...] | None, ...]
    restart: int
    optimizer: Any
    matched: tuple[tuple[Hashable, tuple[int, RecordState, float | None] | None], ...]


class CMAESSampler(Sampler):
    """IPOP-CMA-ES, replayed from the history at each call; see the module docstring."""

    name = "cmaes"
    settings_names = frozenset(CMAESOptions.__dataclass_fields__)

    def __init__(
        self,
        space: SearchSpace,
        direction: Direction = Direction.MINIMIZE,
        seed: int | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(space, direction, seed, options)
        self.settings = CMAESOptions.parse(self.options)
        # Unconditional numeric parameters form the model; the rest is independent.
        self.model = [p for p in space if isinstance(p, FloatParam | IntParam) and not p.when]
        self.outside = [p.name for p in space if p not in self.model]
        if len(self.model) < 2:
            self.outside = space.names
            self.model = []
        self.coords = [_coordinate(p) for p in self.model]
        independent: type[Sampler] = (
            TPESampler if self.settings.independent == "tpe" else RandomSampler
        )
        ind_options = {"multivariate": False} if independent is TPESampler else {}
        self.independent = independent(space, direction, self.seed, ind_options)
        # The optimizer after the closed generations of the last call (see the
        # module docstring); replaced, never changed in place.
        self._checkpoint: _Checkpoint | None = None
        # Each history record's matching key, by identity (the service hands
        # the same record objects to every call): keys cost float formatting.
        self._keys: dict[int, tuple[TrialRecord, Hashable]] = {}

    # -- the public call -----------------------------------------------------

    def suggest(
        self, history: Sequence[TrialRecord], n: int, state: JsonState | None = None
    ) -> Suggestions:
        """Hand out ``n`` members of the current generation (closing it first if it is done)."""
        state = dict(state or {})
        notes = []
        extra: list[Config] = [{} for _ in range(n)]
        if self.outside:
            if self.model:
                why = "categorical and conditional parameters are outside the CMA-ES model"
                what = ", ".join(self.outside)
            else:
                why, what = "CMA-ES needs two unconditional numeric parameters", "every parameter"
            notes.append(
                f"{why}: {what} drawn by the independent {self.settings.independent} sampler"
            )
            calls = {"calls": int(state.get("calls", 0))}
            extra = self.independent.suggest(history, n, calls).configs
        if not self.model:
            return Suggestions(configs=extra, state=self.next_state(state), notes=notes)

        asks: list[int] = [int(a) for a in state.get("asks", [0])]
        told: dict[str, list[int]] = {str(k): list(v) for k, v in state.get("told", {}).items()}
        trials = _Matcher(history, self._trial_keys(history))
        closed = asks[:-1]
        told_of = [_told(told, g) for g in range(len(closed))]
        start, opt, restart, matched = self._resume(trials, closed, told_of)
        # Replay the closed generations; a restart happens where it happened.
        for g in range(start, len(closed)):
            asked = self._ask(opt, closed[g])
            members = []
            for _, x_tell, key in asked:
                trial = trials.take(key)
                members.append((x_tell, trial))
                matched.append((key, _fingerprint(trial)))
            told_members = told_of[g]
            told_now = range(opt.population_size) if told_members is None else told_members
            opt.tell(self._solutions([members[i] for i in told_now]))
            if self._stagnated(opt):
                restart += 1
                opt = self._fresh(restart)
        if len(closed) > start:
            self._checkpoint = _Checkpoint(
                tuple(closed), tuple(told_of), restart, _clone(opt), tuple(matched)
            )
        # The open generation: close it once enough of its members are finished.
        g = len(asks) - 1
        members = [(x_tell, trials.take(key)) for _, x_tell, key in self._ask(opt, asks[-1])]
        finished = [
            i
            for i, (_, t) in enumerate(members)
            if t is not None and t.state is not RecordState.RUNNING
        ]
        if len(finished) >= opt.population_size:
            chosen = finished[: opt.population_size]
            if chosen != list(range(opt.population_size)):
                told[str(g)] = chosen
            opt.tell(self._solutions([members[i] for i in chosen]))
            if self._stagnated(opt):
                restart += 1
                opt = self._fresh(restart)
                notes.append(
                    f"CMA-ES restarted (restart {restart}, population {opt.population_size})"
                )
            asks.append(0)

        configs = [
            self._merge(x_eval, extra[i]) for i, (x_eval, _, _) in enumerate(self._ask(opt, n))
        ]
        asks[-1] += n
        return Suggestions(
            configs=configs, state=self.next_state(state, asks=asks, told=told), notes=notes
        )

    def _resume(
        self,
        trials: _Matcher,
        closed: list[int],
        told_of: list[tuple[int, ...] | None],
    ) -> tuple[int, Optimizer, int, list[tuple[Hashable, Any]]]:
        """Where the replay starts: (generation, optimizer, restart, members matched so far).

        From the checkpoint when its generations are a prefix of ``closed``
        with the same told members, and its members still match the same
        trials, unchanged (which also advances ``trials`` past them); from
        scratch otherwise.
        """
        cp = self._checkpoint
        n = len(cp.asks) if cp is not None else 0
        if (
            cp is not None
            and tuple(closed[:n]) == cp.asks
            and tuple(told_of[:n]) == cp.told
            and all(_fingerprint(trials.take(key)) == seen for key, seen in cp.matched)
        ):
            return n, _clone(cp.optimizer), cp.restart, list(cp.matched)
        trials.reset()
        return 0, self._fresh(0), 0, []

    # -- the optimizer -------------------------------------------------------

    def _fresh(self, restart: int) -> Optimizer:
        """The optimizer of restart number ``restart`` (0: the first run)."""
        d = len(self.coords)
        bounds = np.array([[c.low, c.high] for c in self.coords])
        popsize = self.settings.popsize or 4 + math.floor(3 * math.log(d))
        popsize *= self.settings.inc_popsize**restart
        seed = int(np.random.default_rng([self.seed, restart, 0xC3A]).integers(1, 2**31 - 1))
        if restart == 0:
            mean = bounds.mean(axis=1)
        else:
            mean = bounds[:, 0] + np.random.default_rng(seed).random(d) * (
                bounds[:, 1] - bounds[:, 0]
            )
        sigma = self.settings.sigma0
        steps = np.array([c.step for c in self.coords])
        opt: Optimizer
        if (steps > 0).any():
            opt = CMAwM(
                mean=mean,
                sigma=sigma,
                bounds=bounds,
                steps=steps,
                seed=seed,
                population_size=popsize,
            )
        else:
            opt = CMA(
                mean=mean,
                sigma=sigma,
                bounds=bounds,
                seed=seed,
                population_size=popsize,
                lr_adapt=self.settings.lr_adapt,
            )
        return opt

    def _stagnated(self, opt: Optimizer) -> bool:
        return self.settings.restart == "ipop" and bool(opt.should_stop())

    def _ask(self, opt: Optimizer, count: int) -> list[tuple[np.ndarray, np.ndarray, Hashable]]:
        """``count`` asks as (point to evaluate, point to tell, matching key)."""
        out = []
        for _ in range(count):
            if isinstance(opt, CMAwM):
                x_eval, x_tell = opt.ask()
            else:
                x_eval = x_tell = opt.ask()
            out.append((x_eval, x_tell, self._key(self._values(x_eval))))
        return out

    def _solutions(
        self, members: list[tuple[np.ndarray, TrialRecord | None]]
    ) -> list[tuple[np.ndarray, float]]:
        """The (point, loss) pairs to tell; trials without a finite value rank last."""
        losses = [
            self.direction.loss(t.value)
            if t is not None and t.state is RecordState.SUCCEEDED and t.value is not None
            else math.inf
            for _, t in members
        ]
        finite = [v for v in losses if math.isfinite(v)]
        # Worse than every finite value, yet finite: CMA-ES ranks, and its
        # stopping rules need finite spreads.
        worst = max(finite) + abs(max(finite)) + 1.0 if finite else 0.0
        return [
            (x, v if math.isfinite(v) else worst) for (x, _), v in zip(members, losses, strict=True)
        ]

    def _trial_keys(self, history: Sequence[TrialRecord]) -> list[Hashable]:
        """Each trial's matching key, in history order, reusing the last call's.

        The memo keeps only this history's records (so it cannot grow), and
        holds them, so an ``id`` cannot be reused while it is there.
        """
        old, new, keys = self._keys, {}, []
        for t in history:
            hit = old.get(id(t))
            key = hit[1] if hit is not None and hit[0] is t else self._key(t.params)
            new[id(t)] = (t, key)
            keys.append(key)
        self._keys = new
        return keys

    # -- configurations ------------------------------------------------------

    def _values(self, x: np.ndarray) -> dict[str, Any]:
        """Model parameters' values at an optimizer point."""
        return {p.name: p.from_unit(float(v)) for p, v in zip(self.model, x, strict=True)}

    def _key(self, values: Mapping[str, Any]) -> Hashable:
        # Rounded so that a float that went through a database still matches.
        return tuple(
            float(f"{v:.12g}") if isinstance(v, float) else v
            for v in (values.get(p.name) for p in self.model)
        )

    def _merge(self, x: np.ndarray, extra: Config) -> Config:
        """One configuration: model parameters from ``x``, the others from ``extra``."""
        units: dict[str, float] = {}
        for p in self.space:
            if p.name in extra:
                units[p.name] = p.to_unit(extra[p.name])  # type: ignore[arg-type]
            else:
                units[p.name] = 0.5
        for p, v in zip(self.model, x, strict=True):
            units[p.name] = min(1.0, max(0.0, float(v)))
        return self.space.decode(units)


def _clone(opt: Any) -> Any:
    """An exact, independent copy of a ``cmaes`` optimizer.

    Not ``copy.deepcopy``: ``cmaes`` pickles without the random generator
    (the copy would draw other points) and with the covariance compressed.
    """
    clone = object.__new__(type(opt))
    for name, value in opt.__dict__.items():
        inner = isinstance(value, CMA | CMAwM)
        clone.__dict__[name] = _clone(value) if inner else copy.deepcopy(value)
    return clone


def _told(told: Mapping[str, list[int]], generation: int) -> tuple[int, ...] | None:
    """The members a closed generation was told, ``None`` for the default (the first ones)."""
    chosen = told.get(str(generation))
    return None if chosen is None else tuple(chosen)


def _fingerprint(trial: TrialRecord | None) -> tuple[int, RecordState, float | None] | None:
    """What of a matched trial a told generation depends on."""
    return None if trial is None else (trial.number, trial.state, trial.value)


def _coordinate(p: FloatParam | IntParam) -> _Coordinate:
    """The optimizer coordinate of a model parameter (the unit interval, or a grid in it)."""
    if isinstance(p, IntParam) and not p.log:
        n = p.n_values
        # Cell centres (k + 0.5) / n: exactly what to_unit gives each integer.
        return _Coordinate(0.5 / n, 1.0 - 0.5 / n, 1.0 / n)
    if isinstance(p, FloatParam) and p.step is not None:
        span = p.high - p.low
        n = len(p.grid())
        return _Coordinate(0.0, (n - 1) * p.step / span, p.step / span)
    # Continuous, or log-scale ints whose cells are unequal: searched
    # continuously on the log scale and rounded by from_unit.
    return _Coordinate(0.0, 1.0, 0.0)


class _Matcher:
    """Finds the trial each handed-out member became, by configuration.

    Members are matched in the order they were asked, each taking the oldest
    trial with its configuration not yet taken, so twins (possible with
    integer parameters) pair up one to one.
    """

    def __init__(self, history: Sequence[TrialRecord], keys: Sequence[Hashable]) -> None:
        self._trials: dict[Hashable, list[TrialRecord]] = {}
        for t, key in sorted(zip(history, keys, strict=True), key=lambda p: p[0].number):
            self._trials.setdefault(key, []).append(t)
        self._taken: dict[Hashable, int] = {}

    def reset(self) -> None:
        """Forget every take: the next one of each configuration is its oldest trial again."""
        self._taken.clear()

    def take(self, key: Hashable) -> TrialRecord | None:
        """The next trial with this configuration, or None if there is none (yet)."""
        k = self._taken.get(key, 0)
        trials = self._trials.get(key, [])
        if k >= len(trials):
            return None
        self._taken[key] = k + 1
        return trials[k]
