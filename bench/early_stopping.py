"""Early stopping on simulated learning curves: kubetune's rules next to Optuna's pruners.

Run: ``python bench/early_stopping.py`` (under a minute on one core; ``--help``
for the knobs). It prints one table per scenario.

What is simulated (the curves: ``bench/learning_curves.py``). A population of
``--trials`` configurations, each with a validation-loss curve over
``maxResource`` steps. A configuration has a learning-rate-like position ``x``
in [0, 1] and an architecture quality ``q``:

- its asymptote is ``floor + a * (x - x_best)**2 + b * q`` (too small and too
  large learning rates end worse, a better architecture ends lower);
- it approaches it as ``exp(-t / tau)`` with ``tau`` shrinking as ``x`` grows,
  so large learning rates start fast and plateau high while moderate ones start
  slowly and end low: the curves cross;
- every report adds Gaussian noise (fixed per configuration and step, so every
  method sees the very same observations), and steps take a per-configuration
  time (bigger models are slower), so reports arrive out of order.

Eight workers run the trials in order of their number, driven by an event
clock; after every report the method decides whether the trial stops, and a
freed worker starts the next configuration. Every method sees the same
population and the same noise for a given seed.

What is measured, per method and averaged over seeds:

- steps: the total number of training steps spent, and its ratio to no stopping;
- final best: the noise-free final loss of the configuration the experiment
  would pick (the best observed final value among trials that reached
  ``maxResource``); gap: how far that is above no stopping's pick, in percent
  (mean over seeds, and the worst seed).

Scenarios. ``typical``: crossings happen within the first few steps, as when
learning rates differ by a few times. ``late-crossing``: slow starters overtake
only after a third of the budget, the case that defeats an early first rung and
that Hyperband's later brackets hedge against.

Real training (``--training``). The whole loop, sampler included, on a real
model: a small numpy MLP (:func:`problems.train_mlp`) trained epoch by epoch,
each epoch followed by a fixed sleep (``--epoch-sleep``) so that wall time
counts epochs, as it does on a real cluster. Trials run one after the other;
kubetune's TPE sampler and rule see the records the service builds for them
(:mod:`kubetune_suggestion.service.logic`), Optuna's TPESampler and pruner
run in an ask-and-tell study. Per method and over seeds: the median best
validation loss (of trials that trained every epoch), the median epochs spent
and the median wall time of a run, with ratios of kubetune's against Optuna's.
"""

from __future__ import annotations

import argparse
import heapq
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import optuna
from learning_curves import SCENARIOS, Population, Scenario, population
from problems import MLP_PARAMS, MLPData, mlp_data, train_mlp
from scipy.stats import spearmanr

from kubetune_suggestion.engine.history import Direction, RecordState, TrialRecord
from kubetune_suggestion.engine.samplers import make_sampler
from kubetune_suggestion.engine.samplers.base import JsonState
from kubetune_suggestion.engine.space import SearchSpace
from kubetune_suggestion.engine.stopping import StoppingRule, make_rule
from kubetune_suggestion.service import logic

MIN_RESOURCE = 1
MAX_RESOURCE = 27
REDUCTION_FACTOR = 3
WORKERS = 8
CORRELATION_STEPS = (1, 3, 9)


class Method(Protocol):
    """One early-stopping method, driven trial by trial."""

    def start(self, number: int) -> None:
        """A worker starts trial ``number`` (numbers come in order from 0)."""

    def report(self, number: int, step: int, value: float) -> bool:
        """Record a report; True when the trial should stop."""

    def end(self, number: int, value: float, stopped: bool) -> None:
        """The trial ended: stopped by the method, or finished at ``MAX_RESOURCE``."""


class NoStopping:
    """Every trial trains to the end."""

    def start(self, number: int) -> None:
        """Nothing to track."""

    def report(self, number: int, step: int, value: float) -> bool:
        """Never stop."""
        return False

    def end(self, number: int, value: float, stopped: bool) -> None:
        """Nothing to track."""


