"""Write-behind: `save_behind` updates the cache now and queues the change; a drain applies it later.

Queue: BEHIND_SHARDS Redis Streams, each with a hash tag chosen so that the shards' slots are spread evenly
over the 16384 slots (so over the primaries). A row always maps to the same shard, so its changes stay in
order. A drain (`flush_behind()`, or the Celery task of the same name) takes a shard's lock, reads with a
consumer group (first whatever a dead drainer left unacknowledged, then new entries), coalesces per row
(last write wins in stream order; only the fields that were changed), applies the batch in one database
transaction with `bulk_update`, then acknowledges and deletes the entries, so a stream holds exactly the
changes not yet in the database. A drainer killed mid-batch leaves its entries pending and its lock to
expire after BEHIND_IDLE_TIMEOUT; the next drainer applies them again (at-least-once; applying a value twice
is harmless). A row that keeps failing moves to the dead-letter stream after BEHIND_MAX_ATTEMPTS drains.

While a row has queued changes, a marker next to its cache entry (same slot) holds the newest queued stream
id: fills from the (older) database are refused, and after the drain commits it replaces the entry with the
database's row and removes the marker, unless a newer change was queued meanwhile.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from django.core.cache import caches
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
from django.db.models.expressions import Combinable
from redis.crc import key_slot
from redis.exceptions import ResponseError

from ..cache import CacheUnavailable, Compute, Guarded
from ..keys import BEHIND_CHANGE_IDENTITY
from ..topology import Call
from ..versioning import model_fingerprint
from .registry import ModelCacheConfig, config_for, config_for_label

logger = logging.getLogger("django_distcache.behind")

GROUP = b"distcache"
MARKER_TTL_MS = 24 * 3600 * 1000
CAS_ATTEMPTS = 5
PASS_FACTOR = 10  # a drain coalesces up to this many reads of BEHIND_BATCH_SIZE entries per transaction
_SLOTS = 16384

# save_behind's cache update: compare-and-set the entry (ARGV[1]: sha1 of what was read, '-' = absent),
# and raise the row's marker to the newest queued stream id (ARGV[4]).
_SAVE_SCRIPT = """
local function newer(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am > bm or (am == bm and as > bs)
end
local current = redis.call('GET', KEYS[1])
local ok = true
if current then ok = redis.sha1hex(current) == ARGV[1] else ok = ARGV[1] == '-' end
local marker = redis.call('GET', KEYS[2])
if not marker or newer(ARGV[4], marker) then redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5]) end
if not ok then
  if ARGV[6] == '1' then redis.call('DEL', KEYS[1]) end
  return 0
end
if ARGV[3] == '' then redis.call('SET', KEYS[1], ARGV[2]) else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1
"""

# After a drain commits: replace the entry with the database's row and drop the marker, unless the marker
# says a newer change (> ARGV[1]) is still queued.
_REFRESH_SCRIPT = """
local function newer(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am > bm or (am == bm and as > bs)
end
local marker = redis.call('GET', KEYS[2])
if marker then
  if newer(marker, ARGV[1]) then return 0 end
  redis.call('DEL', KEYS[2])
end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) return 1 end
if ARGV[3] == '' then redis.call('SET', KEYS[1], ARGV[2]) else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1
"""

_RENEW_SCRIPT = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
_RELEASE_SCRIPT = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)


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


def shard_keys(cache: Any, shard: int) -> ShardKeys:
    """A shard's stream, lock and attempt counts: `<KEY_PREFIX>:~behind:{<tag>}` and alike, in one slot."""
    tag = shard_tags(cache._settings.options["BEHIND_SHARDS"])[shard]
    internal = cache._keys.internal
    return ShardKeys(
        stream=internal(f"behind:{{{tag}}}"),
        lock=internal(f"behind-lock:{{{tag}}}"),
        attempts=internal(f"behind-attempts:{{{tag}}}"),
    )


def dead_letter_key(cache: Any) -> bytes:
    return cache._keys.internal("behind-dead")


def stats_key(cache: Any) -> bytes:
    return cache._keys.internal("behind-stats")


