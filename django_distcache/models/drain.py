"""Write-behind, draining: `flush_behind()` (or the Celery task) applies queued changes to the database.

A drain takes a shard's lock, reads the stream from its head and, per model, applies the changes in one
database transaction. Inside that transaction it locks each row's `BehindApplied` mark and applies only the
changes with a newer stream id than the mark, then moves the mark on. So a change is applied at most once
and a row never moves back to an older value, whatever dies or stalls where: a drain killed after its
commit, or one whose lock expired while it waited on the database, finds its changes already applied and
only cleans up. After the commit it rewrites the entry with the row as the transaction left it and takes
the applied changes off the patch (one script per row, guarded by the row's drained mark, so it happens
once), then deletes the entries from the stream. A stream thus holds exactly the changes whose cleanup is
not done.

A change that fails on its own (a unique clash, a value the column refuses) is isolated: the row's other
changes are applied around it, in order, and only that change is retried by the next drains, then moved to
the dead-letter stream after BEHIND_MAX_ATTEMPTS failures. Later changes of that row wait behind it, so
order is kept. A database that refuses everything (down, locked) charges nothing to any change.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

from django.db import (
    DEFAULT_DB_ALIAS,
    InterfaceError,
    OperationalError,
    connections,
    models,
    router,
    transaction,
)
from django.db.models import F

from .. import scripts
from ..core import CacheUnavailable, Core, core_for
from ..plans import PlanOf
from ..topology import Call
from .applied import BehindApplied
from .dead_letter_stream import Letter, send_to_dead_letters
from .fill import RowEntries, Target, write_entries_plan
from .patch import PATCH_TTL_MS
from .registry import ModelCacheConfig, config_for_label
from .streams import (
    ShardKeys,
    decode_change,
    id_text,
    shard_count,
    shard_keys,
    sortable_id,
    stream_entries,
    strict_call,
)

logger = logging.getLogger("django_distcache.behind")

READ_FACTOR = 10  # a drain reads up to this many BEHIND_BATCH_SIZE entries per transaction
RowId = tuple[str, Any]  # (model label, pk)


class DatabaseUnavailable(Exception):
    """The database refused a whole batch for a reason of its own (down, locked): retried by the next drain."""


@dataclass
class DrainReport:
    changes_read: int = 0
    changes_applied: int = 0  # applied by this drain
    changes_found_applied: int = 0  # applied by an earlier drain that died before its cleanup
    rows_written: int = 0
    dropped_deleted: int = 0
    dead_lettered: int = 0
    failed_rows: int = 0
    batches: int = 0
    database_errors: int = 0
    seconds: float = 0.0
    shards_busy: list[int] = field(default_factory=list)
    shards_unreachable: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # why changes that could be applied were not

    @property
    def complete(self) -> bool:
        """True if nothing was left behind for a reason other than a change's own failure."""
        return not self.problems

    def add(self, other: DrainReport) -> None:
        for name in (f.name for f in fields(self)):
            mine, theirs = getattr(self, name), getattr(other, name)
            if isinstance(mine, list):
                mine.extend(theirs)
            else:
                setattr(self, name, mine + theirs)


@dataclass
class _Change:
    id: bytes
    payload: bytes | None
    token: str
    values: dict[str, Any]
    increments: dict[str, int]


@dataclass
class _Row:
    label: str
    pk: Any
    changes: list[_Change] = field(default_factory=list)
    # what became of them
    applied: list[_Change] = field(default_factory=list)
    found_applied: list[_Change] = field(default_factory=list)
    dropped: list[_Change] = field(default_factory=list)
    dead: list[tuple[_Change, str, int]] = field(default_factory=list)
    # The row as the database holds it after the last transaction, if one ran.
    fresh: models.Model | None = None
    read: bool = False  # whether `fresh` was read (None then means the row is gone)

    @property
    def key(self) -> str:
        return str(self.pk)

    def done(self) -> list[_Change]:
        """Changes the database has (or will never get), in stream order: the patch lets go of these."""
        changes = [*self.applied, *self.found_applied, *self.dropped, *(c for c, _, _ in self.dead)]
        return sorted(changes, key=lambda change: sortable_id(change.id))

    def forget_outcomes(self) -> None:
        self.applied, self.found_applied, self.dropped = [], [], []


