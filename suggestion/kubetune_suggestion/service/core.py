"""The suggestion service's application layer: the engine over the store.

:class:`TuningService` is what the HTTP app (:mod:`.app`) and ``kubetune run``
call. Each method is one database transaction in which it reads the stored
state, decides with the pure engine (samplers, early-stopping rules, the pure
helpers of :mod:`.logic`), and writes the outcome, so any replica (or a
restarted process) continues exactly where the last one stopped.

Process-local caches (:mod:`.caches`) hold only what can be rebuilt from the
database and are keyed so that they can never serve stale data.

On PostgreSQL the hot paths first try one conditional statement in
autocommit (:mod:`kubetune_suggestion.store.oneshot`), built from the caches:
``ask`` when the cached history is the stored one and no trial may be
pending, a report when no early-stopping decision is due. The statement
writes only if what the cache assumed is still stored; otherwise it writes
nothing and the method runs its locked transaction, as on SQLite.

Errors are :class:`~.errors.ServiceError` subclasses (404 unknown, 401/403
token, 409 conflicting state, 422 invalid input); when one is raised nothing
has been written.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy.exc import DBAPIError

from kubetune_suggestion.engine.history import Direction, TrialRecord
from kubetune_suggestion.engine.samplers import Sampler, Suggestions, make_sampler
from kubetune_suggestion.engine.space import SpaceError
from kubetune_suggestion.engine.stopping import StoppingRule, make_rule
from kubetune_suggestion.service import logic
from kubetune_suggestion.service import metrics as prom
from kubetune_suggestion.service.caches import (
    Backoff,
    EngineCache,
    Head,
    HistoryCache,
    Lru,
    ReportedTrials,
    SamplerHistory,
    UidHints,
)
from kubetune_suggestion.service.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    ServiceError,
    Unauthorized,
)
from kubetune_suggestion.service.models import (
    AskResult,
    BestTrial,
    ExperimentSummary,
    ExperimentView,
    ObservationView,
    StartRefusal,
    StartResult,
    StopAnswer,
    StopListItem,
    StopOrder,
    TrialAssignment,
    TrialState,
    TrialView,
)
from kubetune_suggestion.service.tokens import token_matches, trial_token
from kubetune_suggestion.spec import ExperimentSpec, SpecError, parse_experiment
from kubetune_suggestion.store import (
    AskedBy,
    ExperimentRow,
    NewTrial,
    StepRow,
    Store,
    TrialRow,
    WriteTxn,
)
from kubetune_suggestion.store.oneshot import FinalReport, FinishRead, OneShot
from kubetune_suggestion.store.rows import utcnow

log = logging.getLogger(__name__)

# Spec fields that cannot change once trials exist: the history would no
# longer mean what the sampler and the rule think it means.
_FROZEN_SPEC_FIELDS = ("objective", "parameters", "algorithm")
MAX_ASK = 1000
# The longest lease an ask may give (a week): longer is no lease at all.
MAX_LEASE_SECONDS = 7 * 24 * 3600
# The ask id of an ask that gives none but caps ``parallelism``: the
# operator's client before it sent an ask id of its own. The operator needs
# its pending trials back after a restart or a failed Pod creation, so its
# asks keep that behaviour; it should send this id itself (see CONTRACT.md).
SCHEDULER_ASK_ID = "operator"
# Tries of the unlocked finish before the locked one (a report in between costs one).
_FINISH_TRIES = 2


@dataclass(frozen=True)
class Report:
    """One observation to store (the arguments of :meth:`TuningService.report`)."""

    uid: str
    number: int
    # The trial's token (None when the request carried none).
    token: str | None
    step: int
    metrics: Mapping[str, Any]


@dataclass(frozen=True)
class _Compiled:
    """An experiment's spec with the engine objects built from it."""

    spec: ExperimentSpec
    sampler: Sampler
    rule: StoppingRule | None


def compile_spec(spec: ExperimentSpec) -> _Compiled:
    """Build the sampler and rule ``spec`` asks for.

    Raises:
        InvalidInput: If the engine rejects the spec, naming the field.
    """
    try:
        sampler = make_sampler(
            spec.algorithm.name,
            spec.search_space(),
            spec.objective.direction,
            spec.algorithm.seed,
            spec.algorithm.settings,
        )
        # Rules name the objective in the reasons users read.
        options = {"metric": spec.objective.metric, **spec.earlyStopping.options()}
        rule = make_rule(spec.earlyStopping.name, spec.objective.direction, options)
    except SpaceError as exc:
        raise InvalidInput(exc.problem, field=f"spec.{exc.field}") from None
    return _Compiled(spec=spec, sampler=sampler, rule=rule)


