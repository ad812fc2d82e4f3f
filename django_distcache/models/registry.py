"""Which models are cached, by which lookups, and how one row becomes cache keys and bytes.

A cached row is stored once per registered lookup (`pk`, `slug`, ...), so `get_cached` by any of them is
one GET. Every key carries the model's fingerprint (versioned keys: a migration changes it), and every
entry carries the tags `<app>.<model>` and `<app>.<model>:<pk>`, so `invalidate_tags` reaches model
entries as it reaches any other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from django.apps import apps
from django.core.cache.backends.base import DEFAULT_TIMEOUT
from django.core.exceptions import FieldDoesNotExist, ImproperlyConfigured, ValidationError
from django.db import models

from ..conf import is_number
from ..core import Core, core_for
from ..tags import validate_tags
from ..versioning import model_fingerprint

WRITE_MODES = ("through", "behind")
DEFAULT_NEGATIVE_TIMEOUT = 30

_registry: dict[type[models.Model], ModelCacheConfig] = {}


@dataclass
class ModelCacheConfig:
    model: type[models.Model]
    lookups: tuple[str, ...]
    timeout: Any
    write: str
    tags: tuple[str, ...] | Callable[[models.Model], Iterable[str]]
    cache_alias: str
    negative_timeout: float
    field_names: tuple[str, ...] = field(init=False)  # attnames of the concrete fields, in stored order

    def __post_init__(self) -> None:
        self.field_names = tuple(f.attname for f in self.model._meta.concrete_fields)

    @property
    def label(self) -> str:
        return self.model._meta.label_lower

    @property
    def core(self) -> Core:
        try:
            return core_for(self.cache_alias)
        except ImproperlyConfigured as error:
            raise ImproperlyConfigured(
                f"{self.label} is cached in CACHES[{self.cache_alias!r}]: {error}"
            ) from None

    # -- tags -----------------------------------------------------------------------------------------
    def model_tag(self) -> str:
        return self.label

    def row_tag(self, pk: Any) -> str:
        return f"{self.label}:{self.normalize('pk', pk)}"

    def missing_tag(self) -> str:
        """Carried by negative entries: any invalidation of the model's rows clears them."""
        return f"{self.label}:missing"

    def static_tags(self) -> list[str]:
        return [self.model_tag(), *(self.tags if not callable(self.tags) else ())]

    def row_tags(self, instance: models.Model) -> list[str]:
        tags = [self.row_tag(instance.pk)]
        if callable(self.tags):
            tags.extend(validate_tags(self.tags(instance)))
        return tags

    def field(self, name: str) -> models.Field[Any, Any]:
        """The model's concrete field called `name` (its name or attname); FieldDoesNotExist otherwise."""
        model_field = self.model._meta.get_field(name)
        if not isinstance(model_field, models.Field):
            raise FieldDoesNotExist(f"{self.label}.{name} is a relation's reverse side, not a field")
        return model_field

    # -- keys -----------------------------------------------------------------------------------------
    def normalize(self, lookup: str, value: Any) -> Any:
        """The Python value a lookup compares, so `pk="42"` and `pk=42` share one key."""
        model_field = self.model._meta.pk if lookup == "pk" else self.field(lookup)
        if isinstance(value, models.Model):
            value = value.pk
        try:
            return model_field.to_python(value)
        except (ValidationError, TypeError, ValueError) as error:
            raise ValueError(f"{value!r} is not a valid {self.label}.{lookup}: {error}") from error

    def entry_key(self, lookup: str, value: Any) -> str:
        """`model:<app.model>:<fingerprint>:<lookup>:{<digest>}`: the braces are a Redis hash tag, so
        the entry and its write-behind marker share a slot, and any lookup value is a safe key."""
        digest = hashlib.blake2b(repr(value).encode(), digest_size=10).hexdigest()
        return f"model:{self.label}:{model_fingerprint(self.model)}:{lookup}:{{{digest}}}"

    def pending_key(self, pk: Any) -> str:
        """Write-behind: the row's patch, the queued changes the database does not have yet, which readers
        lay over the row (a hash, in the slot of the pk entry)."""
        return self.entry_key("pk", pk).replace(":pk:{", ":patch:{")

    def drained_key(self, pk: Any) -> str:
        """Write-behind: the newest stream id whose changes the pk entry holds (same slot as the entry)."""
        return self.entry_key("pk", pk).replace(":pk:{", ":drained:{")

    def lookup_value(self, instance: models.Model, lookup: str) -> Any:
        return instance.pk if lookup == "pk" else getattr(instance, self.field(lookup).attname)

    def keys_of(self, instance: models.Model) -> dict[str, str]:
        """{lookup: entry key} for a row; lookups whose value is NULL have no entry."""
        keys = {}
        for lookup in self.lookups:
            value = self.lookup_value(instance, lookup)
            if value is not None:
                keys[lookup] = self.entry_key(lookup, self.normalize(lookup, value))
        return keys

    # -- stored form ----------------------------------------------------------------------------------
    def row_payload(self, instance: models.Model, core: Core) -> tuple[str, tuple[Any, ...]]:
        """The stored form of a row. Pickle keeps every value as it is; for a text serializer (JSON,
        msgpack) each value is written as its field writes it to text, losing nothing (read back with
        the field's to_python)."""
        if getattr(core.codec.serializer, "name", "pickle") == "pickle":
            return ("row", tuple(getattr(instance, name) for name in self.field_names))
        values = []
        for model_field in self.model._meta.concrete_fields:
            value = getattr(instance, model_field.attname)
            if value is not None and not isinstance(model_field, models.JSONField):
                value = model_field.value_to_string(instance)
            values.append(value)
        return ("row", tuple(values))

    def missing_payload(self, lookup: str, value: Any) -> tuple[str, str, Any]:
        return ("missing", lookup, value)

    def instance_from(self, payload: Any, lookup: str, value: Any, using: str) -> Any:
        """The instance (or DoesNotExist marker) a stored payload holds, if it answers `lookup=value`."""
        if isinstance(payload, list):  # JSON and msgpack give sequences back as lists
            payload = tuple(payload)
        if not isinstance(payload, tuple) or not payload:
            return None
        if payload[0] == "missing" and len(payload) == 3:
            return MISSING_ROW if payload[1] == lookup and payload[2] == value else None
        if payload[0] != "row" or len(payload) != 2 or len(payload[1]) != len(self.field_names):
            return None
        if not isinstance(payload[1], tuple):
            # Through JSON or msgpack: Decimals, dates and UUIDs come back as text; the fields read them.
            fields = self.model._meta.concrete_fields
            values = tuple(
                None if value is None else model_field.to_python(value)
                for model_field, value in zip(fields, payload[1], strict=True)
            )
            payload = (payload[0], values)
        instance = self.model.from_db(using, self.field_names, payload[1])
        if self.normalize(lookup, self.lookup_value(instance, lookup)) != value:
            return None  # a digest collision or a payload from another shape: treat as a miss
        return instance