# -- the drain ----------------------------------------------------------------------------------------
def flush_behind(
    using: str = "default", shards: Iterable[int] | None = None, max_batches: int | None = None
) -> DrainReport:
    """Apply queued write-behind changes to the database now (deploys, tests, the Celery task).

    Every shard is tried whatever happens to the others; `report.problems` says what could not be applied
    and why (`report.complete` is False then). Raises CacheUnavailable only if no shard could be read."""
    core = core_for(using)
    count = shard_count(core)
    report = DrainReport()
    started = time.monotonic()
    wanted = list(range(count) if shards is None else shards)
    for shard in wanted:
        if not 0 <= int(shard) < count:
            raise ValueError(f"shard {shard} out of range 0..{count - 1}")
    failure = None
    for shard in wanted:
        try:
            report.add(_drain_shard(core, int(shard), max_batches))
        except CacheUnavailable as error:
            # One unreachable stream must not hold up the others: its changes wait there for the next drain.
            failure = error
            report.shards_unreachable.append(int(shard))
            report.problems.append(f"shard {shard}: its node is unreachable: {error}")
            logger.warning("write-behind shard %s not drained, its node is unreachable: %s", shard, error)
    report.seconds = time.monotonic() - started
    if failure is not None and len(report.shards_unreachable) == len(wanted):
        raise failure
    return report


def _drain_shard(core: Core, shard: int, max_batches: int | None) -> DrainReport:
    settings = core.settings
    keys = shard_keys(core, shard)
    report = DrainReport()
    token = os.urandom(8).hex()
    idle_ms = max(1, int(settings.behind_idle_timeout * 1000))
    if not strict_call(core, Call(keys.lock, ("SET", keys.lock, token, "NX", "PX", idle_ms))):
        report.shards_busy.append(shard)
        return report
    read_count = settings.behind_batch_size * READ_FACTOR
    held: set[RowId] = set()
    start = "-"
    try:
        # From the head: the stream holds exactly the changes whose cleanup is not done, in order.
        while max_batches is None or report.batches < max_batches:
            reply = strict_call(
                core, Call(keys.stream, ("XRANGE", keys.stream, start, "+", "COUNT", read_count))
            )
            entries = stream_entries(reply)
            if not entries:
                break
            if not _still_ours(core, keys, token, idle_ms):
                break  # another drainer goes on from the head; nothing here depends on the lock for safety
            _apply_batch(core, shard, keys, entries, held, report)
            if len(entries) < read_count:
                break
            start = "(" + id_text(entries[-1][0])
    except DatabaseUnavailable as error:
        report.database_errors += 1
        report.problems.append(f"shard {shard}: the database failed: {error}")
        logger.warning(
            "write-behind drain of shard %s stopped, the database failed: %s (retried by the next drain)",
            shard,
            error,
        )
    finally:
        try:
            strict_call(core, Call(keys.lock, ("EVAL", scripts.RELEASE_IF_OWNER, 1, keys.lock, token)))
        except CacheUnavailable:
            pass  # the lock expires by itself
    return report


def _still_ours(core: Core, keys: ShardKeys, token: str, idle_ms: int) -> bool:
    renewed = strict_call(
        core, Call(keys.lock, ("EVAL", scripts.RENEW_IF_OWNER, 1, keys.lock, token, idle_ms))
    )
    if not renewed:
        logger.warning(
            "lost the write-behind lock of %s (a batch took longer than BEHIND_IDLE_TIMEOUT)", keys.stream
        )
    return bool(renewed)


