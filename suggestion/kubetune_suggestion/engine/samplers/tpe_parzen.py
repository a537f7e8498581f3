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
the cost is a few BLAS calls even for ten thousand kernels.
"""

from __future__ import annotations

import math
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
    u = a + rng.random(np.shape(mu)) * (b - a)
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
        categorical: Indices of the categorical columns (derived).
    """

    n_choices: np.ndarray
    discrete: np.ndarray
    numeric: np.ndarray = field(init=False, repr=False, compare=False)
    categorical: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Every estimator splits its columns this way: done once per space.
        object.__setattr__(self, "numeric", np.flatnonzero(self.n_choices == 0))
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

    def __init__(
        self,
        observations: np.ndarray,
        weights: np.ndarray,
        dims: Dims,
        prior_weight: float = 1.0,
        bandwidth: Bandwidth | None = None,
        min_widths: np.ndarray | None = None,
    ) -> None:
        bandwidth = bandwidth or Bandwidth()
        obs = np.asarray(observations, dtype=float).reshape(-1, len(dims.n_choices))
        n = obs.shape[0]
        self.dims = dims
        w = np.append(np.asarray(weights, dtype=float)[:n], prior_weight)
        total = w.sum()
        if n == 0 or total <= 0:
            w = np.ones(n + 1)
            total = w.sum()
        self.weights = w / total
        self.log_weights = np.log(np.maximum(self.weights, 1e-300))
        # The sampling CDF, normalised as numpy's Generator.choice does, so that
        # drawing with searchsorted gives the same kernels without its checks.
        self._cdf = np.cumsum(self.weights)
        self._cdf /= self._cdf[-1]

        # Numeric columns, kernels in rows, the prior last; an inactive
        # observation is uniform along the column (mean 0.5, marked inactive).
        # Masking is skipped when nothing is inactive (the usual case): the
        # masked values would be the unmasked ones.
        self._num = dims.numeric
        k = self._num.size
        obs_num = obs[:, self._num]
        inactive = np.isnan(obs_num)
        self._any_inactive = bool(inactive.any())
        self.inactive = np.concatenate([inactive, np.zeros((1, k), dtype=bool)])
        self.mus = np.full((n + 1, k), 0.5)
        self.mus[:n] = np.where(inactive, 0.5, obs_num) if self._any_inactive else obs_num
        self.sigmas = np.ones((n + 1, k))
        self.sigmas[:n] = _widths(obs_num, len(dims.n_choices), bandwidth, inactive)
        if min_widths is not None:
            np.maximum(self.sigmas[:n], min_widths[:, self._num], out=self.sigmas[:n])
        self.cat_logp: dict[int, np.ndarray] = {
            int(j): _categorical_table(
                obs[:, j], ~np.isnan(obs[:, j]), int(dims.n_choices[j]), prior_weight
            )
            for j in dims.categorical
        }

        log_z = truncnorm_log_z(self.mus, self.sigmas)
        # Pieces of the expanded quadratic form; an inactive kernel has zero
        # precision and zero constant: density 1.
        prec = 1.0 / self.sigmas**2
        const = -np.log(self.sigmas) - _LOG_SQRT_2PI - log_z
        if self._any_inactive:
            prec = np.where(self.inactive, 0.0, prec)
            const = np.where(self.inactive, 0.0, const)
        # One matrix product gives every numeric term and the log weights:
        # features [x^2, x, active, 1] times these rows.
        self._coef = np.concatenate(
            [
                -0.5 * prec.T,
                (self.mus * prec).T,
                (const - 0.5 * self.mus**2 * prec).T,
                self.log_weights[None, :],
            ]
        )

    @property
    def n_kernels(self) -> int:
        """Observations plus the prior."""
        return int(self.weights.shape[0])

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """Draw ``size`` raw points (numeric columns not yet snapped to their cells)."""
        k = np.searchsorted(self._cdf, rng.random(size), side="right")
        out = np.empty((size, len(self.dims.n_choices)))
        if self._num.size:
            drawn = truncnorm_sample(rng, self.mus[k], self.sigmas[k])
            # Drawn whether used or not: the generator's stream must not depend on it.
            uniform = rng.random(drawn.shape)
            out[:, self._num] = (
                np.where(self.inactive[k], uniform, drawn) if self._any_inactive else drawn
            )
        for j, table in self.cat_logp.items():
            cdf = np.cumsum(np.exp(table[k]), axis=1)
            u = rng.random(size) * cdf[:, -1]
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
        return self.log_pdf_of(numeric_features(x, act, self._num), x, act)

    def log_pdf_of(self, features: np.ndarray, x: np.ndarray, act: np.ndarray) -> np.ndarray:
        """:meth:`log_pdf` given the candidates' :func:`numeric_features` (shared by estimators).

        Args:
            features: ``numeric_features(x, act, dims.numeric)``.
            x: ``(m, d)`` candidates, as for :meth:`log_pdf`.
            act: ``(m, d)`` boolean activity mask, as for :meth:`log_pdf`.
        """
        acc = features @ self._coef
        for j, table in self.cat_logp.items():
            idx = np.where(act[:, j], x[:, j], 0).astype(int)
            acc += np.where(act[:, j : j + 1], table[:, idx].T, 0.0)
        top = acc.max(axis=1, keepdims=True)
        # The sum of exponentials runs in float32 (four times faster than
        # float64 here); terms below exp(-80) relative to the largest cannot
        # change the sum and are clipped to stay normal numbers.
        rel = (acc - top).astype(np.float32)
        np.maximum(rel, -80.0, out=rel)
        np.exp(rel, out=rel)
        return np.asarray(np.log(rel.sum(axis=1, dtype=np.float64)) + top[:, 0])


