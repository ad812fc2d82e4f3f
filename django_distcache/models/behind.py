"""Write-behind: `save_behind` and `incr_behind` change the cache now and queue the change; a drain applies
it to the database later.

Queue: BEHIND_SHARDS Redis Streams, each with a hash tag chosen so that the shards' slots are spread evenly
over the 16384 slots (so over the primaries). A row always maps to the same shard, so its changes stay in
order. A call is one round trip: the change is appended to its stream and laid onto the row's *patch* (a
hash next to the row's cache entry) in the same batch, each node's commands sent before any reply is read.

Readers (`get_cached`) lay the patch over the row they read (from the entry or the database), so they see
every acknowledged change at once: sets replace a field, increments add to it. The entry itself only ever
holds the database's row.

A drain (`flush_behind()`, or the Celery task) takes a shard's lock, reads the stream from its head and,
per model, applies the changes in one database transaction. Inside that transaction it locks each row's
`BehindApplied` mark and applies only the changes with a newer stream id than the mark, then moves the mark
on. So a change is applied at most once and a row never moves back to an older value, whatever dies or
stalls where: a drain killed after its commit, or one whose lock expired while it waited on the database,
finds its changes already applied and only cleans up. After the commit it rewrites the entry with the row
as the transaction left it and takes the applied changes off the patch (one script per row, guarded by the
row's drained mark, so it happens once), then deletes the entries from the stream. A stream thus holds
exactly the changes whose cleanup is not done.

A change that fails on its own (a unique clash, a value the column refuses) is isolated: the row's other
changes are applied around it, in order, and only that change is retried by the next drains, then moved to
the dead-letter stream after BEHIND_MAX_ATTEMPTS failures. Later changes of that row wait behind it, so
order is kept. A database that refuses everything (down, locked) charges nothing to any change.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from django.core.exceptions import FieldDoesNotExist, ImproperlyConfigured
from django.db import (
    DEFAULT_DB_ALIAS,
    InterfaceError,
    OperationalError,
    connections,
    models,
    router,
    transaction,
)
from django.db.models import F, Value
from django.db.models.expressions import Combinable, CombinedExpression

from .. import dispatch, scripts
from ..core import CacheUnavailable, Core, Guarded, core_for
from ..keys import BEHIND_CHANGE_IDENTITY
from ..topology import OUTAGE_ERRORS, Call, key_slot
from ..versioning import model_fingerprint
from .registry import ModelCacheConfig, config_for, config_for_label

logger = logging.getLogger("django_distcache.behind")

PATCH_TTL_MS = 24 * 3600 * 1000
READ_FACTOR = 10  # a drain reads up to this many BEHIND_BATCH_SIZE entries per transaction
_SLOTS = 16384
_INT64 = 2**63


class BehindError(Exception):
    """A write-behind request that cannot be queued as asked (the message says why)."""


class DatabaseUnavailable(Exception):
    """The database refused a whole batch for a reason of its own (down, locked): retried by the next drain."""


# -- keys ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=64)
def shard_tags(count: int) -> tuple[str, ...]:
    """One hash tag per shard whose slot falls in the shard's 1/count of the slot space."""
    tags = []
    for shard in range(count):
        low, high = shard * _SLOTS // count, (shard + 1) * _SLOTS // count
        for attempt in range(1_000_000):
            tag = f"{shard}.{attempt}"
            if low <= key_slot(tag.encode()) < high:
                tags.append(tag)
                break
    return tuple(tags)


@dataclass(frozen=True)
class ShardKeys:
    stream: bytes
    lock: bytes
    attempts: bytes
    stats: bytes


def shard_keys(core: Core, shard: int) -> ShardKeys:
    """A shard's stream, lock, failure counts and counters: `<KEY_PREFIX>:~behind:{<tag>}` and alike, in
    one slot."""
    return _shard_keys(core.keys, core.settings.options["BEHIND_SHARDS"], shard)


@lru_cache(maxsize=1024)
def _shard_keys(layout: Any, count: int, shard: int) -> ShardKeys:
    tag = shard_tags(count)[shard]
    internal = layout.internal
    return ShardKeys(
        stream=internal(f"behind:{{{tag}}}"),
        lock=internal(f"behind-lock:{{{tag}}}"),
        attempts=internal(f"behind-attempts:{{{tag}}}"),
        stats=internal(f"behind-stats:{{{tag}}}"),
    )


def dead_letter_key(core: Core) -> bytes:
    return core.keys.internal("behind-dead")


def stats_key(core: Core) -> bytes:
    """Counters of earlier versions, which kept them in one key; still added into behind_metrics()."""
    return core.keys.internal("behind-stats")