# -- one batch: read, apply per model, dead-letter, refresh the cache, clean up ----------------------------
def _apply_batch(
    core: Core,
    shard: int,
    keys: ShardKeys,
    entries: list[tuple[bytes, bytes | None]],
    held: set[RowId],
    report: DrainReport,
) -> None:
    started = time.monotonic()
    report.batches += 1
    report.changes_read += len(entries)
    rows, letters = _rows_of(core, entries, held)
    settled, stop = _apply_per_model(core, keys, rows, held, report, letters)
    row_letters = [
        Letter(c.id, c.payload, error, attempts) for _, row in settled for c, error, attempts in row.dead
    ]
    if letters or row_letters:
        send_to_dead_letters(core, shard, letters + row_letters)
    refreshed = _refresh_cached_rows(core, [(config, row) for config, row in settled if row.done()])
    done = _count_done(settled, refreshed, letters, report)
    _delete_entries(core, keys, done, time.monotonic() - started)
    if stop is not None:
        raise stop


def _rows_of(
    core: Core, entries: list[tuple[bytes, bytes | None]], held: set[RowId]
) -> tuple[dict[RowId, _Row], list[Letter]]:
    """The entries' changes per row, in stream order; what cannot be read goes to the dead letters."""
    rows: dict[RowId, _Row] = {}
    letters = []
    for entry_id, payload in entries:
        try:
            change = decode_change(core, payload)
        except Exception as error:  # noqa: BLE001 - a corrupt or forged entry goes to the dead letters
            letters.append(Letter(entry_id, payload, f"undecodable: {type(error).__name__}: {error}", 0))
            continue
        row_id = (change["model"], change["pk"])
        if row_id in held:
            continue  # behind a failing change of its row: stays in the stream, in order
        token, increments = str(change.get("token") or ""), change.get("incr") or {}
        rows.setdefault(row_id, _Row(*row_id)).changes.append(
            _Change(entry_id, payload, token, change["fields"], increments)
        )
    return rows, letters


def _apply_per_model(
    core: Core,
    keys: ShardKeys,
    rows: dict[RowId, _Row],
    held: set[RowId],
    report: DrainReport,
    letters: list[Letter],
) -> tuple[list[tuple[ModelCacheConfig, _Row]], DatabaseUnavailable | None]:
    """Each model's rows in a transaction of their own, until the database fails as a whole (returned:
    what was committed before is still cleaned up). Rows of a model no longer registered are added to
    `letters`."""
    by_model: dict[str, list[_Row]] = {}
    for row in rows.values():
        by_model.setdefault(row.label, []).append(row)
    settled: list[tuple[ModelCacheConfig, _Row]] = []
    stop: DatabaseUnavailable | None = None
    for label, model_rows in by_model.items():
        config = config_for_label(label)
        if config is None:
            reason = f"{label} is not registered with cache_model()"
            letters += [Letter(c.id, c.payload, reason, 0) for row in model_rows for c in row.changes]
            continue
        if stop is None:
            try:
                _apply_model_rows(core, keys, config, model_rows, held, report)
            except DatabaseUnavailable as error:
                stop = error
        settled += [(config, row) for row in model_rows]
    return settled, stop


@dataclass
class _Done:
    """The stream ids whose cleanup is done, by what became of them, and the rows written."""

    applied: list[bytes] = field(default_factory=list)
    dropped: list[bytes] = field(default_factory=list)
    dead: list[bytes] = field(default_factory=list)
    rows_written: int = 0


def _count_done(
    settled: list[tuple[ModelCacheConfig, _Row]],
    refreshed: set[RowId],
    letters: list[Letter],
    report: DrainReport,
) -> _Done:
    done = _Done(dead=[letter.id for letter in letters])
    report.dead_lettered += len(letters)
    for _, row in settled:
        done.rows_written += bool(row.applied)
        report.changes_applied += len(row.applied)
        report.dropped_deleted += len(row.dropped)
        report.dead_lettered += len(row.dead)
        if row.dropped:
            logger.warning(
                "dropped %d write-behind change(s) of %s pk=%r: the row does not exist",
                len(row.dropped),
                row.label,
                row.pk,
            )
        if (row.label, row.pk) not in refreshed:
            continue  # its cleanup is not done: its entries stay for the next drain, which finds them applied
        report.changes_found_applied += len(row.found_applied)
        done.applied += [c.id for c in row.applied] + [c.id for c in row.found_applied]
        done.dropped += [c.id for c in row.dropped]
        done.dead += [c.id for c, _, _ in row.dead]
    report.rows_written += done.rows_written
    return done


