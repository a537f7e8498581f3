"""The Parzen estimator behind TPE: a weighted mixture of product kernels on the unit cube.

Every observation becomes one kernel; a prior kernel (a wide one centred on
the cube) is appended so that no region ever gets zero density. Along a
numeric dimension a kernel is a normal truncated to ``[0, 1]``; along a
categorical dimension it is a smoothed one-hot distribution over the choices.
Discrete numeric dimensions (ints, stepped floats) are evaluated at the centre
of the candidate's cell, with every kernel at least as wide as the cell of its
observation: then density times cell width is the kernel's mass over the cell
to within a few percent (midpoint rule), and the width, common to ``l`` and
``g``, cancels in their ratio.

An observation in which a conditional parameter was inactive carries no
information about it: its kernel is uniform along that dimension. A candidate
that leaves a dimension inactive has that dimension integrated out, which for
a product kernel simply drops the factor. Both rules keep one joint model for
conditional spaces without splitting the history into groups.

All work is vectorised over kernels and candidates: numeric dimensions go
through three small matrix products (the expanded Gaussian quadratic form), so
the cost is a few BLAS calls even for ten thousand kernels. At the sizes a
suggestion fits (a few hundred kernels, a few dimensions) the cost is the
number of numpy calls rather than the arithmetic, so the numeric columns are
kept as rows (kernels along the last axis, the layout of the coefficient
matrix), TPE's two estimators are fitted in one pass
(:meth:`ParzenEstimator.fit_groups`), the normal CDFs at the interval's ends
serve both the normalising constants and sampling, and a categorical column's
probabilities come from a small table per choice, shared across fits. None of
it changes a result: every value is computed by the same operations on the
same numbers as the plain formulation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.special import ndtr, ndtri

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def truncnorm_log_z(mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Log of the normal mass that falls in ``[0, 1]``, element-wise, for ``mu`` in ``[0, 1]``.

    With the mean inside the interval the mass is never small (at least
    ``Phi(0) - Phi(-1/sigma)``), so the plain difference of CDFs loses nothing.
    Kernels more than 8 sigmas from both ends lose less than 1e-15 of their
    mass; skipping their (slow, tail-branch) CDFs halves the fitting time.
    """
    mu, sigma = np.broadcast_arrays(np.asarray(mu, dtype=float), np.asarray(sigma, dtype=float))
    to_low, to_high = mu / sigma, (1.0 - mu) / sigma
    out = np.zeros(mu.shape)
    near = (to_low < 8.0) | (to_high < 8.0)
    out[near] = np.log(ndtr(to_high[near]) - ndtr(-to_low[near]))
    return out


