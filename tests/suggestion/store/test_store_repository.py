"""The store's operations: constraints, idempotency, cascades."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.exc import IntegrityError

from kubetune_suggestion.store import AskedBy, ExpiredTrial, NewTrial, Store, TrialRow, WriteTxn

SPEC = {"objective": {"metric": "loss"}}


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store.open(db_url)
    yield s
    s.close()


def _experiment(store: Store, uid: str = "uid-1") -> int:
    with store.write() as tx:
        assert tx.insert_experiment_if_absent(uid, "exp", "ns", SPEC)
        assert not tx.insert_experiment_if_absent(uid, "other", "ns", SPEC)
    row = store.experiment(uid)
    assert row is not None and row.name == "exp" and row.next_number == 0
    return row.id


def _allocate(tx: WriteTxn, eid: int, params: list[dict[str, Any]], version: int = 1) -> None:
    """Allocate trials numbered from 0 with these params (no ask id, no lease)."""
    tx.allocate(eid, [NewTrial(n, p) for n, p in enumerate(params)], version, len(params), None)


def _lock(tx: WriteTxn, number: int) -> TrialRow:
    found = tx.lock_trial_of("uid-1", number)
    assert found is not None
    return found[2]


def test_trial_numbers_are_unique_per_experiment(store: Store) -> None:
    eid = _experiment(store)
    with store.write() as tx:
        _allocate(tx, eid, [{"x": 1}, {"x": 2}])
    with pytest.raises(IntegrityError), store.write() as tx:
        tx.allocate(eid, [NewTrial(1, {"x": 3})], 2, 2, None)
    assert [t.number for t, _ in store.trials(eid)] == [0, 1]


def test_an_observation_is_stored_once_per_step(store: Store) -> None:
    eid = _experiment(store)
    with store.write() as tx:
        _allocate(tx, eid, [{"x": 1}])
        trial = _lock(tx, 0)
        assert tx.store_reports([(trial.id, 1, {"loss": 0.5}, 0.5)]) == {(trial.id, 1)}
        # A retried step, and a batch holding the same step twice, store nothing twice.
        rows = [
            (trial.id, 1, {"loss": 0.1}, 0.1),
            (trial.id, 2, {"loss": 0.4, "acc": 0.9}, 0.4),
            (trial.id, 2, {"loss": 0.3}, 0.3),
        ]
        assert tx.store_reports(rows) == {(trial.id, 2)}
        assert tx.store_reports([]) == set()
    assert store.observations(eid) == {0: [(1, {"loss": 0.5}), (2, {"loss": 0.4, "acc": 0.9})]}
    assert store.last_step(trial.id) == 2


def test_stop_orders_are_listed_until_the_trial_finishes(store: Store) -> None:
    eid = _experiment(store)
    with store.write() as tx:
        _allocate(tx, eid, [{}, {}])
        t0 = _lock(tx, 0)
        assert tx.add_stop_order(t0.id, "too slow", 1)
        assert not tx.add_stop_order(t0.id, "again", 1)
    assert [(s.experiment_uid, s.number, s.reason) for s in store.open_stops()] == [
        ("uid-1", 0, "too slow")
    ]
    assert store.open_stops("another") == []
    with store.write() as tx:
        tx.update_trial(t0.id, state="pruned")
        tx.close_stop_order(t0.id)
    assert store.open_stops() == []
    trial = store.trial(eid, 0)
    assert trial is not None and trial.stop_reason == "too slow"


def test_deleting_an_experiment_deletes_what_it_owns(store: Store) -> None:
    eid = _experiment(store)
    with store.write() as tx:
        _allocate(tx, eid, [{}])
        trial = _lock(tx, 0)
        tx.store_reports([(trial.id, 0, {"loss": 1.0}, 1.0)])
        tx.add_stop_order(trial.id, "r", 1)
        assert tx.delete_experiment("uid-1")
        assert not tx.delete_experiment("uid-1")
    assert store.experiment("uid-1") is None
    assert store.open_stops() == []
    assert store.observations(eid) == {}
    # A re-created experiment gets a new id: caches keyed by id cannot mix them up.
    assert _experiment(store) != eid


def test_the_secret_is_created_once_and_shared(store: Store) -> None:
    first = store.secret("aaa")
    assert first == "aaa"
    assert store.secret("bbb") == "aaa"


def test_bulk_prefill_counts_as_allocated_history(store: Store) -> None:
    eid = _experiment(store)
    store.bulk_insert_finished(eid, [(i, {"x": i}, float(i)) for i in range(5)])
    row = store.experiment("uid-1")
    assert row is not None and row.next_number == 5 and row.history_version == 1
    assert store.count_states(eid) == {"succeeded": 5}
    best = store.best_trial(eid, maximize=False)
    assert best is not None and best.number == 0


def test_an_ask_reads_what_changed_and_what_is_pending(store: Store) -> None:
    """allocate, ask_trials, store_reports, lock_for_finish and finish_trial, in turn."""
    eid = _experiment(store)
    with store.write() as tx:
        tx.allocate(eid, [NewTrial(0, {"x": 1}), NewTrial(1, {"x": 2.5})], 1, 2, {"seed": 3})
    row = store.experiment("uid-1")
    assert row is not None
    assert (row.next_number, row.history_version, row.sampler_state) == (2, 1, {"seed": 3})
    with store.write() as tx:
        # Nothing changed since version 1, but both trials are pending.
        read = tx.ask_trials(eid, 1, None, time.time())
        assert read.changed == [] and read.expired == []
        assert [(t.number, t.state, t.params) for t in read.pending] == [
            (0, "pending", {"x": 1}),
            (1, "pending", {"x": 2.5}),
        ]
        assert read.mine == frozenset()  # allocated under no ask id
        locked = tx.lock_trials_of("uid-1", [1, 0, 7])
        assert sorted(locked) == [0, 1]
        t0 = locked[0][2]
        assert locked[1][2].number == 1
        tx.mark_running([t0.id])
        stored = tx.store_reports([(t0.id, 1, {"loss": 0.5}, 0.5), (t0.id, 1, {"loss": 0.4}, 0.4)])
        assert stored == {(t0.id, 1)}
        assert tx.store_reports([(t0.id, 2, {"acc": 0.9}, None)]) == {(t0.id, 2)}
        tx.add_stop_order(t0.id, "too slow", 1)
    assert store.observations(eid) == {0: [(1, {"loss": 0.5}), (2, {"acc": 0.9})]}
    with store.write() as tx:
        assert tx.lock_for_finish("uid-1", 9) is None
        assert tx.lock_for_finish("nope", 0) is None
        found = tx.lock_for_finish("uid-1", 0)
        assert found is not None
        assert (found.experiment_id, found.spec_version, found.history_version) == (eid, 1, 1)
        trial = found.trial
        assert trial.state == "running" and trial.started_at is not None
        assert found.reported == [(1, 0.5), (2, None)]
        tx.finish_trial(
            eid,
            trial.id,
            2,
            True,
            state="pruned",
            objective=0.5,
            message=None,
            started_at=trial.started_at,
            finished_at=trial.started_at,
        )
        # What changed after version 1 (trial 0), and what is still pending (trial 1).
        read = tx.ask_trials(eid, 1, None, time.time())
        assert [(t.number, t.state) for t in read.changed] == [(0, "pruned")]
        assert [t.number for t in read.pending] == [1]
        assert tx.ask_trials(eid, 2, None, time.time()).changed == []
    assert store.open_stops() == []
    ended = store.trial(eid, 0)
    assert ended is not None
    assert (ended.state, ended.objective, ended.stop_reason) == ("pruned", 0.5, "too slow")
    row = store.experiment("uid-1")
    assert row is not None and row.history_version == 2 and row.next_number == 2


def test_ask_trials_tells_the_pending_trials_of_an_ask_id(store: Store) -> None:
    eid = _experiment(store)
    now = time.time()
    with store.write() as tx:
        tx.allocate(eid, [NewTrial(0, {"x": 1})], 1, 1, None, AskedBy("op"))
        tx.allocate(eid, [NewTrial(1, {"x": 2})], 2, 2, None, AskedBy("other"))
        tx.allocate(eid, [NewTrial(2, {"x": 3})], 3, 3, None)
        assert tx.ask_trials(eid, 3, "op", now).mine == frozenset({0})
        assert tx.ask_trials(eid, 3, "other", now).mine == frozenset({1})
        assert tx.ask_trials(eid, 3, "nobody", now).mine == frozenset()
        tx.mark_running([_lock(tx, 0).id])
        assert tx.ask_trials(eid, 3, "op", now).mine == frozenset()  # started: not handed out again


def test_expire_fails_the_silent_trials(store: Store) -> None:
    eid = _experiment(store)
    now = time.time()
    with store.write() as tx:
        tx.allocate(eid, [NewTrial(0, {})], 1, 1, None, AskedBy(None, 10, now - 1))
        tx.allocate(eid, [NewTrial(1, {})], 2, 2, None, AskedBy(None, 60, now + 59))
        tx.allocate(eid, [NewTrial(2, {})], 3, 3, None)
        tx.add_stop_order(_lock(tx, 0).id, "worse than its rung", 1)
        read = tx.ask_trials(eid, 3, None, now)
        assert [t.number for t in read.pending] == [1, 2]
        expired = tx.expire(eid, read.expired, 4)
    assert expired == [ExpiredTrial(0, 10)]
    failed = store.trial(eid, 0)
    assert failed is not None
    assert (failed.state, failed.history_version) == ("failed", 4)
    assert failed.message is not None
    assert failed.message.startswith("lease expired: no start, report or finish within 10 s")
    assert store.open_stops() == []
    row = store.experiment("uid-1")
    assert row is not None and row.history_version == 4
    with store.write() as tx:
        # Nothing more to expire: nothing written.
        assert tx.ask_trials(eid, 4, None, now).expired == []
        assert tx.expire(eid, [], 5) == []
        # A start renews the lease from now: past the old expiry.
        tx.mark_running([_lock(tx, 1).id])
        assert tx.ask_trials(eid, 4, None, now + 59.5).expired == []
        assert [t.number for t in tx.ask_trials(eid, 4, None, time.time() + 61).expired] == [1]
    row = store.experiment("uid-1")
    assert row is not None and row.history_version == 4