class KubetuneRule:
    """A kubetune rule fed the history the service would pass it."""

    def __init__(self, rule: StoppingRule) -> None:
        self.rule = rule
        self.history: list[TrialRecord] = []

    def start(self, number: int) -> None:
        """Add a running trial without reports."""
        assert number == len(self.history)
        self.history.append(TrialRecord(number, {}, RecordState.RUNNING, steps={}))

    def report(self, number: int, step: int, value: float) -> bool:
        """Append the report and ask the rule, as the service does."""
        record = self.history[number]
        steps = dict(record.steps)
        steps[step] = value
        record = TrialRecord(number, {}, RecordState.RUNNING, steps=steps)
        self.history[number] = record
        return self.rule.decide(record, self.history).stop

    def end(self, number: int, value: float, stopped: bool) -> None:
        """Record the trial as stopped or succeeded."""
        record = self.history[number]
        state = RecordState.PRUNED if stopped else RecordState.SUCCEEDED
        self.history[number] = TrialRecord(number, {}, state, value, record.steps)


class OptunaPruner:
    """An Optuna pruner inside an ask-and-tell study (the sampler is never asked)."""

    def __init__(self, pruner: optuna.pruners.BasePruner) -> None:
        # HyperbandPruner hashes the study name into bracket choices: a fixed
        # name keeps runs reproducible.
        self.study = optuna.create_study(
            study_name="early-stopping", direction="minimize", pruner=pruner
        )
        self.trials: dict[int, optuna.Trial] = {}

    def start(self, number: int) -> None:
        """Ask the study for a trial."""
        self.trials[number] = self.study.ask()

    def report(self, number: int, step: int, value: float) -> bool:
        """``trial.report`` then ``trial.should_prune``, as an Optuna objective does."""
        trial = self.trials[number]
        trial.report(value, step)
        return bool(trial.should_prune())

    def end(self, number: int, value: float, stopped: bool) -> None:
        """Tell the study how the trial ended."""
        trial = self.trials.pop(number)
        if stopped:
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            self.study.tell(trial, value)


def ours(name: str, min_resource: int = MIN_RESOURCE, **extra: int) -> Callable[[], Method]:
    options = {
        "minResource": min_resource,
        "maxResource": MAX_RESOURCE,
        "reductionFactor": REDUCTION_FACTOR,
        **extra,
    }

    def build() -> Method:
        rule = make_rule(name, Direction.MINIMIZE, options)
        assert rule is not None
        return KubetuneRule(rule)

    return build


def optuna_pruner(kind: str, min_resource: int = MIN_RESOURCE) -> Callable[[], Method]:
    def build() -> Method:
        pruners = optuna.pruners
        pruner: optuna.pruners.BasePruner
        if kind == "sha":
            pruner = pruners.SuccessiveHalvingPruner(
                min_resource=min_resource, reduction_factor=REDUCTION_FACTOR
            )
        elif kind == "median":
            pruner = pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
        else:
            pruner = pruners.HyperbandPruner(
                min_resource=min_resource,
                max_resource=MAX_RESOURCE,
                reduction_factor=REDUCTION_FACTOR,
            )
        return OptunaPruner(pruner)

    return build


# ASHA and successive halving appear twice: with the first rung at step 1 (the
# most aggressive setting) and at step 3 (rungs 3 and 9).
METHODS: dict[str, Callable[[], Method]] = {
    "no stopping": NoStopping,
    "kubetune asha r=1": ours("asha"),
    "optuna SHA r=1": optuna_pruner("sha"),
    "kubetune asha r=3": ours("asha", min_resource=3),
    "optuna SHA r=3": optuna_pruner("sha", min_resource=3),
    "kubetune hyperband": ours("hyperband"),
    "optuna Hyperband": optuna_pruner("hyperband"),
    "kubetune median": ours("median", warmupSteps=0, minTrials=5),
    "optuna Median": optuna_pruner("median"),
}


@dataclass(frozen=True)
class Outcome:
    """One method on one population."""

    steps: int
    # Noise-free final loss of the configuration the experiment would pick.
    final_best: float
    completed: int