def shard_of(core: Core, label: str, pk: Any) -> int:
    digest = hashlib.blake2b(f"{label}:{pk!r}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % core.settings.options["BEHIND_SHARDS"]


def _check(replies: Iterable[Any]) -> list[Any]:
    replies = list(replies)
    for reply in replies:
        if isinstance(reply, BaseException):
            raise reply
    return replies


def _sortable(stream_id: bytes | str) -> str:
    """A stream id as text whose order is the stream's order."""
    text = stream_id.decode() if isinstance(stream_id, bytes) else str(stream_id)
    millis, _, sequence = text.partition("-")
    return f"{int(millis):020d}-{int(sequence or 0):020d}"


def _text(stream_id: bytes | str) -> str:
    return stream_id.decode() if isinstance(stream_id, bytes) else str(stream_id)


_token_lock = threading.Lock()
_last_token = [0]
_process_tag = os.urandom(4).hex()


def _order_token() -> str:
    """Orders the sets of one field in a row's patch: microseconds, never repeated nor going back in this
    process, then the process's random tag; fixed width, so text order is time order."""
    with _token_lock:
        now = max(time.time_ns() // 1000, _last_token[0] + 1)
        _last_token[0] = now
    return f"{now:016x}{_process_tag}"


def _after_fork_in_child() -> None:
    global _process_tag, _token_lock
    _process_tag = os.urandom(4).hex()  # a forked child must not share its parent's tokens
    _token_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


# -- save_behind and incr_behind ----------------------------------------------------------------------
def _column(config: ModelCacheConfig, name: str, caller: str) -> Any:
    meta = config.model._meta
    try:
        model_field = meta.get_field(name)
    except FieldDoesNotExist:
        raise ValueError(f"{caller}(): {meta.label} has no field {name!r}") from None
    if not getattr(model_field, "concrete", False) or model_field.many_to_many:
        raise ValueError(f"{caller}(): {meta.label}.{name} is not a column")
    if model_field.primary_key:
        raise ValueError(f"{caller}(): the primary key {name!r} cannot be changed")
    return model_field


def _check_delta(config: ModelCacheConfig, model_field: Any, delta: Any, caller: str) -> int:
    label = f"{config.label}.{model_field.name}"
    if not isinstance(model_field, models.IntegerField):
        raise ValueError(f"{caller}(): {label} is not an integer field; only integer fields count")
    if type(delta) is not int:
        raise TypeError(f"{caller}(): the increment of {label} must be an int, not {type(delta).__name__}")
    if not -_INT64 < delta < _INT64:
        raise ValueError(f"{caller}(): the increment {delta} of {label} is out of the 64-bit range")
    return delta


def _increment_of(model_field: Any, value: Any) -> int | None:
    """The n of `F(field) + n`, `n + F(field)` or `F(field) - n` on the field itself; None for anything else."""
    if not isinstance(value, CombinedExpression) or value.connector not in ("+", "-"):
        return None
    names = (model_field.name, model_field.attname)
    lhs, rhs = value.lhs, value.rhs
    if isinstance(lhs, F) and lhs.name in names and isinstance(rhs, Value) and type(rhs.value) is int:
        return rhs.value if value.connector == "+" else -rhs.value
    plus = value.connector == "+"
    if (
        plus
        and isinstance(rhs, F)
        and rhs.name in names
        and isinstance(lhs, Value)
        and type(lhs.value) is int
    ):
        return lhs.value
    return None


def _changed_values(
    config: ModelCacheConfig, instance: models.Model, update_fields: Any
) -> tuple[dict[str, Any], dict[str, int]]:
    """(values set, increments) of the fields to save; every value checked the way the database will."""
    meta = config.model._meta
    if update_fields is None:
        fields = [f for f in meta.concrete_fields if not f.primary_key]
    else:
        if isinstance(update_fields, str) or not isinstance(update_fields, Iterable):
            raise TypeError("update_fields must be a list of field names")
        fields = [_column(config, name, "save_behind") for name in update_fields]
        if not fields:
            raise ValueError("save_behind(): update_fields is empty; nothing to save")
    connection = connections[router.db_for_write(config.model) or DEFAULT_DB_ALIAS]
    values: dict[str, Any] = {}
    increments: dict[str, int] = {}
    for model_field in fields:
        value = getattr(instance, model_field.attname)
        if isinstance(value, Combinable):
            delta = _increment_of(model_field, value)
            if delta is None:
                raise ValueError(
                    f"save_behind(): {meta.label}.{model_field.name} holds an expression ({value!r}); "
                    "write-behind queues values and increments (F(field) + n), use save() for others"
                )
            increments[model_field.attname] = _check_delta(config, model_field, delta, "save_behind")
            continue
        try:
            model_field.get_db_prep_save(value, connection)  # refuse now what the database would refuse later
        except (TypeError, ValueError) as error:
            raise ValueError(f"save_behind(): {meta.label}.{model_field.name}={value!r}: {error}") from error
        values[model_field.attname] = value
    return values, increments


def _field_identity(core: Core, patch: bytes, name: str) -> bytes:
    """What a patched value is signed for: this row's patch and this field, nothing else."""
    return core.keys.identity(patch) + b"\x00" + name.encode()


def _queue_plan(
    core: Core,
    config: ModelCacheConfig,
    pk: Any,
    values: dict[str, Any],
    increments: dict[str, int],
    counted: str | None = None,
) -> Any:
    """Append the change to its stream and lay it onto the row's patch: one batch, so one round trip.
    Returns (stream id, backlog, the new value of `counted` as readers see it, or None if not known)."""
    options = core.settings.options
    head = yield from core.namespace.current()
    patch = core.physical_of(head, config.pending_key(pk))
    keys = shard_keys(core, shard_of(core, config.label, pk))
    token = _order_token()
    payload = _encode_change(
        core,
        {
            "model": config.label,
            "pk": pk,
            "fields": values,
            "incr": increments,
            "token": token,
            "fingerprint": model_fingerprint(config.model),
        },
    )
    ops: list[Any] = []
    for name, value in values.items():
        ops += ["v", name, core.codec.encode(value, _field_identity(core, patch, name))]
    for name, delta in increments.items():
        ops += ["d", name, delta]
    calls = [
        Call(keys.stream, ("XADD", keys.stream, "*", "c", payload), idempotent=False),
        Call(keys.stream, ("XLEN", keys.stream)),
    ]
    wait_replicas = int(options["BEHIND_WAIT_REPLICAS"])
    if wait_replicas:
        # In the same per-node batch, so on the same connection as the XADD: WAIT counts that connection's
        # writes only.
        wait_ms = max(1, int(options["BEHIND_WAIT_TIMEOUT"] * 1000))
        if core.replicas_listed(keys.stream) < wait_replicas:
            # Fewer replicas than asked for exist (a promoted primary has none until one rejoins): waiting
            # the whole timeout would not make the change safer, only every save slower. A replica that
            # the slot map does not list yet may still acknowledge within the millisecond.
            wait_ms = 1
        calls.append(Call(keys.stream, ("WAIT", wait_replicas, wait_ms)))
    entry = core.physical_of(head, config.entry_key("pk", pk)) if counted else None
    script_keys = (patch, entry) if entry else (patch,)
    calls.append(
        Call(
            patch,
            ("EVAL", scripts.PATCH_ROW, len(script_keys), *script_keys, PATCH_TTL_MS, token, *ops),
            idempotent=False,
        )
    )
    replies = yield calls
    queued, patched = replies[0], replies[-1]
    if isinstance(queued, BaseException):
        if not isinstance(patched, BaseException):
            # Not queued, so readers must not see it: take back what this change still owns of the patch.
            undone = [-item if isinstance(item, int) else item for item in ops]
            undo = Call(patch, ("EVAL", scripts.TAKE_BACK_PATCH, 1, patch, token, *undone), idempotent=False)
            yield Guarded(_one(undo), "save_behind_cache", None)
        raise queued
    # From here on the change is queued: nothing may say otherwise. A failed XLEN only skips the trigger; a
    # failed WAIT counts as no replica reached.
    stream_id = _text(queued)
    backlog = 0 if isinstance(replies[1], BaseException) else int(replies[1])
    reached = 0 if not wait_replicas or isinstance(replies[2], BaseException) else int(replies[2])
    if wait_replicas and reached < wait_replicas:
        core.failures.note(
            "behind_unreplicated",
            "write-behind change %s reached %s of %s replicas",
            stream_id,
            reached,
            wait_replicas,
        )
    if isinstance(patched, BaseException):
        # Queued, but readers of the cached row cannot see it: its row tag is invalidated (through the
        # outbox if that node is unreachable), so they read the database until the drain refreshes it. A
        # refusal (an ACL without the hash commands) is a deployment error: said loudly, but the change is
        # queued, so raising would invite a second, duplicate call.
        if not isinstance(patched, OUTAGE_ERRORS):
            logger.error("write-behind change %s queued, but its patch was refused: %s", stream_id, patched)
        core.failures.note(
            "behind_unpatched", "write-behind change %s not laid on the cache: %s", stream_id, patched
        )
        yield Guarded(core.tags.invalidate([config.row_tag(pk)]), "save_behind_cache", None)
        return stream_id, backlog, None
    value = None
    if counted and isinstance(patched, list | tuple):
        value = yield Guarded(
            _counted_plan(core, config, pk, entry, patch, counted, patched), "save_behind_cache", None
        )
    return stream_id, backlog, value


def _counted_plan(
    core: Core, config: ModelCacheConfig, pk: Any, entry: bytes, patch: bytes, name: str, reply: Any
) -> Any:
    """The field's value as a reader would see it now: the cached row's, or the value queued last, plus
    the increments queued since. None when the row is not cached (only the database knows it then)."""
    data, queued, added = (list(reply) + [None, None, None])[:3]
    model_field = config.model._meta.get_field(name)
    if queued is not None:
        try:
            base = core.codec.decode(queued, _field_identity(core, patch, name))
        except Exception:  # noqa: BLE001 - not ours (see patch_fields): the value is not known
            return None
    else:
        if data is None:
            return None
        found = yield from core.valid_values({0: (entry, data)})
        row = config.instance_from(found[0], "pk", pk, DEFAULT_DB_ALIAS) if 0 in found else None
        if not isinstance(row, config.model):
            return None
        base = getattr(row, name)
    if base is None:
        return None
    return model_field.to_python(base) + int(added or 0)


def _one(call: Call) -> Any:
    return (yield call)


def _registered_behind(model: Any, caller: str) -> ModelCacheConfig:
    config = config_for(model)
    if config.write != "behind":
        raise ImproperlyConfigured(
            f"{config.label} is registered with write={config.write!r}; {caller} needs write='behind'"
        )
    return config


def _queue(
    config: ModelCacheConfig,
    pk: Any,
    values: dict[str, Any],
    increments: dict[str, int],
    counted: str | None = None,
) -> tuple[str, Any]:
    core = config.core
    stream_id, backlog, value = core.run_strict(
        _queue_plan(core, config, pk, values, increments, counted), "save_behind"
    )
    threshold = core.settings.options["BEHIND_TRIGGER_BACKLOG"]
    if threshold and backlog >= threshold:
        _trigger_drain(config.cache_alias, shard_of(core, config.label, pk))
    return stream_id, value


def save_behind(instance: models.Model, update_fields: Iterable[str] | None = None) -> str:
    """Change the cached row now and queue the change for the database; returns the change's stream id.

    Readers through `get_cached` see the new values at once. The database gets them when a drain runs
    (Celery beat, the backlog trigger, or `flush_behind()`). A field set to `F(field) + n` is an increment
    (see `incr_behind`). One round trip, no database access: a row that does not exist is found out by the
    drain, which drops the change. Raises CacheUnavailable when the change cannot be queued (nothing is
    then changed), ValueError for values the database would refuse."""
    config = _registered_behind(instance, "save_behind")
    if instance.pk is None:
        raise ValueError("save_behind() needs a row that exists (its pk is None); create rows with save()")
    pk = config.normalize("pk", instance.pk)
    values, increments = _changed_values(config, instance, update_fields)
    return _queue(config, pk, values, increments)[0]


def incr_behind(model: Any, pk: Any, field: str, delta: int = 1) -> int | None:
    """Add `delta` to an integer field of a row, written behind; returns the field's new value as readers
    of the cache see it, or None when the row is not cached (the increment is queued all the same).

    Concurrent calls never lose an increment: the cache adds each one atomically to the row's pending
    increments (readers through `get_cached` see the sum at once), and the drain applies their sum to the
    database as `field = field + n`, each change exactly once. One round trip, no database query."""
    config = _registered_behind(model, "incr_behind")
    model_field = _column(config, field, "incr_behind")
    delta = _check_delta(config, model_field, delta, "incr_behind")
    pk = config.normalize("pk", pk)
    return _queue(config, pk, {}, {model_field.attname: delta}, counted=model_field.attname)[1]


_last_trigger: dict[tuple[str, int], float] = {}


def _trigger_drain(alias: str, shard: int) -> None:
    now = time.monotonic()
    if now - _last_trigger.get((alias, shard), 0.0) < 1.0:
        return
    _last_trigger[(alias, shard)] = now
    if not dispatch.celery_installed():  # the beat schedule or flush_behind() must drain
        return
    try:
        dispatch.send(dispatch.FLUSH_BEHIND, {"using": alias, "shards": [shard]}, ignore_result=True)
    except Exception as error:  # noqa: BLE001 - the broker is not ours; a failed trigger must not fail the save
        logger.warning("could not queue a write-behind drain of shard %s: %s", shard, error)


# -- reading the patch --------------------------------------------------------------------------------
def patch_fields(core: Core, patch: bytes, reply: Any) -> dict[str, tuple]:
    """{attname: ("set", value, n added since) or ("add", n)} from a patch's HGETALL; a value that does not
    verify (not written by this cache for this row and field) is left out and logged."""
    pairs = reply.items() if isinstance(reply, dict) else zip(reply[::2], reply[1::2], strict=True)
    sets: dict[str, Any] = {}
    adds: dict[str, int] = {}
    for raw_name, raw_value in pairs:
        name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
        kind, _, attname = name.partition(":")
        if kind == "v":
            try:
                sets[attname] = core.codec.decode(raw_value, _field_identity(core, patch, attname))
            except Exception as error:  # noqa: BLE001 - a forged or corrupt value is not laid on the row
                core.failures.count("behind_patch_refused")
                logger.warning("a queued value of %r in %r does not verify: %s", attname, patch, error)
        elif kind == "d":
            try:
                adds[attname] = int(raw_value)
            except (TypeError, ValueError):
                logger.warning("a queued increment of %r in %r is not a number", attname, patch)
    fields: dict[str, tuple] = {name: ("set", value, adds.pop(name, 0)) for name, value in sets.items()}
    fields.update((name, ("add", delta)) for name, delta in adds.items())
    return fields


def lay_patch(config: ModelCacheConfig, instance: models.Model, fields: dict[str, Any]) -> models.Model:
    """The row with its queued changes: sets replace a value, increments add to it."""
    for name, entry in fields.items():
        if name not in config.field_names:
            continue  # a field a migration removed
        kind = entry[0]
        try:
            if kind == "set":
                model_field = config.model._meta.get_field(name)
                value = entry[1]
                value = None if value is None else model_field.to_python(value)
                if entry[2]:
                    value = value + entry[2]
                setattr(instance, name, value)
            elif kind == "add":
                current = getattr(instance, name)
                if current is not None:
                    setattr(instance, name, current + entry[1])
        except Exception as error:  # noqa: BLE001 - the database will refuse it too; show the row as it is
            logger.warning("queued change of %s.%s cannot be shown: %s", config.label, name, error)
    return instance


# -- the drain ----------------------------------------------------------------------------------------
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
        for name in (
            "changes_read",
            "changes_applied",
            "changes_found_applied",
            "rows_written",
            "dropped_deleted",
            "dead_lettered",
            "failed_rows",
            "batches",
            "database_errors",
            "seconds",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.shards_busy.extend(other.shards_busy)
        self.shards_unreachable.extend(other.shards_unreachable)
        self.problems.extend(other.problems)


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
    fresh: Any = None  # the row as the database holds it after the last transaction, if one ran
    read: bool = False  # whether `fresh` was read (None then means the row is gone)

    @property
    def key(self) -> str:
        return str(self.pk)

    def done(self) -> list[_Change]:
        """Changes the database has (or will never get), in stream order: the patch lets go of these."""
        changes = [*self.applied, *self.found_applied, *self.dropped, *(c for c, _, _ in self.dead)]
        return sorted(changes, key=lambda change: _sortable(change.id))


_ZERO = _sortable("0-0")


def _lock_marks(label: str, keys: list[str], db: str) -> dict[str, Any]:
    """The rows' applied marks, created if new and locked until the transaction ends."""
    from .applied import BehindApplied

    manager = BehindApplied.objects.using(db)
    manager.bulk_create(
        [BehindApplied(model=label, pk_value=key, stream_id=_ZERO) for key in keys], ignore_conflicts=True
    )
    marks = manager.select_for_update().filter(model=label, pk_value__in=keys).order_by("pk_value")
    return {mark.pk_value: mark for mark in marks}


def _coalesce(
    config: ModelCacheConfig, pk: Any, changes: list[_Change]
) -> tuple[models.Model, tuple[str, ...]]:
    """One instance holding what `changes` do to a row, in stream order: the last value set wins, and
    increments after it add to it (or, with no value set, become `field + n`)."""
    meta = config.model._meta
    state: dict[str, list[Any]] = {}
    for change in changes:
        for name, value in change.values.items():
            state[name] = ["set", value, 0]
        for name, delta in change.increments.items():
            current = state.setdefault(name, ["add", 0, 0])
            current[2] += delta
    instance = config.model(**{meta.pk.attname: pk})
    for name, (kind, value, added) in state.items():
        # The field as it is now: a field a migration removed (FieldDoesNotExist) or retyped so that the
        # queued value no longer fits (ValidationError) fails this change, not the batch.
        model_field = meta.get_field(name)
        if kind == "set":
            value = None if value is None else model_field.to_python(value)
            if added:
                value = value + added
        else:
            value = F(model_field.name) + added
        setattr(instance, name, value)
    return instance, tuple(sorted(state))


def _apply_transaction(config: ModelCacheConfig, rows: list[_Row], db: str) -> None:
    """Apply the rows' changes not applied yet, in one transaction; raises DatabaseUnavailable if the
    database failed as a whole, the row's own error otherwise (nothing is then applied)."""
    from .applied import BehindApplied

    model = config.model
    meta = model._meta
    rows = sorted(rows, key=lambda row: row.key)  # one lock order for every drain: no deadlock
    for row in rows:
        row.applied, row.found_applied, row.dropped = [], [], []
    pks = [row.pk for row in rows]
    try:
        with transaction.atomic(using=db):
            marks = _lock_marks(config.label, [row.key for row in rows], db)
            existing = set(model._base_manager.using(db).filter(pk__in=pks).values_list("pk", flat=True))
            groups: dict[tuple[str, ...], list[models.Model]] = {}
            moved = []
            for row in rows:
                mark = marks[row.key]
                # In stream order: what the mark covers is a prefix, the rest is newer.
                cut = next(
                    (i for i, change in enumerate(row.changes) if _sortable(change.id) > mark.stream_id),
                    len(row.changes),
                )
                row.found_applied, newer = row.changes[:cut], row.changes[cut:]
                if not newer:
                    continue
                mark.stream_id = _sortable(newer[-1].id)
                moved.append(mark)
                if row.pk not in existing:
                    row.dropped = newer
                    continue
                row.applied = newer
                instance, names = _coalesce(config, row.pk, newer)
                if names:
                    groups.setdefault(names, []).append(instance)
            for names, instances in groups.items():
                fields = [meta.get_field(name).name for name in names]
                model._base_manager.using(db).bulk_update(instances, fields)
            if moved:
                BehindApplied.objects.using(db).bulk_update(moved, ["stream_id"])
            # The rows as this transaction leaves them (its updates hold their locks until the commit).
            fresh = {obj.pk: obj for obj in model._base_manager.using(db).filter(pk__in=pks)}
    except (OperationalError, InterfaceError) as error:
        for row in rows:
            row.applied, row.found_applied, row.dropped = [], [], []
        connection = connections[db]
        if not connection.in_atomic_block:
            # A terminated backend leaves the connection broken: the next drain in this process (a Celery
            # worker lives long) must open a new one rather than fail on the old one forever.
            connection.close_if_unusable_or_obsolete()
        raise DatabaseUnavailable(f"{type(error).__name__}: {error}") from error
    except Exception:
        for row in rows:
            row.applied, row.found_applied, row.dropped = [], [], []
        raise
    for row in rows:
        row.fresh, row.read = fresh.get(row.pk), True


def _apply_model_rows(
    core: Core, keys: ShardKeys, config: ModelCacheConfig, rows: list[_Row], held: set, report: DrainReport
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
    core: Core, keys: ShardKeys, config: ModelCacheConfig, row: _Row, db: str, held: set, report: DrainReport
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
    core: Core, keys: ShardKeys, row: _Row, change: _Change, error: str, held: set, report: DrainReport
) -> bool:
    """Count a failure of one change of the row. True if it goes to the dead letters (the row's later
    changes go on), False if it is held back, with the row's later changes, for the next drain."""
    attempts = int(
        _call(core, Call(keys.attempts, ("HINCRBY", keys.attempts, _text(change.id), 1), idempotent=False))
    )
    if attempts >= core.settings.options["BEHIND_MAX_ATTEMPTS"]:
        row.dead.append((change, error, attempts))
        return True
    held.add((row.label, row.pk))
    report.failed_rows += 1
    logger.warning(
        "write-behind change %s of %s pk=%r failed (attempt %s), the row's later changes wait: %s",
        _text(change.id),
        row.label,
        row.pk,
        attempts,
        error,
    )
    return False


def _run(core: Core, plan: Any, operation: str) -> Any:
    return core.run_strict(plan, operation)


def _call(core: Core, call: Call, operation: str = "flush_behind") -> Any:
    return _run(core, _one(call), operation)


def _batch(core: Core, calls: list[Call], operation: str = "flush_behind") -> list[Any]:
    def plan() -> Any:
        return _check((yield calls))

    return _run(core, plan(), operation)


def _entries(reply: Any) -> list[tuple[bytes, bytes | None]]:
    """[(id, payload)] from an XRANGE reply."""
    result = []
    for item in reply or []:
        if not item:
            continue
        entry_id, fields = item[0], item[1]
        payload = None
        if fields:
            pairs = dict(zip(fields[::2], fields[1::2], strict=True))
            payload = pairs.get(b"c")
        result.append((entry_id, payload))
    return result


def flush_behind(
    using: str = "default", shards: Iterable[int] | None = None, max_batches: int | None = None
) -> DrainReport:
    """Apply queued write-behind changes to the database now (deploys, tests, the Celery task).

    Every shard is tried whatever happens to the others; `report.problems` says what could not be applied
    and why (`report.complete` is False then). Raises CacheUnavailable only if no shard could be read."""
    core = core_for(using)
    count = core.settings.options["BEHIND_SHARDS"]
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
    options = core.settings.options
    keys = shard_keys(core, shard)
    report = DrainReport()
    token = os.urandom(8).hex()
    idle_ms = max(1, int(options["BEHIND_IDLE_TIMEOUT"] * 1000))
    if not _call(core, Call(keys.lock, ("SET", keys.lock, token, "NX", "PX", idle_ms))):
        report.shards_busy.append(shard)
        return report
    read_count = options["BEHIND_BATCH_SIZE"] * READ_FACTOR
    held: set[tuple[str, Any]] = set()
    start = "-"
    try:
        # From the head: the stream holds exactly the changes whose cleanup is not done, in order.
        while max_batches is None or report.batches < max_batches:
            reply = _call(core, Call(keys.stream, ("XRANGE", keys.stream, start, "+", "COUNT", read_count)))
            entries = _entries(reply)
            if not entries:
                break
            if not _still_ours(core, keys, token, idle_ms):
                break  # another drainer goes on from the head; nothing here depends on the lock for safety
            _apply_batch(core, shard, keys, entries, held, report)
            if len(entries) < read_count:
                break
            start = "(" + _text(entries[-1][0])
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
            _call(core, Call(keys.lock, ("EVAL", scripts.RELEASE_IF_OWNER, 1, keys.lock, token)))
        except CacheUnavailable:
            pass  # the lock expires by itself
    return report


def _still_ours(core: Core, keys: ShardKeys, token: str, idle_ms: int) -> bool:
    renewed = _call(core, Call(keys.lock, ("EVAL", scripts.RENEW_IF_OWNER, 1, keys.lock, token, idle_ms)))
    if not renewed:
        logger.warning(
            "lost the write-behind lock of %s (a batch took longer than BEHIND_IDLE_TIMEOUT)", keys.stream
        )
    return bool(renewed)


def _encode_change(core: Core, change: dict[str, Any]) -> bytes:
    """A queued change is signed for what it is (not a cache entry, which could never pass for it) and for
    its KEY_PREFIX, not for one stream: replay_dead_letters moves it between streams."""
    try:
        return core.codec.encode(change, BEHIND_CHANGE_IDENTITY)
    except Exception as error:
        error.add_note("while encoding a write-behind change; nothing was queued")
        raise


def _decode_change(core: Core, payload: bytes | None) -> dict[str, Any]:
    if payload is None:
        raise BehindError("the stream entry has no payload")
    change = core.codec.decode(payload, BEHIND_CHANGE_IDENTITY)
    if not isinstance(change, dict) or not {"model", "pk", "fields"} <= set(change):
        raise BehindError("the stream entry is not a write-behind change")
    if not isinstance(change["fields"], dict) or not isinstance(change.get("incr") or {}, dict):
        raise BehindError("the stream entry is not a write-behind change")
    return change


def _apply_batch(
    core: Core,
    shard: int,
    keys: ShardKeys,
    entries: list[tuple[bytes, bytes | None]],
    held: set[tuple[str, Any]],
    report: DrainReport,
) -> None:
    started = time.monotonic()
    report.batches += 1
    report.changes_read += len(entries)
    rows: dict[tuple[str, Any], _Row] = {}
    letters: list[tuple[bytes, bytes | None, str, int]] = []  # (id, payload, error, attempts)
    for entry_id, payload in entries:
        try:
            change = _decode_change(core, payload)
        except Exception as error:  # noqa: BLE001 - a corrupt or forged entry goes to the dead letters
            letters.append((entry_id, payload, f"undecodable: {type(error).__name__}: {error}", 0))
            continue
        row_id = (change["model"], change["pk"])
        if row_id in held:
            continue  # behind a failing change of its row: stays in the stream, in order
        rows.setdefault(row_id, _Row(change["model"], change["pk"])).changes.append(
            _Change(
                entry_id, payload, str(change.get("token") or ""), change["fields"], change.get("incr") or {}
            )
        )
    by_model: dict[str, list[_Row]] = {}
    for row in rows.values():
        by_model.setdefault(row.label, []).append(row)
    settled: list[tuple[ModelCacheConfig, _Row]] = []
    stop: DatabaseUnavailable | None = None
    for label, model_rows in by_model.items():
        config = config_for_label(label)
        if config is None:
            for row in model_rows:
                letters += [
                    (c.id, c.payload, f"{label} is not registered with cache_model()", 0) for c in row.changes
                ]
            continue
        if stop is None:
            try:
                _apply_model_rows(core, keys, config, model_rows, held, report)
            except DatabaseUnavailable as error:
                stop = error  # what was committed before is still cleaned up below
        settled += [(config, row) for row in model_rows]
    row_letters = [
        (change.id, change.payload, error, attempts)
        for _, row in settled
        for change, error, attempts in row.dead
    ]
    if letters or row_letters:
        _dead_letter(core, shard, letters + row_letters)
    refreshed = _refresh_cached_rows(core, [(config, row) for config, row in settled if row.done()])
    applied_ids: list[bytes] = []
    dropped_ids: list[bytes] = []
    dead_ids = [letter[0] for letter in letters]
    report.dead_lettered += len(letters)
    written = 0
    for _, row in settled:
        written += bool(row.applied)
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
        applied_ids += [c.id for c in row.applied] + [c.id for c in row.found_applied]
        dropped_ids += [c.id for c in row.dropped]
        dead_ids += [c.id for c, _, _ in row.dead]
    report.rows_written += written
    _delete_entries(core, keys, applied_ids, dropped_ids, dead_ids, written, time.monotonic() - started)
    if stop is not None:
        raise stop


def _refresh_cached_rows(core: Core, settled: list[tuple[ModelCacheConfig, _Row]]) -> set[tuple[str, Any]]:
    """After the commit: each row's entry becomes the row as the transaction left it, and the patch lets
    go of the changes done. Returns the rows whose cleanup is done (now or by an earlier drain)."""
    if not settled:
        return set()
    replies = core.run(_refresh_plan(core, settled), "flush_behind_refresh", None)
    if replies is None:
        return set()
    done = set()
    for (_, row), reply in zip(settled, replies, strict=True):
        if not isinstance(reply, BaseException):
            done.add((row.label, row.pk))
    return done


def _refresh_plan(core: Core, settled: list[tuple[ModelCacheConfig, _Row]]) -> Any:
    head = yield from core.namespace.current()
    # The tag versions of every row to store, read together per model (one batch, not a round trip per row).
    versions: dict[Any, dict[str, int]] = {}
    for config in {config.model: config for config, _ in settled}.values():
        tags = [config.row_tags(row.fresh) for c, row in settled if c is config and row.fresh is not None]
        if tags:
            wanted = list(
                dict.fromkeys([*config.static_tags(), *(tag for row_tags in tags for tag in row_tags)])
            )
            versions[config.model] = (yield from core.stamps(wanted, core.expiry_ms(config.timeout))) or {}
    calls = []
    for config, row in settled:
        expiry_ms = core.expiry_ms(config.timeout)
        entry = core.physical_of(head, config.entry_key("pk", row.pk))
        patch = core.physical_of(head, config.pending_key(row.pk))
        drained = core.physical_of(head, config.drained_key(row.pk))
        if not row.read:
            data: bytes | str = "-"  # no transaction read the row (its only change was dead-lettered)
        elif row.fresh is None:
            data = ""
        else:
            held = versions[config.model]
            stamps = {tag: held[tag] for tag in [*config.static_tags(), *config.row_tags(row.fresh)]}
            data = core.encode(config.row_payload(row.fresh, core), "flush_behind", entry, stamps)
        done = row.done()
        newest_set: dict[str, str] = {}
        last_set: dict[str, str] = {}
        added: dict[str, list[Any]] = {}
        for change in done:
            for name in change.values:
                newest_set[name] = max(newest_set.get(name, ""), change.token)
                last_set[name] = change.token
                added[name] = []  # increments before a set are folded into nothing: the set replaced them
            for name, delta in change.increments.items():
                added.setdefault(name, []).extend([_text(change.id), -delta])
        args: list[Any] = [_text(done[-1].id), data, "" if expiry_ms is None else expiry_ms, PATCH_TTL_MS]
        args.append(len(newest_set))
        for name, token in newest_set.items():
            args += [name, token]
        increments = {name: pairs for name, pairs in added.items() if pairs}
        args.append(len(increments))
        for name, pairs in increments.items():
            args += [name, last_set.get(name, ""), len(pairs) // 2, *pairs]
        calls.append(
            Call(
                entry,
                ("EVAL", scripts.REFRESH_DRAINED_ROW, 3, entry, patch, drained, *args),
                idempotent=False,
            )
        )
    return (yield calls)


def _delete_entries(
    core: Core,
    keys: ShardKeys,
    applied: list[bytes],
    dropped: list[bytes],
    dead: list[bytes],
    rows_written: int,
    seconds: float,
) -> None:
    """Delete the done entries from the stream and count them, each once, in one script."""
    if not (applied or dropped or dead):
        return
    _call(
        core,
        Call(
            keys.stream,
            (
                "EVAL",
                scripts.FINISH_DRAINED_BATCH,
                3,
                keys.stream,
                keys.attempts,
                keys.stats,
                len(applied),
                len(dropped),
                len(dead),
                rows_written,
                f"{seconds:.6f}",
                *applied,
                *dropped,
                *dead,
            ),
            idempotent=False,
        ),
    )


def _dead_letter(core: Core, shard: int, letters: list[tuple[bytes, bytes | None, str, int]]) -> None:
    key = dead_letter_key(core)
    calls = [
        Call(
            key,
            (
                "XADD",
                key,
                "*",
                "c",
                payload or b"",
                "error",
                error[:2000],
                "attempts",
                attempts,
                "shard",
                shard,
                "original_id",
                entry_id,
                "at",
                f"{time.time():.3f}",
            ),
            idempotent=False,
        )
        for entry_id, payload, error, attempts in letters
    ]
    _batch(core, calls)
    logger.error("moved %d write-behind change(s) to the dead-letter stream: %s", len(letters), letters[0][2])


# -- dead letters and metrics ---------------------------------------------------------------------------
@dataclass
class DeadLetter:
    id: str
    model: str | None
    pk: Any
    fields: dict[str, Any] | None
    error: str
    attempts: int
    original_id: str


def dead_letters(using: str = "default", count: int = 1000) -> list[DeadLetter]:
    core = core_for(using)
    key = dead_letter_key(core)
    reply = _call(core, Call(key, ("XRANGE", key, "-", "+", "COUNT", count)))
    letters = []
    for entry_id, fields in reply or []:
        pairs = dict(zip(fields[::2], fields[1::2], strict=True))
        try:
            change = _decode_change(core, pairs.get(b"c") or None)
        except Exception:  # noqa: BLE001 - shown as undecodable
            change = {"model": None, "pk": None, "fields": None}
        letters.append(
            DeadLetter(
                id=entry_id.decode(),
                model=change["model"],
                pk=change["pk"],
                fields=change["fields"],
                error=pairs.get(b"error", b"").decode(errors="replace"),
                attempts=int(pairs.get(b"attempts", b"0")),
                original_id=pairs.get(b"original_id", b"").decode(),
            )
        )
    return letters


def replay_dead_letters(using: str = "default", ids: Iterable[str] | None = None) -> int:
    """Queue dead-lettered changes again (as new changes, in their original order); returns how many."""
    core = core_for(using)
    key = dead_letter_key(core)
    wanted = None if ids is None else set(ids)
    replayed = 0
    for letter in dead_letters(using):
        if wanted is not None and letter.id not in wanted:
            continue
        if letter.model is None:
            continue
        raw = _call(core, Call(key, ("XRANGE", key, letter.id, letter.id)))
        payload = dict(zip(raw[0][1][::2], raw[0][1][1::2], strict=True))[b"c"]
        shard = shard_keys(core, shard_of(core, letter.model, letter.pk))
        _call(core, Call(shard.stream, ("XADD", shard.stream, "*", "c", payload), idempotent=False))
        _call(core, Call(key, ("XDEL", key, letter.id)))
        replayed += 1
    return replayed


def purge_dead_letters(using: str = "default", ids: Iterable[str] | None = None) -> int:
    core = core_for(using)
    key = dead_letter_key(core)
    targets = [letter.id for letter in dead_letters(using)] if ids is None else list(ids)
    if not targets:
        return 0
    return int(_call(core, Call(key, ("XDEL", key, *targets))))


def behind_metrics(using: str = "default") -> dict[str, Any]:
    """Backlog per shard, lag (age of the oldest change not yet applied), applied/s, coalescing ratio."""
    core = core_for(using)
    count = core.settings.options["BEHIND_SHARDS"]
    now_ms = time.time() * 1000
    shards = []
    calls = []
    for shard in range(count):
        keys = shard_keys(core, shard)
        calls += [
            Call(keys.stream, ("XLEN", keys.stream)),
            Call(keys.stream, ("XRANGE", keys.stream, "-", "+", "COUNT", 1)),
            Call(keys.stats, ("HGETALL", keys.stats)),
        ]
    calls.append(Call(stats_key(core), ("HGETALL", stats_key(core))))
    calls.append(Call(dead_letter_key(core), ("XLEN", dead_letter_key(core))))
    replies = _batch(core, calls, "behind_metrics")
    oldest_lag = 0.0
    stats: dict[str, float] = {}

    def add_counters(raw: Any) -> None:
        pairs = raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2], strict=True)
        for name, value in pairs:
            key = name.decode()
            stats[key] = stats.get(key, 0.0) + float(value)

    for shard in range(count):
        backlog, first, counters = replies[3 * shard : 3 * shard + 3]
        lag = 0.0
        if first:
            millis = int(first[0][0].split(b"-")[0])
            lag = max(0.0, (now_ms - millis) / 1000)
        oldest_lag = max(oldest_lag, lag)
        shards.append({"shard": shard, "backlog": int(backlog), "lag_seconds": lag})
        add_counters(counters or {})
    add_counters(replies[-2] or {})
    applied = stats.get("changes_applied", 0.0)
    rows = stats.get("rows_written", 0.0)
    seconds = stats.get("apply_seconds", 0.0)
    return {
        "shards": shards,
        "backlog": sum(s["backlog"] for s in shards),
        "lag_seconds": oldest_lag,
        "changes_applied": int(applied),
        "rows_written": int(rows),
        "batches": int(stats.get("batches", 0)),
        "applied_per_second": applied / seconds if seconds else 0.0,
        "coalescing_ratio": applied / rows if rows else 0.0,
        "dead_letters": int(replies[-1]),
    }