def _delete_entries(core: Core, keys: ShardKeys, done: _Done, seconds: float) -> None:
    """Delete the done entries from the stream and count them, each once, in one script."""
    ids = [*done.applied, *done.dropped, *done.dead]
    if not ids:
        return
    counts = (len(done.applied), len(done.dropped), len(done.dead), done.rows_written, f"{seconds:.6f}")
    script = ("EVAL", scripts.FINISH_DRAINED_BATCH, 3, keys.stream, keys.attempts, keys.stats)
    strict_call(core, Call(keys.stream, (*script, *counts, *ids), idempotent=False))


# -- the database side ----------------------------------------------------------------------------------
_ZERO = sortable_id("0-0")


def _apply_model_rows(
    core: Core,
    keys: ShardKeys,
    config: ModelCacheConfig,
    rows: list[_Row],
    held: set[RowId],
    report: DrainReport,
) -> None:
    """All rows in one transaction; if one of them fails, each row alone; if a row fails, its changes one
    by one, so that only the change at fault is held back (and dead-lettered after BEHIND_MAX_ATTEMPTS)."""
    db = router.db_for_write(config.model) or DEFAULT_DB_ALIAS
    try:
        _apply_transaction(config, rows, db)
        return
    except DatabaseUnavailable:
        raise
    except Exception:  # noqa: BLE001, S110 - isolate the changes that fail, apply the others
        pass
    for row in rows:
        if len(rows) > 1:
            try:
                _apply_transaction(config, [row], db)
                continue
            except DatabaseUnavailable:
                raise
            except Exception:  # noqa: BLE001, S110 - this row has a failing change: find it
                pass
        _apply_change_by_change(core, keys, config, row, db, held, report)


def _apply_change_by_change(
    core: Core,
    keys: ShardKeys,
    config: ModelCacheConfig,
    row: _Row,
    db: str,
    held: set[RowId],
    report: DrainReport,
) -> None:
    applied: list[_Change] = []
    found: list[_Change] = []
    dropped: list[_Change] = []
    try:
        for change in row.changes:
            single = _Row(row.label, row.pk, [change])
            try:
                _apply_transaction(config, [single], db)
            except DatabaseUnavailable:
                raise
            except Exception as error:  # noqa: BLE001 - this change is at fault
                if _charge(core, keys, row, change, f"{type(error).__name__}: {error}", held, report):
                    continue
                return
            applied += single.applied
            found += single.found_applied
            dropped += single.dropped
            row.fresh, row.read = single.fresh, True
    finally:
        row.applied, row.found_applied, row.dropped = applied, found, dropped


def _charge(
    core: Core, keys: ShardKeys, row: _Row, change: _Change, error: str, held: set[RowId], report: DrainReport
) -> bool:
    """Count a failure of one change of the row. True if it goes to the dead letters (the row's later
    changes go on), False if it is held back, with the row's later changes, for the next drain."""
    attempts = int(
        strict_call(
            core, Call(keys.attempts, ("HINCRBY", keys.attempts, id_text(change.id), 1), idempotent=False)
        )
    )
    if attempts >= core.settings.behind_max_attempts:
        row.dead.append((change, error, attempts))
        return True
    held.add((row.label, row.pk))
    report.failed_rows += 1
    logger.warning(
        "write-behind change %s of %s pk=%r failed (attempt %s), the row's later changes wait: %s",
        id_text(change.id),
        row.label,
        row.pk,
        attempts,
        error,
    )
    return False