def shard_of(cache: Any, label: str, pk: Any) -> int:
    digest = hashlib.blake2b(f"{label}:{pk!r}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % cache._settings.options["BEHIND_SHARDS"]


def _check(replies: Iterable[Any]) -> list[Any]:
    replies = list(replies)
    for reply in replies:
        if isinstance(reply, BaseException):
            raise reply
    return replies


# -- save_behind --------------------------------------------------------------------------------------
def _changed_values(config: ModelCacheConfig, instance: models.Model, update_fields: Any) -> dict[str, Any]:
    meta = config.model._meta
    if update_fields is None:
        fields = [f for f in meta.concrete_fields if not f.primary_key]
    else:
        if isinstance(update_fields, str) or not isinstance(update_fields, Iterable):
            raise TypeError("update_fields must be a list of field names")
        fields = []
        for name in update_fields:
            try:
                model_field = meta.get_field(name)
            except FieldDoesNotExist:
                raise ValueError(f"save_behind(): {meta.label} has no field {name!r}") from None
            if not getattr(model_field, "concrete", False) or model_field.many_to_many:
                raise ValueError(f"save_behind(): {meta.label}.{name} is not a column")
            if model_field.primary_key:
                raise ValueError(f"save_behind(): the primary key {name!r} cannot be changed")
            fields.append(model_field)
        if not fields:
            raise ValueError("save_behind(): update_fields is empty; nothing to save")
    connection = connections[router.db_for_write(config.model) or DEFAULT_DB_ALIAS]
    values = {}
    for model_field in fields:
        value = getattr(instance, model_field.attname)
        if isinstance(value, Combinable):
            raise ValueError(
                f"save_behind(): {meta.label}.{model_field.name} holds an expression ({value!r}); "
                "write-behind queues values, use save() for database expressions"
            )
        try:
            model_field.get_db_prep_save(value, connection)  # refuse now what the database would refuse later
        except (TypeError, ValueError) as error:
            raise ValueError(f"save_behind(): {meta.label}.{model_field.name}={value!r}: {error}") from error
        values[model_field.attname] = value
    return values


def _load_row(config: ModelCacheConfig, pk: Any) -> models.Model:
    db = router.db_for_read(config.model) or DEFAULT_DB_ALIAS
    return config.model._base_manager.using(db).get(pk=pk)


def _save_plan(cache: Any, config: ModelCacheConfig, pk: Any, values: dict[str, Any]) -> Any:
    options = cache._settings.options
    head = yield from cache._namespace.current()
    entry = cache._physical_of(head, config.entry_key("pk", pk))
    marker = cache._physical_of(head, config.pending_key(pk))
    db = router.db_for_read(config.model) or DEFAULT_DB_ALIAS

    def current_row() -> Any:
        """(the bytes the entry holds, the row they hold if they are a live cached row)"""
        observed = yield Call(entry, ("GET", entry))
        if observed is not None:
            found = yield from cache._valid_values({0: (entry, observed)})
            row = config.instance_from(found[0], "pk", pk, db) if 0 in found else None
            if isinstance(row, config.model):
                return observed, row
        return observed, None

    # The cached row saves a database read; if its node (or one of its tags') is unreachable, the change
    # can still be queued when the stream's node answers.
    observed, row = yield Guarded(current_row(), "save_behind_cache", (None, None))
    if row is None:
        row = yield Compute(_load_row, (config, pk))  # DoesNotExist here: nothing queued yet
    # Queue first: from here on the change reaches the database whatever happens to the cache.
    keys = shard_keys(cache, shard_of(cache, config.label, pk))
    payload = _encode_change(
        cache,
        {"model": config.label, "pk": pk, "fields": values, "fingerprint": model_fingerprint(config.model)},
    )
    calls = [
        Call(keys.stream, ("XADD", keys.stream, "*", "c", payload), idempotent=False),
        Call(keys.stream, ("XLEN", keys.stream)),
    ]
    wait_replicas = int(options["BEHIND_WAIT_REPLICAS"])
    if wait_replicas:
        # In the same per-node batch, so on the same connection as the XADD: WAIT counts that connection's
        # writes only.
        wait_ms = max(1, int(options["BEHIND_WAIT_TIMEOUT"] * 1000))
        if cache._replicas_listed(keys.stream) < wait_replicas:
            # Fewer replicas than asked for exist (a promoted primary has none until one rejoins): waiting
            # the whole timeout would not make the change safer, only every save slower. A replica that
            # the slot map does not list yet may still acknowledge within the millisecond.
            wait_ms = 1
        calls.append(Call(keys.stream, ("WAIT", wait_replicas, wait_ms)))
    replies = _check((yield calls))
    stream_id, backlog = replies[0], replies[1]
    stream_id = stream_id.decode() if isinstance(stream_id, bytes) else str(stream_id)
    if wait_replicas and int(replies[2]) < wait_replicas:
        cache._failures.note(
            "behind_unreplicated",
            "write-behind change %s reached %s of %s replicas",
            stream_id,
            replies[2],
            wait_replicas,
        )
    # The change is queued: a cache outage from here on must not tell the caller it was not saved. The
    # entry then keeps its old value until the drain refreshes it from the database.
    updated = yield Guarded(
        _update_entry_plan(cache, config, entry, marker, current_row, observed, row, values, stream_id),
        "save_behind_cache",
        False,
    )
    if not updated:
        # The entry may still hold the old row when its node is back: its row tag is invalidated (through
        # the outbox if that node is unreachable too), so readers load the row instead.
        yield Guarded(cache._tags.invalidate(config.row_tags(row)), "save_behind_cache", None)
    return stream_id, int(backlog), keys


def _update_entry_plan(
    cache: Any,
    config: ModelCacheConfig,
    entry: bytes,
    marker: bytes,
    current_row: Any,
    observed: bytes | None,
    row: models.Model,
    values: dict[str, Any],
    stream_id: str,
) -> Any:
    """Compare-and-set the cached row with the queued values merged in, and raise the row's marker."""
    expiry_ms = cache._expiry_ms(config.timeout)
    stamps = yield from cache._stamps([*config.static_tags(), *config.row_tags(row)], expiry_ms)
    expiry = "" if expiry_ms is None else expiry_ms
    for attempt in range(CAS_ATTEMPTS):
        for name, value in values.items():
            setattr(row, name, value)
        data = cache._encode(config.row_payload(row, cache), "save_behind", entry, stamps)
        fingerprint = hashlib.sha1(observed).hexdigest() if observed is not None else "-"
        last = "1" if attempt == CAS_ATTEMPTS - 1 else "0"
        stored = yield Call(
            entry,
            (
                "EVAL",
                _SAVE_SCRIPT,
                2,
                entry,
                marker,
                fingerprint,
                data,
                expiry,
                stream_id,
                MARKER_TTL_MS,
                last,
            ),
            idempotent=False,
        )
        if stored == 1:
            return True
        observed, cached_row = yield from current_row()  # another writer got there first: merge onto theirs
        if cached_row is not None:
            row = cached_row
    return True  # the last attempt removes the entry (readers load the row) rather than fail


def save_behind(instance: models.Model, update_fields: Iterable[str] | None = None) -> str:
    """Update the cached row now and queue the change for the database; returns the change's stream id.

    Readers through `get_cached` see the new values at once. The database gets them when a drain runs
    (Celery beat, the backlog trigger, or `flush_behind()`). Raises CacheUnavailable when the change cannot
    be queued (nothing is then changed), ValueError for values the database would refuse."""
    config = config_for(instance)
    if config.write != "behind":
        raise ImproperlyConfigured(
            f"{config.label} is registered with write={config.write!r}; save_behind needs write='behind'"
        )
    if instance.pk is None:
        raise ValueError("save_behind() needs a row that exists (its pk is None); create rows with save()")
    pk = config.normalize("pk", instance.pk)
    values = _changed_values(config, instance, update_fields)
    cache = config.cache
    stream_id, backlog, keys = cache._run_strict(_save_plan(cache, config, pk, values), "save_behind")
    threshold = cache._settings.options["BEHIND_TRIGGER_BACKLOG"]
    if threshold and backlog >= threshold:
        _trigger_drain(config.cache_alias, shard_of(cache, config.label, pk))
    return stream_id


_last_trigger: dict[tuple[str, int], float] = {}


def _trigger_drain(alias: str, shard: int) -> None:
    now = time.monotonic()
    if now - _last_trigger.get((alias, shard), 0.0) < 1.0:
        return
    _last_trigger[(alias, shard)] = now
    try:
        from ..tasks import flush_behind_task
    except ImportError:  # Celery is not installed: the beat schedule or flush_behind() must drain
        return
    try:
        flush_behind_task.apply_async(kwargs={"using": alias, "shards": [shard]}, ignore_result=True)
    except Exception as error:  # noqa: BLE001 - the broker is not ours; a failed trigger must not fail the save
        logger.warning("could not queue a write-behind drain of shard %s: %s", shard, error)


# -- the drain ----------------------------------------------------------------------------------------
@dataclass
class DrainReport:
    changes_read: int = 0
    changes_applied: int = 0
    rows_written: int = 0
    dropped_deleted: int = 0
    dead_lettered: int = 0
    failed_rows: int = 0
    batches: int = 0
    database_errors: int = 0
    seconds: float = 0.0
    shards_busy: list[int] = field(default_factory=list)
    shards_unreachable: list[int] = field(default_factory=list)

    def add(self, other: DrainReport) -> None:
        for name in (
            "changes_read",
            "changes_applied",
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


@dataclass
class _RowChange:
    label: str
    pk: Any
    fields: dict[str, Any] = field(default_factory=dict)
    ids: list[bytes] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)
    deleted: bool = False  # the row was gone when the change was applied: the change is dropped


def _consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}"


