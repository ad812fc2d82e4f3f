"""Read-through: `get_cached(Model, **lookup)`, and the fill protocol that keeps fills behind writes.

A fill (a miss loaded from the database) must never overwrite a newer write. Three things make sure:

1. *The lease.* At miss time, before the database is read, the reader notes the model's write epoch: a
   random value every writer (write-through, `invalidate_model`, write-behind drain) replaces before it
   touches anything else. The fill is dropped if the epoch changed meanwhile.
2. *Order.* The fill reads the row's tag version, *then* the epoch, then writes. Writers replace the epoch,
   *then* the row's tag. So a fill that saw the new tag also sees the new epoch (and is dropped); a fill
   that saw the old tag stamps its entry with it, and the entry is dead on arrival.
3. *Compare-and-set.* Each key is written only if it still holds what the reader saw (nothing, or a dead
   entry), so a value a writer stored meanwhile is never replaced.

The write itself is `fill.write_entries_plan`, the one plan every writer of model entries uses.

Nothing is cached from inside a transaction: inside `atomic()`, a miss reads the database and returns the
row without filling, and a model this transaction wrote is read from the database, not from the cache.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections, router

from ..core import Core
from ..plans import PlanOf
from ..topology import Call
from .fill import RowEntries, UnchangedSinceLease, write_entries_plan
from .patch import QueuedField, lay_patch, patch_fields
from .registry import MISSING_ROW, ModelCacheConfig, config_for

logger = logging.getLogger("django_distcache.models")


def epoch_key(core: Core, config: ModelCacheConfig) -> bytes:
    return core.keys.internal(f"epoch:{config.label}")


def bump_epoch_plan(core: Core, config: ModelCacheConfig) -> PlanOf[bytes]:
    """Writers call this first: every fill that started before it is dropped. Returns the new epoch."""
    key = epoch_key(core, config)
    epoch = os.urandom(8).hex().encode()
    yield Call(key, ("SET", key, epoch))
    return epoch


@dataclass(slots=True)
class Miss:
    physical: bytes
    observed: bytes | None  # what the key held when the reader looked (a dead entry), or None
    patch: dict[str, QueuedField] | None = None  # write-behind: the row's queued changes, laid over the load


@dataclass(slots=True)
class Lease:
    epoch: bytes | None
    stamps: dict[str, int] | None  # the static tags' versions, read before the database was


def lookup_plan(core: Core, config: ModelCacheConfig, lookup: str, value: Any, using: str) -> PlanOf[Any]:
    """A hit (an instance or MISSING_ROW), or a Miss saying what the key held. For a write-behind model
    (cached by pk only) the row's patch, its queued changes, is read in the same round trip (the same
    slot) and laid over the row."""
    head = yield from core.namespace.current()
    physical = core.physical_of(head, config.entry_key(lookup, value))
    patch_key = b""
    if config.write == "behind" and lookup == "pk":
        patch_key = core.physical_of(head, config.pending_key(value))
        data, raw_patch = yield [
            Call(physical, ("GET", physical), read=True),
            Call(patch_key, ("HGETALL", patch_key), read=True),
        ]
        for reply in (data, raw_patch):
            if isinstance(reply, BaseException):
                raise reply
    else:
        data = yield Call(physical, ("GET", physical), read=True)
        raw_patch = None
    result = None
    if data is not None:
        found = yield from core.valid_values({0: (physical, data)})
        if 0 in found:
            result = config.instance_from(found[0], lookup, value, using)
    patch = patch_fields(core, patch_key, raw_patch) if raw_patch else None
    if result is None:
        return Miss(physical, data, patch)
    if patch and result is not MISSING_ROW:
        result = lay_patch(config, result, patch)
    return result


def lease_plan(core: Core, config: ModelCacheConfig) -> PlanOf[Lease]:
    """Taken at miss time, before the database is read."""
    key = epoch_key(core, config)
    epoch = yield Call(key, ("GET", key))
    # The fill stores the row (config.timeout) or that it is missing (negative_timeout): tags for either.
    row_ms, missing_ms = core.expiry_ms(config.timeout), core.expiry_ms(config.negative_timeout)
    expiry_ms = None if row_ms is None or missing_ms is None else max(row_ms, missing_ms)
    stamps = yield from core.stamps([*config.static_tags(), config.missing_tag()], expiry_ms)
    return Lease(epoch, stamps)


def fill_plan(
    core: Core,
    config: ModelCacheConfig,
    lease: Lease,
    found: Any,
    misses: Mapping[str, Miss],
    lookup: str | None = None,
    value: Any = None,
) -> PlanOf[bool]:
    """Store `found` (an instance, or MISSING_ROW for `lookup=value`) under its keys, unless a writer came
    first. `misses` maps lookups to what the reader saw; keys not in it are read here. True if every key
    was written."""
    row = _fill_row(core, config, lease, found, lookup, value)
    if row is None:
        return False
    key = epoch_key(core, config)
    guard = UnchangedSinceLease(key, lease.epoch, {miss.physical: miss.observed for miss in misses.values()})
    written = yield from write_entries_plan(core, [row], guard, skip_unencodable=True)
    return written is not None and all(reply == 1 for _, reply in written)


def _fill_row(
    core: Core, config: ModelCacheConfig, lease: Lease, found: Any, lookup: str | None, value: Any
) -> RowEntries[str | None] | None:
    """What a fill writes: the row under every lookup's key, or that `lookup=value` has no row (None when
    nothing is to be written)."""
    static = {tag: lease.stamps[tag] for tag in config.static_tags()} if lease.stamps else {}
    if found is MISSING_ROW:
        if lookup is None or not config.negative_timeout:
            return None
        static[config.missing_tag()] = lease.stamps[config.missing_tag()] if lease.stamps else 0
        return RowEntries(
            config,
            {lookup: config.entry_key(lookup, value)},
            config.missing_payload(lookup, value),
            [config.row_tag(value)] if lookup == "pk" else [],
            static,
            core.expiry_ms(config.negative_timeout),
            None,
        )
    keys = config.keys_of(found)
    if not keys:
        return None
    # Refused while the row has queued changes (its patch): the drain writes the entry after its commit.
    patch = config.pending_key(found.pk) if config.write == "behind" else None
    payload = config.row_payload(found, core)
    return RowEntries(
        config, keys, payload, config.row_tags(found), static, core.expiry_ms(config.timeout), patch
    )


# -- the public functions ---------------------------------------------------------------------------------
def _single_lookup(config: ModelCacheConfig, lookup: dict[str, Any]) -> tuple[str, Any]:
    if len(lookup) != 1:
        raise TypeError(
            f"get_cached() takes exactly one lookup, one of {config.lookups}; got {sorted(lookup) or 'none'}"
        )
    ((name, value),) = lookup.items()
    if name == config.model._meta.pk.name and "pk" in config.lookups:
        name = "pk"
    if name not in config.lookups:
        raise TypeError(
            f"{config.label} is cached by {config.lookups}; {name!r} is not one of them "
            "(add it to cache_model(lookups=...) or use the ORM)"
        )
    return name, config.normalize(name, value)


def _db_alias(config: ModelCacheConfig) -> str:
    return router.db_for_read(config.model) or DEFAULT_DB_ALIAS


def written_in_this_transaction(config: ModelCacheConfig, using: str) -> bool:
    """True if this transaction saved or deleted a row of the model (its write-through is pending)."""
    connection = connections[using]
    for entry in connection.run_on_commit:
        callback = entry[1] if isinstance(entry, tuple) else entry
        if getattr(callback, "distcache_model", None) is config.model:
            return True
    return False


def _load(config: ModelCacheConfig, using: str, lookup: str, value: Any) -> Any:
    try:
        return config.model._base_manager.using(using).get(**{lookup: value})
    except config.model.DoesNotExist:
        return MISSING_ROW


async def _aload(config: ModelCacheConfig, using: str, lookup: str, value: Any) -> Any:
    try:
        return await config.model._base_manager.using(using).aget(**{lookup: value})
    except config.model.DoesNotExist:
        return MISSING_ROW


def _patched(config: ModelCacheConfig, found: Any, miss: Miss) -> Any:
    """A row loaded from the database, with the queued changes the reader saw laid over it (the fill
    stored the row as the database has it)."""
    if miss.patch and found is not MISSING_ROW:
        return lay_patch(config, found, miss.patch)
    return found


def _found_or_raise(config: ModelCacheConfig, found: Any, lookup: str, value: Any) -> Any:
    if found is MISSING_ROW:
        raise config.model.DoesNotExist(
            f"{config.model._meta.object_name} matching {lookup}={value!r} does not exist."
        )
    return found


def get_cached(model: Any, **lookup: Any) -> Any:
    """The row of `model` with `lookup` (one registered lookup), from the cache, else from the database
    (which then fills every lookup's key). Raises `model.DoesNotExist` like `Model.objects.get`."""
    config = config_for(model)
    name, value = _single_lookup(config, lookup)
    using = _db_alias(config)
    core = config.core
    connection = connections[using]
    in_transaction = connection.in_atomic_block
    if in_transaction and written_in_this_transaction(config, using):
        return _found_or_raise(config, _load(config, using, name, value), name, value)
    result = core.run(lookup_plan(core, config, name, value, using), "get_cached", None)
    if result is not None and not isinstance(result, Miss):
        return _found_or_raise(config, result, name, value)
    if in_transaction or result is None:
        # Inside a transaction nothing is cached; after an outage the cache is skipped for this call.
        return _found_or_raise(config, _load(config, using, name, value), name, value)
    lease = core.run(lease_plan(core, config), "get_cached", None)
    found = _load(config, using, name, value)
    if lease is not None:
        core.run(fill_plan(core, config, lease, found, {name: result}, name, value), "fill", False)
    return _found_or_raise(config, _patched(config, found, result), name, value)


async def aget_cached(model: Any, **lookup: Any) -> Any:
    """`get_cached` for async code: the cache is read natively, the database with Django's async ORM."""
    config = config_for(model)
    name, value = _single_lookup(config, lookup)
    using = _db_alias(config)
    core = config.core
    result = await core.arun(lookup_plan(core, config, name, value, using), "get_cached", None)
    if result is not None and not isinstance(result, Miss):
        return _found_or_raise(config, result, name, value)
    if result is None:
        return _found_or_raise(config, await _aload(config, using, name, value), name, value)
    lease = await core.arun(lease_plan(core, config), "get_cached", None)
    found = await _aload(config, using, name, value)
    if lease is not None:
        await core.arun(fill_plan(core, config, lease, found, {name: result}, name, value), "fill", False)
    return _found_or_raise(config, _patched(config, found, result), name, value)