def truncnorm_log_pdf(x: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Log density on ``[0, 1]`` of a normal ``(mu, sigma)`` truncated to ``[0, 1]``."""
    z = (x - mu) / sigma
    return np.asarray(-0.5 * z * z - np.log(sigma) - _LOG_SQRT_2PI - truncnorm_log_z(mu, sigma))


def truncnorm_sample(rng: np.random.Generator, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """One draw per element from normals ``(mu, sigma)`` truncated to ``[0, 1]``.

    Inverse-CDF sampling: the kernels' means always lie in ``[0, 1]``, so the
    truncation interval holds the mean and the CDF values at its ends are
    never both lost in a tail.
    """
    a = ndtr((0.0 - mu) / sigma)
    b = ndtr((1.0 - mu) / sigma)
    return _truncnorm_invert(a, b, mu, sigma, rng.random(np.shape(mu)))


def _truncnorm_invert(
    a: np.ndarray, b: np.ndarray, mu: np.ndarray, sigma: np.ndarray, r: np.ndarray
) -> np.ndarray:
    """:func:`truncnorm_sample`'s draws for uniforms ``r``, the CDF being ``a``, ``b`` at 0, 1."""
    u = a + r * (b - a)
    u = np.minimum(np.maximum(u, 1e-300), 1.0 - 1e-16)
    return np.asarray(np.minimum(np.maximum(mu + sigma * ndtri(u), 0.0), 1.0))


@dataclass(frozen=True)
class Dims:
    """What each column of an encoded matrix is.

    Attributes:
        n_choices: Number of choices of each categorical column; 0 for numeric ones.
        discrete: True for numeric columns with a finite set of values (ints and
            stepped floats).
        numeric: Indices of the numeric columns (derived).
        numeric_cols: The numeric columns as a slice where they are consecutive
            (the usual layout), else their indices: a slice selects a view
            (derived).
        categorical: Indices of the categorical columns (derived).
    """

    n_choices: np.ndarray
    discrete: np.ndarray
    numeric: np.ndarray = field(init=False, repr=False, compare=False)
    numeric_cols: slice | np.ndarray = field(init=False, repr=False, compare=False)
    categorical: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Every estimator splits its columns this way: done once per space.
        numeric = np.flatnonzero(self.n_choices == 0)
        consecutive = numeric.size > 0 and int(numeric[-1] - numeric[0]) == numeric.size - 1
        cols = slice(int(numeric[0]), int(numeric[-1]) + 1) if consecutive else numeric
        object.__setattr__(self, "numeric", numeric)
        object.__setattr__(self, "numeric_cols", cols)
        object.__setattr__(self, "categorical", np.flatnonzero(self.n_choices > 0))


@dataclass(frozen=True)
class Bandwidth:
    """How kernel widths are chosen.

    Attributes:
        rule: ``neighbor`` (each kernel as wide as the larger gap to its
            neighbours along the dimension, as in Optuna and Hyperopt) or
            ``scott`` (one width per dimension, Scott's rule scaled to the range).
        magic_clip: Floor widths at ``1 / min(100, n_kernels)`` so that a tight
            cluster of observations cannot shrink a kernel to a spike.
        min_width: A floor applied in any case (unit-cube units).
        consider_endpoints: Whether the cube's ends count as neighbours of the
            outermost observations (widens the kernels at the edges).
        clip_count: A second kernel count for the magic clip (the history's
            size); 0 means only the estimator's own count is used.
        clip_lean: With ``clip_count``, the clip uses ``own^(1-lean) * clip_count^lean``.
    """

    rule: str = "neighbor"
    magic_clip: bool = True
    min_width: float = 1e-3
    consider_endpoints: bool = False
    clip_count: int = 0
    clip_lean: float = 0.0


@dataclass(frozen=True)
class Candidates:
    """Candidate points as every estimator's :meth:`ParzenEstimator.log_pdf_of` reads them.

    Attributes:
        features: ``(m, 3k + 1)`` features ``[x^2, x, active, 1]`` of the ``k``
            numeric columns (see :func:`numeric_features`).
        choices: For each categorical column, the candidates' choice indices
            (0 where inactive) and their ``(m, 1)`` activity, None when all
            are active.
    """

    features: np.ndarray
    choices: dict[int, tuple[np.ndarray, np.ndarray | None]]


def candidates(x: np.ndarray, act: np.ndarray, dims: Dims) -> Candidates:
    """Prepare ``(m, d)`` candidates with their ``(m, d)`` activity for density evaluation."""
    choices: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
    for j in dims.categorical.tolist():
        act_j = act[:, j]
        if act_j.all():
            choices[j] = (x[:, j].astype(int), None)
        else:
            choices[j] = (np.where(act_j, x[:, j], 0).astype(int), act[:, j : j + 1])
    return Candidates(numeric_features(x, act, dims), choices)


def numeric_features(x: np.ndarray, act: np.ndarray, dims: Dims) -> np.ndarray:
    """``(m, 3k + 1)`` features ``[x^2, x, active, 1]`` of candidates' ``k`` numeric columns.

    What :meth:`ParzenEstimator.log_pdf_of` multiplies its coefficients by;
    inactive columns are zeroed.
    """
    m, k = x.shape[0], dims.numeric.size
    out = np.empty((m, 3 * k + 1))
    a = act[:, dims.numeric_cols]
    xc = x[:, dims.numeric_cols]
    if a.all():
        out[:, 2 * k :] = 1.0
    else:
        out[:, 2 * k : 3 * k] = a
        out[:, 3 * k] = 1.0
        xc = np.where(a, xc, 0.0)
    np.multiply(xc, xc, out=out[:, :k])
    out[:, k : 2 * k] = xc
    return out


class ParzenEstimator:
    """A mixture of product kernels fitted to encoded observations.

    Args:
        observations: ``(n, d)`` encoded points: unit coordinates for numeric
            columns, choice indices for categorical ones, NaN where inactive.
        weights: ``(n,)`` non-negative weights of the observations.
        dims: What each column is.
        prior_weight: Weight of the prior kernel relative to one observation of
            weight 1; the prior is uniform over categories and a normal of
            width 1 centred on 0.5 for numeric columns.
        bandwidth: How widths are chosen.
        min_widths: ``(n, d)`` per-observation floors on kernel widths (the
            width of the observation's cell along discrete columns), or None.
    """

    # Set by :meth:`_fit`, for one estimator or several at once.
    dims: Dims
    weights: np.ndarray  # (n + 1,) normalised, the prior last
    _draw: np.ndarray  # (4, k, n + 1): CDF at 0 and at 1, mean, width, per numeric column
    _inactive: np.ndarray | None  # (k, n + 1) kernels uniform along a column, None if none is
    _coef: np.ndarray  # (3k + 1, n + 1) coefficients of the features [x^2, x, active, 1]
    # Per categorical column: its index, (C, n + 1) log probabilities by candidate
    # choice, each kernel's kind (its choice; C: uniform), (C + 1, C) CDFs by kind.
    _choices: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]
    _cdf: np.ndarray | None  # (n + 1,) cumulative weights, built on the first draw

    def __init__(
        self,
        observations: np.ndarray,
        weights: np.ndarray,
        dims: Dims,
        prior_weight: float = 1.0,
        bandwidth: Bandwidth | None = None,
        min_widths: np.ndarray | None = None,
    ) -> None:
        obs = np.asarray(observations, dtype=float).reshape(-1, len(dims.n_choices))
        weights = np.asarray(weights, dtype=float)[: obs.shape[0]]
        floors = None if min_widths is None else np.asarray(min_widths, dtype=float)
        self._fit([self], obs, [weights], dims, prior_weight, bandwidth or Bandwidth(), floors)

    @classmethod
    def fit_groups(
        cls,
        observations: np.ndarray,
        weights: Sequence[np.ndarray],
        dims: Dims,
        prior_weight: float,
        bandwidth: Bandwidth,
        min_widths: np.ndarray | None,
    ) -> list[ParzenEstimator]:
        """One estimator per group of consecutive rows, each as if constructed alone.

        Fitting the groups together (TPE's good and bad ones) shares every
        element-wise step between them, which at these sizes halves the
        number of numpy calls; every value is the one a separate fit gives.

        Args:
            observations: The groups' ``(n, d)`` rows, one group after the other.
            weights: Each group's weights; their lengths are the group sizes.
            dims: As for the constructor.
            prior_weight: As for the constructor.
            bandwidth: As for the constructor.
            min_widths: As for the constructor, rows as in ``observations``.
        """
        estimators = [cls.__new__(cls) for _ in weights]
        cls._fit(estimators, observations, weights, dims, prior_weight, bandwidth, min_widths)
        return estimators

    @staticmethod
    def _fit(
        estimators: Sequence[ParzenEstimator],
        obs: np.ndarray,
        weights: Sequence[np.ndarray],
        dims: Dims,
        prior_weight: float,
        bandwidth: Bandwidth,
        min_widths: np.ndarray | None,
    ) -> None:
        spans, columns = _kernel_spans(weights)
        normalised = _normalised_weights(spans, weights, prior_weight, columns)
        draw, log_z, masked = _numeric_kernels(obs, dims, spans, columns, bandwidth, min_widths)
        coef = _coefficients(draw, log_z, masked, normalised)
        kinds_by_column = _choice_kinds(obs, dims, spans, columns)
        for est, (_, c, n) in zip(estimators, spans, strict=True):
            end = c + n + 1
            est.dims = dims
            est.weights = normalised[c:end]
            est._draw = draw[:, :, c:end]
            est._inactive = None if masked is None else masked[:, c:end]
            est._coef = np.ascontiguousarray(coef[:, c:end])
            est._cdf = None
            est._choices = []
            for j, n_choices, kinds in kinds_by_column:
                log_p_t, cdf = _choice_tables(n, n_choices, prior_weight)
                # (C, n + 1): one row per candidate choice, kernels along it.
                est._choices.append((j, log_p_t[:, kinds[c:end]], kinds[c:end], cdf))

    @property
    def n_kernels(self) -> int:
        """Observations plus the prior."""
        return int(self.weights.shape[0])

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """Draw ``size`` raw points (numeric columns not yet snapped to their cells)."""
        if self._cdf is None:
            # Normalised as numpy's Generator.choice does, so that drawing with
            # searchsorted gives the same kernels without its checks.
            cdf = np.cumsum(self.weights)
            cdf /= cdf[-1]
            self._cdf = cdf
        num = self.dims.numeric_cols
        kd = self.dims.numeric.size
        # Every uniform in one call, in the order of separate calls (kernels,
        # then per numeric column a truncated normal's and an inactive
        # column's, then per categorical column one): the same stream.
        uniforms = rng.random(size * (1 + 2 * kd + len(self._choices)))
        k = np.searchsorted(self._cdf, uniforms[:size], side="right")
        out = np.empty((size, len(self.dims.n_choices)))
        at = size
        if kd:
            low, high, mu, sigma = self._draw[:, :, k]
            r = uniforms[at : at + size * kd].reshape(size, kd)
            drawn = _truncnorm_invert(low, high, mu, sigma, r.T)
            # Drawn whether used or not: the generator's stream must not depend on it.
            uniform = uniforms[at + size * kd : at + 2 * size * kd].reshape(size, kd)
            at += 2 * size * kd
            if self._inactive is not None:
                out[:, num] = np.where(self._inactive[:, k].T, uniform, drawn.T)
            else:
                out[:, num] = drawn.T
        for j, _, kinds, cdf_table in self._choices:
            cdf = cdf_table[kinds[k]]
            u = uniforms[at : at + size] * cdf[:, -1]
            at += size
            out[:, j] = np.minimum((cdf < u[:, None]).sum(axis=1), cdf.shape[1] - 1)
        return out

    def log_pdf(self, x: np.ndarray, active: np.ndarray) -> np.ndarray:
        """Log density of candidates (probability along categorical columns).

        Args:
            x: ``(m, d)`` candidates, numeric columns snapped to their cells,
                categorical columns holding choice indices.
            active: ``(m, d)`` which columns each candidate uses; the others are
                integrated out.
        """
        x = np.atleast_2d(np.asarray(x, dtype=float))
        act = np.asarray(active, dtype=bool).reshape(x.shape)
        return self.log_pdf_of(candidates(x, act, self.dims))

    def log_pdf_of(self, cands: Candidates) -> np.ndarray:
        """:meth:`log_pdf` of :func:`candidates` (prepared once for both estimators)."""
        acc = cands.features @ self._coef
        for j, table, _, _ in self._choices:
            idx, act = cands.choices[j]
            if act is None:
                acc += table[idx]
            else:
                acc += np.where(act, table[idx], 0.0)
        top = acc.max(axis=1, keepdims=True)
        # The sum of exponentials runs in float32 (four times faster than
        # float64 here); terms below exp(-80) relative to the largest cannot
        # change the sum and are clipped to stay normal numbers.
        rel = (acc - top).astype(np.float32)
        np.maximum(rel, -80.0, out=rel)
        np.exp(rel, out=rel)
        return np.asarray(np.log(rel.sum(axis=1, dtype=np.float64)) + top[:, 0])