class TuningService:
    """Experiments, trials and observations: the contract in ``CONTRACT.md``.

    Args:
        store: The observation store.
        secret: The trial-token secret; None uses the one stored in the
            database (generated by the first replica), so replicas agree.
    """

    def __init__(self, store: Store, secret: str | None = None) -> None:
        self.store = store
        self.secret = secret if secret else store.secret(secrets.token_hex(32))
        self._engines: EngineCache[_Compiled] = EngineCache()
        self._histories = HistoryCache()
        self._ids = UidHints()
        self._ask_backoff = Backoff()
        self._reported = ReportedTrials()
        # The next ask's suggestion, worked out while the service had nothing to do.
        self._prepared: Lru[_Prepared] = Lru(1024)

    @classmethod
    def open(cls, url: str, *, secret: str | None = None, migrate: bool = True) -> TuningService:
        """A service over the database at ``url`` (schema migrated unless told otherwise)."""
        return cls(Store.open(url, migrate=migrate), secret=secret)

    def close(self) -> None:
        """Release the database connections."""
        self.store.close()

    def token(self, uid: str, number: int) -> str:
        """The token trial ``number``'s reports must carry."""
        return trial_token(self.secret, uid, number)

    # -- experiments -------------------------------------------------------------

    def register(
        self, uid: str, name: str, namespace: str, spec: ExperimentSpec | Mapping[str, Any]
    ) -> ExperimentView:
        """Create the experiment, or update its spec (upsert keyed by ``uid``).

        Raises:
            InvalidInput: For a spec the engine rejects (the field is named).
            Conflict: For a change of objective, parameters or algorithm after
                trials were handed out.
        """
        if not uid or len(uid) > 128:
            raise InvalidInput("the experiment uid must be 1-128 characters", field="uid")
        if not isinstance(spec, ExperimentSpec):
            try:
                spec = parse_experiment(spec)
            except SpecError as exc:
                raise InvalidInput(exc.problem, field=exc.field) from None
        compile_spec(spec)
        spec_json = spec.model_dump(mode="json")
        with self.store.write() as tx:
            created = tx.insert_experiment_if_absent(uid, name, namespace, spec_json)
            row = tx.lock_experiment(uid)
            assert row is not None
            spec_version = row.spec_version
            if not created and (
                row.spec != spec_json or row.name != name or row.namespace != namespace
            ):
                if row.next_number > 0:
                    for field in _FROZEN_SPEC_FIELDS:
                        if row.spec.get(field) != spec_json.get(field):
                            raise Conflict(
                                f"spec.{field} cannot change after trials were handed out "
                                f"({row.next_number} so far); create a new Experiment instead",
                                field=f"spec.{field}",
                            )
                if row.spec != spec_json:
                    spec_version += 1
                tx.update_experiment(
                    row.id,
                    name=name,
                    namespace=namespace,
                    spec=spec_json,
                    spec_version=spec_version,
                )
        self._ids.put(uid, row.id, spec_version)
        return ExperimentView(
            uid=uid,
            name=name,
            namespace=namespace,
            spec=spec_json,
            spec_version=spec_version,
            created=created,
        )

    def delete(self, uid: str) -> None:
        """Delete the experiment with all its trials and observations.

        Raises:
            NotFound: If there is no such experiment.
        """
        with self.store.write() as tx:
            if not tx.delete_experiment(uid):
                raise NotFound(f"no experiment {uid!r}", field="uid")

    # -- trials -------------------------------------------------------------------

    def ask(
        self,
        uid: str,
        count: int,
        parallelism: int | None = None,
        *,
        ask_id: str | None = None,
        lease_seconds: int | None = None,
    ) -> AskResult:
        """Up to ``count`` trials to run that no other ask has returned.

        Every ask allocates: two asks never get the same trial. With
        ``ask_id``, the ask is idempotent for that id: the trials an earlier
        ask with the same id handed out and nobody started yet come first
        (a retry, or a scheduler restarting, gets its trials back), then new
        ones. Without it, only new trials. An ask that caps ``parallelism``
        and gives no ``ask_id`` asks as :data:`SCHEDULER_ASK_ID` (the
        operator). With ``lease_seconds``, each new trial must be started,
        report or finish within that many seconds of its ask or of its last
        start or report, or the next ask fails it as abandoned (its slot is
        freed); without it, trials never expire. Never allocates beyond
        ``spec.maxTrials``, nor beyond ``parallelism`` trials pending or
        running at once when it is given; nothing once the objective target
        is reached or too many trials failed. Safe across processes:
        allocation holds the experiment's row lock, or (the fast path) is one
        statement that only writes if nothing changed since the cached history.

        Raises:
            InvalidInput: For ``count`` outside 1..1000, an ``ask_id`` that
                is not 1-128 characters, ``lease_seconds`` outside 1..604800.
            NotFound: If there is no such experiment.
        """
        fast = self.ask_from_cache(
            uid, count, parallelism, ask_id=ask_id, lease_seconds=lease_seconds
        )
        if fast is not None:
            return fast
        return self.ask_locked(uid, count, parallelism, ask_id=ask_id, lease_seconds=lease_seconds)

    def ask_from_cache(
        self,
        uid: str,
        count: int,
        parallelism: int | None = None,
        *,
        ask_id: str | None = None,
        lease_seconds: int | None = None,
    ) -> AskResult | None:
        """:meth:`ask` from the cached history, allocating with one conditional statement.

        Never waits for the experiment's row lock beyond one statement: what
        the HTTP app may run on its event loop.

        Returns:
            None, having written nothing, when the cache cannot answer alone
            (then :meth:`ask_locked` must): not on PostgreSQL, nothing cached,
            trials that may be pending (a retry must get them back), a lease
            that may have run out (the locked path sweeps), an experiment
            halted, suspended or full (rare: the locked path answers), or a
            change since the cached version (another replica's).

        Raises:
            InvalidInput: As :meth:`ask`.
        """
        asked = _asked_by(count, parallelism, ask_id, lease_seconds)
        cached = self._cached_ask(uid, count, parallelism)
        if cached is None:
            return None
        experiment_id, history, head, compiled, wanted = cached
        spec = compiled.spec
        prepared = self._prepared.pop(experiment_id)
        if prepared is not None and wanted == 1 and prepared.matches(history, compiled):
            suggestions = prepared.suggestions
        else:
            records = list(history.records.values())
            suggestions = compiled.sampler.suggest(records, wanted, head.sampler_state)
        new = [
            NewTrial(head.next_number + i, c) for i, c in enumerate(suggestions.configs[:wanted])
        ]
        with self.store.oneshot() as db:
            allocated = db.allocate_if_current(
                experiment_id,
                (history.version, head.spec_version, head.next_number),
                new,
                suggestions.state,
                asked,
            )
        if allocated is None:
            self._ask_backoff.lost(experiment_id)
            return None
        self._ask_backoff.won(experiment_id)
        self._remember_allocation(
            experiment_id, compiled, history, head, new, allocated.sampler_state, asked
        )
        # What a finish would read of each new trial, until it changes.
        params = {t.number: t.params for t in new}
        for number, trial_id, row_version in allocated.trials:
            row = TrialRow(
                trial_id,
                number,
                dict(params[number]),
                TrialState.PENDING.value,
                None,
                None,
                None,
                history.version + 1,
                allocated.created_at,
                None,
                None,
            )
            self._reported.allocated(
                uid, number, FinishRead(experiment_id, head.spec_version, row, row_version, [])
            )
        self._log_notes(uid, suggestions.notes)
        return _ask_result(
            [self._assignment(uid, t.number, t.params) for t in new],
            count,
            spec.maxTrials,
            head.next_number + len(new),
            suggestions.exhausted,
        )

    def _cached_ask(
        self, uid: str, count: int, parallelism: int | None, *, trying: bool = True
    ) -> tuple[int, SamplerHistory, Head, _Compiled, int] | None:
        """What :meth:`ask_from_cache` works from, if the caches can answer alone.

        (experiment id, history, its head, compiled spec, how many trials to
        allocate), or None (see :meth:`ask_from_cache`). ``trying``: this is
        the ask's try, which the backoff counts (a prepare only looks).
        """
        if not self.store.postgres:
            return None
        known = self._ids.get(uid)
        history = None if known is None else self._histories.get(known[0])
        if known is None or history is None or history.head is None or history.head.pending:
            return None
        if history.lease_deadline is not None and time.time() >= history.lease_deadline:
            return None
        experiment_id, head = known[0], history.head
        backoff = self._ask_backoff
        skip = (
            (not backoff.should_try(experiment_id)) if trying else backoff.skipping(experiment_id)
        )
        if skip:
            return None
        compiled = self._engines.get(experiment_id, head.spec_version)
        if compiled is None:
            return None
        spec = compiled.spec
        if spec.suspend or logic.halt_reason(spec, {"failed": history.failures}, history.best):
            return None
        wanted = min(count, spec.maxTrials - head.next_number)
        if parallelism is not None:
            # No trial is pending here (see above), so every active one runs.
            wanted = min(wanted, parallelism - history.active)
        if wanted <= 0:
            return None
        return experiment_id, history, head, compiled, wanted

    def prepare_ask(self, uid: str) -> bool:
        """Work out the suggestion a one-trial :meth:`ask_from_cache` would make next.

        For an idle moment after a finish: the sampler's work then leaves the
        next ask's path. Writes nothing; the ask uses it only if nothing the
        suggestion depends on changed meanwhile (the history's records, the
        sampler state, the spec: compared by identity, as every change
        replaces them), so asks answer exactly as without it.

        Returns:
            Whether a suggestion was prepared.
        """
        cached = self._cached_ask(uid, 1, None, trying=False)
        if cached is None:
            return False
        experiment_id, history, head, compiled, _ = cached
        records = list(history.records.values())
        suggestions = compiled.sampler.suggest(records, 1, head.sampler_state)
        self._prepared.put(experiment_id, _Prepared(history.records, head, compiled, suggestions))
        return True

    def ask_locked(
        self,
        uid: str,
        count: int,
        parallelism: int | None = None,
        *,
        ask_id: str | None = None,
        lease_seconds: int | None = None,
    ) -> AskResult:
        """:meth:`ask` in a transaction holding the experiment's row lock.

        First fails the trials whose lease ran out (their slots are then free).

        Raises:
            InvalidInput: As :meth:`ask`.
            NotFound: If there is no such experiment.
        """
        asked = _asked_by(count, parallelism, ask_id, lease_seconds)
        with self.store.write() as tx:
            row = tx.lock_experiment(uid)
            if row is None:
                raise NotFound(f"no experiment {uid!r}", field="uid")
            compiled = self._compiled_for(tx, row.id, row.spec_version, row.spec)
            spec = compiled.spec
            expired, lease_deadline = tx.expire_leases(row.id, time.time(), row.history_version + 1)
            if expired:
                row = replace(row, history_version=row.history_version + 1)
            # One query for both what changed since the cached history and
            # which trials are still pending.
            base = self._histories.base(row)
            loaded, mine = tx.ask_trials(row.id, base.version, asked.ask_id)
            history = self._histories.refresh(
                base,
                row,
                (t for t in loaded if t.history_version > base.version),
                spec.objective.direction,
            )
            history = replace(history, lease_deadline=lease_deadline)
            halted = logic.halt_reason(spec, {"failed": history.failures}, history.best)
            if halted is not None:
                return AskResult(trials=[], exhausted=True, reason=halted)
            if spec.suspend:
                return AskResult(trials=[], exhausted=False, reason="the experiment is suspended")
            pending_now = [t for t in loaded if t.state == "pending"]
            head = Head(
                spec_version=row.spec_version,
                next_number=row.next_number,
                sampler_state=row.sampler_state,
                pending=frozenset(t.number for t in pending_now),
            )
            history = replace(history, head=head)
            assignments = [
                self._assignment(uid, t.number, t.params) for t in pending_now if t.number in mine
            ][:count]
            room = spec.maxTrials - row.next_number
            if parallelism is not None:
                # Counted under the row lock that every allocation takes: a
                # trial started meanwhile only moves from pending to running,
                # and one finished meanwhile makes the count cautious.
                room = min(room, parallelism - history.active)
            wanted = min(count - len(assignments), room)
            sampler_exhausted = False
            notes: list[str] = []
            new: list[NewTrial] = []
            stored_state = row.sampler_state
            if wanted > 0:
                records = list(history.records.values())
                suggestions = compiled.sampler.suggest(records, wanted, row.sampler_state)
                sampler_exhausted = suggestions.exhausted
                notes = suggestions.notes
                new = [
                    NewTrial(row.next_number + i, c)
                    for i, c in enumerate(suggestions.configs[:wanted])
                ]
                stored_state = tx.allocate(
                    row.id,
                    new,
                    row.history_version + 1,
                    row.next_number + len(new),
                    suggestions.state,
                    asked,
                )
                assignments += [self._assignment(uid, t.number, t.params) for t in new]
        # Cache only what was committed: a rolled-back allocation must not be remembered.
        self._ids.put(uid, row.id, row.spec_version)
        if wanted > 0:
            self._remember_allocation(row.id, compiled, history, head, new, stored_state, asked)
        else:
            self._histories.remember(row.id, history)
        for trial in expired:
            log.info(
                "experiment %s: trial %d failed: lease of %d s expired",
                uid,
                trial.number,
                trial.lease_seconds,
            )
        self._log_notes(uid, notes)
        return _ask_result(
            assignments, count, spec.maxTrials, row.next_number + len(new), sampler_exhausted
        )

    def _remember_allocation(
        self,
        experiment_id: int,
        compiled: _Compiled,
        history: SamplerHistory,
        head: Head,
        new: Sequence[NewTrial],
        sampler_state: dict[str, Any] | None,
        asked: AskedBy,
    ) -> None:
        """Cache the history after a committed allocation of ``new`` (by ``asked``)."""
        spec = compiled.spec
        head = Head(
            spec_version=head.spec_version,
            next_number=head.next_number + len(new),
            sampler_state=sampler_state,
            pending=head.pending.union(t.number for t in new),
        )
        advanced = history.updated(
            history.version + 1,
            (logic.trial_record(t.number, t.params, "pending", None) for t in new),
            spec.objective.direction,
            head,
        )
        expires, deadline = asked.expires_at, history.lease_deadline
        if new and expires is not None:
            earliest = expires if deadline is None else min(deadline, expires)
            advanced = replace(advanced, lease_deadline=earliest)
        self._histories.remember(experiment_id, advanced)
        prom.SUGGESTIONS.labels(spec.algorithm.name).inc(len(new))

    @staticmethod
    def _log_notes(uid: str, notes: Sequence[str]) -> None:
        for note in notes:
            log.info("experiment %s: %s", uid, note)

    def start(self, uid: str, number: int) -> None:
        """Mark a handed-out trial as running (idempotent).

        Raises:
            NotFound: If there is no such experiment or trial.
            Conflict: If the trial already finished.
        """
        with self.store.write() as tx:
            found = tx.lock_trial_of(uid, number)
            if found is None:
                raise self._not_found(tx, uid, number)
            experiment_id, _, trial = found
            if TrialState(trial.state).finished:
                raise Conflict(f"trial {number} already finished ({trial.state})", field="number")
            tx.mark_running(trial.id)
        self._histories.started(experiment_id, [number])
        # The row changed: what a finish would have known of it is stale.
        self._reported.pop(uid, number)

    def start_many(self, uid: str, numbers: Sequence[int]) -> StartResult:
        """:meth:`start` for several trials of one experiment, in one transaction.

        A trial that is unknown or already finished is refused on its own
        (404 / 409 in ``refused``); the others are started.

        Raises:
            InvalidInput: For no numbers or more than 1000.
            NotFound: If there is no such experiment.
        """
        wanted = sorted(set(numbers))
        if not 1 <= len(wanted) <= MAX_ASK:
            raise InvalidInput(f"numbers must list 1 to {MAX_ASK} trials", field="numbers")
        refused: list[StartRefusal] = []
        with self.store.write() as tx:
            found = tx.lock_trials_of(uid, wanted)
            if not found and tx.experiment_id(uid) is None:
                raise NotFound(f"no experiment {uid!r}", field="uid")
            ids: list[int] = []
            started: list[int] = []
            experiment_id = None
            for number in wanted:
                hit = found.get(number)
                if hit is None:
                    message = f"experiment {uid!r} has no trial {number}"
                    refused.append(
                        StartRefusal(number=number, status=404, code="not_found", message=message)
                    )
                    continue
                experiment_id, _, trial = hit
                if TrialState(trial.state).finished:
                    message = f"trial {number} already finished ({trial.state})"
                    refused.append(
                        StartRefusal(number=number, status=409, code="conflict", message=message)
                    )
                    continue
                ids.append(trial.id)
                started.append(number)
            tx.mark_running_many(ids)
        if experiment_id is not None and started:
            self._histories.started(experiment_id, started)
        for number in started:  # their rows changed (see start)
            self._reported.pop(uid, number)
        return StartResult(started=started, refused=refused)

    def report(
        self, uid: str, number: int, token: str | None, step: int, metrics: Mapping[str, Any]
    ) -> StopAnswer:
        """Store one observation and say whether the trial should stop.

        Idempotent on (trial, step): a repeated step is acknowledged and not
        stored again. Marks a pending trial running. Runs the early-stopping
        rule when the report carries the objective; a stop decision is
        recorded (see :meth:`stops`) and repeated on later reports.

        Raises:
            Unauthorized: Without a token.
            Forbidden: With a token of another trial.
            InvalidInput: For a bad step or a non-finite / non-numeric metric.
            NotFound: If there is no such experiment or trial.
            Conflict: If the trial already finished.
        """
        result = self.report_batch([Report(uid, number, token, step, metrics)])[0]
        if isinstance(result, ServiceError):
            raise result
        return result

    def report_batch(self, reports: Sequence[Report]) -> list[StopAnswer | ServiceError]:
        """:meth:`report` for many reports in one transaction; one answer or error each.

        The HTTP app funnels concurrent reports through this, so a burst of
        reports costs one commit and a handful of statements instead of a
        transaction each. A refused report changes nothing and does not
        affect the others. Nothing is acknowledged before the commit.
        """
        results: list[StopAnswer | ServiceError | None] = [None] * len(reports)
        checked: list[tuple[int, Report, int, dict[str, float]]] = []
        for i, r in enumerate(reports):
            try:
                checked.append((i, r, *self._check_report(r)))
            except ServiceError as exc:
                results[i] = exc
        if checked:
            try:
                self._store_reports(checked, results)
            except DBAPIError:
                if len(checked) == 1:
                    raise
                # A deadlock or serialisation failure dooms the whole batch:
                # retry each report on its own so one cannot fail the others.
                log.warning("a batch of %d reports failed; retrying one by one", len(checked))
                for i, r, _, _ in checked:
                    results[i] = self.report_batch([r])[0]
        return [r if r is not None else ServiceError("not processed") for r in results]

    def _check_report(self, r: Report) -> tuple[int, dict[str, float]]:
        """The report's step and clean metrics, checked before any I/O."""
        if not r.token:
            raise Unauthorized(
                "a trial token is required (Authorization: Bearer <token>)", field="token"
            )
        if not token_matches(self.secret, r.uid, r.number, r.token):
            raise Forbidden(f"the token is not trial {r.number}'s token", field="token")
        return logic.check_step(r.step), logic.check_metrics(r.metrics)

    def _store_reports(
        self,
        checked: Sequence[tuple[int, Report, int, dict[str, float]]],
        results: list[StopAnswer | ServiceError | None],
    ) -> None:
        """Store checked reports and decide stops, filling ``results`` in place."""
        if len(checked) == 1:
            i, r, step, clean = checked[0]
            try:
                answer = self._report_in_one_statement(r, step, clean)
            except ServiceError as exc:
                results[i] = exc
                return
            if answer is not None:
                results[i] = answer
                return
        accepted: list[tuple[int, Report, int, int, _Compiled, TrialRow, float | None]] = []
        with self.store.write() as tx:
            numbers: dict[str, set[int]] = {}
            for _, r, _, _ in checked:
                numbers.setdefault(r.uid, set()).add(r.number)
            # Experiments in a fixed order too, so batches spanning several cannot deadlock.
            found = {uid: tx.lock_trials_of(uid, sorted(numbers[uid])) for uid in sorted(numbers)}
            seen = {uid: hit for uid, hits in found.items() for hit in hits.values()}
            rows: list[tuple[int, int, dict[str, float], float | None]] = []
            for i, r, step, clean in checked:
                hit = found[r.uid].get(r.number)
                if hit is None:
                    results[i] = self._not_found(tx, r.uid, r.number)
                    continue
                experiment_id, spec_version, trial = hit
                if TrialState(trial.state).finished:
                    results[i] = _finished_conflict(r.number, trial.state)
                    continue
                compiled = self._compiled_for(tx, experiment_id, spec_version, None)
                objective = clean.get(compiled.spec.objective.metric)
                rows.append((trial.id, step, clean, objective))
                accepted.append((i, r, step, experiment_id, compiled, trial, objective))
            # Every reporting trial: a report renews its lease, and starts it if pending.
            stored = tx.store_reports(rows, [t.id for *_, t, _ in accepted])
            # One load of intermediate values per experiment serves every decision.
            top_step: dict[int, int] = {}
            for _, _, step, experiment_id, compiled, _, objective in accepted:
                if compiled.rule is not None and objective is not None:
                    top_step[experiment_id] = max(step, top_step.get(experiment_id, step))
            curves = {e: tx.step_history(e, top) for e, top in top_step.items()}
            stopped: dict[int, str] = {}
            for i, _, step, experiment_id, compiled, trial, objective in accepted:
                reason = trial.stop_reason or stopped.get(trial.id)
                if reason is not None:
                    results[i] = StopAnswer(stop=True, reason=reason)
                elif (
                    (trial.id, step) in stored and experiment_id in curves and objective is not None
                ):
                    answer = self._decide(tx, compiled, curves[experiment_id], trial, step)
                    if answer.stop:
                        stopped[trial.id] = answer.reason
                    results[i] = answer
                else:
                    results[i] = StopAnswer(stop=False)
        for uid, (experiment_id, spec_version, _) in seen.items():
            self._ids.put(uid, experiment_id, spec_version)
        for _, r, _, experiment_id, _, _, _ in accepted:
            self._histories.started(experiment_id, [r.number])
        prom.OBSERVATIONS.inc(len(stored))

    def report_from_cache(self, r: Report) -> StopAnswer | None:
        """:meth:`report` with one conditional statement, when no stop decision is due.

        Never waits for more than the trial's row lock during one statement:
        what the HTTP app may run on its event loop.

        Returns:
            None, having written nothing, when :meth:`report_batch` must
            answer: not on PostgreSQL, the experiment's id and spec are not
            cached, a rule must decide on this report (that needs the
            experiment's curves), or the statement found no such trial under
            the cached id and spec version (the locked path then tells which
            error it is, or stores it).

        Raises:
            ServiceError: As :meth:`report` does (nothing stored).
        """
        step, clean = self._check_report(r)
        return self._report_in_one_statement(r, step, clean)

    def _report_in_one_statement(
        self, r: Report, step: int, clean: dict[str, float]
    ) -> StopAnswer | None:
        if not self.store.postgres:
            return None
        known = self._ids.get(r.uid)
        compiled = None if known is None else self._engines.get(*known)
        if known is None or compiled is None:
            return None
        objective = clean.get(compiled.spec.objective.metric)
        if compiled.rule is not None and objective is not None:
            return None
        with self.store.oneshot() as db:
            outcome = db.report_if_current(r.uid, r.number, known, step, clean, objective)
        if outcome is None:
            return None
        if TrialState(outcome.state).finished:
            raise _finished_conflict(r.number, outcome.state)
        self._reported.record(r.uid, r.number, known, outcome, step, objective)
        self._histories.started(known[0], [r.number])
        prom.OBSERVATIONS.inc(int(outcome.stored))
        if outcome.stop_reason is not None:
            return StopAnswer(stop=True, reason=outcome.stop_reason)
        return StopAnswer(stop=False)

    def finish(
        self,
        uid: str,
        number: int,
        state: str,
        message: str | None = None,
        *,
        metrics: Mapping[str, Any] | None = None,
        step: int | None = None,
        token: str | None = None,
    ) -> TrialView:
        """End a trial; its objective comes from the stored observations.

        ``succeeded`` without any report of the objective metric becomes
        ``metrics_unavailable``. Finishing again in the same state is a no-op.
        With ``metrics`` the trial's final report is stored with its end (the
        two at once, as Optuna's ``tell``): it needs the trial's ``token``,
        like any report, and its ``step`` defaults to one past the last
        reported step (a step already reported is not stored again).
        On PostgreSQL it first tries two statements without a transaction
        (read, then end the trial if its row is still the version read); a
        report in between sends it round again, and then to the locked path.

        Raises:
            InvalidInput: For a state that is not a final one, a ``step``
                without ``metrics``, a bad step or a non-finite metric.
            Unauthorized: For ``metrics`` without a token.
            Forbidden: For ``metrics`` with a token of another trial.
            NotFound: If there is no such experiment or trial.
            Conflict: If the trial already finished in another state.
        """
        try:
            final = TrialState(state)
        except ValueError:
            final = TrialState.PENDING
        if not final.finished:
            raise InvalidInput(
                "state must be one of succeeded, failed, pruned, metrics_unavailable; "
                f"got {state!r}",
                field="state",
            )
        report = None
        if metrics is not None:
            checked_step, clean = self._check_report(Report(uid, number, token, step or 0, metrics))
            report = _Final(None if step is None else checked_step, clean)
        elif step is not None:
            raise InvalidInput("step is only accepted together with metrics", field="step")
        if self.store.postgres:
            for _ in range(_FINISH_TRIES):
                done = self._finish_unlocked(uid, number, final, message, report)
                if done is not None:
                    return done
        return self._finish_locked(uid, number, final, message, report)

    def _finish_unlocked(
        self, uid: str, number: int, final: TrialState, message: str | None, report: _Final | None
    ) -> TrialView | None:
        """:meth:`finish` with two statements and no lock held between them.

        One statement when this process allocated the trial or stored every
        report of it itself (:class:`ReportedTrials`): the read is what those
        writes left.

        None, having written nothing, when the trial changed between the two.
        """
        known = self._reported.pop(uid, number)
        with self.store.oneshot() as db:
            if known is not None:
                done = self._finish_as_read(db, uid, final, message, known, report)
                if done is not None:
                    return done
            read = db.finish_read(uid, number)
            if read is None:
                if self.store.experiment(uid) is None:
                    raise NotFound(f"no experiment {uid!r}", field="uid")
                raise NotFound(f"experiment {uid!r} has no trial {number}", field="number")
            compiled = self._engines.get(read.experiment_id, read.spec_version)
            if compiled is None:
                row = self.store.experiment(uid)
                if row is None or (row.id, row.spec_version) != (
                    read.experiment_id,
                    read.spec_version,
                ):
                    return None  # changed since the read
                compiled = self._compiled_from_row(row)
            _check_final_report(compiled, final, report)
            if TrialState(read.trial.state).finished:
                _check_repeat(compiled, read.trial, final, message, report, read.observed)
                return self._trial_view(read.experiment_id, number)
            return self._finish_as_read(db, uid, final, message, read, report, compiled)

    def _finish_as_read(
        self,
        db: OneShot,
        uid: str,
        final: TrialState,
        message: str | None,
        read: FinishRead,
        report: _Final | None,
        compiled: _Compiled | None = None,
    ) -> TrialView | None:
        """End the trial if its row is still the version ``read`` found; None if not."""
        compiled = compiled or self._engines.get(read.experiment_id, read.spec_version)
        trial = read.trial
        if compiled is None or TrialState(trial.state).finished:
            return None  # the caller reads and decides
        observed, stored = _with_final(compiled, read.observed, report)
        final, objective, message = _ending(compiled, final, message, observed, trial.stop_reason)
        now = utcnow()
        version = db.finish_if_unchanged(
            read, final.value, objective, message, trial.started_at or now, now, stored
        )
        if version is None:
            return None
        if stored is not None:
            prom.OBSERVATIONS.inc()
        ended = _ended(trial, final, objective, message, now)
        return self._finished(
            uid, read.experiment_id, read.spec_version, version, compiled, ended, observed
        )

    def _finish_locked(
        self, uid: str, number: int, final: TrialState, message: str | None, report: _Final | None
    ) -> TrialView:
        """:meth:`finish` in a transaction holding the experiment's and the trial's row locks."""
        with self.store.write() as tx:
            # The experiment's row and the trial's, locked in that order (one round trip).
            found = tx.lock_for_finish(uid, number)
            if found is None:
                if tx.lock_experiment(uid) is None:
                    raise NotFound(f"no experiment {uid!r}", field="uid")
                raise NotFound(f"experiment {uid!r} has no trial {number}", field="number")
            experiment_id, spec_version, history_version, trial = found
            compiled = self._compiled_for(tx, experiment_id, spec_version, None)
            _check_final_report(compiled, final, report)
            reported = tx.observed_steps(trial.id)
            if TrialState(trial.state).finished:
                _check_repeat(compiled, trial, final, message, report, reported)
                return self._trial_view(experiment_id, number)
            observed, stored = _with_final(compiled, reported, report)
            if stored is not None:
                tx.store_reports([(trial.id, stored.step, stored.metrics, stored.objective)], [])
            final, objective, message = _ending(
                compiled, final, message, observed, trial.stop_reason
            )
            version = history_version + 1
            now = utcnow()
            tx.finish_trial(
                experiment_id,
                trial.id,
                version,
                trial.stop_reason is not None,
                state=final.value,
                objective=objective,
                message=message,
                started_at=trial.started_at or now,
                finished_at=now,
            )
        if stored is not None:
            prom.OBSERVATIONS.inc()
        ended = _ended(trial, final, objective, message, now)
        return self._finished(uid, experiment_id, spec_version, version, compiled, ended, observed)

    def _finished(
        self,
        uid: str,
        experiment_id: int,
        spec_version: int,
        version: int,
        compiled: _Compiled,
        ended: TrialRow,
        observed: Sequence[tuple[int, float | None]],
    ) -> TrialView:
        """After a committed end (``ended``) at history ``version``: the caches, and its view."""
        self._ids.put(uid, experiment_id, spec_version)
        # The cached history, if it was the one just before, takes the change.
        self._histories.advance(
            experiment_id,
            version,
            logic.trial_record(ended.number, ended.params, ended.state, ended.objective),
            compiled.spec.objective.direction,
        )
        # Built from what the write knew: no re-read on the hot path.
        return _trial_view(ended, observed[-1][0] if observed else None, None)

    # -- reading ------------------------------------------------------------------

    def stops(self, uid: str) -> list[StopOrder]:
        """Trials of the experiment ordered to stop that have not finished yet.

        Raises:
            NotFound: If there is no such experiment.
        """
        if self.store.experiment(uid) is None:
            raise NotFound(f"no experiment {uid!r}", field="uid")
        return [StopOrder(number=s.number, reason=s.reason) for s in self.store.open_stops(uid)]

    def all_stops(self, uid: str | None = None) -> list[StopListItem]:
        """Open stop orders of one experiment (no error if unknown) or of all of them."""
        return [
            StopListItem(experiment=s.experiment_uid, number=s.number, reason=s.reason)
            for s in self.store.open_stops(uid)
        ]

    def summary(self, uid: str) -> ExperimentSummary:
        """Counts by state, the best trial, and whether the experiment is complete.

        Raises:
            NotFound: If there is no such experiment.
        """
        row = self._experiment(uid)
        spec = self._compiled_from_row(row).spec
        counts = self.store.count_states(row.id)
        best_row = self.store.best_trial(row.id, spec.objective.direction is Direction.MAXIMIZE)
        best = None
        if best_row is not None and best_row.objective is not None:
            best = BestTrial(
                number=best_row.number, params=best_row.params, objective=best_row.objective
            )
        reason = logic.completion_reason(
            spec, counts, row.next_number, best.objective if best else None
        )
        return ExperimentSummary(
            uid=row.uid,
            name=row.name,
            namespace=row.namespace,
            counts={s: counts.get(s.value, 0) for s in TrialState},
            best=best,
            allocated=row.next_number,
            done=sum(n for s, n in counts.items() if TrialState(s).finished),
            max_trials=spec.maxTrials,
            complete=reason is not None,
            complete_reason=reason,
        )

    def trials(self, uid: str, observations: bool = False) -> list[TrialView]:
        """Every trial by number, with every report when ``observations``.

        Raises:
            NotFound: If there is no such experiment.
        """
        row = self._experiment(uid)
        reports = self.store.observations(row.id) if observations else {}
        return [
            _trial_view(
                t,
                last_step,
                [ObservationView(step=s, metrics=m) for s, m in reports.get(t.number, [])]
                if observations
                else None,
            )
            for t, last_step in self.store.trials(row.id)
        ]

    def trial(self, uid: str, number: int) -> TrialView:
        """One trial.

        Raises:
            NotFound: If there is no such experiment or trial.
        """
        return self._trial_view(self._experiment(uid).id, number, uid)

    def experiment_spec(self, uid: str) -> ExperimentSpec:
        """The experiment's current spec.

        Raises:
            NotFound: If there is no such experiment.
        """
        return self._compiled_from_row(self._experiment(uid)).spec

    def ping(self) -> None:
        """Raise unless the database answers."""
        self.store.ping()

    # -- internals ----------------------------------------------------------------

    def _assignment(self, uid: str, number: int, params: Mapping[str, Any]) -> TrialAssignment:
        return TrialAssignment(number=number, params=dict(params), token=self.token(uid, number))

    def _experiment(self, uid: str) -> ExperimentRow:
        row = self.store.experiment(uid)
        if row is None:
            raise NotFound(f"no experiment {uid!r}", field="uid")
        return row

    def _not_found(self, tx: WriteTxn, uid: str, number: int) -> NotFound:
        if tx.experiment_id(uid) is None:
            return NotFound(f"no experiment {uid!r}", field="uid")
        return NotFound(f"experiment {uid!r} has no trial {number}", field="number")

    def _trial_view(self, experiment_id: int, number: int, uid: str = "") -> TrialView:
        found = self.store.trial(experiment_id, number)
        if found is None:
            raise NotFound(f"experiment {uid!r} has no trial {number}", field="number")
        steps = self.store.last_step(found.id)
        return _trial_view(found, steps, None)

    def _compiled_from_row(self, row: ExperimentRow) -> _Compiled:
        return self._engines.get(row.id, row.spec_version) or self._compile(
            row.id, row.spec_version, row.spec
        )

    def _compiled_for(
        self, tx: WriteTxn, experiment_id: int, spec_version: int, spec: dict[str, Any] | None
    ) -> _Compiled:
        cached = self._engines.get(experiment_id, spec_version)
        if cached is not None:
            return cached
        if spec is None:
            spec_version, spec = tx.experiment_spec(experiment_id)
        return self._compile(experiment_id, spec_version, spec)

    def _compile(self, experiment_id: int, spec_version: int, spec: dict[str, Any]) -> _Compiled:
        # Stored specs were validated at registration; parsing cannot fail
        # unless the engine changed under them, which is a server error.
        compiled = compile_spec(parse_experiment(spec))
        self._engines.put(experiment_id, spec_version, compiled)
        return compiled

    def _decide(
        self,
        tx: WriteTxn,
        compiled: _Compiled,
        rows: Sequence[StepRow],
        trial: TrialRow,
        step: int,
    ) -> StopAnswer:
        """Run the early-stopping rule for ``trial`` after its report at ``step``.

        ``rows`` holds the experiment's intermediate values (possibly beyond
        ``step``, when a batch holds later reports): the rule sees them up to
        ``step``, as if the reports had come one by one.
        """
        assert compiled.rule is not None
        me, history = logic.stop_inputs(
            ((r.number, r.state, r.objective, r.step, r.value) for r in rows),
            trial.number,
            trial.params,
            step,
        )
        decision = compiled.rule.decide(me, history)
        if not decision.stop:
            return StopAnswer(stop=False)
        reason = decision.reason or f"stopped by {compiled.rule.name}"
        tx.add_stop_order(trial.id, reason)
        prom.STOP_DECISIONS.labels(compiled.rule.name).inc()
        return StopAnswer(stop=True, reason=reason)