class _MissingRow:
    def __repr__(self) -> str:
        return "<row does not exist>"


MISSING_ROW = _MissingRow()


def _validate(model: Any, lookups: Any, write: Any, timeout: Any, tags: Any, negative_timeout: Any) -> None:
    if not (isinstance(model, type) and issubclass(model, models.Model)):
        raise TypeError(f"cache_model() needs a Django model class, got {model!r}")
    meta = model._meta
    if meta.abstract or meta.proxy or meta.swapped:
        raise ImproperlyConfigured(
            f"cache_model(): {meta.label} is abstract, proxy or swapped; register the concrete model"
        )
    if isinstance(lookups, str) or not lookups:
        raise ImproperlyConfigured(
            "cache_model(): lookups must be a non-empty tuple of field names, e.g. ('pk', 'slug')"
        )
    for lookup in lookups:
        if lookup != "pk":
            _validate_lookup(model, lookup)
    _validate_write(write, lookups)
    if not callable(tags):
        validate_tags(tags)
    _validate_timeouts(timeout, negative_timeout)


def _validate_lookup(model: type[models.Model], lookup: str) -> None:
    label = model._meta.label
    try:
        model_field = model._meta.get_field(lookup)
    except FieldDoesNotExist:
        raise ImproperlyConfigured(f"cache_model(): {label} has no field {lookup!r}") from None
    if not isinstance(model_field, models.Field) or not model_field.concrete or model_field.many_to_many:
        raise ImproperlyConfigured(f"cache_model(): {label}.{lookup} is not a concrete column")
    if not (model_field.unique or model_field.primary_key):
        raise ImproperlyConfigured(
            f"cache_model(): {label}.{lookup} is not unique, so it cannot name one row; "
            "only pk and unique fields can be lookups"
        )


