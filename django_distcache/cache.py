"""The Django cache backend: Django's cache API over a `core.Core`, sync and native async.

Each operation is a plan (see core.py) written once; the sync method runs it with `core.run`, the async
one with `core.arun`. The plans here are the ones only Django's API needs; what features share is in
core.py.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache, default_key_func

from . import scripts, stampede
from .codec import SignatureError, UndecodableValueError
from .conf import is_whole, parse_settings
from .core import MISSING, STRICT, CacheUnavailable, Compute, Core, Guarded, Plan, PlanOf
from .tags import validate_tags
from .topology import OUTAGE_ERRORS, Call, CommandError
from .topology.base import BATCH_SLICE

__all__ = ["CacheUnavailable", "RedisClusterCache"]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# What Django's memcached-portability warning looks for; checked first so the common key costs one regex.
_KEY_MAY_WARN = re.compile(r"[\x00-\x20\x7f]")


class RedisClusterCache(BaseCache):
    """Django cache backend for Redis Cluster. See docs/configuration.md for LOCATION and OPTIONS."""

    def __init__(self, server: str | list[str], params: dict[str, Any]) -> None:
        options = dict(params.get("OPTIONS") or {})
        # Django's BaseCache reads MAX_ENTRIES/CULL_FREQUENCY; Redis bounds memory with maxmemory instead.
        for django_only in ("MAX_ENTRIES", "CULL_FREQUENCY"):
            options.pop(django_only, None)
        super().__init__(params)
        plain = (
            type(self).make_key is BaseCache.make_key
            and type(self).make_and_validate_key is BaseCache.make_and_validate_key
            and type(self).validate_key is RedisClusterCache.validate_key
        )
        self.core = Core(
            parse_settings(server, options),
            key_prefix=self.key_prefix,
            version=self.version,
            default_timeout=self.default_timeout,
            make_key=self._plain_made_key if plain else self.make_and_validate_key,
            strips_prefix=self.key_func is default_key_func,
        )

    def _plain_made_key(self, key: str, version: int | None) -> str:
        """make_and_validate_key when the key function and make_key are Django's own: the same key and the
        same warnings, without three calls per key (get_many makes a hundred)."""
        if self.key_func is not default_key_func:  # (checked per call: a test may swap it on the instance)
            return self.make_and_validate_key(key, version)
        made = f"{self.key_prefix}:{self.version if version is None else version}:{key}"
        # What validate_key looks for (a control character, a space, DEL) can only be there when the key
        # is not printable or has a space: two C-level tests instead of a regular expression, per key.
        if len(made) > 250 or not made.isprintable() or " " in made:
            self.validate_key(made)
        return made

    def validate_key(self, key: str) -> None:
        """Django's CacheKeyWarning checks, run only for keys that could trigger them (same warnings)."""
        if len(key) > 250 or _KEY_MAY_WARN.search(key):
            super().validate_key(key)

    # -- plans ----------------------------------------------------------------------------------------
    def _get_plan(self, key: Any, default: Any, version: int | None) -> Plan:
        physical = yield from self.core.physical_key(key, version)
        data = yield Call(physical, ("GET", physical), read=True)
        if data is None:
            return default
        found = yield from self.core.valid_values({key: (physical, data)})
        return found.get(key, default)

    def _write_plan(
        self,
        key: Any,
        value: Any,
        timeout: Any,
        version: int | None,
        tags: Any,
        only_new: bool,
        stamps: Any = None,
    ) -> PlanOf[bool]:
        """set() and add(): one SET (NX for add) of the encoded value, stamped with its tags' versions."""
        made = self.core.made_key(key, version)
        expiry_ms = self.core.expiry_ms(timeout)
        prepared = None
        if stamps is None:
            tags = validate_tags(tags)
            if tags:
                prepared = self.core.prepared(value, key)
            stamps = yield from self.core.stamps(tags, expiry_ms)
        head = yield from self.core.namespace.current()
        physical = self.core.keys.entry(head, made)
        data = self.core.encode(value, key, physical, stamps, prepared)
        if expiry_ms == 0 and only_new:
            # Django: add() with timeout 0 succeeds only if the key was absent, and keeps nothing.
            added = yield Call(physical, ("SET", physical, data, "NX"), repairable=True)
            if added:
                yield Call(physical, ("DEL", physical), repairable=True)
            return bool(added)
        if expiry_ms == 0:
            yield Call(physical, ("DEL", physical), repairable=True)
            return True
        if not only_new:
            return bool(
                (yield Call(physical, self.core.set_args(physical, data, expiry_ms), repairable=True))
            )
        if (yield Call(physical, self.core.set_args(physical, data, expiry_ms, "NX"), repairable=True)):
            return True
        # Something is stored. If it is dead (a stale tag, undecodable), it must not block add(): replace
        # it, but only if it is still those exact bytes, so a live value written meanwhile is never lost.
        existing = yield Call(physical, ("GET", physical))
        if existing is None or (yield from self.core.valid_values({key: (physical, existing)})):
            return False
        fingerprint = hashlib.sha1(existing).hexdigest()
        expiry = "" if expiry_ms is None else expiry_ms
        replaced = yield Call(
            physical,
            ("EVAL", scripts.SET_IF_UNCHANGED, 1, physical, fingerprint, data, expiry),
            idempotent=False,
            repairable=True,
        )
        return bool(replaced)

    def _get_or_set_plan(self, key: Any, default: Any, timeout: Any, version: int | None, tags: Any) -> Plan:
        tags = validate_tags(tags)
        expiry_ms = self.core.expiry_ms(
            timeout
        )  # a bad timeout is refused before anything is read or written
        value = yield Guarded(self._get_plan(key, MISSING, version), "get", MISSING)
        if value is not MISSING:
            return value
        # Tag versions are read before the value is computed: an invalidation that lands during the
        # computation makes the stored entry born stale instead of hiding it from the invalidation.
        stamps = None
        if tags:
            stamps = yield Guarded(self.core.stamps(tags, expiry_ms), "get_or_set", MISSING)
        if callable(default):
            default = yield Compute(default)
        if stamps is MISSING:
            return default  # the tags could not be read: store nothing rather than store it unstamped
        added = yield Guarded(
            self._write_plan(key, default, timeout, version, tags, True, stamps), "add", False
        )
        if added:
            return default
        # Someone else stored a value between our get and our add: theirs wins, as in Django.
        return (yield Guarded(self._get_plan(key, default, version), "get", default))

    def _get_many_or_set_plan(
        self, keys: Iterable[Any], factory: Callable[..., Any], timeout: Any, version: int | None, tags: Any
    ) -> PlanOf[dict[Any, Any]]:
        keys = list(keys)
        tags = validate_tags(tags)
        expiry_ms = self.core.expiry_ms(timeout)
        found = yield Guarded(self._get_many_plan(keys, version), "get_many", {})
        missing = [key for key in keys if key not in found]
        if missing:
            stamps = None
            if tags:
                stamps = yield Guarded(self.core.stamps(tags, expiry_ms), "get_many_or_set", MISSING)
            computed = self._only_requested((yield Compute(factory, (missing,))), missing)
            if computed and stamps is not MISSING:
                yield Guarded(
                    self.core.set_many_plan(computed, timeout, version, tags, stamps), "set_many", []
                )
            found.update(computed)
        return {key: found[key] for key in keys if key in found}

    def _delete_plan(self, key: Any, version: int | None) -> PlanOf[bool]:
        physical = yield from self.core.physical_key(key, version)
        return bool((yield Call(physical, ("DEL", physical), repairable=True)))

    def _has_key_plan(self, key: Any, version: int | None) -> PlanOf[bool]:
        # A GET, not EXISTS: an entry whose tag was invalidated must not count as present.
        value = yield from self._get_plan(key, MISSING, version)
        return value is not MISSING

    def _get_many_plan(self, keys: Iterable[Any], version: int | None) -> PlanOf[dict[Any, Any]]:
        keys = keys if isinstance(keys, list | tuple) else list(keys)
        if len(keys) <= BATCH_SLICE:
            return (yield from self._get_slice_plan(keys, version))
        found: dict[Any, Any] = {}  # in slices: what a slice holds in flight is freed before the next
        for start in range(0, len(keys), BATCH_SLICE):
            found.update((yield from self._get_slice_plan(keys[start : start + BATCH_SLICE], version)))
        return found

    def _get_slice_plan(self, keys: Iterable[Any], version: int | None) -> PlanOf[dict[Any, Any]]:
        physical = yield from self.core.physical_keys(keys, version)
        if not physical:
            return {}
        replies = yield [Call(p, ("GET", p), True) for p in physical]  # (read=True, positional: faster)
        return (yield from self.core.valid_replies(physical, replies, "get_many"))

    def _delete_many_plan(self, keys: Iterable[Any], version: int | None) -> PlanOf[None]:
        physical = yield from self.core.physical_keys(keys, version)
        if physical:
            replies = yield [Call(p, ("DEL", p), repairable=True) for p in physical]
            for reply in replies:
                self.core.failures.check_item("delete_many", reply)

    def _incr_plan(self, key: Any, delta: int, version: int | None, negate: bool = False) -> PlanOf[int]:
        if not is_whole(delta):
            raise TypeError(f"incr/decr delta must be an int, got {type(delta).__name__}")
        if negate:
            delta = -delta
        if not _INT64_MIN <= delta <= _INT64_MAX:
            raise OverflowError(f"incr/decr delta {delta} does not fit in a 64-bit integer")
        physical = yield from self.core.physical_key(key, version)
        try:
            value = yield Call(
                physical,
                ("EVAL", scripts.INCR_IF_PRESENT, 1, physical, delta),
                idempotent=False,
                repairable=True,
            )
        except CommandError as error:
            message = str(error)
            if "not an integer" in message:
                raise TypeError(f"cache value of {key!r} is not an integer") from error
            if "overflow" in message:
                raise OverflowError(f"incrementing {key!r} by {delta} overflows a 64-bit integer") from error
            raise
        if value is None:
            raise ValueError(f"Key '{key}' not found")
        return int(value)

    def _touch_plan(self, key: Any, timeout: Any, version: int | None) -> PlanOf[bool]:
        physical = yield from self.core.physical_key(key, version)
        expiry_ms = self.core.expiry_ms(timeout)
        if expiry_ms is None:
            reply = yield Call(physical, ("EVAL", scripts.PERSIST_IF_PRESENT, 1, physical), repairable=True)
        elif expiry_ms == 0:
            reply = yield Call(physical, ("DEL", physical), repairable=True)
        else:
            reply = yield Call(physical, ("PEXPIRE", physical, expiry_ms), repairable=True)
        return bool(reply)

    def _ttl_plan(self, key: Any, version: int | None) -> PlanOf[int | None]:
        physical = yield from self.core.physical_key(key, version)
        milliseconds = yield Call(physical, ("PTTL", physical), read=True)
        if milliseconds == -2:
            return 0
        if milliseconds == -1:
            return None
        return math.ceil(int(milliseconds) / 1000)

    def _incr_version_plan(self, key: Any, delta: int, version: int | None) -> PlanOf[int]:
        version = self.version if version is None else version
        old = yield from self.core.physical_key(key, version)
        new = yield from self.core.physical_key(key, version + delta)
        data, milliseconds = yield [Call(old, ("GET", old)), Call(old, ("PTTL", old))]
        for reply in (data, milliseconds):
            if isinstance(reply, BaseException):
                raise reply
        if data is not None:
            # The value moves with its envelope, tags and remaining lifetime; its signature is made anew
            # for the new key (it binds the version), once the old one verifies: as a get() would, a value
            # that does not verify counts as missing.
            try:
                data = self.core.codec.rebind(
                    data, self.core.keys.identity(old), self.core.keys.identity(new)
                )
            except (SignatureError, UndecodableValueError) as error:
                self.core.decode_failed(error)
                data = None
        if data is None:
            raise ValueError(f"Key '{key}' not found")
        expiry_ms = None if milliseconds < 0 else max(1, milliseconds)
        yield Call(new, self.core.set_args(new, data, expiry_ms), repairable=True)
        yield Call(old, ("DEL", old), repairable=True)
        return version + delta

    def _clear_plan(self) -> PlanOf[bool]:
        yield from self.core.namespace.bump()
        return True

    # -- Django's API, sync ---------------------------------------------------------------------------
    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        return self.core.run(self._get_plan(key, default, version), "get", default)

    def set(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
        tags: Iterable[str] | None = None,
    ) -> None:
        self.core.run(self._write_plan(key, value, timeout, version, tags, False), "set")

    def add(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
        tags: Iterable[str] | None = None,
    ) -> bool:
        return self.core.run(self._write_plan(key, value, timeout, version, tags, True), "add", False)

    def get_or_set(
        self,
        key: Any,
        default: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
        tags: Iterable[str] | None = None,
        *,
        stale: float | None = None,
        beta: float | None = None,
    ) -> Any:
        """Django's get_or_set; with tags, their versions are read before `default()` runs (race-safe).
        A callable `default` is computed once in the fleet however many callers miss together, and
        recomputed early (XFetch) or served `stale` seconds past its timeout while one caller refreshes it
        (docs/stampede.md)."""
        if not callable(default):
            return self.core.run(self._get_or_set_plan(key, default, timeout, version, tags), "get_or_set")
        policy = stampede.policy_for(self.core, stale, beta)
        return stampede.get_or_compute(self.core, key, version, default, timeout, tags, policy, "get_or_set")

    def delete(self, key: Any, version: int | None = None) -> bool:
        return self.core.run(self._delete_plan(key, version), "delete", False)

    def has_key(self, key: Any, version: int | None = None) -> bool:
        return self.core.run(self._has_key_plan(key, version), "has_key", False)

    def get_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        return self.core.run(self._get_many_plan(keys, version), "get_many", {})

    def set_many(
        self,
        data: Mapping[Any, Any],
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
        tags: Iterable[str] | None = None,
    ) -> list[Any]:
        return self.core.run(self.core.set_many_plan(data, timeout, version, tags), "set_many", list(data))

    def invalidate_tags(self, *tags: str) -> int:
        """Invalidate every entry carrying any of `tags`, in O(1) per tag. Outages raise CacheUnavailable:
        an invalidation is never silently dropped."""
        return self.core.run_strict(self.core.invalidate_tags_plan(tags), "invalidate_tags")

    def delete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        self.core.run(self._delete_many_plan(keys, version), "delete_many")

    def incr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        return self._incr_result(self.core.run(self._incr_plan(key, delta, version), "incr", MISSING), key)

    def decr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        return self._incr_result(
            self.core.run(self._incr_plan(key, delta, version, negate=True), "incr", MISSING), key
        )

    def touch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        return self.core.run(self._touch_plan(key, timeout, version), "touch", False)

    def incr_version(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        result = self.core.run(self._incr_version_plan(key, delta, version), "incr_version", MISSING)
        return self._incr_result(result, key)

    def clear(self) -> bool:  # type: ignore[override]  # (Django's returns None; True says it was done)
        return self.core.run(self._clear_plan(), "clear", False)

    def close(self, **kwargs: Any) -> None:
        """Called by Django after every request; connections are pooled per process, so nothing to do."""

    # -- extensions, sync -----------------------------------------------------------------------------
    def ttl(self, key: Any, version: int | None = None) -> int | None:
        """Seconds left (rounded up); None if the key never expires; 0 if it does not exist."""
        return self.core.run(self._ttl_plan(key, version), "ttl", 0)

    def expire(self, key: Any, timeout: Any, version: int | None = None) -> bool:
        """Give an existing key a new timeout (None: never expire). Same as touch(), the redis-style name."""
        return self.touch(key, timeout, version=version)

    def persist(self, key: Any, version: int | None = None) -> bool:
        """Remove the key's expiry; False if the key does not exist."""
        return self.touch(key, None, version=version)

    def get_many_or_set(
        self,
        keys: Iterable[Any],
        factory: Callable[[list[Any]], Mapping[Any, Any]],
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
        tags: Iterable[str] | None = None,
    ) -> dict[Any, Any]:
        """Fetch keys; compute only the missing ones with factory(missing_keys) and store them in one batch."""
        return self.core.run(
            self._get_many_or_set_plan(keys, factory, timeout, version, tags), "get_many_or_set", {}
        )

    @staticmethod
    def _only_requested(computed: Any, missing: list[Any]) -> dict[Any, Any]:
        if not isinstance(computed, Mapping):
            raise TypeError(f"get_many_or_set factory must return a mapping, got {type(computed).__name__}")
        return {key: computed[key] for key in missing if key in computed}

    def lock(
        self,
        key: Any,
        timeout: float | None = None,
        sleep: float = 0.1,
        blocking: bool = True,
        blocking_timeout: float | None = None,
        version: int | None = None,
    ) -> Any:
        """A redis-py Lock on the node owning `key`. Lock errors propagate: mutual exclusion cannot degrade.

        Lock keys live outside the namespace generation, so clear() never frees a lock someone holds.
        """
        physical = self._lock_key(key, version)
        try:
            client = self.core.topology.client_for(physical)
        except OUTAGE_ERRORS as error:
            raise CacheUnavailable(f"cache lock: cannot reach the node for {key!r}: {error}") from error
        return client.lock(
            physical,  # type: ignore[arg-type]  # (typed str; a bytes name works and is what the docs show)
            timeout=timeout,
            sleep=sleep,
            blocking=blocking,
            blocking_timeout=blocking_timeout,
        )

    # -- Django's API, async (native: asyncio connections, no thread hop) ----------------------------------
    async def aget(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        return await self.core.arun(self._get_plan(key, default, version), "get", default)

    async def aset(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
        tags: Iterable[str] | None = None,
    ) -> None:
        await self.core.arun(self._write_plan(key, value, timeout, version, tags, False), "set")

    async def aadd(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
        tags: Iterable[str] | None = None,
    ) -> bool:
        return await self.core.arun(self._write_plan(key, value, timeout, version, tags, True), "add", False)

    async def aget_or_set(
        self,
        key: Any,
        default: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
        tags: Iterable[str] | None = None,
        *,
        stale: float | None = None,
        beta: float | None = None,
    ) -> Any:
        if not callable(default):
            return await self.core.arun(
                self._get_or_set_plan(key, default, timeout, version, tags), "get_or_set"
            )
        policy = stampede.policy_for(self.core, stale, beta)
        return await stampede.aget_or_compute(
            self.core, key, version, default, timeout, tags, policy, "get_or_set"
        )

    async def adelete(self, key: Any, version: int | None = None) -> bool:
        return await self.core.arun(self._delete_plan(key, version), "delete", False)

    async def ahas_key(self, key: Any, version: int | None = None) -> bool:
        return await self.core.arun(self._has_key_plan(key, version), "has_key", False)

    async def aget_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        return await self.core.arun(self._get_many_plan(keys, version), "get_many", {})

    async def aset_many(
        self,
        data: Mapping[Any, Any],
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
        tags: Iterable[str] | None = None,
    ) -> list[Any]:
        return await self.core.arun(
            self.core.set_many_plan(data, timeout, version, tags), "set_many", list(data)
        )

    async def ainvalidate_tags(self, *tags: str) -> int:
        return await self.core.arun(self.core.invalidate_tags_plan(tags), "invalidate_tags", STRICT)

    async def adelete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        await self.core.arun(self._delete_many_plan(keys, version), "delete_many")

    async def aincr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        return self._incr_result(
            await self.core.arun(self._incr_plan(key, delta, version), "incr", MISSING), key
        )

    async def adecr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        return self._incr_result(
            await self.core.arun(self._incr_plan(key, delta, version, negate=True), "incr", MISSING), key
        )

    @staticmethod
    def _incr_result(result: object, key: Any) -> int:
        # During an outage the key is as good as missing: Django's contract for that is ValueError.
        if result is MISSING:
            raise ValueError(f"Key '{key}' not found (cache unavailable)")
        return cast(int, result)

    async def atouch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        return await self.core.arun(self._touch_plan(key, timeout, version), "touch", False)

    async def aincr_version(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        result = await self.core.arun(self._incr_version_plan(key, delta, version), "incr_version", MISSING)
        return self._incr_result(result, key)

    async def aclear(self) -> bool:  # type: ignore[override]
        return await self.core.arun(self._clear_plan(), "clear", False)

    async def aclose(self, **kwargs: Any) -> None:
        """Connections are pooled per event loop and live as long as it does."""

    async def attl(self, key: Any, version: int | None = None) -> int | None:
        return await self.core.arun(self._ttl_plan(key, version), "ttl", 0)

    async def aexpire(self, key: Any, timeout: Any, version: int | None = None) -> bool:
        return await self.atouch(key, timeout, version=version)

    async def apersist(self, key: Any, version: int | None = None) -> bool:
        return await self.atouch(key, None, version=version)

    async def aget_many_or_set(
        self,
        keys: Iterable[Any],
        factory: Callable[[list[Any]], Any],
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
        tags: Iterable[str] | None = None,
    ) -> dict[Any, Any]:
        """Async twin of get_many_or_set; the factory may be a plain or an async function."""
        plan = self._get_many_or_set_plan(keys, factory, timeout, version, tags)
        return await self.core.arun(plan, "get_many_or_set", {})

    async def alock(
        self,
        key: Any,
        timeout: float | None = None,
        sleep: float = 0.1,
        blocking: bool = True,
        blocking_timeout: float | None = None,
        version: int | None = None,
    ) -> Any:
        """An asyncio redis-py Lock on the node owning `key`; use as `async with await cache.alock(...)`."""
        physical = self._lock_key(key, version)
        try:
            client = await self.core.async_topology().client_for(physical)
        except OUTAGE_ERRORS as error:
            raise CacheUnavailable(f"cache lock: cannot reach the node for {key!r}: {error}") from error
        return client.lock(
            physical,
            timeout=timeout,
            sleep=sleep,
            blocking=blocking,
            blocking_timeout=blocking_timeout,
        )

    def _lock_key(self, key: Any, version: int | None) -> bytes:
        return self.core.keys.beside("lock", self.core.made_key(key, version))

    # -- introspection -----------------------------------------------------------------------------------
    @property
    def failure_counts(self) -> dict[str, int]:
        """Outages turned into misses/dropped writes (and undecodable values), per operation, since this
        process first used this cluster; shared by every instance with the same connection settings."""
        return dict(self.core.failures.counts)

    def physical_key(self, key: Any, version: int | None = None) -> bytes | None:
        """The exact Redis key a cache key is stored under: `<KEY_PREFIX>:<generation>:<VERSION>:<key>`;
        None while the namespace generation cannot be read."""
        physical: bytes | None = self.core.run(self.core.physical_key(key, version), "physical_key")
        return physical