def _apply_transaction(config: ModelCacheConfig, rows: list[_Row], db: str) -> None:
    """Apply the rows' changes not applied yet, in one transaction; raises DatabaseUnavailable if the
    database failed as a whole, the row's own error otherwise (nothing is then applied)."""
    rows = sorted(rows, key=lambda row: row.key)  # one lock order for every drain: no deadlock
    for row in rows:
        row.forget_outcomes()
    try:
        with transaction.atomic(using=db):
            fresh = _apply_in_transaction(config, rows, db)
    except Exception as error:
        for row in rows:
            row.forget_outcomes()
        if not isinstance(error, OperationalError | InterfaceError):
            raise
        connection = connections[db]
        if not connection.in_atomic_block:
            # A terminated backend leaves the connection broken: the next drain in this process (a Celery
            # worker lives long) must open a new one rather than fail on the old one forever.
            connection.close_if_unusable_or_obsolete()
        raise DatabaseUnavailable(f"{type(error).__name__}: {error}") from error
    for row in rows:
        row.fresh, row.read = fresh.get(row.pk), True


def _apply_in_transaction(config: ModelCacheConfig, rows: list[_Row], db: str) -> dict[Any, models.Model]:
    """Inside the transaction: lock the marks, apply what is newer than them, move them on. Returns the
    rows as this transaction leaves them (its updates hold their locks until the commit)."""
    manager = config.model._base_manager.using(db)
    pks = [row.pk for row in rows]
    marks = _lock_marks(config.label, [row.key for row in rows], db)
    existing = set(manager.filter(pk__in=pks).values_list("pk", flat=True))
    groups: dict[tuple[str, ...], list[models.Model]] = {}
    moved = []
    for row in rows:
        mark = marks[row.key]
        newer = _past_the_mark(row, mark)
        if not newer:
            continue
        moved.append(mark)
        if row.pk not in existing:
            row.dropped = newer
            continue
        row.applied = newer
        instance, names = _coalesce(config, row.pk, newer)
        if names:
            groups.setdefault(names, []).append(instance)
    for names, instances in groups.items():
        manager.bulk_update(instances, [config.field(name).name for name in names])
    if moved:
        BehindApplied.objects.using(db).bulk_update(moved, ["stream_id"])
    return {obj.pk: obj for obj in manager.filter(pk__in=pks)}


def _lock_marks(label: str, keys: list[str], db: str) -> dict[str, BehindApplied]:
    """The rows' applied marks, created if new and locked until the transaction ends."""
    manager = BehindApplied.objects.using(db)
    manager.bulk_create(
        [BehindApplied(model=label, pk_value=key, stream_id=_ZERO) for key in keys], ignore_conflicts=True
    )
    marks = manager.select_for_update().filter(model=label, pk_value__in=keys).order_by("pk_value")
    return {mark.pk_value: mark for mark in marks}


def _past_the_mark(row: _Row, mark: BehindApplied) -> list[_Change]:
    """The row's changes newer than its mark, which moves past them; those it covers (a prefix, in stream
    order) are `found_applied`."""
    cut = next(
        (i for i, change in enumerate(row.changes) if sortable_id(change.id) > mark.stream_id),
        len(row.changes),
    )
    row.found_applied, newer = row.changes[:cut], row.changes[cut:]
    if newer:
        mark.stream_id = sortable_id(newer[-1].id)
    return newer


