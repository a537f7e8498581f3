"""What an ask hands out, decided inside its write transaction.

:meth:`~.core.TuningService.ask` locks the experiment's row, brings the
cached sampler history up to the stored one and fails the trials whose lease
ran out; :func:`hand_out` then gives the ask id's pending trials back and
allocates new ones, within ``maxTrials`` and the parallelism asked for.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubetune_suggestion.service import logic
from kubetune_suggestion.service.cache import SamplerHistory
from kubetune_suggestion.service.compiled import Compiled
from kubetune_suggestion.service.errors import InvalidInput
from kubetune_suggestion.service.models import AskResult, TrialAssignment
from kubetune_suggestion.store import AskedBy, ExperimentRow, NewTrial, WriteTxn
from kubetune_suggestion.store.writes import AskTrials

MAX_ASK = 1000
# The longest lease an ask may give (a week): longer is no lease at all.
MAX_LEASE_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True)
class HandedOut:
    """What an ask hands out, and the history after it."""

    result: AskResult
    history: SamplerHistory
    allocated: int = 0
    notes: Sequence[str] = ()


@dataclass(frozen=True)
class Ask:
    """An ask's arguments, checked."""

    count: int
    parallelism: int | None
    asked: AskedBy


def check_ask(count: Any, parallelism: int | None, ask_id: Any, lease_seconds: Any) -> Ask:
    """An ask's arguments checked, its new trials leased from now.

    Raises:
        InvalidInput: Naming the argument out of range.
    """
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_ASK:
        raise InvalidInput(
            f"count must be a whole number from 1 to {MAX_ASK}, got {count!r}", field="count"
        )
    check_ask_id(ask_id)
    if lease_seconds is not None and (
        isinstance(lease_seconds, bool)
        or not isinstance(lease_seconds, int)
        or not 1 <= lease_seconds <= MAX_LEASE_SECONDS
    ):
        raise InvalidInput(
            f"lease_seconds must be a whole number from 1 to {MAX_LEASE_SECONDS}, "
            f"got {lease_seconds!r}",
            field="lease_seconds",
        )
    expires = None if lease_seconds is None else time.time() + lease_seconds
    return Ask(count, parallelism, AskedBy(ask_id, lease_seconds, expires))


def check_ask_id(ask_id: Any) -> None:
    """Refuse an ``ask_id`` that is not None or a string of 1-128 characters.

    Raises:
        InvalidInput: Naming ``ask_id``.
    """
    if ask_id is not None and (not isinstance(ask_id, str) or not 1 <= len(ask_id) <= 128):
        raise InvalidInput(f"ask_id must be 1-128 characters, got {ask_id!r}", field="ask_id")


def hand_out(
    tx: WriteTxn,
    row: ExperimentRow,
    compiled: Compiled,
    history: SamplerHistory,
    read: AskTrials,
    ask: Ask,
    assignment: Callable[[int, Mapping[str, Any]], TrialAssignment],
) -> HandedOut:
    """The trials an ask hands out: the ask id's pending ones, then new ones allocated.

    ``row`` is the experiment's row as locked, ``history`` the sampler history
    at its version and ``read`` what :meth:`~.WriteTxn.ask_trials` read.
    """
    spec = compiled.spec
    halted = logic.halt_reason(spec, {"failed": history.failures}, history.best)
    if halted is not None:
        return HandedOut(AskResult(trials=[], exhausted=True, reason=halted), history)
    if spec.suspend:
        suspended = AskResult(trials=[], exhausted=False, reason="the experiment is suspended")
        return HandedOut(suspended, history)
    assignments = [assignment(t.number, t.params) for t in read.pending if t.number in read.mine]
    assignments = assignments[: ask.count]
    room = spec.maxTrials - row.next_number
    if ask.parallelism is not None:
        # Counted under the row lock that every allocation takes.
        room = min(room, ask.parallelism - history.active)
    wanted = min(ask.count - len(assignments), room)
    if wanted <= 0:
        result = _ask_result(assignments, ask.count, spec.maxTrials, row.next_number, False)
        return HandedOut(result, history)
    suggestions = compiled.sampler.suggest(
        list(history.records.values()), wanted, row.sampler_state
    )
    new = [NewTrial(row.next_number + i, c) for i, c in enumerate(suggestions.configs[:wanted])]
    version, next_number = history.version + 1, row.next_number + len(new)
    tx.allocate(row.id, new, version, next_number, suggestions.state, ask.asked)
    pending = (logic.trial_record(t.number, t.params, "pending", None) for t in new)
    history = history.updated(version, pending, spec.objective.direction)
    assignments += [assignment(t.number, t.params) for t in new]
    result = _ask_result(assignments, ask.count, spec.maxTrials, next_number, suggestions.exhausted)
    return HandedOut(result, history, len(new), suggestions.notes)


def _ask_result(
    assignments: list[TrialAssignment],
    count: int,
    max_trials: int,
    next_number: int,
    sampler_exhausted: bool,
) -> AskResult:
    """The answer to an ask for ``count`` that hands out ``assignments``."""
    reason = None
    if len(assignments) < count:
        if next_number >= max_trials:
            reason = f"maxTrials ({max_trials}) reached"
        elif sampler_exhausted:
            reason = "the search space is exhausted"
    return AskResult(
        trials=assignments,
        exhausted=sampler_exhausted or next_number >= max_trials,
        reason=reason,
    )