def _check_repeat(
    compiled: _Compiled,
    trial: TrialRow,
    final: TrialState,
    message: str | None,
    report: _Final | None,
    observed: Sequence[tuple[int, float | None]],
) -> None:
    """Check that finishing the finished ``trial`` again so would record what it did.

    A repeat is compared with what the first finish recorded: the state it
    would end in (so ``succeeded`` again of a trial that became
    ``metrics_unavailable`` is the same finish), the message when it gives
    one, and with a final report, the objective value stored at its step (the
    last one when it names none).

    Raises:
        Conflict: Saying what is stored, if anything differs.
    """
    objective_metric = compiled.spec.objective.metric
    differs = []
    state, _, recorded = _ending(compiled, final, message, observed, trial.stop_reason)
    if state.value != trial.state:
        differs.append(f"state ({final.value})")
    elif message is not None and recorded != trial.message:
        differs.append("message")
    if report is not None:
        values = dict(observed)
        step = report.step if report.step is not None else max(values, default=None)
        value = report.metrics.get(objective_metric)
        if step is None or step not in values or values[step] != value:
            differs.append(f"final report ({objective_metric}={value} at step {step})")
    if not differs:
        return
    stored = f"state {trial.state}, objective {trial.objective}"
    if trial.message:
        text = trial.message if len(trial.message) <= 200 else trial.message[:200] + "..."
        stored += f", message {text!r}"
    raise Conflict(
        f"trial {trial.number} already finished ({stored}); "
        f"this finish differs in its {' and '.join(differs)}",
        field="state" if state.value != trial.state else "metrics" if report else "message",
    )


