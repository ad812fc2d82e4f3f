"""`@cached`: memoize a function (sync or async) in the cache, with tags and stampede protection.

    @django_distcache.cached(timeout=300, tags=lambda slug: [f"product:{slug}"], stale=60)
    def product_summary(slug): ...

    product_summary.invalidate("red-shoe")

The key is the function's module and qualified name plus a digest of its bound arguments (defaults
applied, so `f(1)` and `f(x=1)` share an entry); arguments must have a stable `repr` (model instances are
keyed by label and pk), or give `key=` (a string template or a callable of the arguments).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, overload

from django.core.cache import caches
from django.core.cache.backends.base import DEFAULT_TIMEOUT
from django.db import models

from . import dispatch, stampede
from .conf import is_number
from .core import Core, PlanOf, core_for
from .tags import validate_tags

R = TypeVar("R")

_registry: dict[str, CachedFunction] = {}


class UnsavedInstanceError(ValueError):
    """An argument is a model instance that is not (yet) a database row: nothing identifies it in a key."""


def _stable(value: Any) -> str:
    if isinstance(value, models.Model):
        if value.pk is None or value._state.adding:
            # Two unsaved instances (or one made with the pk of a saved row) are not that row: keyed by
            # label and pk they would share its entry and get each other's results.
            raise UnsavedInstanceError(
                f"an unsaved {value._meta.label} instance has no identity to key a cached result on; "
                "save it first, or give @cached a key="
            )
        return f"<{value._meta.label_lower}:{value.pk!r}>"
    if isinstance(value, dict):
        return "{" + ",".join(f"{_stable(k)}:{_stable(v)}" for k, v in sorted(value.items(), key=repr)) + "}"
    if isinstance(value, list | tuple):
        inner = ",".join(_stable(item) for item in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    if isinstance(value, set | frozenset):
        return "{" + ",".join(sorted(_stable(item) for item in value)) + "}"
    return repr(value)


Tags = Iterable[str] | Callable[..., Iterable[str]] | None
Key = str | Callable[..., str] | None


class CachedFunction:
    """The wrapper `@cached` returns: call it as the function; `.invalidate(*args, **kwargs)` drops one
    entry (`.ainvalidate` for async code); `.key_for(*args, **kwargs)` tells the cache key."""

    def __init__(
        self,
        function: Callable[..., Any],
        timeout: Any,
        tags: Tags,
        key: Key,
        stale: float | None,
        beta: float | None,
        refresh: str | None,
        using: str,
        version: int | None,
    ) -> None:
        self.function = function
        self.name = f"{function.__module__}.{function.__qualname__}"
        self.signature = inspect.signature(function)
        self.is_async = inspect.iscoroutinefunction(function)
        self.timeout, self.tags, self.key, self.stale, self.beta = timeout, tags, key, stale, beta
        self.refresh, self.using, self.version = refresh, using, version
        functools.update_wrapper(self, function)
        _registry[self.name] = self

    @property
    def core(self) -> Core:
        return core_for(self.using)

    def key_for(self, *args: Any, **kwargs: Any) -> str:
        if callable(self.key):
            return str(self.key(*args, **kwargs))
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        if isinstance(self.key, str):
            return self.key.format(**bound.arguments)
        text = ",".join(f"{name}={_stable(value)}" for name, value in bound.arguments.items())
        digest = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
        return f"cached:{self.name}:{digest}"

    def tags_for(self, *args: Any, **kwargs: Any) -> list[str]:
        return validate_tags(self.tags(*args, **kwargs) if callable(self.tags) else self.tags)

    def _policy(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> stampede.Policy:
        policy = stampede.policy_for(
            self.core, self.stale, self.beta, "inline" if self.refresh == "celery" else self.refresh
        )
        if self.refresh == "celery" and (self.stale or policy.beta):
            policy = dataclasses.replace(
                policy, refresh=functools.partial(_queue_refresh, self.name, args, kwargs)
            )
        return policy

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            key = self.key_for(*args, **kwargs)
        except UnsavedInstanceError:
            return self.function(*args, **kwargs)  # not cacheable: computed for this call alone
        if self.is_async:
            return self._acall(key, args, kwargs)
        return self._fetch(stampede.get_or_compute, key, args, kwargs)

    async def _acall(self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return await self._fetch(stampede.aget_or_compute, key, args, kwargs)

    def _fetch(
        self, get_or_compute: Callable[..., R], key: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> R:
        """One call through `get_or_compute` (stampede's sync or async one): the same arguments for both."""
        return get_or_compute(
            self.core,
            key,
            self.version,
            lambda: self.function(*args, **kwargs),
            self.timeout,
            self.tags_for(*args, **kwargs),
            self._policy(args, kwargs),
            "cached",
        )

    def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        return bool(caches[self.using].delete(self.key_for(*args, **kwargs), version=self.version))

    async def ainvalidate(self, *args: Any, **kwargs: Any) -> bool:
        return bool(await caches[self.using].adelete(self.key_for(*args, **kwargs), version=self.version))

    def refresh_now(self, token: str | None, *args: Any, **kwargs: Any) -> Any:
        """Recompute and store one entry now (what the Celery refresh task runs); releases `token`'s lease."""
        core = self.core
        key = self.key_for(*args, **kwargs)
        function = self.function if not self.is_async else _run_coroutine(self.function)
        lease = stampede.lease_key(core, core.made_key(key, self.version))
        policy = stampede.policy_for(core, self.stale, self.beta, "inline")

        def plan() -> PlanOf[Any]:
            physical = yield from core.physical_key(key, self.version)
            entry = stampede.Entry(
                core,
                key,
                self.version,
                physical,
                lease,
                lambda: function(*args, **kwargs),
                self.timeout,
                self.tags_for(*args, **kwargs),
                policy,
            )
            return (yield from stampede.refresh_plan(entry, token))

        return core.run(plan(), "refresh", None)


def _run_coroutine(function: Callable[..., Any]) -> Callable[..., Any]:
    from asgiref.sync import async_to_sync

    return async_to_sync(function)


def _queue_refresh(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any], key: Any, version: int | None, token: str
) -> None:
    dispatch.send(dispatch.REFRESH, {"name": name, "args": list(args), "kwargs": kwargs, "token": token})


