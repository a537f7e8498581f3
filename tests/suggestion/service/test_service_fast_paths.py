"""The one-statement paths of ask and report, and when they must give way to the locked ones.

On PostgreSQL the steady state (ask, report, finish, ask...) takes one
statement per ask and per report; anything the process's caches cannot
vouch for (another replica's write, pending trials, a spec change, a
re-created experiment, a stop decision) takes the locked path, with the
same answers. SQLite always takes the locked paths.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from kubetune_suggestion.engine.samplers.tpe import TPESampler
from kubetune_suggestion.service.core import _FINISH_TRIES, Report, TuningService
from kubetune_suggestion.service.errors import Conflict, NotFound
from kubetune_suggestion.service.models import StopAnswer, TrialAssignment, TrialState
from kubetune_suggestion.service.testing import EXAMPLE_ASHA, example_spec
from kubetune_suggestion.store.oneshot import OneShot
from tests.suggestion.service.spies import record_calls

UID = "fast-uid"


@pytest.fixture
def replicas(db_url: str) -> Iterator[tuple[TuningService, TuningService]]:
    """Two services on one database, as two replicas (each with its own caches)."""
    a = TuningService.open(db_url)
    b = TuningService.open(db_url, migrate=False)
    yield a, b
    a.close()
    b.close()


def _register(svc: TuningService, **overrides: Any) -> None:
    spec = {"algorithm": {"name": "tpe", "seed": 1, "settings": {"n_startup_trials": 2}}}
    svc.register(UID, "exp", "ns", example_spec(**{"maxTrials": 30, **spec, **overrides}))


def _run(svc: TuningService, trial: TrialAssignment, loss: float = 0.5) -> None:
    svc.report(UID, trial.number, trial.token, 1, {"loss": loss})
    svc.finish(UID, trial.number, "succeeded")


def _report(trial: TrialAssignment, step: int = 1, **metrics: float) -> Report:
    return Report(UID, trial.number, trial.token, step, metrics or {"loss": 0.5})


def test_the_steady_state_takes_one_statement_per_ask_and_report_on_postgres(
    replicas: tuple[TuningService, TuningService], monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, _ = replicas
    _register(svc)
    assert svc.ask_from_cache(UID, 1) is None  # nothing cached yet
    _run(svc, svc.ask(UID, 1).trials[0])
    if not svc.store.postgres:
        assert svc.ask_from_cache(UID, 1) is None
        assert svc.report_from_cache(_report(svc.ask(UID, 1).trials[0])) is None
        return
    # Every statement, the locked path's included, goes through a psycopg
    # cursor; a transaction around statements ends with a commit.
    statements = record_calls(monkeypatch, psycopg.Cursor, "execute")
    commits = record_calls(monkeypatch, psycopg.Connection, "commit")
    for i in range(1, 4):
        statements.clear()
        asked = svc.ask_from_cache(UID, 1)
        assert asked is not None and [t.number for t in asked.trials] == [i]
        assert len(statements) == 1
        trial = asked.trials[0]
        assert svc.report_from_cache(_report(trial, loss=0.1 * i)) == StopAnswer(stop=False)
        assert len(statements) == 2
        svc.finish(UID, trial.number, "succeeded")
    assert commits == []  # each statement was a transaction of its own (autocommit)
    summary = svc.summary(UID)
    assert summary.counts[TrialState.SUCCEEDED] == 4 and summary.allocated == 4


def test_the_fast_ask_keeps_to_parallelism(
    replicas: tuple[TuningService, TuningService],
) -> None:
    svc, other = replicas
    _register(svc)
    running = svc.ask(UID, 3, parallelism=3).trials
    svc.start_many(UID, [t.number for t in running])
    if svc.store.postgres:
        # Three running, none pending: the cache answers, and has no room.
        assert svc.ask_from_cache(UID, 5, parallelism=3) is None
        assert svc.ask(UID, 5, parallelism=3).trials == []
        _run(svc, running[0])
        asked = svc.ask_from_cache(UID, 5, parallelism=3)
        assert asked is not None and [t.number for t in asked.trials] == [3]
        svc.start(UID, 3)
        # A trial finished on another replica: this cache is stale, the
        # locked path counts from the store and frees exactly that slot.
        _run(other, running[1])
        assert [t.number for t in svc.ask(UID, 5, parallelism=3).trials] == [4]
    else:
        _run(svc, running[0])
        assert [t.number for t in svc.ask(UID, 5, parallelism=3).trials] == [3]


def test_a_stale_cache_gives_way_to_the_locked_path(
    replicas: tuple[TuningService, TuningService],
) -> None:
    a, b = replicas
    _register(a)
    _run(a, a.ask(UID, 1).trials[0])
    # Replica b allocates and finishes trials a's cache never saw.
    for _ in range(2):
        _run(b, b.ask(UID, 1).trials[0], loss=0.2)
    assert a.ask_from_cache(UID, 1) is None  # its conditional allocation found a newer version
    (trial,) = a.ask(UID, 1).trials
    assert trial.number == 3
    _run(a, trial)
    # Each ask allocates: two replicas never hand out the same trial.
    assert (a.ask(UID, 1).trials[0].number, b.ask(UID, 1).trials[0].number) == (4, 5)
    numbers = [t.number for t in a.trials(UID)]
    assert numbers == list(range(6))


def test_the_fast_ask_matches_what_the_locked_path_suggests(db_url: str) -> None:
    """The same history and sampler state give the same trial, whichever path allocates."""
    if db_url.startswith("sqlite"):
        pytest.skip("SQLite has only the locked path: nothing to compare it with")
    params: dict[str, list[dict[str, Any]]] = {}
    fast_asks = 0
    for mode in ("cached", "locked"):
        svc = TuningService.open(db_url)
        uid = f"{UID}-{mode}"
        svc.register(uid, "exp", "ns", example_spec(maxTrials=12, algorithm={"name": "tpe"}))
        params[mode] = []
        for _ in range(8):
            asked = svc.ask_from_cache(uid, 1) if mode == "cached" else None
            fast_asks += asked is not None
            if asked is None:
                asked = svc.ask_locked(uid, 1)
            trial = asked.trials[0]
            params[mode].append(trial.params)
            svc.report(uid, trial.number, trial.token, 1, {"loss": trial.params["lr"] * 10})
            svc.finish(uid, trial.number, "succeeded")
        svc.close()
    assert fast_asks == 7  # every ask but the first (nothing cached yet) took the fast path
    assert params["cached"] == params["locked"]


def test_pending_trials_are_handed_back_until_a_report_or_start(
    replicas: tuple[TuningService, TuningService],
) -> None:
    svc, _ = replicas
    _register(svc)
    first = svc.ask(UID, 2, ask_id="w").trials
    # Pending trials may be in the cache: a retry must get them back, so no fast path.
    assert svc.ask_from_cache(UID, 1, ask_id="w") is None
    assert svc.ask(UID, 2, ask_id="w").trials == first
    svc.report(UID, first[0].number, first[0].token, 1, {"loss": 0.3})
    svc.start(UID, first[1].number)
    if svc.store.postgres:
        asked = svc.ask_from_cache(UID, 1)
        assert asked is not None and [t.number for t in asked.trials] == [2]
    else:
        assert [t.number for t in svc.ask(UID, 1).trials] == [2]


def test_spec_changes_reach_both_fast_paths(
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
    if a.store.postgres:
        with pytest.raises(Conflict, match="already finished"):
            a.report_from_cache(_report(trial, step=2))
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


def test_replicas_racing_on_the_fast_paths_never_share_a_number_or_lose_a_report(
    replicas: tuple[TuningService, TuningService],
) -> None:
    """Threads on two replicas ask, report and finish at once; the conditional writes race."""
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


def test_the_fast_paths_come_back_after_a_change_sent_them_to_the_locked_path(
    replicas: tuple[TuningService, TuningService],
) -> None:
    a, b = replicas
    if not a.store.postgres:
        pytest.skip("SQLite has no fast paths")
    _register(a)
    _run(a, a.ask(UID, 1).trials[0])
    for change in ("spec", "re-created"):
        if change == "spec":
            _register(b, maxTrials=40)
        else:
            b.delete(UID)
            _register(b)
        fast = None
        for _ in range(4):  # a lost race is followed by one locked ask
            fast = a.ask_from_cache(UID, 1)
            asked = fast or a.ask(UID, 1)
            trial = asked.trials[0]
            report = _report(trial)
            answer = a.report_from_cache(report)
            if answer is None:
                answer = a.report_batch([report])[0]
            assert answer == StopAnswer(stop=False)
            a.finish(UID, trial.number, "succeeded")
            if fast is not None:
                break
        assert fast is not None, f"no fast ask after the {change}"
        trial = a.ask(UID, 1).trials[0]
        assert a.report_from_cache(_report(trial)) == StopAnswer(stop=False)
        a.finish(UID, trial.number, "succeeded")


def test_a_report_between_the_finish_read_and_write_is_counted(
    replicas: tuple[TuningService, TuningService], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A report slipping in after finish read the reports sends it round again."""
    a, b = replicas
    if not a.store.postgres:
        pytest.skip("SQLite has no unlocked finish")
    _register(a, objective={"metric": "loss", "direction": "minimize", "strategy": "min"})
    trial = a.ask(UID, 1).trials[0]
    a.report(UID, trial.number, trial.token, 1, {"loss": 0.5})
    write = OneShot.finish_if_unchanged
    calls: list[int] = []
    # a stored the only report itself: its first try uses what that report
    # left, without a read; then come the tries that read.
    tries = 1 + _FINISH_TRIES

    def racing(self: OneShot, *args: Any) -> int | None:
        calls.append(len(calls))
        n = len(calls)
        if n <= tries:  # every unlocked try loses to a report
            b.report(UID, trial.number, trial.token, 1 + n, {"loss": 0.5 - n / 10})
        return write(self, *args)

    monkeypatch.setattr(OneShot, "finish_if_unchanged", racing)
    view = a.finish(UID, trial.number, "succeeded")
    assert len(calls) == tries  # then the locked path answered
    assert view.objective == 0.5 - tries / 10 and view.last_step == 1 + tries
    with pytest.raises(Conflict):
        b.report(UID, trial.number, trial.token, 9, {"loss": 0.0})