def _check_final_report(compiled: _Compiled, final: TrialState, report: _Final | None) -> None:
    """Refuse the final report of a ``succeeded`` finish that lacks the objective.

    Stored, it would end the trial ``metrics_unavailable`` for good over what
    is most likely a misspelt metric name. Other ends may carry any metrics
    (a failed trial's last report rarely has a result).

    Raises:
        InvalidInput: Naming the objective metric.
    """
    metric = compiled.spec.objective.metric
    if final is TrialState.SUCCEEDED and report is not None and metric not in report.metrics:
        raise InvalidInput(
            f"metrics must include the objective {metric!r} "
            f"(got {', '.join(sorted(report.metrics))})",
            field=f"metrics.{metric}",
        )


@dataclass(frozen=True)
class _Prepared:
    """A suggestion worked out ahead of an ask, with what it was worked out from."""

    records: dict[int, TrialRecord]
    head: Head
    compiled: _Compiled
    suggestions: Suggestions

    def matches(self, history: SamplerHistory, compiled: _Compiled) -> bool:
        """Whether the ask would suggest from exactly these inputs.

        Every change of the records, the sampler state or the spec replaces
        the object holding it; this entry keeps its own alive, so identity
        cannot be a reused address.
        """
        head = history.head
        return (
            history.records is self.records
            and head is not None
            and head.sampler_state is self.head.sampler_state
            and head.next_number == self.head.next_number
            and compiled is self.compiled
        )


