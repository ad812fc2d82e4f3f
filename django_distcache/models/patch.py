"""A write-behind row's *patch*: its queued changes the database does not have yet, in a hash next to the
row's cache entry (same slot).

Readers (`get_cached`) lay the patch over the row they read (from the entry or the database), so they see
every acknowledged change at once: sets replace a field, increments add to it. The entry itself only ever
holds the database's row. Fields of the hash: `v:<field>` the newest value set (encoded, signed for this
patch and field), `t:<field>` that set's order token, `d:<field>` the sum of increments queued after it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from django.db import models

from ..core import Core
from .registry import ModelCacheConfig

logger = logging.getLogger("django_distcache.behind")

PATCH_TTL_MS = 24 * 3600 * 1000

_NOT_SET: Any = object()


@dataclass(frozen=True, slots=True)
class QueuedField:
    """What a field's queued changes do: the value set last (if one was), plus the increments after it."""

    added: int = 0
    value: Any = _NOT_SET

    @property
    def is_set(self) -> bool:
        return self.value is not _NOT_SET


def field_identity(core: Core, patch: bytes, name: str) -> bytes:
    """What a patched value is signed for: this row's patch and this field, nothing else."""
    return core.keys.identity(patch) + b"\x00" + name.encode()


def patch_fields(core: Core, patch: bytes, reply: Any) -> dict[str, QueuedField]:
    """{attname: its queued changes} from a patch's HGETALL; a value that does not verify (not written by
    this cache for this row and field) is left out and logged."""
    pairs = reply.items() if isinstance(reply, dict) else zip(reply[::2], reply[1::2], strict=True)
    sets: dict[str, Any] = {}
    adds: dict[str, int] = {}
    for raw_name, raw_value in pairs:
        name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
        kind, _, attname = name.partition(":")
        if kind == "v":
            try:
                sets[attname] = core.codec.decode(raw_value, field_identity(core, patch, attname))
            except Exception as error:  # noqa: BLE001 - a forged or corrupt value is not laid on the row
                core.failures.count("behind_patch_refused")
                logger.warning("a queued value of %r in %r does not verify: %s", attname, patch, error)
        elif kind == "d":
            try:
                adds[attname] = int(raw_value)
            except (TypeError, ValueError):
                logger.warning("a queued increment of %r in %r is not a number", attname, patch)
    fields = {name: QueuedField(adds.pop(name, 0), value) for name, value in sets.items()}
    fields.update((name, QueuedField(delta)) for name, delta in adds.items())
    return fields


def lay_patch(
    config: ModelCacheConfig, instance: models.Model, fields: dict[str, QueuedField]
) -> models.Model:
    """The row with its queued changes: sets replace a value, increments add to it."""
    for name, queued in fields.items():
        if name not in config.field_names:
            continue  # a field a migration removed
        try:
            if queued.is_set:
                value: Any = queued.value
                value = None if value is None else config.field(name).to_python(value)
                if queued.added:
                    value = value + queued.added
                setattr(instance, name, value)
            else:
                current = getattr(instance, name)
                if current is not None:
                    setattr(instance, name, current + queued.added)
        except Exception as error:  # noqa: BLE001 - the database will refuse it too; show the row as it is
            logger.warning("queued change of %s.%s cannot be shown: %s", config.label, name, error)
    return instance
