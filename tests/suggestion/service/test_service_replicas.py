"""Two replicas on one database: what one writes, the other's cache never hides.

Each service keeps compiled specs and sampler histories between calls
(``service/cache.py``); these tests change the stored state through one
replica (allocations, finishes, spec changes, a re-created experiment) and
check that the other answers as if it had no cache.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from kubetune_suggestion.service.core import TuningService
from kubetune_suggestion.service.errors import Conflict, NotFound
from kubetune_suggestion.service.models import StopAnswer, TrialAssignment, TrialState
from kubetune_suggestion.service.testing import EXAMPLE_ASHA, example_spec

UID = "fast-uid"


def _register(svc: TuningService, **overrides: Any) -> None:
    spec = {"algorithm": {"name": "tpe", "seed": 1, "settings": {"n_startup_trials": 2}}}
    svc.register(UID, "exp", "ns", example_spec(**{"maxTrials": 30, **spec, **overrides}))


def _run(svc: TuningService, trial: TrialAssignment, loss: float = 0.5) -> None:
    svc.report(UID, trial.number, trial.token, 1, {"loss": loss})
    svc.finish(UID, trial.number, "succeeded")


def test_parallelism_counts_what_every_replica_started_and_finished(
    replicas: tuple[TuningService, TuningService],
) -> None:
    svc, other = replicas
    _register(svc)
    running = svc.ask(UID, 3, parallelism=3).trials
    svc.start_many(UID, [t.number for t in running])
    # Three running: no room.
    assert svc.ask(UID, 5, parallelism=3).trials == []
    _run(svc, running[0])
    assert [t.number for t in svc.ask(UID, 5, parallelism=3).trials] == [3]
    svc.start(UID, 3)
    # A trial finished on another replica frees exactly that slot here.
    _run(other, running[1])
    assert [t.number for t in svc.ask(UID, 5, parallelism=3).trials] == [4]


def test_trials_another_replica_allocated_and_finished_reach_this_ones_asks(
    replicas: tuple[TuningService, TuningService],
) -> None:
    a, b = replicas
    _register(a)
    _run(a, a.ask(UID, 1).trials[0])
    # Replica b allocates and finishes trials a's cache never saw.
    for _ in range(2):
        _run(b, b.ask(UID, 1).trials[0], loss=0.2)
    (trial,) = a.ask(UID, 1).trials
    assert trial.number == 3
    _run(a, trial)
    # Each ask allocates: two replicas never hand out the same trial.
    assert (a.ask(UID, 1).trials[0].number, b.ask(UID, 1).trials[0].number) == (4, 5)
    numbers = [t.number for t in a.trials(UID)]
    assert numbers == list(range(6))


def test_pending_trials_are_handed_back_until_a_report_or_start(
    replicas: tuple[TuningService, TuningService],
) -> None:
    svc, _ = replicas
    _register(svc)
    first = svc.ask(UID, 2, ask_id="w").trials
    assert svc.ask(UID, 2, ask_id="w").trials == first
    svc.report(UID, first[0].number, first[0].token, 1, {"loss": 0.3})
    svc.start(UID, first[1].number)
    assert [t.number for t in svc.ask(UID, 1, ask_id="w").trials] == [2]


def test_spec_changes_by_another_replica_reach_asks_and_reports(
    replicas: tuple[TuningService, TuningService],
) -> None:
    a, b = replicas
    _register(a)
    t0, t1, t2 = a.ask(UID, 3).trials
    for trial in (t0, t1, t2):
        assert a.report(UID, trial.number, trial.token, 1, {"acc": 0.5}) == StopAnswer(stop=False)
    # Another replica adds an early-stopping rule: a's next reports must run it.
    _register(b, earlyStopping=EXAMPLE_ASHA)
    assert not a.report(UID, t0.number, t0.token, 2, {"loss": 0.1}).stop
    assert a.report(UID, t1.number, t1.token, 2, {"loss": 0.9}).stop
    # A stopped trial hears so on a report without the objective too (no decision due).
    stopped = a.report(UID, t1.number, t1.token, 3, {"acc": 0.5})
    assert stopped.stop and "ASHA" in stopped.reason
    for trial in (t0, t1, t2):
        a.finish(UID, trial.number, "succeeded")
    # ... and suspends it: a's next ask hands out nothing.
    _register(b, earlyStopping=EXAMPLE_ASHA, suspend=True)
    result = a.ask(UID, 1)
    assert result.trials == [] and "suspended" in (result.reason or "")
    _register(b, earlyStopping=EXAMPLE_ASHA, maxTrials=4)
    assert [t.number for t in a.ask(UID, 5).trials] == [3]


def test_a_re_created_experiment_is_not_mistaken_for_the_deleted_one(
    replicas: tuple[TuningService, TuningService],
) -> None:
    a, b = replicas
    _register(a)
    for _ in range(3):
        _run(a, a.ask(UID, 1).trials[0])
    b.delete(UID)
    with pytest.raises(NotFound):
        a.ask(UID, 1)
    _register(b)
    (trial,) = a.ask(UID, 1).trials
    assert trial.number == 0
    assert a.report(UID, 0, trial.token, 1, {"loss": 0.2}) == StopAnswer(stop=False)
    assert [(t.number, t.state) for t in b.trials(UID)] == [(0, TrialState.RUNNING)]


def test_a_report_after_finish_is_refused_and_finishing_twice_is_a_no_op(
    replicas: tuple[TuningService, TuningService],
) -> None:
    a, b = replicas
    _register(a)
    trial = a.ask(UID, 1).trials[0]
    a.report(UID, trial.number, trial.token, 1, {"loss": 0.4})
    before = b.finish(UID, trial.number, "succeeded")  # by the other replica
    with pytest.raises(Conflict, match="already finished"):
        a.report(UID, trial.number, trial.token, 2, {"loss": 0.1})
    assert a.finish(UID, trial.number, "succeeded") == before
    with pytest.raises(Conflict, match="already finished"):
        a.finish(UID, trial.number, "failed")
    (view,) = a.trials(UID, observations=True)
    assert view.objective == 0.4 and [o.step for o in view.observations or []] == [1]


def test_a_finish_on_another_replica_reaches_the_next_ask(
    replicas: tuple[TuningService, TuningService],
) -> None:
    a, b = replicas
    _register(a, maxFailedTrials=0)
    _run(a, a.ask(UID, 1).trials[0])
    trial = a.ask(UID, 1).trials[0]
    a.report(UID, trial.number, trial.token, 1, {"loss": 0.3})
    b.finish(UID, trial.number, "failed", "OOMKilled")
    result = a.ask(UID, 1)
    assert result.trials == [] and result.exhausted and "1 trial failed" in (result.reason or "")


def test_replicas_racing_never_share_a_number_or_lose_a_report(
    replicas: tuple[TuningService, TuningService],
) -> None:
    """Threads on two replicas ask, report and finish at once."""
    a, b = replicas
    _register(a, maxTrials=48)
    handed_out: dict[int, dict[str, Any]] = {}
    lock = threading.Lock()
    failures: list[BaseException] = []

    def work(svc: TuningService) -> None:
        try:
            while True:
                asked = svc.ask(UID, 1)
                if not asked.trials:
                    return
                trial = asked.trials[0]
                with lock:
                    # A pending trial is handed out again until it starts: one worker runs it.
                    if handed_out.setdefault(trial.number, trial.params) is not trial.params:
                        assert handed_out[trial.number] == trial.params
                        continue
                for step in (1, 2):
                    svc.report(UID, trial.number, trial.token, step, {"loss": 1.0 / step})
                svc.finish(UID, trial.number, "succeeded")
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(svc,)) for svc in (a, b, a, b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == []
    assert sorted(handed_out) == list(range(48))
    views = a.trials(UID, observations=True)
    assert [(v.number, v.params) for v in views] == sorted(handed_out.items())
    assert all(v.state is TrialState.SUCCEEDED and v.objective == 0.5 for v in views)
    assert all([o.step for o in v.observations or []] == [1, 2] for v in views)


def test_asks_from_a_warm_cache_suggest_what_cold_processes_would(db_url: str) -> None:
    """The cached sampler history is the stored one.

    Two experiments with the same spec and seed get the same asks and the
    same results: one through a process that keeps its cache, the other
    through a new process for every call. They must be handed the same
    trials, trial after trial.
    """
    warm = TuningService.open(db_url)
    _register(warm)
    spec = warm.experiment_spec(UID)
    warm.register("cold", "exp", "ns", spec)
    for i in range(10):
        trials = []
        for uid, svc in ((UID, warm), ("cold", TuningService.open(db_url, migrate=False))):
            trial = svc.ask(uid, 1).trials[0]
            svc.report(uid, trial.number, trial.token, 1, {"loss": trial.params["lr"] * 10})
            svc.finish(uid, trial.number, "succeeded" if i % 4 else "failed")
            trials.append((trial.number, trial.params))
            if svc is not warm:
                svc.close()
        assert trials[0] == trials[1], f"ask {i}"
    warm.close()