def simulate(pop: Population, method: Method, workers: int = WORKERS) -> Outcome:
    trials = pop.observed.shape[0]
    events: list[tuple[float, int]] = []  # (time of the next report, trial number)
    progress: dict[int, int] = {}
    started = 0

    def start_next(now: float) -> None:
        nonlocal started
        if started < trials:
            number = started
            started += 1
            method.start(number)
            progress[number] = 0
            heapq.heappush(events, (now + float(pop.duration[number]), number))

    for _ in range(workers):
        start_next(0.0)
    steps = 0
    finished: dict[int, float] = {}
    while events:
        now, number = heapq.heappop(events)
        step = progress[number] + 1
        progress[number] = step
        steps += 1
        value = float(pop.observed[number, step - 1])
        stop = method.report(number, step, value)
        if step == MAX_RESOURCE:
            # A trial stopped at its last step has still finished training.
            finished[number] = value
        if stop or step == MAX_RESOURCE:
            method.end(number, value, stopped=stop)
            start_next(now)
        else:
            heapq.heappush(events, (now + float(pop.duration[number]), number))
    pick = min(finished, key=lambda n: finished[n])
    return Outcome(steps=steps, final_best=float(pop.final[pick]), completed=len(finished))


def run(
    scenario: Scenario, seeds: Sequence[int], trials: int
) -> tuple[dict[str, list[Outcome]], list[float]]:
    """Every method on every seed's population, and how early values rank the finals."""
    results: dict[str, list[Outcome]] = {name: [] for name in METHODS}
    correlations: list[list[float]] = [[] for _ in CORRELATION_STEPS]
    for seed in seeds:
        pop = population(scenario, trials, seed, MAX_RESOURCE)
        for i, step in enumerate(CORRELATION_STEPS):
            rho = spearmanr(pop.observed[:, step - 1], pop.final).statistic
            correlations[i].append(float(rho))
        for name, build in METHODS.items():
            results[name].append(simulate(pop, build()))
    return results, [statistics.mean(c) for c in correlations]


def table(
    scenario: Scenario,
    results: dict[str, list[Outcome]],
    trials: int,
    correlations: Sequence[float],
) -> str:
    base = results["no stopping"]
    base_steps = statistics.mean(o.steps for o in base)
    header = (
        f"| {'method':<20} | {'steps':>7} | {'ratio':>6} | {'final best':>10} | "
        f"{'gap mean':>8} | {'gap worst':>9} | {'finished':>8} |"
    )
    lines = [
        f"scenario {scenario.name}: {trials} trials x {MAX_RESOURCE} steps, {WORKERS} workers, "
        f"{len(base)} seeds; maxResource={MAX_RESOURCE}, reductionFactor={REDUCTION_FACTOR}, "
        f"minResource={MIN_RESOURCE} unless r= says otherwise",
        "rank correlation (Spearman) of the values at steps "
        + ", ".join(f"{s}" for s in CORRELATION_STEPS)
        + " with the final: "
        + ", ".join(f"{c:.2f}" for c in correlations),
        "",
        header,
        "|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|",
    ]
    for name, outcomes in results.items():
        steps = statistics.mean(o.steps for o in outcomes)
        gaps = [
            100.0 * (o.final_best / b.final_best - 1.0) for o, b in zip(outcomes, base, strict=True)
        ]
        lines.append(
            f"| {name:<20} | {steps:>7.0f} | {steps / base_steps:>6.1%} | "
            f"{statistics.mean(o.final_best for o in outcomes):>10.4f} | "
            f"{statistics.mean(gaps):>7.2f}% | {max(gaps):>8.2f}% | "
            f"{statistics.mean(o.completed for o in outcomes):>8.1f} |"
        )
    return "\n".join(lines)


# -- real training: sampler and pruner together on a numpy MLP ----------------


class Tuner(Protocol):
    """A sampler and an early-stopping method, driven one trial at a time."""

    def ask(self) -> dict[str, Any]:
        """The next trial's configuration."""

    def report(self, epoch: int, value: float) -> bool:
        """Record the validation loss after ``epoch``; True when the trial should stop."""

    def tell(self, value: float, pruned: bool) -> None:
        """The trial ended: pruned at its last report, or trained to the end."""