@pytest.mark.parametrize("strategy", ["last", "min", "max"])
def test_a_finish_after_this_process_stored_every_report_skips_the_read(
    replicas: tuple[TuningService, TuningService],
    monkeypatch: pytest.MonkeyPatch,
    strategy: str,
) -> None:
    a, b = replicas
    if not a.store.postgres:
        pytest.skip("SQLite has no unlocked finish")
    _register(a, objective={"metric": "loss", "direction": "minimize", "strategy": strategy})
    reads = record_calls(monkeypatch, OneShot, "finish_read")
    _run(a, a.ask(UID, 1).trials[0])  # warms a's caches (the first report takes the lock)
    losses = [0.6, 0.3, 0.45]
    expected = {"last": 0.45, "min": 0.3, "max": 0.6}[strategy]

    # Every report through a, one repeated: the finish reads nothing back.
    mine = a.ask(UID, 1).trials[0]
    for step, loss in enumerate(losses, 1):
        assert a.report_from_cache(_report(mine, step, loss=loss)) == StopAnswer(stop=False)
    assert a.report_from_cache(_report(mine, 2, loss=0.1)) == StopAnswer(stop=False)  # kept 0.3
    reads.clear()
    view = a.finish(UID, mine.number, "succeeded")
    assert reads == [] and view.objective == expected and view.last_step == 3

    # One report through b in between: a's chain is broken, the finish reads.
    mixed = a.ask(UID, 1).trials[0]
    a.report_from_cache(_report(mixed, 1, loss=losses[0]))
    b.report(UID, mixed.number, mixed.token, 2, {"loss": losses[1]})
    a.report_from_cache(_report(mixed, 3, loss=losses[2]))
    view = a.finish(UID, mixed.number, "succeeded")
    assert reads == [(UID, mixed.number)] and view.objective == expected and view.last_step == 3

    # b's report after a's last one: a tries what it knows, loses, and reads.
    late = a.ask(UID, 1).trials[0]
    a.report_from_cache(_report(late, 1, loss=losses[0]))
    a.report_from_cache(_report(late, 2, loss=losses[1]))
    b.report(UID, late.number, late.token, 3, {"loss": losses[2]})
    view = a.finish(UID, late.number, "succeeded")
    assert reads == [(UID, mixed.number), (UID, late.number)]
    assert view.objective == expected and view.last_step == 3
    stored = {t.number: t.objective for t in b.trials(UID)}
    assert stored[mine.number] == stored[mixed.number] == stored[late.number] == expected


