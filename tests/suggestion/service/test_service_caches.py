"""The service's process-local caches, without a database."""

from __future__ import annotations

from kubetune_suggestion.engine.history import Direction, TrialRecord, TrialState
from kubetune_suggestion.service.caches import Backoff, Head, HistoryCache, SamplerHistory, UidHints


def _history(version: int, pending: frozenset[int]) -> SamplerHistory:
    records = {
        0: TrialRecord(0, {"x": 0}, TrialState.SUCCEEDED, 0.5),
        1: TrialRecord(1, {"x": 1}, TrialState.RUNNING),
    }
    head = Head(spec_version=1, next_number=2, sampler_state={"calls": 1}, pending=pending)
    return SamplerHistory(version, records, best=0.5, head=head)


def test_a_finish_advances_only_the_history_just_before_it() -> None:
    cache = HistoryCache()
    cache.remember(7, _history(3, frozenset({1})))
    done = TrialRecord(1, {"x": 1}, TrialState.SUCCEEDED, 0.25)
    cache.advance(7, 5, done, Direction.MINIMIZE)  # from 4: a version this cache never saw
    cached = cache.get(7)
    assert cached is not None and cached.version == 3
    cache.advance(7, 4, done, Direction.MINIMIZE)
    cached = cache.get(7)
    assert cached is not None and cached.version == 4 and cached.best == 0.25
    assert cached.records[1] is done and cached.head is not None
    assert cached.head.pending == frozenset() and cached.head.next_number == 2


def test_started_trials_leave_the_pending_set_at_the_same_version() -> None:
    cache = HistoryCache()
    cache.remember(7, _history(3, frozenset({1, 2})))
    cache.started(7, [2, 9])
    cached = cache.get(7)
    assert cached is not None and cached.version == 3
    assert cached.head is not None and cached.head.pending == frozenset({1})
    # An older history is never remembered over a newer one.
    cache.remember(7, _history(2, frozenset()))
    cached = cache.get(7)
    assert cached is not None and cached.version == 3


def test_uid_hints_take_the_latest_guess() -> None:
    hints = UidHints()
    hints.put("uid", 1, 1)
    hints.put("uid", 4, 2)
    assert hints.get("uid") == (4, 2) and hints.get("other") is None


def test_backoff_skips_more_calls_after_each_lost_race_and_resets_on_a_win() -> None:
    backoff = Backoff(limit=5)
    assert backoff.should_try("e")
    skipped = []
    for _ in range(4):
        backoff.lost("e")
        n = 0
        while not backoff.should_try("e"):
            n += 1
        skipped.append(n)
    assert skipped == [1, 3, 5, 5]
    backoff.won("e")
    assert backoff.should_try("e") and backoff.should_try("e")


def test_looking_at_the_backoff_counts_no_skipped_call() -> None:
    backoff = Backoff(limit=5)
    assert not backoff.skipping("e")
    backoff.lost("e")
    backoff.lost("e")  # the next 3 calls skip
    assert all(backoff.skipping("e") for _ in range(10))
    assert [backoff.should_try("e") for _ in range(4)] == [False, False, False, True]
    assert not backoff.skipping("e")
