"""Combining per-trial Events (pure logic, explicit clock)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kubetune_controller.events import MAX_MESSAGE, EventBatcher, combine

EXP = {"apiVersion": "kubetune.io/v1alpha1", "kind": "Experiment", "name": "e", "uid": "u1"}
OTHER = {**EXP, "name": "f", "uid": "u2"}


def test_first_event_goes_out_at_once_and_a_burst_becomes_one_event() -> None:
    b = EventBatcher(window=5.0)
    first = b.add(EXP, "TrialCreated", "created trial e-0 (x=1)", False, now=0.0)
    assert [e.message for e in first] == ["created trial e-0 (x=1)"]
    for i in range(1, 4):
        assert b.add(EXP, "TrialCreated", f"created trial e-{i} (x=1)", False, now=float(i)) == []
    assert b.due(4.9) == []
    (combined,) = b.due(5.0)
    assert combined.reason == "TrialCreated"
    assert combined.involved == EXP
    assert combined.message == (
        "(combined 3): created trial e-1 (x=1); created trial e-2 (x=1); created trial e-3 (x=1)"
    )


def test_reasons_and_objects_have_windows_of_their_own() -> None:
    b = EventBatcher(window=5.0)
    assert len(b.add(EXP, "TrialCreated", "a", False, 0.0)) == 1
    assert len(b.add(EXP, "TrialPruned", "b", False, 0.1)) == 1
    assert len(b.add(OTHER, "TrialCreated", "c", False, 0.2)) == 1
    assert b.add(EXP, "TrialCreated", "d", False, 0.3) == []


def test_a_quiet_window_lets_the_next_event_through_at_once() -> None:
    b = EventBatcher(window=5.0)
    b.add(EXP, "TrialCreated", "a", False, 0.0)
    assert b.due(6.0) == []  # nothing was held
    assert [e.message for e in b.add(EXP, "TrialCreated", "b", False, 7.0)] == ["b"]


def test_a_steady_stream_is_one_event_per_window_and_nothing_is_lost() -> None:
    b = EventBatcher(window=1.0)
    written = []
    for i in range(100):  # ten events a second for ten seconds
        now = i / 10
        written += b.add(EXP, "TrialCreated", f"t{i}", False, now)
        written += b.due(now)
    written += b.drain()
    assert 10 <= len(written) <= 12
    names = [m for e in written for m in e.message.removeprefix("(combined ").split(": ")[-1:]]
    seen = {part for text in names for part in text.split("; ")}
    assert {f"t{i}" for i in range(100)} <= seen


def test_a_warning_held_with_normal_events_makes_the_combined_event_a_warning() -> None:
    b = EventBatcher(window=5.0)
    b.add(EXP, "TrialFailed", "a", True, 0.0)
    b.add(EXP, "TrialFailed", "b", False, 1.0)
    b.add(EXP, "TrialFailed", "c", True, 2.0)
    (event,) = b.drain()
    assert event.warning


def test_combined_message_is_cut_to_the_limit_saying_how_many_are_left_out() -> None:
    text = combine([f"created trial exp-{i} (lr=0.001234, layers=3)" for i in range(200)])
    assert len(text) <= MAX_MESSAGE
    assert text.startswith("(combined 200): created trial exp-0 ")
    assert text.endswith(" others")
    assert combine(["only one"]) == "only one"


def test_flushing_an_object_releases_only_its_held_events_at_once() -> None:
    """The experiment's end is written after what was held about it, not before."""
    b = EventBatcher(window=5.0)
    b.add(EXP, "TrialCreated", "created e-0", False, 0.0)
    b.add(EXP, "TrialCreated", "created e-1", False, 0.5)
    b.add(EXP, "TrialPruned", "pruned e-0", False, 0.6)
    b.add(EXP, "TrialPruned", "pruned e-1", True, 0.7)
    b.add(OTHER, "TrialCreated", "created f-0", False, 0.8)
    b.add(OTHER, "TrialCreated", "created f-1", False, 0.9)

    flushed = b.flush("u1")
    assert [(e.reason, e.message, e.warning) for e in flushed] == [
        ("TrialCreated", "created e-1", False),
        ("TrialPruned", "pruned e-1", True),
    ]
    assert b.flush("u1") == []
    # The other experiment's window is untouched and closes on time.
    assert b.due(4.9) == []
    assert [e.message for e in b.due(5.8)] == ["created f-1"]
    # A flushed object starts afresh: its next event goes out at once.
    assert [e.message for e in b.add(EXP, "TrialCreated", "created e-2", False, 1.0)] == [
        "created e-2"
    ]


def test_a_combined_event_is_dated_by_what_it_combines() -> None:
    b = EventBatcher(window=5.0)
    t0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    b.add(EXP, "TrialCreated", "created e-0", False, 0.0, when=t0)
    for i in range(1, 4):
        b.add(
            EXP, "TrialCreated", f"created e-{i}", False, float(i), when=t0 + timedelta(seconds=i)
        )
    (combined,) = b.due(5.0)
    assert (combined.first, combined.last, combined.count) == (
        t0 + timedelta(seconds=1),
        t0 + timedelta(seconds=3),
        3,
    )