class KubetuneTuner:
    """kubetune's sampler and rule, fed what the service feeds them.

    The sampler sees :func:`logic.trial_record` records (a pruned trial's
    value is its last reported objective, the default ``strategy: last``)
    and its JSON state from the previous ask; the rule sees every trial's
    curve, as :func:`logic.stop_inputs` builds it for a sequential run.
    """

    def __init__(self, rule: str, seed: int, epochs: int) -> None:
        space = SearchSpace.from_spec(MLP_PARAMS)
        self.sampler = make_sampler("tpe", space, Direction.MINIMIZE, seed)
        options: dict[str, int] = {
            "minResource": MIN_RESOURCE,
            "maxResource": epochs,
            "reductionFactor": REDUCTION_FACTOR,
        }
        if rule == "median":
            options = {"warmupSteps": 0, "minTrials": 5}
        built = make_rule(rule, Direction.MINIMIZE, options)
        assert built is not None
        self.rule = KubetuneRule(built)
        self.records: list[TrialRecord] = []
        self.state: JsonState | None = None

    def ask(self) -> dict[str, Any]:
        """One suggestion from the whole history, as a one-trial ask."""
        suggestions = self.sampler.suggest(self.records, 1, self.state)
        self.state = suggestions.state
        config = dict(suggestions.configs[0])
        number = len(self.records)
        self.records.append(logic.trial_record(number, config, "running", None))
        self.rule.start(number)
        return config

    def report(self, epoch: int, value: float) -> bool:
        """The rule's decision on this report."""
        return self.rule.report(len(self.records) - 1, epoch, value)

    def tell(self, value: float, pruned: bool) -> None:
        """Store the ended trial as the service does."""
        number = len(self.records) - 1
        state = "pruned" if pruned else "succeeded"
        self.records[number] = logic.trial_record(number, self.records[number].params, state, value)
        self.rule.end(number, value, stopped=pruned)


class OptunaTuner:
    """Optuna's TPESampler (defaults) and a pruner in an ask-and-tell study."""

    def __init__(self, pruner: str, seed: int, epochs: int) -> None:
        chosen: optuna.pruners.BasePruner
        if pruner == "sha":
            chosen = optuna.pruners.SuccessiveHalvingPruner(
                min_resource=MIN_RESOURCE, reduction_factor=REDUCTION_FACTOR
            )
        else:
            chosen = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
        self.study = optuna.create_study(
            direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed), pruner=chosen
        )
        self.trial: optuna.Trial | None = None

    def ask(self) -> dict[str, Any]:
        """A trial with the MLP's parameters suggested."""
        self.trial = self.study.ask()
        return {p["name"]: _suggest(self.trial, p) for p in MLP_PARAMS}

    def report(self, epoch: int, value: float) -> bool:
        """``trial.report`` then ``trial.should_prune``."""
        assert self.trial is not None
        self.trial.report(value, epoch)
        return bool(self.trial.should_prune())

    def tell(self, value: float, pruned: bool) -> None:
        """Tell the study how the trial ended."""
        assert self.trial is not None
        if pruned:
            self.study.tell(self.trial, state=optuna.trial.TrialState.PRUNED)
        else:
            self.study.tell(self.trial, value)


def _suggest(trial: optuna.Trial, param: Mapping[str, Any]) -> Any:
    log = bool(param.get("log", False))
    if param["type"] == "int":
        return trial.suggest_int(param["name"], param["min"], param["max"], log=log)
    return trial.suggest_float(param["name"], param["min"], param["max"], log=log)


TUNERS: dict[str, Callable[[int, int], Tuner]] = {
    "kubetune tpe+asha": lambda seed, epochs: KubetuneTuner("asha", seed, epochs),
    "optuna tpe+SHA": lambda seed, epochs: OptunaTuner("sha", seed, epochs),
    "kubetune tpe+median": lambda seed, epochs: KubetuneTuner("median", seed, epochs),
    "optuna tpe+Median": lambda seed, epochs: OptunaTuner("median", seed, epochs),
}
# Each kubetune method's Optuna counterpart, for the ratios.
COUNTERPARTS = {"kubetune tpe+asha": "optuna tpe+SHA", "kubetune tpe+median": "optuna tpe+Median"}


@dataclass(frozen=True)
class TrainingOutcome:
    """One tuner's sequential run on one seed's data."""

    best: float  # lowest final validation loss among trials that trained every epoch
    epochs: int  # epochs trained, over all trials
    seconds: float  # wall time of the run, sampler and pruner included


