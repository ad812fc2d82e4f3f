"""Write-behind, queueing: `save_behind` and `incr_behind` change the cache now and queue the change; a drain
(drain.py) applies it to the database later.

A call is one round trip: the change is appended to its shard's stream (streams.py) and laid onto the row's
patch (patch.py) in the same batch, each node's commands sent before any reply is read. So readers of the
cache see it at once, and the database gets it when a drain runs (Celery beat, the backlog trigger, or
`flush_behind()`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import FieldDoesNotExist, ImproperlyConfigured
from django.db import DEFAULT_DB_ALIAS, connections, models, router
from django.db.models import F, Value
from django.db.models.expressions import Combinable, CombinedExpression

from .. import dispatch, scripts
from ..core import Core, Guarded
from ..plans import PlanOf
from ..topology import OUTAGE_ERRORS, Call
from ..versioning import model_fingerprint
from .patch import PATCH_TTL_MS, field_identity
from .registry import ModelCacheConfig, config_for
from .streams import encode_change, id_text, one, shard_keys, shard_of

logger = logging.getLogger("django_distcache.behind")

_INT64 = 2**63


# -- order tokens -------------------------------------------------------------------------------------
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


# -- what a call asks for, checked the way the database will ------------------------------------------
def _column(config: ModelCacheConfig, name: str, caller: str) -> models.Field[Any, Any]:
    label = config.label
    try:
        model_field = config.model._meta.get_field(name)
    except FieldDoesNotExist:
        raise ValueError(f"{caller}(): {label} has no field {name!r}") from None
    if not isinstance(model_field, models.Field) or not model_field.concrete or model_field.many_to_many:
        raise ValueError(f"{caller}(): {label}.{name} is not a column")
    if model_field.primary_key:
        raise ValueError(f"{caller}(): the primary key {name!r} cannot be changed")
    return model_field


def _check_delta(
    config: ModelCacheConfig, model_field: models.Field[Any, Any], delta: Any, caller: str
) -> int:
    label = f"{config.label}.{model_field.name}"
    if not isinstance(model_field, models.IntegerField):
        raise ValueError(f"{caller}(): {label} is not an integer field; only integer fields count")
    if type(delta) is not int:
        raise TypeError(f"{caller}(): the increment of {label} must be an int, not {type(delta).__name__}")
    if not -_INT64 < delta < _INT64:
        raise ValueError(f"{caller}(): the increment {delta} of {label} is out of the 64-bit range")
    return delta


def _names_field(expression: Any, model_field: models.Field[Any, Any]) -> bool:
    return isinstance(expression, F) and getattr(expression, "name", None) in (
        model_field.name,
        model_field.attname,
    )


def _int_value(expression: Any) -> int | None:
    if isinstance(expression, Value) and type(expression.value) is int:
        return expression.value
    return None


def _increment_of(model_field: models.Field[Any, Any], value: Any) -> int | None:
    """The n of `F(field) + n`, `n + F(field)` or `F(field) - n` on the field itself; None for anything else."""
    if not isinstance(value, CombinedExpression) or value.connector not in ("+", "-"):
        return None
    lhs, rhs = value.lhs, value.rhs
    amount = _int_value(rhs)
    if _names_field(lhs, model_field) and amount is not None:
        return amount if value.connector == "+" else -amount
    amount = _int_value(lhs)
    if value.connector == "+" and _names_field(rhs, model_field) and amount is not None:
        return amount
    return None


def _fields_to_save(config: ModelCacheConfig, update_fields: Any) -> list[models.Field[Any, Any]]:
    if update_fields is None:
        return [f for f in config.model._meta.concrete_fields if not f.primary_key]
    if isinstance(update_fields, str) or not isinstance(update_fields, Iterable):
        raise TypeError("update_fields must be a list of field names")
    fields = [_column(config, name, "save_behind") for name in update_fields]
    if not fields:
        raise ValueError("save_behind(): update_fields is empty; nothing to save")
    return fields


def _changed_values(
    config: ModelCacheConfig, instance: models.Model, update_fields: Any
) -> tuple[dict[str, Any], dict[str, int]]:
    """(values set, increments) of the fields to save; every value checked the way the database will."""
    label = config.label
    connection = connections[router.db_for_write(config.model) or DEFAULT_DB_ALIAS]
    values: dict[str, Any] = {}
    increments: dict[str, int] = {}
    for model_field in _fields_to_save(config, update_fields):
        value = getattr(instance, model_field.attname)
        if isinstance(value, Combinable):
            delta = _increment_of(model_field, value)
            if delta is None:
                raise ValueError(
                    f"save_behind(): {label}.{model_field.name} holds an expression ({value!r}); "
                    "write-behind queues values and increments (F(field) + n), use save() for others"
                )
            increments[model_field.attname] = _check_delta(config, model_field, delta, "save_behind")
            continue
        try:
            model_field.get_db_prep_save(value, connection)  # refuse now what the database would refuse later
        except (TypeError, ValueError) as error:
            raise ValueError(f"save_behind(): {label}.{model_field.name}={value!r}: {error}") from error
        values[model_field.attname] = value
    return values, increments


# -- the queueing plan --------------------------------------------------------------------------------
@dataclass(slots=True)
class _Outgoing:
    """A change on its way to the queue: its stream, its row's patch (and entry, when a field's new value is asked
    for), and the patch's operations (op, field, value) for PATCH_ROW."""

    config: ModelCacheConfig
    pk: Any
    stream: bytes
    patch: bytes
    entry: bytes | None
    token: str
    payload: bytes
    ops: list[Any]


