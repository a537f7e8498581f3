"""One-statement conditional writes (PostgreSQL): they write only what the caller assumed.

The races are real: a transaction of another connection holds the row lock
and changes the row while the statement waits for it, as another replica's
locked path would.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kubetune_suggestion.store import NewTrial, Store
from kubetune_suggestion.store.oneshot import FinishRead, ReportOutcome
from kubetune_suggestion.store.rows import utcnow

SPEC = {"objective": {"metric": "loss"}}
UID = "uid-1"

# Only PostgreSQL has them (SQLite's service always takes its locked paths).
pytestmark = pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store.open(db_url)
    assert s.postgres
    yield s
    s.close()


def _experiment_with_trial(store: Store, state: str = "running") -> tuple[int, int]:
    """(experiment id, trial id) of an experiment at history version 1 with trial 0."""
    with store.write() as tx:
        assert tx.insert_experiment_if_absent(UID, "exp", "ns", SPEC)
        row = tx.lock_experiment(UID)
        assert row is not None
        tx.allocate(row.id, [NewTrial(0, {"x": 1})], 1, 1, {"calls": 1})
        trial = tx.lock_trial(row.id, 0)
        assert trial is not None
        if state != "pending":
            tx.update_trial(trial.id, state=state)
    return row.id, trial.id


def _report(store: Store, eid: int, spec_version: int = 1, step: int = 1) -> ReportOutcome | None:
    with store.oneshot() as db:
        return db.report_if_current(UID, 0, (eid, spec_version), step, {"loss": 0.5}, 0.5)


def _in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(call()))
    thread.start()
    return thread, out


def test_allocation_happens_only_at_the_expected_versions(store: Store) -> None:
    eid, _ = _experiment_with_trial(store)
    new = [NewTrial(1, {"x": 2}), NewTrial(2, {"x": 3})]
    with store.oneshot() as db:
        # A stale history version, spec version or next number: nothing written.
        for expected in [(0, 1, 1), (1, 2, 1), (1, 1, 0)]:
            assert db.allocate_if_current(eid, expected, new, {"calls": 2}) is None
        assert db.allocate_if_current(eid + 1, (1, 1, 1), new, {"calls": 2}) is None
    row = store.experiment(UID)
    assert row is not None and (row.history_version, row.next_number) == (1, 1)
    assert [t.number for t, _ in store.trials(eid)] == [0]
    with store.oneshot() as db:
        done = db.allocate_if_current(eid, (1, 1, 1), new, {"calls": 2, "f": 0.1})
    assert done is not None and done.sampler_state == {"calls": 2, "f": 0.1}
    row = store.experiment(UID)
    assert row is not None and (row.history_version, row.next_number) == (2, 3)
    assert row.sampler_state == done.sampler_state
    trials = [t for t, _ in store.trials(eid)]
    assert [(t.number, t.state, t.history_version) for t in trials[1:]] == [
        (1, "pending", 2),
        (2, "pending", 2),
    ]


def test_an_allocation_waiting_for_a_locked_allocation_writes_nothing(store: Store) -> None:
    eid, _ = _experiment_with_trial(store)
    with store.write() as tx:
        assert tx.lock_experiment(UID) is not None

        def allocate() -> Any:
            with store.oneshot() as db:
                return db.allocate_if_current(eid, (1, 1, 1), [NewTrial(1, {"x": 9})], None)

        thread, out = _in_thread(allocate)
        thread.join(0.3)
        assert thread.is_alive()  # waiting for the row lock
        tx.allocate(eid, [NewTrial(1, {"x": 2})], 2, 2, {"calls": 2})
    thread.join(10)
    assert out == [None]
    trials = [t for t, _ in store.trials(eid)]
    assert [(t.number, t.params) for t in trials] == [(0, {"x": 1}), (1, {"x": 2})]


def _found(outcome: ReportOutcome | None) -> tuple[Any, ...] | None:
    """What a report found and did, without the row versions it also answers."""
    if outcome is None:
        return None
    return (outcome.trial_id, outcome.state, outcome.stop_reason, outcome.stored)


def test_a_report_is_stored_once_and_starts_a_pending_trial(store: Store) -> None:
    eid, trial_id = _experiment_with_trial(store, state="pending")
    first = _report(store, eid)
    assert _found(first) == (trial_id, "pending", None, True)
    again = _report(store, eid)
    assert _found(again) == (trial_id, "running", None, False)
    # What a finish could use instead of reading back: the row each report
    # left, its version, and the reports stored before (a chain of versions).
    assert first is not None and again is not None
    assert first.reports_before == 0 and again.reports_before == 1
    assert first.after is not None and first.after.state == "running"
    assert again.before == first.after_version != first.before
    view = store.trial(eid, 0)
    assert view is not None and view.state == "running" and view.started_at is not None
    assert store.observations(eid) == {0: [(1, {"loss": 0.5})]}


def test_a_report_under_other_ids_or_spec_writes_nothing(store: Store) -> None:
    eid, _ = _experiment_with_trial(store, state="pending")
    assert _report(store, eid, spec_version=2) is None
    assert _report(store, eid + 1) is None
    with store.oneshot() as db:
        assert db.report_if_current(UID, 5, (eid, 1), 1, {"loss": 0.5}, 0.5) is None
    view = store.trial(eid, 0)
    assert view is not None and view.state == "pending"
    assert store.observations(eid) == {}


def test_a_report_of_a_finished_trial_stores_nothing(store: Store) -> None:
    eid, trial_id = _experiment_with_trial(store, state="succeeded")
    outcome = _report(store, eid)
    assert _found(outcome) == (trial_id, "succeeded", None, False)
    assert outcome is not None and outcome.after is None  # nothing written
    assert store.observations(eid) == {}


def test_a_report_waiting_for_a_finishing_trial_sees_it_finished(store: Store) -> None:
    eid, trial_id = _experiment_with_trial(store, state="pending")
    with store.write() as tx:
        assert tx.lock_for_finish(UID, 0) is not None
        thread, out = _in_thread(lambda: _report(store, eid))
        thread.join(0.3)
        assert thread.is_alive()  # waiting for the trial's row lock
        tx.finish_trial(
            eid,
            trial_id,
            2,
            False,
            state="failed",
            objective=None,
            message="gone",
            started_at=utcnow(),
            finished_at=utcnow(),
        )
    thread.join(10)
    assert [_found(o) for o in out] == [(trial_id, "failed", None, False)]
    view = store.trial(eid, 0)
    assert view is not None and view.state == "failed"
    assert store.observations(eid) == {}


def test_a_failed_statement_does_not_return_its_connection_to_the_pool(store: Store) -> None:
    eid, _ = _experiment_with_trial(store)
    with pytest.raises(Exception, match="uq_trials_experiment_number"), store.oneshot() as db:
        # Numbers that exist already: the unique constraint refuses them.
        db.allocate_if_current(eid, (1, 1, 1), [NewTrial(0, {"x": 5})], None)
    with store.oneshot() as db:
        assert db.allocate_if_current(eid, (1, 1, 1), [NewTrial(1, {"x": 5})], None) is not None
    with store.write() as tx:
        assert tx.lock_experiment(UID) is not None


def _finish(store: Store, read: FinishRead) -> int | None:
    with store.oneshot() as db:
        return db.finish_if_unchanged(read, "succeeded", 0.5, None, utcnow(), utcnow())


def _read(store: Store) -> FinishRead:
    with store.oneshot() as db:
        read = db.finish_read(UID, 0)
    assert read is not None
    return read


def test_a_finish_reads_the_reports_and_ends_the_trial_if_it_did_not_change(
    store: Store,
) -> None:
    eid, trial_id = _experiment_with_trial(store, state="pending")
    with store.oneshot() as db:
        assert db.finish_read(UID, 1) is None and db.finish_read("nope", 0) is None
    read = _read(store)
    assert read.observed == [] and read.trial.state == "pending"
    assert _report(store, eid, step=3) is not None
    assert _report(store, eid, step=1) is not None
    assert _finish(store, read) is None  # reports came in since the read
    read = _read(store)
    assert read.observed == [(1, 0.5), (3, 0.5)] and read.trial.state == "running"
    with store.write() as tx:
        assert tx.add_stop_order(trial_id, "stopped by a rule", 1)
    assert _finish(store, read) is None  # so did a stop order
    read = _read(store)
    assert _finish(store, read) == 2
    assert _finish(store, read) is None  # it ended: nothing twice
    view = store.trial(eid, 0)
    assert view is not None and (view.state, view.objective, view.history_version) == (
        "succeeded",
        0.5,
        2,
    )
    row = store.experiment(UID)
    assert row is not None and row.history_version == 2
    assert store.open_stops() == []


def test_a_report_of_the_locked_path_also_makes_a_finish_read_again(store: Store) -> None:
    _experiment_with_trial(store)
    read = _read(store)
    with store.write() as tx:
        hit = tx.lock_trials_of(UID, [0])[0]
        tx.store_reports([(hit[2].id, 1, {"loss": 0.1}, 0.1)], [])
    assert _finish(store, read) is None
    assert _read(store).observed == [(1, 0.1)]


def test_a_finish_waiting_for_a_report_in_progress_writes_nothing(store: Store) -> None:
    eid, trial_id = _experiment_with_trial(store)
    read = _read(store)
    with store.write() as tx:
        assert tx.lock_trials_of(UID, [0])
        thread, out = _in_thread(lambda: _finish(store, read))
        thread.join(0.3)
        assert thread.is_alive()  # waiting for the trial's row lock
        tx.store_reports([(trial_id, 1, {"loss": 0.1}, 0.1)], [])
    thread.join(10)
    assert out == [None]
    view = store.trial(eid, 0)
    assert view is not None and view.state == "running"