def _validate_write(write: Any, lookups: Any) -> None:
    if write not in WRITE_MODES:
        raise ImproperlyConfigured(f"cache_model(): write must be one of {WRITE_MODES}, got {write!r}")
    if write == "behind" and tuple(lookups) != ("pk",):
        raise ImproperlyConfigured(
            "cache_model(): write='behind' models are cached by pk only (lookups=('pk',)); "
            "see docs/write-behind.md"
        )
    if write == "behind" and apps.apps_ready and not apps.is_installed("django_distcache"):
        raise ImproperlyConfigured(
            "cache_model(): write='behind' needs 'django_distcache' in INSTALLED_APPS (and `manage.py "
            "migrate`): the drain keeps each row's applied mark in a table of its own"
        )


def _validate_timeouts(timeout: Any, negative_timeout: Any) -> None:
    if timeout is not DEFAULT_TIMEOUT and timeout is not None and not (is_number(timeout) and timeout > 0):
        raise ImproperlyConfigured(
            f"cache_model(): timeout must be a positive number of seconds or None, got {timeout!r}"
        )
    if not (is_number(negative_timeout) and negative_timeout >= 0):
        raise ImproperlyConfigured(
            f"cache_model(): negative_timeout must be seconds >= 0, got {negative_timeout!r}"
        )


_on_register: list[Callable[[ModelCacheConfig], None]] = []


def on_register(hook: Callable[[ModelCacheConfig], None]) -> None:
    """Call `hook` with each model's config as `cache_model` registers it (models/__init__.py connects
    the write-through signals this way, so the registry does not import what builds on it)."""
    _on_register.append(hook)


def cache_model(
    model: type[models.Model] | None = None,
    *,
    lookups: tuple[str, ...] = ("pk",),
    timeout: Any = DEFAULT_TIMEOUT,
    write: str = "through",
    tags: Iterable[str] | Callable[[models.Model], Iterable[str]] = (),
    cache: str = "default",
    negative_timeout: float = DEFAULT_NEGATIVE_TIMEOUT,
) -> Any:
    """Register a model for read-through caching and write-through/write-behind; a class decorator, or
    called with the model (`cache_model(Product, lookups=...)` in an AppConfig.ready)."""

    def register(target: type[models.Model]) -> type[models.Model]:
        _validate(target, lookups, write, timeout, tags, negative_timeout)
        config = ModelCacheConfig(
            model=target,
            lookups=tuple(dict.fromkeys(lookups)),
            timeout=timeout,
            write=write,
            tags=tags if callable(tags) else tuple(tags),
            cache_alias=cache,
            negative_timeout=negative_timeout,
        )
        _registry[target] = config
        for hook in _on_register:
            hook(config)
        return target

    if model is None:
        return register
    return register(model)


def config_for(model: Any) -> ModelCacheConfig:
    if isinstance(model, models.Model):
        model = type(model)
    config = _registry.get(model)
    if config is None and isinstance(model, type) and issubclass(model, models.Model):
        concrete = model._meta.concrete_model
        config = _registry.get(concrete) if concrete is not None else None
    if config is None:
        name = getattr(getattr(model, "_meta", None), "label", model)
        raise ImproperlyConfigured(f"{name} is not registered with django_distcache.cache_model()")
    return config


def config_for_label(label: str) -> ModelCacheConfig | None:
    for config in _registry.values():
        if config.label == label:
            return config
    return None


def registered() -> list[ModelCacheConfig]:
    return list(_registry.values())