def _change(
    core: Core,
    head: bytes,
    config: ModelCacheConfig,
    pk: Any,
    values: dict[str, Any],
    increments: dict[str, int],
    counted: str | None,
) -> _Outgoing:
    patch = core.physical_of(head, config.pending_key(pk))
    token = _order_token()
    payload = encode_change(
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
        ops += ["v", name, core.codec.encode(value, field_identity(core, patch, name))]
    for name, delta in increments.items():
        ops += ["d", name, delta]
    entry = core.physical_of(head, config.entry_key("pk", pk)) if counted else None
    stream = shard_keys(core, shard_of(core, config.label, pk)).stream
    return _Outgoing(config, pk, stream, patch, entry, token, payload, ops)


def _replicas_to_wait(core: Core, stream: bytes) -> tuple[int, int]:
    """(replicas, milliseconds) for WAIT after the XADD; (0, 0) for no WAIT."""
    settings = core.settings
    wait_replicas = settings.behind_wait_replicas
    if not wait_replicas:
        return 0, 0
    if core.replicas_listed(stream) < wait_replicas:
        # Fewer replicas than asked for exist (a promoted primary has none until one rejoins): waiting the
        # whole timeout would not make the change safer, only every save slower. A replica that the slot
        # map does not list yet may still acknowledge within the millisecond.
        return wait_replicas, 1
    return wait_replicas, max(1, int(settings.behind_wait_timeout * 1000))


def _queue_calls(change: _Outgoing, wait: tuple[int, int]) -> list[Call]:
    """XADD, XLEN, WAIT (if asked for), PATCH_ROW: one batch."""
    stream, patch = change.stream, change.patch
    calls = [
        Call(stream, ("XADD", stream, "*", "c", change.payload), idempotent=False),
        Call(stream, ("XLEN", stream)),
    ]
    if wait[0]:
        # In the same per-node batch, so on the same connection as the XADD: WAIT counts that connection's
        # writes only.
        calls.append(Call(stream, ("WAIT", *wait)))
    script_keys = (patch, change.entry) if change.entry else (patch,)
    args = (
        "EVAL",
        scripts.PATCH_ROW,
        len(script_keys),
        *script_keys,
        PATCH_TTL_MS,
        change.token,
        *change.ops,
    )
    calls.append(Call(patch, args, idempotent=False))
    return calls


def _queue_plan(
    core: Core,
    config: ModelCacheConfig,
    pk: Any,
    values: dict[str, Any],
    increments: dict[str, int],
    counted: str | None = None,
) -> PlanOf[tuple[str, int, Any]]:
    """Append the change to its stream and lay it onto the row's patch: one batch, so one round trip.
    Returns (stream id, backlog, the new value of `counted` as readers see it, or None if not known)."""
    head = yield from core.namespace.current()
    change = _change(core, head, config, pk, values, increments, counted)
    wait = _replicas_to_wait(core, change.stream)
    replies = yield _queue_calls(change, wait)
    queued, patched = replies[0], replies[-1]
    if isinstance(queued, BaseException):
        if not isinstance(patched, BaseException):
            # Not queued, so readers must not see it: take back what this change still owns of the patch.
            undone = [-item if isinstance(item, int) else item for item in change.ops]
            args = ("EVAL", scripts.TAKE_BACK_PATCH, 1, change.patch, change.token, *undone)
            yield Guarded(one(Call(change.patch, args, idempotent=False)), "save_behind_cache", None)
        raise queued
    # From here on the change is queued: nothing may say otherwise. A failed XLEN only skips the trigger; a
    # failed WAIT counts as no replica reached.
    stream_id = id_text(queued)
    backlog = 0 if isinstance(replies[1], BaseException) else int(replies[1])
    if wait[0]:
        _note_replication(core, stream_id, wait[0], replies[2])
    if isinstance(patched, BaseException):
        yield from _unpatched(core, config, pk, stream_id, patched)
        return stream_id, backlog, None
    value = None
    if counted and change.entry and isinstance(patched, list | tuple):
        value = yield Guarded(_counted_plan(core, change, counted, patched), "save_behind_cache", None)
    return stream_id, backlog, value


def _note_replication(core: Core, stream_id: str, wanted: int, reply: Any) -> None:
    reached = 0 if isinstance(reply, BaseException) else int(reply)
    if reached < wanted:
        core.failures.note(
            "behind_unreplicated",
            "write-behind change %s reached %s of %s replicas",
            stream_id,
            reached,
            wanted,
        )


def _unpatched(
    core: Core, config: ModelCacheConfig, pk: Any, stream_id: str, error: BaseException
) -> PlanOf[None]:
    """Queued, but readers of the cached row cannot see it: its row tag is invalidated (through the outbox
    if that node is unreachable), so they read the database until the drain refreshes it. A refusal (an
    ACL without the hash commands) is a deployment error: said loudly, but the change is queued, so
    raising would invite a second, duplicate call."""
    if not isinstance(error, OUTAGE_ERRORS):
        logger.error("write-behind change %s queued, but its patch was refused: %s", stream_id, error)
    core.failures.note(
        "behind_unpatched", "write-behind change %s not laid on the cache: %s", stream_id, error
    )
    yield Guarded(core.tags.invalidate([config.row_tag(pk)]), "save_behind_cache", None)


def _counted_plan(core: Core, change: _Outgoing, name: str, reply: Any) -> PlanOf[int | None]:
    """The field's value as a reader would see it now: the cached row's, or the value queued last, plus
    the increments queued since. None when the row is not cached (only the database knows it then)."""
    config, entry = change.config, change.entry
    data, queued, added = (list(reply) + [None, None, None])[:3]
    if queued is not None:
        try:
            base = core.codec.decode(queued, field_identity(core, change.patch, name))
        except Exception:  # noqa: BLE001 - not ours (see patch_fields): the value is not known
            return None
    else:
        if data is None or entry is None:
            return None
        found = yield from core.valid_values({0: (entry, data)})
        row = config.instance_from(found[0], "pk", change.pk, DEFAULT_DB_ALIAS) if 0 in found else None
        if not isinstance(row, config.model):
            return None
        base = getattr(row, name)
    if base is None:
        return None
    return int(config.field(name).to_python(base)) + int(added or 0)


# -- the public functions -----------------------------------------------------------------------------
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
    threshold = core.settings.behind_trigger_backlog
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
    value: int | None = _queue(config, pk, {}, {model_field.attname: delta}, counted=model_field.attname)[1]
    return value


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