def numeric_features(x: np.ndarray, act: np.ndarray, numeric: np.ndarray) -> np.ndarray:
    """``(m, 3k + 1)`` features ``[x^2, x, active, 1]`` of candidates' ``k`` numeric columns.

    What :meth:`ParzenEstimator.log_pdf_of` multiplies its coefficients by;
    inactive columns are zeroed.
    """
    a = act[:, numeric].astype(float)
    xc = np.where(a > 0, x[:, numeric], 0.0)
    return np.concatenate([xc * xc, xc, a, np.ones((x.shape[0], 1))], axis=1)


def _categorical_table(
    col: np.ndarray, act: np.ndarray, n_choices: int, prior_weight: float
) -> np.ndarray:
    """``(n + 1, C)`` log probabilities: each observation's choice smoothed by the prior."""
    n = col.shape[0]
    table = np.full((n + 1, n_choices), prior_weight / (n + 1))
    rows = np.flatnonzero(act)
    table[rows, col[rows].astype(int)] += 1.0
    table[:n][~act] = 1.0
    table[-1] = 1.0  # the prior: uniform whatever its weight
    table /= table.sum(axis=1, keepdims=True)
    return np.log(np.maximum(table, 1e-300))


def _widths(
    x: np.ndarray, n_dims: int, bw: Bandwidth, inactive: np.ndarray | None = None
) -> np.ndarray:
    """Kernel widths for ``(n, k)`` numeric observations (1 where inactive).

    ``inactive`` is ``np.isnan(x)`` when the caller has it already.
    """
    n = x.shape[0]
    if n == 0 or x.shape[1] == 0:
        return np.ones(x.shape)
    if inactive is None:
        inactive = np.isnan(x)
    partial = inactive.any(axis=0)
    if partial.any():
        # Conditional columns differ in their active rows: those one at a time.
        sigmas = np.ones(x.shape)
        full = np.flatnonzero(~partial)
        sigmas[:, full] = _widths(x[:, full], n_dims, bw)
        for j in np.flatnonzero(partial):
            act = ~inactive[:, j]
            sigmas[act, j] = _widths(x[act, j : j + 1], n_dims, bw)[:, 0]
        return sigmas
    if bw.rule == "scott":
        widths = np.full(x.shape, 0.2 * (n + 1) ** (-1.0 / (n_dims + 4)))
    else:
        # Column-major work on the transposed copy: sorting along contiguous rows.
        xt = np.ascontiguousarray(x.T)
        order = xt.argsort(axis=1)
        k = xt.shape[0]
        rows = np.arange(k)[:, None]
        padded = np.concatenate([np.zeros((k, 1)), xt[rows, order], np.ones((k, 1))], axis=1)
        gaps = padded[:, 1:] - padded[:, :-1]
        sorted_w = np.maximum(gaps[:, :-1], gaps[:, 1:])
        if not bw.consider_endpoints and n >= 2:
            sorted_w[:, 0] = padded[:, 2] - padded[:, 1]
            sorted_w[:, -1] = padded[:, -2] - padded[:, -3]
        widths_t = np.empty(xt.shape)
        widths_t[rows, order] = sorted_w
        widths = widths_t.T
    # As in Optuna: the range over min(100, 1 + number of kernels incl. the prior).
    count = n ** (1.0 - bw.clip_lean) * bw.clip_count**bw.clip_lean if bw.clip_count else n
    floor = 1.0 / min(100.0, count + 2.0) if bw.magic_clip else 0.0
    return np.asarray(np.minimum(np.maximum(widths, max(floor, bw.min_width)), 1.0))