def refresh_by_name(name: str, args: Iterable[Any], kwargs: dict[str, Any], token: str | None) -> None:
    function = _registry.get(name)
    if function is None:
        module, _, _ = name.rpartition(".")
        while module and function is None:
            try:
                __import__(module)
            except ImportError:
                module = module.rpartition(".")[0]
                continue
            function = _registry.get(name)
            break
    if function is None:
        raise LookupError(f"no @cached function named {name!r} in this process")
    function.refresh_now(token, *args, **kwargs)


@overload
def cached(timeout: Callable[..., Any], /) -> CachedFunction: ...
@overload
def cached(
    timeout: float | None = ...,
    *,
    tags: Tags = None,
    key: Key = None,
    stale: float | None = None,
    beta: float | None = None,
    refresh: str | None = None,
    using: str = "default",
    version: int | None = None,
) -> Callable[[Callable[..., Any]], CachedFunction]: ...
def cached(
    timeout: Any = DEFAULT_TIMEOUT,
    *,
    tags: Tags = None,
    key: Key = None,
    stale: float | None = None,
    beta: float | None = None,
    refresh: str | None = None,
    using: str = "default",
    version: int | None = None,
) -> CachedFunction | Callable[[Callable[..., Any]], CachedFunction]:
    """Memoize a function in the cache `using`. `stale`: seconds an expired result may still be returned
    while one caller refreshes it (in a thread, or `refresh="celery"` through the Celery task
    `django_distcache.refresh`); `beta`: XFetch eagerness (OPTIONS['XFETCH_BETA'] by default)."""
    if refresh not in (None, "inline", "thread", "celery"):
        raise ValueError(f"refresh must be None, 'inline', 'thread' or 'celery', got {refresh!r}")
    if tags is not None and not callable(tags):
        validate_tags(tags)
    if key is not None and not (isinstance(key, str) or callable(key)):
        raise TypeError(f"key must be a string template or a callable, got {key!r}")
    if stale is not None and (not is_number(stale) or stale < 0):
        raise ValueError(f"stale must be a number of seconds >= 0, got {stale!r}")

    def decorate(function: Callable[..., Any]) -> CachedFunction:
        if not callable(function):
            raise TypeError("@cached decorates a function")
        return CachedFunction(function, timeout, tags, key, stale, beta, refresh, using, version)

    if callable(timeout) and not isinstance(timeout, int | float):
        function, timeout = timeout, DEFAULT_TIMEOUT  # used bare: @cached
        return decorate(function)
    return decorate
