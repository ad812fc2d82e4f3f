"""Write-through: after a registered model's row is saved or deleted and the transaction commits, its
cache entries are replaced (save) or removed (delete), and its row tag is invalidated.

Covered: `Model.save()`, `Model.delete()` (and the cascade's per-object deletes), `QuerySet.delete()` (Django
sends post_delete per row), many-to-many `add/remove/set/clear` (m2m_changed). Not covered, because Django
sends no signal: `QuerySet.update()`, `bulk_create`, `bulk_update`, raw SQL; after those call
`invalidate_model(Model, pks=...)`.

The replacement is re-read from the database after the commit rather than taken from the saved instance:
the instance may hold expressions (`F("views") + 1`), values the database converts, or stale fields outside
`update_fields`. The re-read goes through the fill protocol (see read.py), so two writers racing leave the
newer row or nothing, never the older one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from functools import partial
from typing import Any

from asgiref.sync import sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.db import DEFAULT_DB_ALIAS, connections, models, router, transaction
from django.db.models.signals import m2m_changed, post_delete, post_init, post_save

from ..core import Core, Guarded
from ..topology import Call, is_outage
from .read import Lease, bump_epoch_plan, fill_plan
from .registry import MISSING_ROW, ModelCacheConfig, config_for

logger = logging.getLogger("django_distcache.models")

SNAPSHOT_ATTRIBUTE = "_distcache_lookup_values"
_NO_EPOCH = b""  # the epoch could not be written (its node is down)


def _invalidate_plan(
    core: Core, config: ModelCacheConfig, pks: list[Any], extra_keys: Iterable[str], whole_model: bool
) -> Any:
    """Epoch first (voids every fill in flight), then the tags, then the keys we know.

    Only the tags are essential: every entry of a row carries its row tag, and a tag invalidation that
    cannot reach its node waits in the outbox (outbox.py) with the entries missing meanwhile. If the
    epoch's node is down, fills cannot read it either, so none completes; a key that cannot be deleted
    is dead by its tag."""
    epoch = yield Guarded(bump_epoch_plan(core, config), "write_through", None)
    if whole_model:
        tags = [config.model_tag(), config.missing_tag()]
    else:
        tags = [config.row_tag(pk) for pk in pks] + [config.missing_tag()]
    yield from core.tags.invalidate(tags)
    keys = list(
        dict.fromkeys([*(config.entry_key("pk", config.normalize("pk", pk)) for pk in pks), *extra_keys])
    )
    if keys:
        head = yield from core.namespace.current()
        physical = [core.physical_of(head, key) for key in keys]
        replies = yield [Call(p, ("DEL", p)) for p in physical]
        for reply in replies:
            if isinstance(reply, BaseException) and not is_outage(reply):
                raise reply
    return epoch if epoch is not None else _NO_EPOCH


def _write_through(
    config: ModelCacheConfig, pk: Any, stale_keys: list[str], refill: bool, using: str
) -> None:
    """Runs after the commit. A cache outage is logged and counted, never raised into the request."""
    core = config.core
    epoch = core.run(_invalidate_plan(core, config, [pk], stale_keys, False), "write_through", None)
    if epoch is None:
        logger.error(
            "write-through of %s pk=%r could not reach the cache; its entries may be stale until they expire",
            config.label,
            pk,
        )
        return
    if not refill or epoch is _NO_EPOCH:
        return  # (without our epoch a refill could not be told apart from a stale fill: the next read fills)
    try:
        found = config.model._base_manager.using(using).get(pk=pk)
    except config.model.DoesNotExist:
        return  # deleted by a later transaction; its own write-through removed the keys
    lease = Lease(epoch, None)
    stamps_plan = core.stamps(config.static_tags(), core.expiry_ms(config.timeout))
    lease.stamps = core.run(stamps_plan, "write_through", None)
    if lease.stamps is not None:
        core.run(fill_plan(core, config, lease, found, {}), "write_through", False)


def _on_commit(config: ModelCacheConfig, using: str, callback: Any) -> None:
    callback.distcache_model = config.model  # read.written_in_this_transaction looks for it
    transaction.on_commit(callback, using=using)


def _stale_keys(config: ModelCacheConfig, instance: models.Model, current: dict[str, str]) -> list[str]:
    """Keys of lookup values the row had when loaded and no longer has (a changed slug)."""
    before = getattr(instance, SNAPSHOT_ATTRIBUTE, None) or {}
    stale = []
    for lookup, value in before.items():
        if value is None:
            continue
        key = config.entry_key(lookup, value)
        if current.get(lookup) != key:
            stale.append(key)
    return stale


def _snapshot(config: ModelCacheConfig, instance: models.Model) -> None:
    values = {}
    for lookup in config.lookups:
        if lookup == "pk":
            continue
        raw = config.lookup_value(instance, lookup)
        try:
            values[lookup] = None if raw is None else config.normalize(lookup, raw)
        except ValueError:
            values[lookup] = None
    instance.__dict__[SNAPSHOT_ATTRIBUTE] = values


def _post_init(config: ModelCacheConfig, sender: Any, instance: models.Model, **kwargs: Any) -> None:
    _snapshot(config, instance)


def _post_save(
    config: ModelCacheConfig,
    sender: Any,
    instance: models.Model,
    raw: bool = False,
    using: str = DEFAULT_DB_ALIAS,
    **kwargs: Any,
) -> None:
    current = config.keys_of(instance)
    stale = _stale_keys(config, instance, current)
    pk = instance.pk
    _on_commit(config, using, partial(_write_through, config, pk, [*current.values(), *stale], True, using))
    if len(config.lookups) > 1:
        _snapshot(config, instance)


def _post_delete(
    config: ModelCacheConfig,
    sender: Any,
    instance: models.Model,
    using: str = DEFAULT_DB_ALIAS,
    **kwargs: Any,
) -> None:
    keys = list(config.keys_of(instance).values()) + _stale_keys(config, instance, {})
    _on_commit(config, using, partial(_write_through, config, instance.pk, keys, False, using))


def _m2m_changed(
    action: str, instance: models.Model, model: Any, pk_set: Any, using: str = DEFAULT_DB_ALIAS, **kwargs: Any
) -> None:
    if action not in ("post_add", "post_remove", "post_clear"):
        return  # (after clear() Django does not say which rows were on the other side: see docs/models.md)
    touched: list[tuple[Any, Any]] = [(type(instance), instance.pk)]
    if pk_set:
        touched.extend((model, pk) for pk in pk_set)
    for target_model, pk in touched:
        try:
            config = config_for(target_model)
        except ImproperlyConfigured:  # that side of the relation is not cached
            continue
        _on_commit(config, using, partial(_write_through, config, pk, [], True, using))


_connected: set[type] = set()
_connected_m2m: list[bool] = []


def connect_signals(config: ModelCacheConfig) -> None:
    model = config.model
    if model in _connected:
        return
    _connected.add(model)
    post_save.connect(
        partial(_post_save, config), sender=model, weak=False, dispatch_uid=f"distcache-save-{config.label}"
    )
    post_delete.connect(
        partial(_post_delete, config),
        sender=model,
        weak=False,
        dispatch_uid=f"distcache-delete-{config.label}",
    )
    if len(config.lookups) > 1:
        post_init.connect(
            partial(_post_init, config),
            sender=model,
            weak=False,
            dispatch_uid=f"distcache-init-{config.label}",
        )
    if not _connected_m2m:
        # One receiver for every relation: at registration (class creation) the through models of the
        # relations may not exist yet, and the handler ignores relations with no registered side.
        m2m_changed.connect(_m2m_changed, weak=False, dispatch_uid="distcache-m2m")
        _connected_m2m.append(True)


def _prepare_invalidation(model: Any, pks: Iterable[Any] | None, using: str | None) -> tuple[Any, str, Any]:
    """What invalidate_model and ainvalidate_model share: the model's config, the database whose commit
    to wait for, and the plan factory (one plan, run by either driver)."""
    config = config_for(model)
    pk_list = None if pks is None else [config.normalize("pk", pk) for pk in pks]
    db = using or router.db_for_write(config.model) or DEFAULT_DB_ALIAS

    def plan() -> Any:
        return _invalidate_plan(config.core, config, pk_list or [], [], pk_list is None)

    return config, db, plan


def _deferred_to_commit(config: ModelCacheConfig, db: str, plan: Any) -> bool:
    """Inside a transaction, the invalidation runs when it commits (True); outside, the caller runs it now."""
    if not connections[db].in_atomic_block:
        return False
    _on_commit(config, db, lambda: config.core.run_strict(plan(), "invalidate_model"))
    return True


def invalidate_model(model: Any, pks: Iterable[Any] | None = None, *, using: str | None = None) -> None:
    """Make cached rows of `model` miss: the rows `pks`, or every row when `pks` is None. For writes that
    send no signals (`QuerySet.update`, `bulk_create`, `bulk_update`, raw SQL). Inside a transaction it
    runs when the transaction commits. Raises CacheUnavailable if the cache cannot be reached."""
    config, db, plan = _prepare_invalidation(model, pks, using)
    if not _deferred_to_commit(config, db, plan):
        config.core.run_strict(plan(), "invalidate_model")


async def ainvalidate_model(
    model: Any, pks: Iterable[Any] | None = None, *, using: str | None = None
) -> None:
    """invalidate_model for async code. The transaction is looked for where Django runs the ORM for async
    code (its thread-sensitive thread), so a transaction opened by sync code around this call is waited
    for as well."""
    config, db, plan = _prepare_invalidation(model, pks, using)
    if not await sync_to_async(_deferred_to_commit, thread_sensitive=True)(config, db, plan):
        await config.core.arun_strict(plan(), "invalidate_model")


__all__ = ["invalidate_model", "ainvalidate_model", "MISSING_ROW"]