def _coalesce(
    config: ModelCacheConfig, pk: Any, changes: list[_Change]
) -> tuple[models.Model, tuple[str, ...]]:
    """One instance holding what `changes` do to a row, in stream order: the last value set wins, and
    increments after it add to it (or, with no value set, become `field + n`)."""
    state: dict[str, list[Any]] = {}
    for change in changes:
        for name, value in change.values.items():
            state[name] = ["set", value, 0]
        for name, delta in change.increments.items():
            current = state.setdefault(name, ["add", 0, 0])
            current[2] += delta
    instance = config.model(**{config.model._meta.pk.attname: pk})
    for name, (kind, value, added) in state.items():
        # The field as it is now: a field a migration removed (FieldDoesNotExist) or retyped so that the
        # queued value no longer fits (ValidationError) fails this change, not the batch.
        model_field = config.field(name)
        if kind == "set":
            value = None if value is None else model_field.to_python(value)
            if added:
                value = value + added
        else:
            value = F(model_field.name) + added
        setattr(instance, name, value)
    return instance, tuple(sorted(state))


# -- after the commit: the cache entries and patches -----------------------------------------------------
def _refresh_cached_rows(core: Core, settled: list[tuple[ModelCacheConfig, _Row]]) -> set[RowId]:
    """After the commit: each row's entry becomes the row as the transaction left it, and the patch lets
    go of the changes done. Returns the rows whose cleanup is done (now or by an earlier drain)."""
    if not settled:
        return set()
    rows = [_refresh_entries(core, config, row) for config, row in settled]
    written = core.run(write_entries_plan(core, rows, _RefreshDrained()), "flush_behind_refresh", None)
    if written is None:
        return set()
    return {
        (target.row.of.label, target.row.of.pk)
        for target, reply in written
        if not isinstance(reply, BaseException)
    }


def _refresh_entries(core: Core, config: ModelCacheConfig, row: _Row) -> RowEntries[_Row]:
    """The row's pk entry as the transaction left it (no payload when the row is gone or was not read)."""
    fresh = row.fresh if row.read else None
    payload = None if fresh is None else config.row_payload(fresh, core)
    tags = [] if fresh is None else [*config.static_tags(), *config.row_tags(fresh)]
    keys = {"pk": config.entry_key("pk", row.pk)}
    return RowEntries(config, keys, payload, tags, {}, core.expiry_ms(config.timeout), row)


class _RefreshDrained:
    """The refresh's guard: REFRESH_DRAINED_ROW, once per row and newest stream id done (the row's drained
    mark), so a slow drain never moves the entry back; it also takes the done changes off the patch."""

    def admits(self, core: Core, head: bytes, targets: list[Target[_Row]]) -> PlanOf[bool]:
        yield from ()
        return True

    def call(self, core: Core, head: bytes, target: Target[_Row]) -> Call:
        row, config = target.row.of, target.row.config
        patch = core.physical_of(head, config.pending_key(row.pk))
        drained = core.physical_of(head, config.drained_key(row.pk))
        data: bytes | str = "-" if not row.read else (target.data or b"")  # "-": no transaction read it
        expiry_ms = target.row.expiry_ms
        done = row.done()
        args = [id_text(done[-1].id), data, "" if expiry_ms is None else expiry_ms, PATCH_TTL_MS]
        script = ("EVAL", scripts.REFRESH_DRAINED_ROW, 3, target.physical, patch, drained)
        return Call(target.physical, (*script, *args, *_patch_release_args(done)), idempotent=False)


def _patch_release_args(done: list[_Change]) -> list[Any]:
    """REFRESH_DRAINED_ROW's arguments after the first four: the sets and increments done, per field."""
    newest_set: dict[str, str] = {}
    last_set: dict[str, str] = {}
    added: dict[str, list[Any]] = {}
    for change in done:
        for name in change.values:
            newest_set[name] = max(newest_set.get(name, ""), change.token)
            last_set[name] = change.token
            added[name] = []  # increments before a set are folded into nothing: the set replaced them
        for name, delta in change.increments.items():
            added.setdefault(name, []).extend([id_text(change.id), -delta])
    args: list[Any] = [len(newest_set)]
    for name, token in newest_set.items():
        args += [name, token]
    increments = {name: pairs for name, pairs in added.items() if pairs}
    args.append(len(increments))
    for name, pairs in increments.items():
        args += [name, last_set.get(name, ""), len(pairs) // 2, *pairs]
    return args
