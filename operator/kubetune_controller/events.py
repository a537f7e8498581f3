"""Combining frequent Events: one per reason and object per window, not one per trial.

An experiment of a thousand trials would otherwise write a thousand
``TrialCreated`` Events (and as many ``TrialPruned``): each is an API write,
and ``kubectl describe`` would show a wall of them. Kubernetes' own event
recorder drops such floods (a per-object token bucket); this keeps every
trial's name instead, in fewer Events.

The first event of a (object, reason) goes out at once, so a person watching
sees activity immediately; those that follow within ``window`` seconds of it
are held and go out together, as one Event naming each trial, when the window
closes. Pure logic: the caller supplies the clock and writes the Events.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

# The Event message limit the operator keeps to (kubectl shows it whole).
MAX_MESSAGE = 1024


@dataclass(frozen=True)
class PendingEvent:
    """An Event ready to be written: what :func:`~kubetune_controller.pods.build_event` takes."""

    involved: Mapping[str, str]
    reason: str
    message: str
    warning: bool
    # For a combined Event: when its first and last events happened, and how
    # many it stands for (the Event's firstTimestamp, lastTimestamp, count).
    first: datetime | None = None
    last: datetime | None = None
    count: int = 1


@dataclass
class _HeldEvents:
    """The events of one (object, reason) held while its window is open."""

    # When the window opened (the caller's monotonic clock).
    opened: float
    # The object the events are about (an Event's involvedObject).
    involved: Mapping[str, str]
    # Whether any held event is a warning (the combined Event is one then).
    warning: bool
    # The held events' messages and when each happened, in arrival order.
    held: list[str] = field(default_factory=list)
    times: list[datetime | None] = field(default_factory=list)

    def combined(self, reason: str) -> PendingEvent:
        """One Event for every held event."""
        return PendingEvent(
            self.involved,
            reason,
            combine(self.held),
            self.warning,
            first=self.times[0],
            last=self.times[-1],
            count=len(self.held),
        )


def combine(messages: list[str], limit: int = MAX_MESSAGE) -> str:
    """One message for several: how many, then each one, cut to ``limit`` characters.

    >>> combine(["created trial a-0 (x=1)", "created trial a-1 (x=2)"])
    '(combined 2): created trial a-0 (x=1); created trial a-1 (x=2)'
    """
    if len(messages) == 1:
        return messages[0][:limit]
    head = f"(combined {len(messages)}): "
    text = head + "; ".join(messages)
    if len(text) <= limit:
        return text
    kept: list[str] = []
    size = len(head)
    for i, message in enumerate(messages):
        tail = f"; ... and {len(messages) - i} others"
        if size + len(message) + 2 + len(tail) > limit:
            return head + "; ".join(kept) + tail
        kept.append(message)
        size += len(message) + 2
    return text[:limit]  # unreachable: the whole text did not fit


class EventBatcher:
    """Holds events of the same reason about the same object for ``window`` seconds.

    Args:
        window: Seconds an (object, reason) stays open after an Event about it
            was written; events arriving meanwhile are combined.
    """

    def __init__(self, window: float) -> None:
        self.window = window
        self._windows: dict[tuple[str, str], _HeldEvents] = {}

    def add(
        self,
        involved: Mapping[str, str],
        reason: str,
        message: str,
        warning: bool,
        now: float,
        when: datetime | None = None,
    ) -> list[PendingEvent]:
        """Record one event; the Events to write now (none while a window is open).

        ``now`` is the monotonic clock the windows run on; ``when``, the
        wall-clock time the event happened, dates it if it is held.
        """
        key = (involved.get("uid") or involved["name"], reason)
        ready = self._close(key, now)
        window = self._windows.get(key)
        if window is None:
            self._windows[key] = _HeldEvents(now, involved, warning)
            return [*ready, PendingEvent(involved, reason, message, warning)]
        window.held.append(message)
        window.times.append(when)
        window.warning = window.warning or warning
        return ready

    def due(self, now: float) -> list[PendingEvent]:
        """The combined Events whose window closed by ``now``."""
        ready: list[PendingEvent] = []
        for key in list(self._windows):
            ready += self._close(key, now)
        return ready

    def flush(self, uid: str) -> list[PendingEvent]:
        """Every event held about the object ``uid``, combined, whatever the time.

        Written before a one-off Event about the same object (the experiment
        ending), so that ``kubectl describe`` lists the trials created and
        pruned before the end above the end itself.
        """
        ready: list[PendingEvent] = []
        for key in [k for k in self._windows if k[0] == uid]:
            window = self._windows.pop(key)
            if window.held:
                ready.append(window.combined(key[1]))
        return ready

    def drain(self) -> list[PendingEvent]:
        """Every held event, combined, whatever the time (at shutdown)."""
        return self.due(float("inf"))

    def _close(self, key: tuple[str, str], now: float) -> list[PendingEvent]:
        window = self._windows.get(key)
        if window is None or now - window.opened < self.window:
            return []
        del self._windows[key]
        if not window.held:
            return []
        # What was held opens the next window: a steady stream of events
        # becomes one Event per window.
        self._windows[key] = _HeldEvents(now, window.involved, window.warning)
        return [window.combined(key[1])]