def _tell(svc: TuningService, uid: str, trial: TrialAssignment, state: str = "succeeded") -> None:
    metrics = {"loss": trial.params["lr"] * 10} if state == "succeeded" else None
    svc.finish(uid, trial.number, state, metrics=metrics, token=trial.token)


@pytest.mark.parametrize("algorithm", ["tpe", "cmaes", "sobol", "random"])
def test_a_prepared_suggestion_is_the_one_the_ask_would_have_made(
    db_url: str, algorithm: str
) -> None:
    """Asks answer alike with and without suggestions worked out ahead of them.

    Also when a prepared suggestion goes unused: working it out must leave
    no trace in the sampler (CMA-ES keeps its optimizer between calls).
    """
    params: dict[str, list[dict[str, Any]]] = {}
    for mode in ("prepared", "plain"):
        svc = TuningService.open(db_url)
        uid = f"{UID}-{mode}"
        algo = {"name": algorithm, "seed": 3}
        if algorithm == "cmaes":
            algo["settings"] = {"popsize": 4}
        svc.register(uid, "exp", "ns", example_spec(maxTrials=30, algorithm=algo))
        params[mode] = []
        for i in range(12):
            # Every fourth ask wants two trials: a prepared one is then left unused.
            for trial in svc.ask(uid, 2 if i % 4 == 3 else 1).trials:
                params[mode].append(trial.params)
                _tell(svc, uid, trial)
            if mode == "prepared":
                assert svc.prepare_ask(uid) is svc.store.postgres
            if i % 3 == 2:  # a change after the prepare: the next ask must not use it
                extra = svc.ask(uid, 1).trials[0]
                params[mode].append(extra.params)
                _tell(svc, uid, extra, "failed")
        svc.close()
    assert len(params["plain"]) == 19 and params["prepared"] == params["plain"]


def test_an_ask_after_a_prepare_runs_no_sampler_unless_something_changed(
    replicas: tuple[TuningService, TuningService], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _ = replicas
    if not a.store.postgres:
        pytest.skip("SQLite has no cached ask to prepare")
    _register(a)
    calls = record_calls(monkeypatch, TPESampler, "suggest")
    _tell(a, UID, a.ask(UID, 1).trials[0])  # warms a's caches
    assert a.prepare_ask(UID) and len(calls) == 2
    asked = a.ask_from_cache(UID, 1)
    assert asked is not None and len(calls) == 2  # the prepared suggestion
    _tell(a, UID, asked.trials[0])
    # Prepared while another trial still runs, which then finishes: the
    # history changed, so the ask works out a suggestion of its own.
    running, other = a.ask(UID, 2).trials
    a.start(UID, running.number)
    _tell(a, UID, other)
    assert a.prepare_ask(UID)
    _tell(a, UID, running)
    calls.clear()
    asked = a.ask_from_cache(UID, 1)
    assert asked is not None and len(calls) == 1
    # A prepare while a trial is pending (an ask with its ask id must get it
    # back: asks take the locked path) does nothing.
    assert not a.prepare_ask(UID) and len(calls) == 1
