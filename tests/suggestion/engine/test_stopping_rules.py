"""ASHA, median and Hyperband decisions on crafted histories, in both directions.

Histories are written for minimisation; ``flip`` turns one into the same
situation for a maximised metric (every value negated), which must give the
same decisions and the same reasons with the values negated.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

import pytest

from kubetune_suggestion.engine.history import Direction, RecordState, TrialRecord
from kubetune_suggestion.engine.space import SpaceError
from kubetune_suggestion.engine.stopping import RULES, StopDecision, make_rule
from kubetune_suggestion.engine.stopping.asha import ASHARule
from kubetune_suggestion.engine.stopping.hyperband import HyperbandRule
from kubetune_suggestion.engine.stopping.median import MedianRule
from kubetune_suggestion.spec import EarlyStopping

ASHA_OPTIONS = {"minResource": 1, "maxResource": 27, "reductionFactor": 3, "metric": "val_loss"}


def trial(
    number: int, steps: Mapping[int, float], state: RecordState = RecordState.RUNNING
) -> TrialRecord:
    return TrialRecord(number=number, params={}, state=state, steps=dict(steps))


def flip(t: TrialRecord) -> TrialRecord:
    return TrialRecord(t.number, t.params, t.state, None, {s: -v for s, v in t.steps.items()})


def decide(
    rule_cls: type[ASHARule | MedianRule | HyperbandRule],
    direction: Direction,
    options: Mapping[str, object],
    me: TrialRecord,
    others: Sequence[TrialRecord],
) -> StopDecision:
    rule = rule_cls(direction, options)
    if direction is Direction.MAXIMIZE:
        me, others = flip(me), [flip(o) for o in others]
    # The history holds the trial itself too, as the service passes it.
    return rule.decide(me, [*others, me])


def reason(text: str, direction: Direction) -> str:
    """The minimisation reason as it reads for the negated (maximised) metric."""
    if direction is Direction.MINIMIZE:
        return text
    out = []
    for word in text.split(" "):
        stripped = word.rstrip(",);")
        try:
            value = float(stripped)
        except ValueError:
            out.append(word)
            continue
        is_number_word = "." in stripped
        out.append(word.replace(stripped, f"{-value:.4g}") if is_number_word else word)
    return " ".join(out)


# -- ASHA -------------------------------------------------------------------------------------

# Eight trials reached rung 1 (step 1) with 0.1 .. 0.8; some went on, some
# were stopped, one finished. Their later values must not matter at rung 1.
RUNG1 = [
    trial(i, {1: 0.1 * (i + 1), 2: 0.05 if i == 7 else 0.1 * (i + 1)}, state)
    for i, state in enumerate(
        [RecordState.SUCCEEDED, RecordState.RUNNING, RecordState.PRUNED] * 2
        + [RecordState.FAILED, RecordState.RUNNING]
    )
]


@pytest.mark.parametrize("direction", list(Direction))
def test_asha_stops_a_trial_outside_the_top_third_of_its_rung(direction: Direction) -> None:
    me = trial(20, {1: 0.35})
    got = decide(ASHARule, direction, ASHA_OPTIONS, me, RUNG1)
    # 9 trials at the rung, the top 3 continue: cut-off is the 3rd best, 0.3.
    assert got == StopDecision(
        True,
        reason(
            "ASHA rung 1 (step 1): val_loss 0.35 is not in the top 1/3 of 9 trials (cut-off 0.3)",
            direction,
        ),
    )


@pytest.mark.parametrize("direction", list(Direction))
@pytest.mark.parametrize("value", [0.05, 0.25, 0.3])
def test_asha_keeps_a_trial_inside_the_top_third(direction: Direction, value: float) -> None:
    assert not decide(ASHARule, direction, ASHA_OPTIONS, trial(20, {1: value}), RUNG1).stop


@pytest.mark.parametrize("direction", list(Direction))
def test_asha_judges_a_rung_once_at_the_report_that_reaches_it(direction: Direction) -> None:
    # Reached rung 1 earlier (and was kept then); step 2 is no rung.
    me = trial(20, {1: 0.9, 2: 0.9})
    assert not decide(ASHARule, direction, ASHA_OPTIONS, me, RUNG1).stop


@pytest.mark.parametrize("direction", list(Direction))
def test_asha_with_fewer_trials_than_the_reduction_factor_keeps_only_the_best(
    direction: Direction,
) -> None:
    first = trial(0, {1: 0.5})
    assert not decide(ASHARule, direction, ASHA_OPTIONS, first, []).stop
    assert not decide(ASHARule, direction, ASHA_OPTIONS, trial(1, {1: 0.4}), [first]).stop
    got = decide(ASHARule, direction, ASHA_OPTIONS, trial(1, {1: 0.6}), [first])
    assert got == StopDecision(
        True,
        reason(
            "ASHA rung 1 (step 1): val_loss 0.6 is not the best of the 2 trials that reached "
            "this rung so far (best 0.5; fewer than 3 trials, so only the best continues)",
            direction,
        ),
    )


@pytest.mark.parametrize("direction", list(Direction))
def test_asha_higher_rung_compares_values_at_that_rung(direction: Direction) -> None:
    # Rung 2 is step 3. Trials 0-5 got there; trial 6 stopped at step 1.
    others = [trial(i, {1: 0.5, 3: 0.1 * (i + 1), 9: 0.01}) for i in range(6)]
    others.append(trial(6, {1: 0.01}, RecordState.PRUNED))
    # 7 at the rung, top 2 continue: cut-off 0.2.
    assert not decide(
        ASHARule, direction, ASHA_OPTIONS, trial(9, {1: 0.5, 2: 0.4, 3: 0.2}), others
    ).stop
    got = decide(ASHARule, direction, ASHA_OPTIONS, trial(9, {1: 0.5, 2: 0.1, 3: 0.25}), others)
    assert got.stop
    assert got.reason == reason(
        "ASHA rung 2 (step 3): val_loss 0.25 is not in the top 1/3 of 7 trials (cut-off 0.2)",
        direction,
    )


@pytest.mark.parametrize("direction", list(Direction))
def test_asha_sparse_reports_use_the_latest_value_at_or_before_the_rung(
    direction: Direction,
) -> None:
    # These report every other step: at rung 3 their value is the one from step 2.
    others = [trial(i, {0: 0.9, 2: 0.1 * (i + 1), 4: 0.0}) for i in range(6)]
    # A report at step 4 crosses rung 3; the trial's own value there is from step 2.
    got = decide(ASHARule, direction, ASHA_OPTIONS, trial(9, {0: 0.9, 2: 0.3, 4: 0.0}), others)
    assert got.stop and "rung 2 (step 3)" in got.reason
    # One report that jumps over rungs 1 and 3 is judged at both.
    got = decide(ASHARule, direction, ASHA_OPTIONS, trial(9, {4: 0.95}), others)
    assert got.stop and "rung 1 (step 1)" in got.reason
    assert not decide(ASHARule, direction, ASHA_OPTIONS, trial(9, {4: 0.05}), others).stop


@pytest.mark.parametrize("direction", list(Direction))
def test_asha_treats_nan_and_inf_as_worst(direction: Direction) -> None:
    for bad in (math.nan, math.inf, -math.inf):
        got = decide(ASHARule, direction, ASHA_OPTIONS, trial(20, {1: bad}), RUNG1)
        assert got.stop and "counts as the worst value" in got.reason
    # Others' NaN do not rank above a real value.
    diverged = [trial(i, {1: math.nan}) for i in range(8)]
    assert not decide(ASHARule, direction, ASHA_OPTIONS, trial(20, {1: 5.0}), diverged).stop


def test_asha_never_judges_at_max_resource() -> None:
    rule = ASHARule(Direction.MINIMIZE, ASHA_OPTIONS)
    assert rule.rungs == [1, 3, 9]
    me = trial(20, {9: 0.0, 27: 9.0})
    others = [trial(i, {27: 0.1}) for i in range(9)]
    assert not rule.decide(me, others).stop


def test_asha_ignores_a_trial_without_reports() -> None:
    assert not ASHARule(Direction.MINIMIZE, ASHA_OPTIONS).decide(trial(0, {}), RUNG1).stop


# -- median -----------------------------------------------------------------------------------

MEDIAN_OPTIONS = {"warmupSteps": 2, "minTrials": 3, "metric": "val_loss"}
AT_STEP_4 = [
    trial(i, {s: 1.0 - 0.1 * s for s in range(1, 4)} | {4: v})
    for i, v in enumerate([0.2, 0.3, 0.4, 0.5])
]


@pytest.mark.parametrize("direction", list(Direction))
def test_median_stops_a_trial_whose_best_is_worse_than_the_median(direction: Direction) -> None:
    me = trial(9, {1: 0.9, 2: 0.8, 3: 0.6, 4: 0.5})
    got = decide(MedianRule, direction, MEDIAN_OPTIONS, me, AT_STEP_4)
    assert got == StopDecision(
        True,
        reason(
            "median rule at step 4: best val_loss so far 0.5 is worse than the median 0.35 "
            "of 4 other trials at this step",
            direction,
        ),
    )


@pytest.mark.parametrize("direction", list(Direction))
def test_median_judges_the_best_value_so_far(direction: Direction) -> None:
    # A dip to 0.3 at step 2 keeps it, although it reads 0.6 now.
    me = trial(9, {1: 0.9, 2: 0.3, 3: 0.6, 4: 0.6})
    assert not decide(MedianRule, direction, MEDIAN_OPTIONS, me, AT_STEP_4).stop
    # Equal to the median is not worse.
    me = trial(9, {1: 0.9, 4: 0.35})
    assert not decide(MedianRule, direction, MEDIAN_OPTIONS, me, AT_STEP_4).stop


@pytest.mark.parametrize("direction", list(Direction))
def test_median_waits_for_warmup_and_enough_trials(direction: Direction) -> None:
    at_step_1 = [trial(i, {1: 0.1}) for i in range(5)]
    assert not decide(MedianRule, direction, MEDIAN_OPTIONS, trial(9, {1: 0.9}), at_step_1).stop
    # Step 4 reached by only two others (the rest stopped at step 3).
    others = AT_STEP_4[:2] + [trial(5 + i, {3: 0.1}, RecordState.PRUNED) for i in range(4)]
    assert not decide(MedianRule, direction, MEDIAN_OPTIONS, trial(9, {4: 0.9}), others).stop


@pytest.mark.parametrize("direction", list(Direction))
def test_median_uses_others_value_at_that_step(direction: Direction) -> None:
    # Others that passed step 4 count with their value at 4 (or just before it),
    # not their best or later values.
    others = [
        trial(0, {4: 0.2, 8: 0.01}, RecordState.SUCCEEDED),
        trial(1, {3: 0.3, 6: 0.01}, RecordState.PRUNED),
        trial(2, {4: 0.4, 5: 0.01}),
    ]
    got = decide(MedianRule, direction, MEDIAN_OPTIONS, trial(9, {4: 0.31}), others)
    assert got.stop and "median 0.3 of 3 other trials" in reason(got.reason, direction)


@pytest.mark.parametrize("direction", list(Direction))
def test_median_treats_nan_and_inf_as_worst(direction: Direction) -> None:
    got = decide(
        MedianRule, direction, MEDIAN_OPTIONS, trial(9, {3: math.nan, 4: math.inf}), AT_STEP_4
    )
    assert got.stop
    assert got.reason.startswith("median rule at step 4: val_loss has no finite value so far")
    diverged = [trial(i, {4: math.nan}) for i in range(4)]
    assert not decide(MedianRule, direction, MEDIAN_OPTIONS, trial(9, {4: 9.0}), diverged).stop


# -- Hyperband --------------------------------------------------------------------------------

HB_OPTIONS = {"minResource": 1, "maxResource": 27, "reductionFactor": 3, "metric": "val_loss"}


def test_hyperband_brackets_and_their_rungs() -> None:
    rule = HyperbandRule(Direction.MINIMIZE, HB_OPTIONS)
    assert rule.n_brackets == 4
    assert rule.bracket_rungs == [[1, 3, 9], [3, 9], [9], []]
    assert HyperbandRule(Direction.MINIMIZE, HB_OPTIONS | {"brackets": 2}).n_brackets == 2
    assert HyperbandRule(Direction.MINIMIZE, HB_OPTIONS | {"brackets": 9}).n_brackets == 4


def test_hyperband_assigns_brackets_deterministically_in_hyperband_proportions() -> None:
    rule = HyperbandRule(Direction.MINIMIZE, HB_OPTIONS)
    again = HyperbandRule(Direction.MAXIMIZE, HB_OPTIONS)
    brackets = [rule.bracket_of(n) for n in range(2000)]
    assert brackets == [again.bracket_of(n) for n in range(2000)]
    counts = Counter(brackets)
    # Weights 27/4, 9/3, 3/2, 1/1 out of 12.25.
    for b, weight in enumerate([6.75, 3.0, 1.5, 1.0]):
        assert counts[b] / 2000 == pytest.approx(weight / 12.25, abs=0.01)
    # Consecutive trials spread over brackets instead of filling one first.
    assert len(set(brackets[:8])) >= 3


def numbers_in(rule: HyperbandRule, bracket: int, count: int) -> list[int]:
    return [n for n in range(1000) if rule.bracket_of(n) == bracket][:count]


@pytest.mark.parametrize("direction", list(Direction))
def test_hyperband_compares_a_trial_only_within_its_bracket(direction: Direction) -> None:
    rule = HyperbandRule(direction, HB_OPTIONS)
    b0 = numbers_in(rule, 0, 10)
    b1 = numbers_in(rule, 1, 10)
    # Bracket 1 trials are far better at step 3 than anything in bracket 0.
    others = [trial(n, {1: 0.5, 3: 0.01}) for n in b1[:9]]
    others += [trial(n, {1: 0.5, 3: 0.2 + 0.1 * i}) for i, n in enumerate(b0[:8])]
    # Rung 2 of bracket 0 (step 3): 9 trials, cut-off 0.4 within bracket 0.
    assert not decide(
        HyperbandRule, direction, HB_OPTIONS, trial(b0[9], {1: 0.5, 3: 0.3}), others
    ).stop
    got = decide(HyperbandRule, direction, HB_OPTIONS, trial(b0[9], {1: 0.5, 3: 0.45}), others)
    assert got == StopDecision(
        True,
        reason(
            "Hyperband bracket 1 of 4, rung 2 (step 3): val_loss 0.45 is not in the top 1/3 "
            "of 9 trials (cut-off 0.4)",
            direction,
        ),
    )
    # In bracket 1 the first rung is step 3, where 0.3 is the worst of 10.
    got = decide(HyperbandRule, direction, HB_OPTIONS, trial(b1[9], {1: 0.9, 3: 0.3}), others)
    assert got.stop and got.reason.startswith("Hyperband bracket 2 of 4, rung 1 (step 3)")


@pytest.mark.parametrize("direction", list(Direction))
def test_hyperband_last_bracket_never_stops(direction: Direction) -> None:
    rule = HyperbandRule(direction, HB_OPTIONS)
    last = numbers_in(rule, 3, 6)
    others = [trial(n, {s: 0.01 for s in range(1, 28)}) for n in last[:5]]
    me = trial(last[5], {s: 9.0 for s in range(1, 28)})
    assert not decide(HyperbandRule, direction, HB_OPTIONS, me, others).stop


# -- registry and options ---------------------------------------------------------------------


def test_rules_registry_and_make_rule() -> None:
    assert set(RULES) == {"asha", "median", "hyperband"}
    assert make_rule("none", "minimize") is None
    with pytest.raises(SpaceError) as info:
        make_rule("pbt", "minimize")
    assert info.value.field == "earlyStopping.name"
    assert "choose one of ['none', 'asha', 'hyperband', 'median']" in info.value.problem


@pytest.mark.parametrize("name", ["asha", "median", "hyperband"])
def test_rules_take_the_options_of_the_spec(name: str) -> None:
    spec = EarlyStopping.model_validate({"name": name, "maxResource": 27, "minResource": 1})
    rule = make_rule(name, "maximize", spec.options())
    assert rule is not None and rule.direction is Direction.MAXIMIZE


@pytest.mark.parametrize(
    ("options", "field", "problem"),
    [
        ({}, "earlyStopping.maxResource", "`maxResource` is required for this rule"),
        (
            {"minResource": 9, "maxResource": 9},
            "earlyStopping.maxResource",
            "maxResource (9) must be greater than minResource (9)",
        ),
        (
            {"maxResource": 9, "reductionFactor": 1},
            "earlyStopping.reductionFactor",
            "`reductionFactor` must be at least 2, got 1",
        ),
        (
            {"maxResource": 9.5},
            "earlyStopping.maxResource",
            "`maxResource` must be a whole number, got 9.5",
        ),
    ],
)
@pytest.mark.parametrize("name", ["asha", "hyperband"])
def test_successive_halving_option_errors(
    name: str, options: dict[str, object], field: str, problem: str
) -> None:
    with pytest.raises(SpaceError) as info:
        make_rule(name, "minimize", options)
    assert (info.value.field, info.value.problem) == (field, problem)