# A group of kernels in the fitted columns: (start row in the observations,
# start column, number of observations); its prior kernel follows them.
_Span = tuple[int, int, int]


def _kernel_spans(weights: Sequence[np.ndarray]) -> tuple[list[_Span], int]:
    """Where each group's kernels go, and how many kernel columns there are in all.

    Kernels in columns: each group's observations then its prior, group after group.
    """
    spans: list[_Span] = []
    row = column = 0
    for w in weights:
        spans.append((row, column, w.shape[0]))
        row += w.shape[0]
        column += w.shape[0] + 1
    return spans, column


def _normalised_weights(
    spans: Sequence[_Span], weights: Sequence[np.ndarray], prior_weight: float, columns: int
) -> np.ndarray:
    """``(columns,)`` kernel weights, each group's (prior last) summing to 1.

    A group with no observations, or no positive weight, weighs its kernels equally.
    """
    normalised = np.empty(columns)
    for (_, c, n), w in zip(spans, weights, strict=True):
        group = normalised[c : c + n + 1]
        group[:n] = w
        group[n] = prior_weight
        total = group.sum()
        if n == 0 or total <= 0:
            group[:] = 1.0
            total = group.sum()
        group /= total
    return normalised


def _numeric_kernels(
    obs: np.ndarray,
    dims: Dims,
    spans: Sequence[_Span],
    columns: int,
    bandwidth: Bandwidth,
    min_widths: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The numeric columns' kernels, as rows with the kernels along them.

    An inactive observation is uniform along the column (mean 0.5, width 1,
    marked inactive). Masking is skipped when nothing is inactive (the usual
    case): the masked values would be the unmasked ones.

    Returns:
        ``(4, k, columns)``: the normal CDF at 0 and at 1, the mean and the
        width of each kernel; ``(k, columns)`` log of each kernel's mass in
        ``[0, 1]``; ``(k, columns)`` which kernels are inactive along which
        column, None when none is.
    """
    k = dims.numeric.size
    xt = obs.T[dims.numeric_cols]
    inactive = np.isnan(xt)
    any_inactive = bool(inactive.any())
    means = np.where(inactive, 0.5, xt) if any_inactive else xt
    floors = None if min_widths is None else min_widths.T[dims.numeric_cols]
    n_dims = len(dims.n_choices)
    draw = np.empty((4, k, columns))
    mu, sigma = draw[2], draw[3]
    for r, c, n in spans:
        mu[:, c : c + n] = means[:, r : r + n]
        mu[:, c + n] = 0.5
        widths = _widths(xt[:, r : r + n], n_dims, bandwidth, inactive[:, r : r + n])
        if floors is not None:
            np.maximum(widths, floors[:, r : r + n], out=widths)
        sigma[:, c : c + n] = widths
        sigma[:, c + n] = 1.0
    # The normal CDF at both ends of [0, 1]: what sampling inverts, and
    # the log of the mass in between (see :func:`truncnorm_log_z`, whose
    # values these are, computed once for both uses).
    to_low, to_high = mu / sigma, (1.0 - mu) / sigma
    ndtr(-to_low, out=draw[0])
    ndtr(to_high, out=draw[1])
    near = np.minimum(to_low, to_high) < 8.0
    log_z = np.where(near, np.log(draw[1] - draw[0]), 0.0)
    masked = None
    if any_inactive:
        masked = np.zeros((k, columns), dtype=bool)
        for r, c, n in spans:
            masked[:, c : c + n] = inactive[:, r : r + n]
    return draw, log_z, masked


def _coefficients(
    draw: np.ndarray, log_z: np.ndarray, masked: np.ndarray | None, normalised: np.ndarray
) -> np.ndarray:
    """``(3k + 1, columns)`` coefficients of the features ``[x^2, x, active, 1]``.

    Pieces of the expanded quadratic form; an inactive kernel has zero
    precision and zero constant: density 1. One matrix product gives every
    numeric term and the log weights: features times the rows of the coefficients.
    """
    mu, sigma = draw[2], draw[3]
    k, columns = mu.shape
    prec = 1.0 / sigma**2
    const = -np.log(sigma) - _LOG_SQRT_2PI - log_z
    if masked is not None:
        prec[masked] = 0.0
        const[masked] = 0.0
    coef = np.empty((3 * k + 1, columns))
    np.multiply(prec, -0.5, out=coef[:k])
    np.multiply(mu, prec, out=coef[k : 2 * k])
    np.subtract(const, 0.5 * mu**2 * prec, out=coef[2 * k : 3 * k])
    np.log(np.maximum(normalised, 1e-300), out=coef[3 * k])
    return coef


def _choice_kinds(
    obs: np.ndarray, dims: Dims, spans: Sequence[_Span], columns: int
) -> list[tuple[int, int, np.ndarray]]:
    """Per categorical column: its index, its number of choices and each kernel's kind.

    A kernel's kind is the choice it observed; the last kind, ``C``, is
    uniform (an inactive observation, or the prior).
    """
    out = []
    for j in dims.categorical.tolist():
        n_choices = int(dims.n_choices[j])
        col = obs[:, j]
        kinds = np.empty(columns, dtype=np.intp)
        kinds[:] = n_choices
        picked = np.where(np.isnan(col), n_choices, col)
        for r, c, n in spans:
            kinds[c : c + n] = picked[r : r + n]
        out.append((j, n_choices, kinds))
    return out


@functools.lru_cache(maxsize=64)
def _choice_tables(n: int, n_choices: int, prior_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """A categorical kernel's distribution by its choice, for ``n`` observations; read-only.

    Kernel ``c < C``: an observation of choice ``c``, smoothed by the prior;
    kernel ``C``: uniform (an inactive observation, or the prior). An
    estimator's kernels pick their rows by choice, so these depend on the
    estimator's size alone and are shared by the fits of one group size.

    Returns:
        ``(C, C + 1)`` log probabilities, one row per choice asked about and
        one column per kernel kind; ``(C + 1, C)`` cumulative probabilities,
        one row per kernel kind, which draws are taken from.
    """
    c = n_choices
    table = np.full((c + 1, c), prior_weight / (n + 1))
    table[np.arange(c), np.arange(c)] += 1.0
    table[c] = 1.0
    table /= table.sum(axis=1, keepdims=True)
    log_p = np.log(np.maximum(table, 1e-300))
    log_p_t, cdf = np.ascontiguousarray(log_p.T), np.cumsum(np.exp(log_p), axis=1)
    log_p_t.flags.writeable = cdf.flags.writeable = False
    return log_p_t, cdf


def _widths(
    xt: np.ndarray, n_dims: int, bw: Bandwidth, inactive: np.ndarray | None = None
) -> np.ndarray:
    """Kernel widths for numeric observations given as ``(k, n)`` rows (1 where inactive).

    ``inactive`` is ``np.isnan(xt)`` when the caller has it already.
    """
    k, n = xt.shape
    if n == 0 or k == 0:
        return np.ones(xt.shape)
    if inactive is None:
        inactive = np.isnan(xt)
    partial = inactive.any(axis=1)
    if partial.any():
        # Conditional columns differ in their active rows: those one at a time.
        sigmas = np.ones(xt.shape)
        full = np.flatnonzero(~partial)
        sigmas[full] = _widths(xt[full], n_dims, bw)
        for j in np.flatnonzero(partial).tolist():
            act = ~inactive[j]
            sigmas[j, act] = _widths(xt[j : j + 1, act], n_dims, bw)[0]
        return sigmas
    # As in Optuna: the range over min(100, 1 + number of kernels incl. the prior).
    count = n ** (1.0 - bw.clip_lean) * bw.clip_count**bw.clip_lean if bw.clip_count else n
    floor = 1.0 / min(100.0, count + 2.0) if bw.magic_clip else 0.0
    low = max(floor, bw.min_width)
    if bw.rule == "scott":
        widths = np.full(xt.shape, 0.2 * (n + 1) ** (-1.0 / (n_dims + 4)))
        return np.asarray(np.minimum(np.maximum(widths, low), 1.0))
    # Each width is the larger gap to the neighbours in sorted order; clipped
    # there, then put back in the observations' order.
    order = xt.argsort(axis=1)
    rows = np.arange(k)[:, None]
    padded = np.empty((k, n + 2))
    padded[:, 0] = 0.0
    padded[:, -1] = 1.0
    padded[:, 1:-1] = xt[rows, order]
    gaps = padded[:, 1:] - padded[:, :-1]
    sorted_w = np.maximum(gaps[:, :-1], gaps[:, 1:])
    if not bw.consider_endpoints and n >= 2:
        sorted_w[:, 0] = gaps[:, 1]
        sorted_w[:, -1] = gaps[:, -2]
    np.maximum(sorted_w, low, out=sorted_w)
    np.minimum(sorted_w, 1.0, out=sorted_w)
    widths = np.empty(xt.shape)
    widths[rows, order] = sorted_w
    return widths