def _ensure_group_plan(keys: ShardKeys) -> Any:
    try:
        yield Call(keys.stream, ("XGROUP", "CREATE", keys.stream, GROUP, "0", "MKSTREAM"))
    except ResponseError as error:
        if "BUSYGROUP" not in str(error):
            raise


def _run(cache: Any, plan: Any, operation: str) -> Any:
    return cache._run_strict(plan, operation)


def _call(cache: Any, call: Call, operation: str = "flush_behind") -> Any:
    def plan() -> Any:
        return (yield call)

    return _run(cache, plan(), operation)


def _batch(cache: Any, calls: list[Call], operation: str = "flush_behind") -> list[Any]:
    def plan() -> Any:
        return _check((yield calls))

    return _run(cache, plan(), operation)


def _stream_entries(reply: Any) -> Any:
    """The entry list of a one-stream XREADGROUP reply (a map in RESP3, a list of pairs in RESP2)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return next(iter(reply.values()))
    return reply[0][1]


def _entries(reply: Any) -> list[tuple[bytes, bytes | None]]:
    """[(id, payload)] from XAUTOCLAIM/XREADGROUP entry lists; deleted entries come back as None."""
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
    """Apply queued write-behind changes to the database now (deploys, tests, the Celery task)."""
    cache = caches[using]
    count = cache._settings.options["BEHIND_SHARDS"]
    report = DrainReport()
    started = time.monotonic()
    wanted = list(range(count) if shards is None else shards)
    for shard in wanted:
        if not 0 <= int(shard) < count:
            raise ValueError(f"shard {shard} out of range 0..{count - 1}")
    failure = None
    for shard in wanted:
        try:
            report.add(_drain_shard(cache, int(shard), max_batches))
        except CacheUnavailable as error:
            # One unreachable stream must not hold up the others: its changes wait there for the next drain.
            failure = error
            report.shards_unreachable.append(int(shard))
            logger.warning("write-behind shard %s not drained, its node is unreachable: %s", shard, error)
    report.seconds = time.monotonic() - started
    if failure is not None and len(report.shards_unreachable) == len(wanted):
        raise failure
    return report


def _drain_shard(cache: Any, shard: int, max_batches: int | None) -> DrainReport:
    options = cache._settings.options
    keys = shard_keys(cache, shard)
    report = DrainReport()
    _run(cache, _ensure_group_plan(keys), "flush_behind")
    token = os.urandom(8).hex()
    idle_ms = max(1, int(options["BEHIND_IDLE_TIMEOUT"] * 1000))
    if not _call(cache, Call(keys.lock, ("SET", keys.lock, token, "NX", "PX", idle_ms))):
        report.shards_busy.append(shard)
        return report
    consumer = _consumer_name()
    batch_size = options["BEHIND_BATCH_SIZE"]
    failed_rows: set[tuple[str, Any]] = set()
    try:
        # Whatever a previous drainer read and did not acknowledge comes first, in stream order. Holding the
        # lock means that drainer is gone (its lock expired), so its entries are claimed at once.
        cursor = b"0-0"
        while True:
            if max_batches is not None and report.batches >= max_batches:
                return report
            reply = _call(
                cache,
                Call(
                    keys.stream, ("XAUTOCLAIM", keys.stream, GROUP, consumer, 0, cursor, "COUNT", batch_size)
                ),
            )
            cursor, claimed = reply[0], _entries(reply[1])
            if claimed:
                if not _still_ours(cache, keys, token, idle_ms):
                    return report
                _apply_batch(cache, shard, keys, claimed, failed_rows, report)
            if cursor in (b"0-0", "0-0"):
                break
        while max_batches is None or report.batches < max_batches:
            # Read until caught up (or PASS_FACTOR reads' worth), then coalesce everything read into one
            # transaction: the fewer, larger batches, the more changes of a hot row become one write.
            entries: list[tuple[bytes, bytes | None]] = []
            for _ in range(PASS_FACTOR):
                reply = _call(
                    cache,
                    Call(
                        keys.stream,
                        (
                            "XREADGROUP",
                            "GROUP",
                            GROUP,
                            consumer,
                            "COUNT",
                            batch_size,
                            "STREAMS",
                            keys.stream,
                            ">",
                        ),
                    ),
                )
                read = _entries(_stream_entries(reply))
                entries.extend(read)
                if len(read) < batch_size:
                    break
            if not entries:
                break
            if not _still_ours(cache, keys, token, idle_ms):
                return report
            _apply_batch(cache, shard, keys, entries, failed_rows, report)
    except DatabaseUnavailable as error:
        report.database_errors += 1
        logger.warning(
            "write-behind drain of shard %s stopped, the database failed: %s (retried by the next drain)",
            shard,
            error,
        )
    finally:
        _call(cache, Call(keys.lock, ("EVAL", _RELEASE_SCRIPT, 1, keys.lock, token)))
    return report


def _still_ours(cache: Any, keys: ShardKeys, token: str, idle_ms: int) -> bool:
    renewed = _call(cache, Call(keys.lock, ("EVAL", _RENEW_SCRIPT, 1, keys.lock, token, idle_ms)))
    if not renewed:
        logger.warning(
            "lost the write-behind lock of %s (a batch took longer than BEHIND_IDLE_TIMEOUT)", keys.stream
        )
    return bool(renewed)


def _encode_change(cache: Any, change: dict[str, Any]) -> bytes:
    """A queued change is signed for what it is (not a cache entry, which could never pass for it) and for
    its KEY_PREFIX, not for one stream: replay_dead_letters moves it between streams."""
    try:
        return cache._codec.encode(change, BEHIND_CHANGE_IDENTITY)
    except Exception as error:
        error.add_note("while encoding a write-behind change; nothing was queued")
        raise


def _decode_change(cache: Any, payload: bytes | None) -> dict[str, Any]:
    if payload is None:
        raise BehindError("the stream entry has no payload")
    change = cache._codec.decode(payload, BEHIND_CHANGE_IDENTITY)
    if not isinstance(change, dict) or not {"model", "pk", "fields"} <= set(change):
        raise BehindError("the stream entry is not a write-behind change")
    return change


def _apply_batch(
    cache: Any,
    shard: int,
    keys: ShardKeys,
    entries: list[tuple[bytes, bytes | None]],
    failed_rows: set[tuple[str, Any]],
    report: DrainReport,
) -> None:
    started = time.monotonic()
    report.batches += 1
    report.changes_read += len(entries)
    rows: dict[tuple[str, Any], _RowChange] = {}
    done_ids: list[bytes] = []  # acknowledged whatever happens (dropped or dead-lettered)
    held_ids: list[bytes] = []  # left pending: their row failed earlier in this drain
    for entry_id, payload in entries:
        try:
            change = _decode_change(cache, payload)
        except Exception as error:  # noqa: BLE001 - a corrupt or forged entry goes to the dead letters
            _dead_letter(
                cache, shard, [(entry_id, payload)], f"undecodable: {type(error).__name__}: {error}", 0
            )
            report.dead_lettered += 1
            done_ids.append(entry_id)
            continue
        row_id = (change["model"], change["pk"])
        if row_id in failed_rows:
            held_ids.append(entry_id)
            continue
        row = rows.setdefault(row_id, _RowChange(change["model"], change["pk"]))
        row.fields.update(change["fields"])  # stream order: the later value wins
        row.ids.append(entry_id)
        row.payloads.append(payload)
    by_model: dict[str, list[_RowChange]] = {}
    for row in rows.values():
        by_model.setdefault(row.label, []).append(row)
    applied: list[_RowChange] = []
    for label, model_rows in by_model.items():
        config = config_for_label(label)
        if config is None:
            for row in model_rows:
                _dead_letter(
                    cache,
                    shard,
                    list(zip(row.ids, row.payloads, strict=True)),
                    f"{label} is not registered with cache_model()",
                    0,
                )
                report.dead_lettered += len(row.ids)
                done_ids.extend(row.ids)
            continue
        ok, bad = _apply_rows(config, model_rows)
        applied.extend((config, row) for row in ok)
        done_ids.extend(i for row in ok for i in row.ids)
        for row, error in bad:
            attempts = int(
                _call(
                    cache,
                    Call(
                        keys.attempts,
                        ("HINCRBY", keys.attempts, f"{row.label}:{row.pk!r}", 1),
                        idempotent=False,
                    ),
                )
            )
            if attempts >= cache._settings.options["BEHIND_MAX_ATTEMPTS"]:
                _dead_letter(cache, shard, list(zip(row.ids, row.payloads, strict=True)), error, attempts)
                _call(cache, Call(keys.attempts, ("HDEL", keys.attempts, f"{row.label}:{row.pk!r}")))
                _forget_cached_row(cache, config, row.pk)
                report.dead_lettered += len(row.ids)
                done_ids.extend(row.ids)
            else:
                failed_rows.add((row.label, row.pk))
                report.failed_rows += 1
                logger.warning(
                    "write-behind change of %s pk=%r failed (attempt %s): %s",
                    row.label,
                    row.pk,
                    attempts,
                    error,
                )
    if done_ids:
        _batch(
            cache,
            [
                Call(keys.stream, ("XACK", keys.stream, GROUP, *done_ids)),
                Call(keys.stream, ("XDEL", keys.stream, *done_ids)),
            ],
        )
    _refresh_cached_rows(cache, [(config, row) for config, row in applied if not row.deleted])
    for config, row in applied:
        if row.deleted:
            _forget_cached_row(cache, config, row.pk)
    changes = sum(len(row.ids) for _, row in applied if not row.deleted)
    written = sum(1 for _, row in applied if not row.deleted)
    dropped = sum(len(row.ids) for _, row in applied if row.deleted)
    report.changes_applied += changes
    report.rows_written += written
    report.dropped_deleted += dropped
    elapsed = time.monotonic() - started
    stats = stats_key(cache)

    def count_stats() -> Any:
        yield [
            Call(stats, ("HINCRBY", stats, "changes_applied", changes), idempotent=False),
            Call(stats, ("HINCRBY", stats, "rows_written", written), idempotent=False),
            Call(stats, ("HINCRBY", stats, "dropped_deleted", dropped), idempotent=False),
            Call(stats, ("HINCRBYFLOAT", stats, "apply_seconds", f"{elapsed:.6f}"), idempotent=False),
            Call(stats, ("HINCRBY", stats, "batches", 1), idempotent=False),
        ]

    try:  # metrics only: the batch is applied and acknowledged, an unreachable stats node must not stop it
        cache._run(count_stats(), "flush_behind_stats", None)
    except CacheUnavailable:  # FAILURE_POLICY "raise"
        pass


def _apply_rows(
    config: ModelCacheConfig, rows: list[_RowChange]
) -> tuple[list[_RowChange], list[tuple[_RowChange, str]]]:
    """Apply in one transaction; if it fails, row by row to find the ones that fail. Returns (ok, failed)."""
    db = router.db_for_write(config.model) or DEFAULT_DB_ALIAS
    try:
        with transaction.atomic(using=db):
            _write_rows(config, rows, db)
        return rows, []
    except (OperationalError, InterfaceError) as error:
        # The database is down, locked or deadlocked: no row is at fault, none is charged an attempt.
        raise DatabaseUnavailable(f"{type(error).__name__}: {error}") from error
    except Exception as first_error:  # noqa: BLE001 - isolate the rows that fail, apply the others
        if len(rows) == 1:
            return [], [(rows[0], f"{type(first_error).__name__}: {first_error}")]
    ok, bad = [], []
    for row in rows:
        try:
            with transaction.atomic(using=db):
                _write_rows(config, [row], db)
            ok.append(row)
        except (OperationalError, InterfaceError) as error:
            raise DatabaseUnavailable(f"{type(error).__name__}: {error}") from error
        except Exception as error:  # noqa: BLE001 - recorded with the row, dead-lettered after N attempts
            bad.append((row, f"{type(error).__name__}: {error}"))
    return ok, bad


def _write_rows(config: ModelCacheConfig, rows: list[_RowChange], db: str) -> None:
    model = config.model
    meta = model._meta
    pks = [row.pk for row in rows]
    existing = set(model._base_manager.using(db).filter(pk__in=pks).values_list("pk", flat=True))
    groups: dict[tuple[str, ...], list[models.Model]] = {}
    for row in rows:
        row.deleted = row.pk not in existing
        if row.deleted:
            logger.warning(
                "dropped %d write-behind change(s) of %s pk=%r: the row no longer exists",
                len(row.ids),
                row.label,
                row.pk,
            )
            continue
        names = tuple(sorted(row.fields))
        instance = model(**{meta.pk.attname: row.pk})
        for name, value in row.fields.items():
            # The field as it is now: a field a migration removed (FieldDoesNotExist) or retyped so that the
            # queued value no longer fits (ValidationError) fails this row, not the batch.
            model_field = meta.get_field(name)
            setattr(instance, name, None if value is None else model_field.to_python(value))
        groups.setdefault(names, []).append(instance)
    for names, instances in groups.items():
        fields = [meta.get_field(name).name for name in names]
        model._base_manager.using(db).bulk_update(instances, fields)


def _refresh_cached_rows(cache: Any, applied: list[tuple[ModelCacheConfig, _RowChange]]) -> None:
    """After the commit: each applied row's entry becomes the database's row, unless newer changes wait."""
    by_config: dict[Any, tuple[ModelCacheConfig, list[_RowChange]]] = {}
    for config, row in applied:
        by_config.setdefault(config.model, (config, []))[1].append(row)
    for config, rows in by_config.values():
        db = router.db_for_read(config.model) or DEFAULT_DB_ALIAS
        fresh = {
            obj.pk: obj
            for obj in config.model._base_manager.using(db).filter(pk__in=[row.pk for row in rows])
        }
        cache._run(_refresh_plan(cache, config, rows, fresh), "flush_behind_refresh", None)


def _refresh_plan(cache: Any, config: ModelCacheConfig, rows: list[_RowChange], fresh: dict[Any, Any]) -> Any:
    head = yield from cache._namespace.current()
    expiry_ms = cache._expiry_ms(config.timeout)
    expiry = "" if expiry_ms is None else expiry_ms
    calls = []
    for row in rows:
        instance = fresh.get(row.pk)
        entry = cache._physical_of(head, config.entry_key("pk", row.pk))
        marker = cache._physical_of(head, config.pending_key(row.pk))
        data = b""
        if instance is not None:
            stamps = yield from cache._stamps([*config.static_tags(), *config.row_tags(instance)], expiry_ms)
            data = cache._encode(config.row_payload(instance, cache), "flush_behind", entry, stamps)
        last_id = row.ids[-1].decode() if isinstance(row.ids[-1], bytes) else str(row.ids[-1])
        calls.append(
            Call(entry, ("EVAL", _REFRESH_SCRIPT, 2, entry, marker, last_id, data, expiry), idempotent=False)
        )
    if calls:
        yield calls


def _forget_cached_row(cache: Any, config: ModelCacheConfig, pk: Any) -> None:
    """A dead-lettered row: its cache entry holds values the database never got; let readers load the row."""

    def plan() -> Any:
        head = yield from cache._namespace.current()
        entry = cache._physical_of(head, config.entry_key("pk", pk))
        marker = cache._physical_of(head, config.pending_key(pk))
        yield [Call(entry, ("DEL", entry)), Call(marker, ("DEL", marker))]

    cache._run(plan(), "flush_behind_refresh", None)


def _dead_letter(
    cache: Any, shard: int, entries: list[tuple[bytes, bytes | None]], error: str, attempts: int
) -> None:
    key = dead_letter_key(cache)
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
        for entry_id, payload in entries
    ]
    _batch(cache, calls)
    logger.error("moved %d write-behind change(s) to the dead-letter stream: %s", len(entries), error)


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
    cache = caches[using]
    key = dead_letter_key(cache)
    reply = _call(cache, Call(key, ("XRANGE", key, "-", "+", "COUNT", count)))
    letters = []
    for entry_id, fields in reply or []:
        pairs = dict(zip(fields[::2], fields[1::2], strict=True))
        try:
            change = _decode_change(cache, pairs.get(b"c") or None)
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
    cache = caches[using]
    key = dead_letter_key(cache)
    wanted = None if ids is None else set(ids)
    replayed = 0
    for letter in dead_letters(using):
        if wanted is not None and letter.id not in wanted:
            continue
        if letter.model is None:
            continue
        raw = _call(cache, Call(key, ("XRANGE", key, letter.id, letter.id)))
        payload = dict(zip(raw[0][1][::2], raw[0][1][1::2], strict=True))[b"c"]
        shard = shard_keys(cache, shard_of(cache, letter.model, letter.pk))
        _call(cache, Call(shard.stream, ("XADD", shard.stream, "*", "c", payload), idempotent=False))
        _call(cache, Call(key, ("XDEL", key, letter.id)))
        replayed += 1
    return replayed


def purge_dead_letters(using: str = "default", ids: Iterable[str] | None = None) -> int:
    cache = caches[using]
    key = dead_letter_key(cache)
    targets = [letter.id for letter in dead_letters(using)] if ids is None else list(ids)
    if not targets:
        return 0
    return int(_call(cache, Call(key, ("XDEL", key, *targets))))


def behind_metrics(using: str = "default") -> dict[str, Any]:
    """Backlog per shard, lag (age of the oldest change not yet applied), applied/s, coalescing ratio."""
    cache = caches[using]
    count = cache._settings.options["BEHIND_SHARDS"]
    now_ms = time.time() * 1000
    shards = []
    calls = []
    for shard in range(count):
        keys = shard_keys(cache, shard)
        calls += [
            Call(keys.stream, ("XLEN", keys.stream)),
            Call(keys.stream, ("XRANGE", keys.stream, "-", "+", "COUNT", 1)),
        ]
    calls.append(Call(stats_key(cache), ("HGETALL", stats_key(cache))))
    calls.append(Call(dead_letter_key(cache), ("XLEN", dead_letter_key(cache))))
    replies = _batch(cache, calls, "behind_metrics")
    oldest_lag = 0.0
    for shard in range(count):
        backlog, first = replies[2 * shard], replies[2 * shard + 1]
        lag = 0.0
        if first:
            millis = int(first[0][0].split(b"-")[0])
            lag = max(0.0, (now_ms - millis) / 1000)
        oldest_lag = max(oldest_lag, lag)
        shards.append({"shard": shard, "backlog": int(backlog), "lag_seconds": lag})
    raw = replies[-2] or {}
    pairs = raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2], strict=True)
    stats = {name.decode(): float(value) for name, value in pairs}
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