def tune(
    tuner: Tuner, data: MLPData, trials: int, epochs: int, epoch_sleep: float
) -> TrainingOutcome:
    """Run ``trials`` trials one after the other, each stopped when the method says so.

    The last epoch is never a pruning point: a trial that reached it has
    trained fully (the service records it as succeeded whatever the rule says).
    """
    began = time.perf_counter()
    best, spent = math.inf, 0
    for _ in range(trials):
        config = tuner.ask()
        value, pruned = math.inf, False
        for epoch, value in enumerate(train_mlp(data, config, epochs), start=1):
            time.sleep(epoch_sleep)
            spent += 1
            if epoch < epochs and tuner.report(epoch, value):
                pruned = True
                break
        tuner.tell(value, pruned)
        if not pruned:
            best = min(best, value)
    return TrainingOutcome(best, spent, time.perf_counter() - began)


def run_training(
    seeds: Sequence[int], trials: int, epochs: int, epoch_sleep: float
) -> dict[str, list[TrainingOutcome]]:
    """Every tuner on every seed (seed: the dataset's and the sampler's)."""
    results: dict[str, list[TrainingOutcome]] = {name: [] for name in TUNERS}
    for seed in seeds:
        data = mlp_data(seed)
        for name, build in TUNERS.items():
            results[name].append(tune(build(seed, epochs), data, trials, epochs, epoch_sleep))
    return results


def training_table(
    results: Mapping[str, list[TrainingOutcome]], trials: int, epochs: int, epoch_sleep: float
) -> str:
    def medians(name: str) -> tuple[float, float, float]:
        outcomes = results[name]
        return (
            statistics.median(o.best for o in outcomes),
            statistics.median(o.epochs for o in outcomes),
            statistics.median(o.seconds for o in outcomes),
        )

    seeds = len(next(iter(results.values())))
    header = (
        f"| {'method':<20} | {'best val loss':>13} | {'epochs':>6} | {'wall s':>6} | "
        f"{'loss / optuna':>13} | {'epochs / optuna':>15} | {'wall / optuna':>13} |"
    )
    lines = [
        f"real training: numpy MLP, {trials} trials x {epochs} epochs, sequential, "
        f"{epoch_sleep * 1000:g} ms sleep per epoch, {seeds} seeds (medians); TPE + "
        f"ASHA/SHA (minResource={MIN_RESOURCE}, reductionFactor={REDUCTION_FACTOR}) "
        "or median (5 startup trials, no warm-up)",
        "",
        header,
        "|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|",
    ]
    for name in results:
        best, spent, seconds = medians(name)
        ratios = f"| {'':>13} | {'':>15} | {'':>13} |"
        if name in COUNTERPARTS:
            o_best, o_spent, o_seconds = medians(COUNTERPARTS[name])
            ratios = (
                f"| {best / o_best:>13.3f} | {spent / o_spent:>15.3f} | "
                f"{seconds / o_seconds:>13.3f} |"
            )
        lines.append(f"| {name:<20} | {best:>13.4f} | {spent:>6.0f} | {seconds:>6.1f} " + ratios)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--seeds", type=int, help="populations per scenario (default 20; --training: 5)"
    )
    parser.add_argument(
        "--trials", type=int, help="configurations per population (default 100; --training: 60)"
    )
    parser.add_argument(
        "--scenario", choices=[*SCENARIOS, "all"], default="all", help="which curve family"
    )
    parser.add_argument(
        "--training", action="store_true", help="real training with TPE instead of simulation"
    )
    parser.add_argument("--epochs", type=int, default=27, help="--training: epochs per trial")
    parser.add_argument(
        "--epoch-sleep", type=float, default=0.01, help="--training: seconds slept per epoch"
    )
    args = parser.parse_args(argv)
    if args.training:
        seeds, trials = args.seeds or 5, args.trials or 60
        began = time.perf_counter()
        trained = run_training(range(seeds), trials, args.epochs, args.epoch_sleep)
        print(training_table(trained, trials, args.epochs, args.epoch_sleep))
        print(f"({time.perf_counter() - began:.0f} s)")
        return 0
    seeds, trials = args.seeds or 20, args.trials or 100
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    for name in names:
        began = time.perf_counter()
        results, correlations = run(SCENARIOS[name], range(seeds), trials)
        print(table(SCENARIOS[name], results, trials, correlations))
        print(f"({time.perf_counter() - began:.0f} s)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
