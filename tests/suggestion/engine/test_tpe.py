"""TPE numerics: the Parzen estimator, the encoding, the ranking, and behaviour on toy problems."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from scipy import integrate, stats

from kubetune_suggestion.engine.history import Direction, RecordState, TrialRecord
from kubetune_suggestion.engine.samplers.tpe import TPESampler, _best_first, default_weights, thin
from kubetune_suggestion.engine.samplers.tpe_encoding import Encoder
from kubetune_suggestion.engine.samplers.tpe_parzen import (
    Bandwidth,
    Dims,
    ParzenEstimator,
    truncnorm_log_pdf,
    truncnorm_sample,
)
from kubetune_suggestion.engine.space import SearchSpace, SpaceError


def numeric_dims(d: int) -> Dims:
    return Dims(n_choices=np.zeros(d, dtype=int), discrete=np.zeros(d, dtype=bool))


# -- truncated normal ------------------------------------------------------------


@pytest.mark.parametrize(
    "mu,sigma", [(0.5, 1.0), (0.0, 0.01), (1.0, 0.3), (0.2, 0.05), (0.93, 2.0)]
)
def test_truncnorm_log_pdf_matches_scipy(mu: float, sigma: float) -> None:
    x = np.linspace(0.0, 1.0, 41)
    a, b = (0.0 - mu) / sigma, (1.0 - mu) / sigma
    expected = stats.truncnorm.logpdf(x, a, b, loc=mu, scale=sigma)
    got = truncnorm_log_pdf(x, np.full_like(x, mu), np.full_like(x, sigma))
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


def test_truncnorm_samples_stay_in_the_cube_and_match_scipy_mean() -> None:
    rng = np.random.default_rng(0)
    mu, sigma = np.full(20000, 0.9), np.full(20000, 0.3)
    draws = truncnorm_sample(rng, mu, sigma)
    assert draws.min() >= 0.0 and draws.max() <= 1.0
    expected = stats.truncnorm.mean((0 - 0.9) / 0.3, (1 - 0.9) / 0.3, loc=0.9, scale=0.3)
    assert abs(draws.mean() - expected) < 0.01


# -- Parzen estimator ------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 5, 40])
def test_parzen_density_integrates_to_one_in_1d(n: int) -> None:
    obs = np.random.default_rng(n).random((n, 1))
    pe = ParzenEstimator(obs, default_weights(n), numeric_dims(1))

    def density(u: float) -> float:
        return float(np.exp(pe.log_pdf(np.array([[u]]), np.ones((1, 1), dtype=bool)))[0])

    total, _ = integrate.quad(density, 0.0, 1.0, limit=400, points=list(obs[:, 0]))
    assert total == pytest.approx(1.0, abs=1e-6)


def test_parzen_density_integrates_to_one_in_2d() -> None:
    obs = np.random.default_rng(3).random((6, 2))
    pe = ParzenEstimator(obs, np.ones(6), numeric_dims(2))
    grid = (np.arange(400) + 0.5) / 400
    xx, yy = np.meshgrid(grid, grid)
    points = np.column_stack([xx.ravel(), yy.ravel()])
    total = np.exp(pe.log_pdf(points, np.ones(points.shape, dtype=bool))).mean()
    assert total == pytest.approx(1.0, abs=2e-3)


def test_categorical_probabilities_sum_to_one() -> None:
    obs = np.array([[0.0], [2.0], [2.0], [np.nan]])
    dims = Dims(n_choices=np.array([3]), discrete=np.array([False]))
    pe = ParzenEstimator(obs, np.ones(4), dims)
    x = np.array([[0.0], [1.0], [2.0]])
    probs = np.exp(pe.log_pdf(x, np.ones((3, 1), dtype=bool)))
    assert probs.sum() == pytest.approx(1.0)
    assert probs[2] > probs[0] > probs[1]


def test_inactive_columns_are_integrated_out() -> None:
    # The marginal of a product mixture along the first column: integrate the
    # joint density over the second and compare with the masked evaluation.
    rng = np.random.default_rng(5)
    obs = rng.random((7, 2))
    obs[2, 1] = np.nan  # an observation where the second parameter was inactive
    pe = ParzenEstimator(obs, np.ones(7), numeric_dims(2))
    for u in (0.1, 0.5, 0.77):
        grid = (np.arange(2000) + 0.5) / 2000
        joint = np.exp(
            pe.log_pdf(np.column_stack([np.full_like(grid, u), grid]), np.ones((2000, 2), bool))
        )
        masked = np.exp(pe.log_pdf(np.array([[u, 0.3]]), np.array([[True, False]])))[0]
        assert masked == pytest.approx(joint.mean(), rel=1e-3)


def test_parzen_matches_optuna() -> None:
    optuna = pytest.importorskip("optuna")
    from optuna.samplers._tpe import parzen_estimator as ope
    from optuna.samplers._tpe.sampler import default_weights as optuna_weights

    rng = np.random.default_rng(11)
    for n in (1, 3, 30, 60):
        obs = rng.random((n, 3))
        space = {f"x{i}": optuna.distributions.FloatDistribution(0, 1) for i in range(3)}
        params = ope._ParzenEstimatorParameters(1.0, True, False, optuna_weights, True)
        theirs = ope._ParzenEstimator({f"x{i}": obs[:, i] for i in range(3)}, space, params)
        ours = ParzenEstimator(obs, default_weights(n), numeric_dims(3))
        x = rng.random((16, 3))
        expected = theirs.log_pdf({f"x{i}": x[:, i] for i in range(3)})
        np.testing.assert_allclose(ours.log_pdf(x, np.ones((16, 3), bool)), expected, atol=1e-6)


def test_samples_are_inside_and_valid() -> None:
    obs = np.array([[0.0, 0.1, 1.0], [1.0, 0.9, np.nan], [2.0, np.nan, 0.5]])
    dims = Dims(n_choices=np.array([3, 0, 0]), discrete=np.array([False, False, True]))
    pe = ParzenEstimator(obs, np.ones(3), dims)
    draws = pe.sample(np.random.default_rng(0), 500)
    assert set(np.unique(draws[:, 0])) <= {0.0, 1.0, 2.0}
    assert np.all((draws[:, 1:] >= 0) & (draws[:, 1:] <= 1))


def test_thinning_keeps_total_weight_and_the_newest() -> None:
    keep, weights = thin(1000, 300)  # explicit budget, not the default
    assert len(keep) <= 300 and len(keep) == len(weights)
    assert weights.sum() == pytest.approx(default_weights(1000).sum())
    assert list(keep[-150:]) == list(range(850, 1000))
    assert np.all(np.diff(keep) > 0)
    keep, weights = thin(200, 300)
    assert list(keep) == list(range(200))


# -- encoding ----------------------------------------------------------------------

SPACE = SearchSpace.from_spec(
    [
        {"name": "lr", "type": "float", "min": 1e-5, "max": 1e-1, "log": True},
        {"name": "bs", "type": "int", "min": 16, "max": 512, "log": True},
        {"name": "layers", "type": "int", "min": 1, "max": 6},
        {"name": "frac", "type": "float", "min": 0.0, "max": 1.0, "step": 0.3},
        {"name": "opt", "type": "categorical", "values": ["adam", "sgd", True, 1]},
        {"name": "momentum", "type": "float", "min": 0.5, "max": 0.99, "when": {"opt": "sgd"}},
    ]
)


def random_configs(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [SPACE.decode({p.name: float(rng.random()) for p in SPACE}) for _ in range(n)]


def test_encoding_matches_to_unit() -> None:
    configs = random_configs(200)
    encoder = Encoder(SPACE)
    x = encoder.encode(configs)
    for i, config in enumerate(configs):
        for j, p in enumerate(SPACE.params):
            if p.name not in config:
                assert math.isnan(x[i, j])
            elif p.type == "categorical":
                assert x[i, j] == SPACE["opt"].index(config["opt"])  # type: ignore[union-attr]
            else:
                assert x[i, j] == pytest.approx(p.to_unit(config[p.name]), abs=1e-12)  # type: ignore[arg-type]


def test_snapping_agrees_with_from_unit() -> None:
    encoder = Encoder(SPACE)
    u = np.random.default_rng(1).random((500, len(SPACE)))
    u[:, 4] = np.floor(u[:, 4] * 4)
    snapped = encoder.snap(u)
    for row_raw, row in zip(u, snapped, strict=True):
        for j, p in enumerate(SPACE.params):
            if p.type in ("int",) or (p.type == "float" and p.step is not None):  # type: ignore[union-attr]
                assert p.from_unit(row[j]) == p.from_unit(row_raw[j])
                assert p.to_unit(p.from_unit(row[j])) == pytest.approx(row[j], abs=1e-9)  # type: ignore[arg-type]


def test_invalid_values_encode_as_missing() -> None:
    encoder = Encoder(SPACE)
    x = encoder.encode([{"lr": "oops", "bs": None, "layers": 3, "frac": 0.3, "opt": "nope"}])
    assert math.isnan(x[0, 0]) and math.isnan(x[0, 1]) and math.isnan(x[0, 4])


# -- the sampler ---------------------------------------------------------------------

LINE = SearchSpace.from_spec([{"name": "x", "type": "float", "min": -5.0, "max": 5.0}])


def run(sampler: TPESampler, objective: Any, trials: int, batch: int = 1) -> list[TrialRecord]:
    history: list[TrialRecord] = []
    state = None
    while len(history) < trials:
        out = sampler.suggest(history, batch, state)
        state = out.state
        for config in out.configs:
            history.append(
                TrialRecord(len(history), config, RecordState.SUCCEEDED, objective(config))
            )
    return history


@pytest.mark.parametrize("direction", list(Direction))
@pytest.mark.parametrize("multivariate", [True, False])
def test_concentrates_near_the_optimum_of_a_quadratic(
    direction: Direction, multivariate: bool
) -> None:
    sign = 1.0 if direction is Direction.MINIMIZE else -1.0
    sampler = TPESampler(LINE, direction, seed=3, options={"multivariate": multivariate})
    history = run(sampler, lambda c: sign * (c["x"] - 1.3) ** 2, 60)
    late = [t.params["x"] for t in history[-20:]]
    assert abs(float(np.median(late)) - 1.3) < 0.3
    assert min(abs(t.params["x"] - 1.3) for t in history) < 0.05


def test_a_batch_spreads_out_around_running_trials() -> None:
    sampler = TPESampler(LINE, seed=0)
    history = run(sampler, lambda c: (c["x"] - 1.3) ** 2, 30)
    running = [TrialRecord(30 + i, {"x": 1.3 + 0.01 * i}, RecordState.RUNNING) for i in range(4)]
    batch = sampler.suggest(history + running, 8, {"calls": 99}).configs
    xs = sorted(c["x"] for c in batch)
    assert len(set(xs)) == 8
    # Constant liar: not all eight on the running cluster.
    assert sum(abs(x - 1.3) < 0.05 for x in xs) < 8


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("direction", list(Direction))
def test_good_group_is_optunas_with_pruned_trials(seed: int, direction: Direction) -> None:
    """Few succeeded trials and many pruned at rungs 1, 3 and 9: the split is Optuna's.

    Optuna's ``_split_trials`` ranks pruned trials below every complete one,
    those that reported a later step first, then by their last value.
    """
    import optuna
    from optuna.samplers._tpe.sampler import _split_trials

    rng = np.random.default_rng(seed)
    history: list[TrialRecord] = []
    frozen: list[optuna.trial.FrozenTrial] = []
    for number in range(int(rng.integers(12, 60))):
        x = float(rng.uniform(-5, 5))
        state, value, steps = RecordState.PRUNED, None, {}
        kind = rng.random()
        if kind < 0.1:
            state, value = RecordState.SUCCEEDED, float(rng.random())
        elif kind < 0.15:
            state = RecordState.RUNNING
        else:
            # A falling curve whose last value overlaps other rungs' values.
            depth = int(rng.choice([1, 3, 9]))
            steps = {s: float(rng.random()) + 1.0 / s for s in range(1, depth + 1)}
            value = steps[depth]
        history.append(TrialRecord(number, {"x": x}, state, value, steps))
        optuna_state = {
            RecordState.SUCCEEDED: optuna.trial.TrialState.COMPLETE,
            RecordState.PRUNED: optuna.trial.TrialState.PRUNED,
            RecordState.RUNNING: optuna.trial.TrialState.RUNNING,
        }[state]
        trial = optuna.trial.create_trial(
            state=optuna_state,
            value=value if state is RecordState.SUCCEEDED else None,
            intermediate_values=steps,
        )
        trial.number = number
        frozen.append(trial)
    study = optuna.create_study(direction=direction.value)
    sampler = TPESampler(LINE, direction, seed=0)
    obs = sampler._observe(history)
    below, _ = _split_trials(study, frozen, sampler._n_below(obs.n_finished))
    assert {history[i].number for i in np.flatnonzero(obs.below)} == {t.number for t in below}


@pytest.mark.parametrize(
    "gamma,expected",
    [(0.2, {7}), (0.4, {7, 0}), (0.6, {7, 0, 5}), (0.8, {7, 0, 5, 4}), (1.0, {7, 0, 5, 4, 3})],
)
def test_good_group_never_holds_failed_nan_or_running(gamma: float, expected: set[int]) -> None:
    sampler = TPESampler(LINE, Direction.MAXIMIZE, seed=0, options={"gamma": gamma})
    history = [
        TrialRecord(0, {"x": 0.0}, RecordState.SUCCEEDED, 1.0),
        TrialRecord(1, {"x": 1.0}, RecordState.SUCCEEDED, math.nan),
        TrialRecord(2, {"x": 2.0}, RecordState.FAILED),
        TrialRecord(3, {"x": 3.0}, RecordState.PRUNED, 5.0, steps={1: 5.0}),
        TrialRecord(4, {"x": 4.0}, RecordState.PRUNED, 9.0, steps={1: 9.0}),
        TrialRecord(5, {"x": -1.0}, RecordState.PRUNED, 0.5, steps={1: 0.1, 3: 0.5}),
        TrialRecord(6, {"x": -2.0}, RecordState.RUNNING),
        TrialRecord(7, {"x": -3.0}, RecordState.SUCCEEDED, 2.0),
        TrialRecord(8, {"x": -4.0}, RecordState.SUCCEEDED, math.inf),
    ]
    obs = sampler._observe(history)
    # Succeeded trials by value (maximised), then pruned ones, those that got
    # further first, then by value; failed, NaN/inf and running never.
    assert {history[i].number for i in np.flatnonzero(obs.below)} == expected
    assert obs.n_finished == 5
    assert obs.running == [{"x": -2.0}]


def test_integer_parameters_stay_integers_and_all_values_get_tried() -> None:
    space = SearchSpace.from_spec(
        [
            {"name": "k", "type": "int", "min": 1, "max": 3},
            {"name": "x", "type": "float", "min": 0, "max": 1},
        ]
    )
    history = run(TPESampler(space, seed=2), lambda c: (c["k"] - 2) ** 2 + c["x"], 40, batch=4)
    assert all(type(t.params["k"]) is int for t in history)
    assert {t.params["k"] for t in history} == {1, 2, 3}
    assert sum(t.params["k"] == 2 for t in history[-12:]) >= 6


def test_unknown_and_bad_settings_are_named() -> None:
    with pytest.raises(SpaceError, match=r"algorithm\.settings\.gama"):
        TPESampler(LINE, options={"gama": 0.2})
    with pytest.raises(SpaceError, match=r"algorithm\.settings\.gamma"):
        TPESampler(LINE, options={"gamma": 2.0})
    with pytest.raises(SpaceError, match=r"algorithm\.settings\.multivariate"):
        TPESampler(LINE, options={"multivariate": "yes"})


def test_sobol_startup_fills_the_space_across_calls() -> None:
    sampler = TPESampler(LINE, seed=0, options={"startup": "sobol", "n_startup_trials": 8})
    first = sampler.suggest([], 4).configs
    history = [TrialRecord(i, c, RecordState.RUNNING) for i, c in enumerate(first)]
    second = sampler.suggest(history, 4, {"calls": 1}).configs
    xs = sorted(c["x"] for c in first + second)
    # Eight Sobol points: one in each eighth of the range.
    assert [math.floor((x + 5) / 10 * 8) for x in xs] == list(range(8))


@pytest.mark.parametrize("options", [{}, {"multivariate": False}, {"constant_liar": False}])
def test_a_sampler_reused_across_a_changing_history_suggests_what_a_fresh_one_does(
    options: dict[str, Any],
) -> None:
    """The columns it keeps between calls never change a suggestion.

    The history grows, running trials finish (new records at the same
    positions), some fail or are pruned, and once it shrinks: each call of
    the one sampler must equal a fresh sampler's on the same history.
    """
    space = SearchSpace.from_spec(
        [
            {"name": "lr", "type": "float", "min": 1e-4, "max": 1e-1, "log": True},
            {"name": "layers", "type": "int", "min": 1, "max": 4},
            {"name": "opt", "type": "categorical", "values": ["adam", "sgd"]},
            {"name": "momentum", "type": "float", "min": 0.5, "max": 0.9, "when": {"opt": "sgd"}},
        ]
    )
    settings = {"n_startup_trials": 4, **options}
    reused = TPESampler(space, Direction.MINIMIZE, 5, settings)
    rng = np.random.default_rng(0)
    history: list[TrialRecord] = []
    state = None
    for call in range(40):
        for i, t in enumerate(history):
            if t.state is RecordState.RUNNING and rng.random() < 0.5:
                end = [RecordState.SUCCEEDED, RecordState.FAILED, RecordState.PRUNED][call % 3]
                value = None if end is RecordState.FAILED else float(rng.random())
                history[i] = TrialRecord(t.number, dict(t.params), end, value, steps={1: 0.5})
        if call == 30:
            history = history[:-3]
        fresh = TPESampler(space, Direction.MINIMIZE, 5, settings)
        got = reused.suggest(list(history), 1 + call % 3, state)
        assert got == fresh.suggest(list(history), 1 + call % 3, state), f"call {call}"
        state = got.state
        history += [TrialRecord(len(history), c, RecordState.RUNNING) for c in got.configs]


# -- fast paths: each must give what the plain computation gives, to the bit ------


def test_default_weights_are_numpy_linspace_to_the_bit() -> None:
    for n in [*range(60), 199, 200, 201, 975, 1000, 9999, 10_000]:
        expected = (
            np.ones(n)
            if n <= 25
            else np.concatenate([np.linspace(1.0 / n, 1.0, num=n - 25), np.ones(25)])
        )
        assert default_weights(n).tobytes() == expected.tobytes(), n


def test_estimators_fitted_together_equal_estimators_fitted_alone() -> None:
    rng = np.random.default_rng(7)
    dims = Dims(
        n_choices=np.array([0, 0, 3, 0, 2]), discrete=np.array([False, True, False, False, False])
    )
    sizes = [0, 1, 2, 25, 199]
    x = rng.random((sum(sizes), 5))
    x[:, 1] = (np.floor(x[:, 1] * 4) + 0.5) / 4  # a discrete column's cell centres
    x[:, 2] = np.floor(x[:, 2] * 3)
    x[:, 4] = np.floor(x[:, 4] * 2)
    x[rng.random(len(x)) < 0.2, 3] = np.nan  # a conditional column
    x[rng.random(len(x)) < 0.1, 4] = np.nan
    floors = np.zeros(x.shape)
    floors[:, 1] = 0.25
    weights = [default_weights(n) for n in sizes]
    bandwidth = Bandwidth(clip_count=500, clip_lean=0.3)
    together = ParzenEstimator.fit_groups(x, weights, dims, 1.0, bandwidth, floors)
    candidates = rng.random((64, 5))
    candidates[:, 2] = np.floor(candidates[:, 2] * 3)
    candidates[:, 4] = np.floor(candidates[:, 4] * 2)
    active = rng.random((64, 5)) < 0.8
    start = 0
    for n, w, joint in zip(sizes, weights, together, strict=True):
        rows = slice(start, start + n)
        alone = ParzenEstimator(x[rows], w, dims, 1.0, bandwidth, floors[rows])
        start += n
        assert joint.weights.tobytes() == alone.weights.tobytes()
        got, expected = joint.log_pdf(candidates, active), alone.log_pdf(candidates, active)
        assert got.tobytes() == expected.tobytes()
        draws = joint.sample(np.random.default_rng(n), 64)
        assert draws.tobytes() == alone.sample(np.random.default_rng(n), 64).tobytes()


def test_cell_widths_of_a_few_rows_equal_those_of_many() -> None:
    encoder = Encoder(SPACE)
    x = encoder.encode(random_configs(300, seed=4))
    x[::7, 2] = np.nan
    many = encoder.cell_widths(x)
    # Twice: the first call computes and remembers, the second looks up.
    for _ in range(2):
        few = np.vstack([encoder.cell_widths(x[i : i + 3]) for i in range(0, len(x), 3)])
        assert few.tobytes() == many.tobytes()


def test_best_candidate_first_is_the_stable_sort_of_the_scores() -> None:
    rng = np.random.default_rng(2)
    for trial in range(200):
        score = np.round(rng.normal(size=16), 1)  # ties
        if trial % 3 == 0:
            score[rng.integers(16)] = np.nan
        expected = (-score).argsort(kind="stable").tolist()
        assert list(_best_first(score)) == expected