@dataclass(frozen=True)
class _Final:
    """A finish's final report, checked: its step (None: after the last) and metrics."""

    step: int | None
    metrics: dict[str, float]


def _with_final(
    compiled: _Compiled,
    observed: Sequence[tuple[int, float | None]],
    report: _Final | None,
) -> tuple[Sequence[tuple[int, float | None]], FinalReport | None]:
    """The trial's reports (step, objective) with ``report``, and what of it to store.

    Nothing to store without a report, or when its step was reported already
    (a repeated step is kept as first stored, as :meth:`TuningService.report` does).
    """
    if report is None:
        return observed, None
    step = report.step
    if step is None:
        step = observed[-1][0] + 1 if observed else 0
    elif any(s == step for s, _ in observed):
        return observed, None
    value = report.metrics.get(compiled.spec.objective.metric)
    merged = sorted([*observed, (step, value)], key=lambda o: o[0])
    return merged, FinalReport(step, report.metrics, value)


def _ending(
    compiled: _Compiled,
    final: TrialState,
    message: str | None,
    observed: Sequence[tuple[int, float | None]],
    stop_reason: str | None,
) -> tuple[TrialState, float | None, str | None]:
    """(state, objective, message) a trial ends with, from its reports (step, objective).

    A ``pruned`` trial that had reported its objective at its last step
    (``maxResource``) ran to its end before its stop took effect: it ends
    ``succeeded``, the stop withdrawn (see :func:`logic.ran_to_the_end`).
    """
    if final is TrialState.PRUNED and logic.ran_to_the_end(compiled.spec, observed):
        final = TrialState.SUCCEEDED
        message = logic.stop_not_applied(compiled.spec, stop_reason)
    objective = None
    if final in (TrialState.SUCCEEDED, TrialState.PRUNED):
        values = [(step, v) for step, v in observed if v is not None]
        objective = logic.final_objective(values, compiled.spec.objective.strategy)
    if final is TrialState.SUCCEEDED and objective is None:
        final = TrialState.METRICS_UNAVAILABLE
        message = (
            message or f"the trial never reported its objective {compiled.spec.objective.metric!r}"
        )
    return final, objective, message


def _ended(
    trial: TrialRow,
    final: TrialState,
    objective: float | None,
    message: str | None,
    now: datetime,
) -> TrialRow:
    """``trial`` as its end at ``now`` wrote it."""
    return replace(
        trial,
        state=final.value,
        objective=objective,
        message=message,
        started_at=trial.started_at or now,
        finished_at=now,
    )


def _asked_by(count: Any, parallelism: int | None, ask_id: Any, lease_seconds: Any) -> AskedBy:
    """Who an ask's new trials are asked by (its arguments checked), leased from now.

    Raises:
        InvalidInput: Naming the argument out of range.
    """
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_ASK:
        raise InvalidInput(
            f"count must be a whole number from 1 to {MAX_ASK}, got {count!r}", field="count"
        )
    if ask_id is not None and (not isinstance(ask_id, str) or not 1 <= len(ask_id) <= 128):
        raise InvalidInput(f"ask_id must be 1-128 characters, got {ask_id!r}", field="ask_id")
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
    if ask_id is None and parallelism is not None:
        ask_id = SCHEDULER_ASK_ID
    expires = None if lease_seconds is None else time.time() + lease_seconds
    return AskedBy(ask_id, lease_seconds, expires)


def _finished_conflict(number: int, state: str) -> Conflict:
    """The answer to a report of a trial that finished."""
    return Conflict(
        f"trial {number} already finished ({state}); reports are no longer accepted",
        field="number",
    )


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


def _trial_view(
    trial: TrialRow, last_step: int | None, observations: Sequence[ObservationView] | None
) -> TrialView:
    return TrialView(
        number=trial.number,
        state=TrialState(trial.state),
        params=trial.params,
        objective=trial.objective,
        last_step=last_step,
        stop_reason=trial.stop_reason,
        message=trial.message,
        created_at=trial.created_at,
        started_at=trial.started_at,
        finished_at=trial.finished_at,
        observations=list(observations) if observations is not None else None,
    )
