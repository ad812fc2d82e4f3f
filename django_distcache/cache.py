"""The Django cache backend: Django's cache API over a Redis Cluster, sync and native async.

Each operation is written once, as a *plan*: a generator that yields the `Call`s (or lists of calls) it
needs and receives their replies. `_run` drives a plan with the blocking topology, `_arun` with the
asyncio one, so key making, encoding and decisions are shared and only the I/O differs. `_run`/`_arun`
are also the one place where an outage becomes the configured failure policy.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import math
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache, InvalidCacheKey, default_key_func
from redis.crc import key_slot
from redis.exceptions import ResponseError

from . import scripts, stampede
from .backplane import Backplane, Subscriber
from .codec import EXPIRED, SignatureError, UndecodableValueError
from .conf import CacheSettings, build_codec, expiry_ms, parse_settings
from .forksafe import renew_locks_after_fork
from .keys import KeyLayout
from .outbox import Outbox, default_outbox_dir, run_plan
from .tags import TagVersions, stamps_are_current, validate_tags
from .topology import (
    OUTAGE_ERRORS,
    AsyncClusterTopology,
    Call,
    ClusterTopology,
    PermissionRefusedError,
    is_outage,
)
from .topology.base import BATCH_SLICE, TopologyState
from .versioning import Namespace, Purger

logger = logging.getLogger("django_distcache")


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()
_STRICT = _Missing()  # as a fallback: the operation never degrades (invalidations); outages raise
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# What Django's memcached-portability warning looks for; checked first so the common key costs one regex.
_KEY_MAY_WARN = re.compile(r"[\x00-\x20\x7f]")
Plan = Generator[Any, Any, Any]


# Failures a caller never notices: the operation went on with an in-process copy (the namespace
# generation while its node is down). Counted, but they do not make the caller's call a degraded one.
SERVED_FROM_COPY = frozenset({"namespace"})


class CacheUnavailable(Exception):
    """Raised instead of degrading when OPTIONS['FAILURE_POLICY'] is 'raise'."""


@dataclass(slots=True)
class Guarded:
    """A step of a plan that is a whole operation of its own, with its own failure fallback.

    get_or_set is "get, compute, add, get": an outage in the get must still let the value be computed
    and returned, so each step degrades on its own instead of the whole plan.
    """

    plan: Plan
    operation: str
    fallback: Any


@dataclass(slots=True)
class Compute:
    """Call user code from a plan: the async driver awaits the result when it is awaitable."""

    function: Callable[..., Any]
    args: tuple = ()


@dataclass(slots=True)
class Sleep:
    """Wait inside a plan (time.sleep for the sync driver, asyncio.sleep for the async one)."""

    seconds: float


@dataclass(slots=True)
class Spawn:
    """Run `plan_factory()`'s plan in the background (a thread, or a task on the running loop), under
    its own failure policy; the plan that spawned it goes on at once."""

    plan_factory: Callable[[], Any]
    operation: str


_background_pool: Any = None
_background_tasks: set = set()


def _spawn_thread(cache: RedisClusterCache, request: Spawn) -> None:
    global _background_pool
    if _background_pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _background_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="distcache-refresh")
    _background_pool.submit(_run_logged, cache, request)


def _run_logged(cache: RedisClusterCache, request: Spawn) -> None:
    try:
        cache._run(request.plan_factory(), request.operation, None)
    except Exception:  # noqa: BLE001 - a background refresh has no caller to raise to: it logs
        logger.exception("background %s failed", request.operation)
    finally:
        from django.db import close_old_connections

        close_old_connections()


def _spawn_task(cache: RedisClusterCache, request: Spawn) -> None:
    async def run() -> None:
        try:
            await cache._arun(request.plan_factory(), request.operation, None)
        except Exception:  # noqa: BLE001 - as _run_logged
            logger.exception("background %s failed", request.operation)

    task = asyncio.get_running_loop().create_task(run())
    _background_tasks.add(task)
    task.add_done_callback(_background_tasks.discard)


@dataclass
class _Shared:
    """What every backend instance with the same cluster settings shares: pools, slot map, namespaces,
    and per KEY_PREFIX the invalidation channel's subscriber.

    Django makes a backend instance per thread (and per async context), so keeping connections on the
    instance would open new connections for every request under ASGI.
    """

    state: TopologyState
    topology: ClusterTopology
    purger: Purger
    backplanes: dict[str, Backplane] = field(default_factory=dict)
    subscribers: dict[int, Subscriber] = field(default_factory=dict)  # by the slot of their channels
    failure_counts: dict[str, int] = field(default_factory=dict)
    async_topologies: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    namespaces: dict[tuple[str, float], Namespace] = field(default_factory=dict)
    tag_versions: dict[tuple[str, float], TagVersions] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        renew_locks_after_fork(self, "lock")


_shared_by_settings: dict[str, _Shared] = {}
_shared_lock = threading.Lock()
_counts_lock = threading.Lock()


def _renew_module_locks() -> None:
    global _shared_lock, _counts_lock
    _shared_lock, _counts_lock = threading.Lock(), threading.Lock()


os.register_at_fork(after_in_child=_renew_module_locks)


def _shared_for(settings: CacheSettings) -> _Shared:
    key = repr(settings.connection)
    shared = _shared_by_settings.get(key)
    if shared is None:
        with _shared_lock:
            shared = _shared_by_settings.get(key)
            if shared is None:
                state = TopologyState(settings.connection)
                topology = ClusterTopology(state)
                shared = _shared_by_settings[key] = _Shared(state, topology, Purger(topology))
    return shared


class FailurePolicy:
    """Turns outages into misses/dropped writes (logged, counted), or raises when the user chose that."""

    LOG_EVERY = 10.0  # seconds between two warnings for the same operation

    def __init__(self, policy: str, counts: dict[str, int]) -> None:
        self.policy = policy
        self.counts = counts  # shared by every instance on the same cluster
        self._last_logged: dict[str, float] = {}
        self._thread = threading.local()

    def count(self, what: str) -> None:
        with _counts_lock:
            self.counts[what] = self.counts.get(what, 0) + 1
        if what not in SERVED_FROM_COPY:
            self._thread.count = getattr(self._thread, "count", 0) + 1

    def note(self, what: str, message: str, *args: Any) -> None:
        """Count `what` and log `message` as a warning, at most once per LOG_EVERY seconds."""
        self.count(what)
        if self._log_due(what):
            logger.warning(message + "; %d so far", *args, self.counts[what])

    def counted_in_this_thread(self) -> int:
        """How many failures this thread has seen: a caller can tell whether its own call degraded."""
        return getattr(self._thread, "count", 0)

    def handle(self, operation: str, error: BaseException, fallback: Any) -> Any:
        self.count(operation)
        if self.policy == "raise" or fallback is _STRICT:
            raise CacheUnavailable(f"cache {operation} failed: {error}") from error
        if self._log_due(operation):
            logger.warning(
                "cache %s failed (%s: %s); degraded to %r; %d failures so far",
                operation,
                type(error).__name__,
                error,
                fallback,
                self.counts[operation],
            )
        return fallback

    def _log_due(self, what: str) -> bool:
        """True at most once per LOG_EVERY seconds for each `what`: warnings, not one per request."""
        now = time.monotonic()
        if now - self._last_logged.get(what, 0.0) < self.LOG_EVERY:
            return False
        self._last_logged[what] = now
        return True

    def check_item(self, operation: str, result: Any) -> bool:
        """For one result of a batch: True if usable; a bug raises; an outage is counted and skipped."""
        if isinstance(result, BaseException):
            if is_outage(result):
                self.handle(operation, result, None)
                return False
            raise result
        return True


async def _maybe_await(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


class RedisClusterCache(BaseCache):
    """Django cache backend for Redis Cluster. See docs/configuration.md for LOCATION and OPTIONS."""

    def __init__(self, server: str | list[str], params: dict[str, Any]) -> None:
        options = dict(params.get("OPTIONS") or {})
        # Django's BaseCache reads MAX_ENTRIES/CULL_FREQUENCY; Redis bounds memory with maxmemory instead.
        for django_only in ("MAX_ENTRIES", "CULL_FREQUENCY"):
            options.pop(django_only, None)
        super().__init__(params)
        self._settings = parse_settings(server, options)
        self._keys = KeyLayout(self.key_prefix, self.key_func is default_key_func)
        self._codec = build_codec(self._settings, self.key_prefix)
        self._shared = _shared_for(self._settings)
        self._failures = FailurePolicy(self._settings.failure_policy, self._shared.failure_counts)
        shared = self._shared
        with shared.lock:
            if self.key_prefix not in shared.backplanes:
                slot = key_slot(self._keys.channel)
                if slot not in shared.subscribers:
                    shared.subscribers[slot] = Subscriber(shared.topology)
                shared.backplanes[self.key_prefix] = Backplane(shared.subscribers[slot], self._keys.channel)
            self._backplane = shared.backplanes[self.key_prefix]
            namespace_id = (self.key_prefix, self._settings.namespace_check_interval)
            if namespace_id not in shared.namespaces:
                shared.namespaces[namespace_id] = Namespace(
                    self._keys, self._settings.namespace_check_interval, shared.purger, self._backplane
                )
            self._namespace = shared.namespaces[namespace_id]
            tags_id = (self.key_prefix, float(self._settings.options["TAG_VERSION_TTL"]))
            if tags_id not in shared.tag_versions:
                tag_versions = TagVersions(self.key_prefix, tags_id[1], self._backplane)
                tag_versions.outbox = self._make_outbox(tag_versions)
                shared.tag_versions[tags_id] = tag_versions
            self._tags = shared.tag_versions[tags_id]

    def _make_outbox(self, tag_versions: TagVersions) -> Outbox:
        shared, options, namespace, prefix, backplane = (
            self._shared,
            self._settings.options,
            self._namespace,
            self.key_prefix,
            self._backplane,
        )
        directory = options["OUTBOX_DIR"]
        if directory is None:
            directory = default_outbox_dir()

        def publish(landed: dict[str, int]) -> None:
            shared.topology.execute_batch(
                [backplane.publish_call("tag", prefix, tag, version) for tag, version in landed.items()]
            )

        def count(what: str) -> None:
            with _counts_lock:
                shared.failure_counts[what] = shared.failure_counts.get(what, 0) + 1

        return Outbox(
            prefix,
            shared.topology,
            int(options["OUTBOX_SIZE"]),
            Path(directory) if directory else None,
            tag_versions.tag_key,
            publish,
            lambda: run_plan(shared.topology, namespace.bump()),
            count,
        )

    # -- drivers: the only place that does I/O and applies the failure policy ------------------------------
    def _run(self, plan: Plan, operation: str, fallback: Any = None) -> Any:
        topology = self._shared.topology
        try:
            request = next(plan)
            while True:
                try:
                    kind = type(request)
                    if kind is Call:
                        reply = topology.execute(request)
                    elif kind is Guarded:
                        reply = self._run(request.plan, request.operation, request.fallback)
                    elif kind is Compute:
                        try:
                            reply = request.function(*request.args)
                        except Exception as error:  # user code: the plan may clean up (release a lease)
                            request = plan.throw(error)
                            continue
                    elif kind is Sleep:
                        reply = time.sleep(request.seconds)
                    elif kind is Spawn:
                        reply = _spawn_thread(self, request)
                    else:
                        reply = topology.execute_batch(request)
                except ResponseError as error:
                    # A command error (not an outage) goes back into the plan, which may translate it.
                    request = plan.throw(error)
                    continue
                request = plan.send(reply)
        except StopIteration as done:
            return done.value
        except OUTAGE_ERRORS as error:
            return self._failures.handle(operation, error, fallback)
        except PermissionRefusedError as error:
            self._note_acl(error)
            raise

    async def _arun(self, plan: Plan, operation: str, fallback: Any = None) -> Any:
        topology = self._async_topology()
        try:
            request = next(plan)
            while True:
                try:
                    kind = type(request)
                    if kind is Call:
                        reply = await topology.execute(request)
                    elif kind is Guarded:
                        reply = await self._arun(request.plan, request.operation, request.fallback)
                    elif kind is Compute:
                        try:
                            reply = await _maybe_await(request.function(*request.args))
                        except Exception as error:  # user code: the plan may clean up (release a lease)
                            request = plan.throw(error)
                            continue
                    elif kind is Sleep:
                        reply = await asyncio.sleep(request.seconds)
                    elif kind is Spawn:
                        reply = _spawn_task(self, request)
                    else:
                        reply = await topology.execute_batch(request)
                except ResponseError as error:
                    # A command error (not an outage) goes back into the plan, which may translate it.
                    request = plan.throw(error)
                    continue
                request = plan.send(reply)
        except StopIteration as done:
            return done.value
        except OUTAGE_ERRORS as error:
            return self._failures.handle(operation, error, fallback)
        except PermissionRefusedError as error:
            self._note_acl(error)
            raise

    def _note_acl(self, error: PermissionRefusedError) -> None:
        if not getattr(error, "acl_noted", False):  # a nested plan's driver may have seen it first
            error.acl_noted = True
            error.add_note(
                f"Every key and the channel of KEY_PREFIX {self.key_prefix!r} are covered by the ACL patterns "
                f"{self._keys.acl_patterns()}"
            )

    def _async_topology(self) -> AsyncClusterTopology:
        loop = asyncio.get_running_loop()
        topology = self._shared.async_topologies.get(loop)
        if topology is None:
            topology = self._shared.async_topologies[loop] = AsyncClusterTopology(self._shared.state)
        return topology

    # -- pure helpers ---------------------------------------------------------------------------------
    def validate_key(self, key: str) -> None:
        """Django's CacheKeyWarning checks, run only for keys that could trigger them (same warnings)."""
        if len(key) > 250 or _KEY_MAY_WARN.search(key):
            super().validate_key(key)

    def _made_key(self, key: Any, version: int | None) -> str:
        if not isinstance(key, str):
            raise TypeError(f"cache keys must be str, got {type(key).__name__}: {key!r}")
        made = self.make_and_validate_key(key, version=version)
        if not made.isascii():
            try:
                made.encode()
            except UnicodeEncodeError as error:  # a lone surrogate: no UTF-8 form, so no Redis key
                raise InvalidCacheKey(
                    f"cache key {key!r} cannot be encoded as UTF-8: {error.reason}"
                ) from None
        return made

    def _physical_key(self, key: Any, version: int | None) -> Plan:
        made = self._made_key(key, version)
        head = yield from self._namespace.current()
        return self._keys.entry(head, made)

    def _physical_keys(self, keys: Iterable[Any], version: int | None) -> Plan:
        made = {self._made_key(key, version): key for key in keys}
        head = yield from self._namespace.current()
        entry = self._keys.entry
        return {entry(head, m): key for m, key in made.items()}

    def _physical_of(self, head: bytes, key: Any, version: int | None = None) -> bytes:
        """The physical key of `key` under `head` (what `self._namespace.current()` gave): for features that
        make several keys under one namespace read."""
        return self._keys.entry(head, self._made_key(key, version))

    def _expiry_ms(self, timeout: Any) -> int | None:
        """Milliseconds to live: None for 'forever', 0 for 'do not keep' (Django's 0 and negatives)."""
        return expiry_ms(self.default_timeout if timeout is DEFAULT_TIMEOUT else timeout)

    def _set_args(self, physical: bytes, data: bytes, expiry_ms: int | None, *flags: str) -> tuple:
        if expiry_ms is None:
            return ("SET", physical, data, *flags)
        return ("SET", physical, data, "PX", expiry_ms, *flags)

    def _decode(self, data: bytes, physical: bytes) -> tuple[Any, dict[str, int] | None]:
        """(value, tag stamps) of what `physical` holds. A value that fails verification or decoding is a
        miss (counted, logged)."""
        try:
            value, tags = self._codec.decode_stamped(data, self._keys.identity(physical))
            if value is EXPIRED:
                return _MISSING, None
            return value, tags
        except (SignatureError, UndecodableValueError) as error:
            self._decode_failed(error)
            return _MISSING, None

    def _decode_failed(self, error: Exception) -> None:
        self._failures.count("undecodable")
        logger.warning("ignoring a stored value that cannot be used (%s: %s)", type(error).__name__, error)

    # -- plans ----------------------------------------------------------------------------------------
    def _get_plan(self, key: Any, default: Any, version: int | None) -> Plan:
        physical = yield from self._physical_key(key, version)
        data = yield Call(physical, ("GET", physical), read=True)
        if data is None:
            return default
        found = yield from self._valid_values({key: (physical, data)})
        return found.get(key, default)

    def _replicas_listed(self, key: bytes) -> int:
        """How many replicas the slot map lists for `key`'s slot; as many as anyone asks before one is loaded."""
        slot_map = self._shared.state.slot_map
        return slot_map.replica_count(key) if slot_map is not None else sys.maxsize

    def _valid_values(self, stored: Mapping[Any, tuple[bytes, bytes]]) -> Plan:
        """Decode stored bytes (key -> (physical key, bytes)); drop what cannot be decoded and what carries
        a stale or missing tag."""
        values, stamps = {}, {}
        held_verdict = self._tags.held_verdict
        for key, (physical, data) in stored.items():
            value, tags = self._decode(data, physical)
            if value is _MISSING:
                continue
            if tags:
                verdict = held_verdict(tags)  # usually settled in-process, without a round trip
                if verdict is False:
                    continue
                if verdict is None:
                    stamps[key] = tags
            values[key] = value
        if stamps:
            needed = list(dict.fromkeys(tag for tags in stamps.values() for tag in tags))
            current = yield from self._tags.current(needed)
            for key, tags in stamps.items():
                if not stamps_are_current(tags, current):
                    del values[key]
        return values

    def _stamps(self, tags: list[str], expiry_ms: int | None) -> Plan:
        """Current versions of (validated) `tags` for an entry that Redis keeps `expiry_ms` (None: forever):
        read before any value is computed; the tag keys are created if missing and made to outlive it."""
        if not tags:
            return None
        return (yield from self._tags.for_write(tags, expiry_ms))

    def _write_plan(
        self,
        key: Any,
        value: Any,
        timeout: Any,
        version: int | None,
        tags: Any,
        only_new: bool,
        stamps: Any = None,
    ) -> Plan:
        """set() and add(): one SET (NX for add) of the encoded value, stamped with its tags' versions."""
        made = self._made_key(key, version)
        expiry_ms = self._expiry_ms(timeout)
        prepared = None
        if stamps is None:
            tags = validate_tags(tags)
            if tags:
                prepared = self._prepared(value, key)
            stamps = yield from self._stamps(tags, expiry_ms)
        head = yield from self._namespace.current()
        physical = self._keys.entry(head, made)
        data = self._encode(value, key, physical, stamps, prepared)
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
            return bool((yield Call(physical, self._set_args(physical, data, expiry_ms), repairable=True)))
        if (yield Call(physical, self._set_args(physical, data, expiry_ms, "NX"), repairable=True)):
            return True
        # Something is stored. If it is dead (a stale tag, undecodable), it must not block add(): replace
        # it, but only if it is still those exact bytes, so a live value written meanwhile is never lost.
        existing = yield Call(physical, ("GET", physical))
        if existing is None or (yield from self._valid_values({key: (physical, existing)})):
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
        expiry_ms = self._expiry_ms(timeout)  # a bad timeout is refused before anything is read or written
        value = yield Guarded(self._get_plan(key, _MISSING, version), "get", _MISSING)
        if value is not _MISSING:
            return value
        # Tag versions are read before the value is computed: an invalidation that lands during the
        # computation makes the stored entry born stale instead of hiding it from the invalidation.
        stamps = None
        if tags:
            stamps = yield Guarded(self._stamps(tags, expiry_ms), "get_or_set", _MISSING)
        if callable(default):
            default = yield Compute(default)
        if stamps is _MISSING:
            return default  # the tags could not be read: store nothing rather than store it unstamped
        added = yield Guarded(
            self._write_plan(key, default, timeout, version, tags, True, stamps), "add", False
        )
        if added:
            return default
        # Someone else stored a value between our get and our add: theirs wins, as in Django.
        return (yield Guarded(self._get_plan(key, default, version), "get", default))

    def _get_many_or_set_plan(
        self, keys: Iterable[Any], factory: Callable, timeout: Any, version: int | None, tags: Any
    ) -> Plan:
        keys = list(keys)
        tags = validate_tags(tags)
        expiry_ms = self._expiry_ms(timeout)
        found = yield Guarded(self._get_many_plan(keys, version), "get_many", {})
        missing = [key for key in keys if key not in found]
        if missing:
            stamps = None
            if tags:
                stamps = yield Guarded(self._stamps(tags, expiry_ms), "get_many_or_set", _MISSING)
            computed = self._only_requested((yield Compute(factory, (missing,))), missing)
            if computed and stamps is not _MISSING:
                yield Guarded(self._set_many_plan(computed, timeout, version, tags, stamps), "set_many", [])
            found.update(computed)
        return {key: found[key] for key in keys if key in found}

    def _encode(
        self,
        value: Any,
        key: Any,
        physical: bytes,
        stamps: dict[str, int] | None = None,
        prepared: tuple[bytes, int] | None = None,
    ) -> bytes:
        """The bytes to store under `physical` (the signature binds it); `key` names it in errors."""
        try:
            return self._codec.encode(value, self._keys.identity(physical), tags=stamps, prepared=prepared)
        except Exception as error:
            error.add_note(f"while encoding the value for cache key {key!r}; nothing was written")
            raise

    def _prepared(self, value: Any, key: Any) -> tuple[bytes, int]:
        """What _encode needs of `value`, made before a tagged write touches its tag keys: a value that
        cannot be stored is refused with nothing written, tag keys included."""
        try:
            return self._codec.prepare(value)
        except Exception as error:
            error.add_note(f"while encoding the value for cache key {key!r}; nothing was written")
            raise

    def _delete_plan(self, key: Any, version: int | None) -> Plan:
        physical = yield from self._physical_key(key, version)
        return bool((yield Call(physical, ("DEL", physical), repairable=True)))

    def _has_key_plan(self, key: Any, version: int | None) -> Plan:
        # A GET, not EXISTS: an entry whose tag was invalidated must not count as present.
        value = yield from self._get_plan(key, _MISSING, version)
        return value is not _MISSING

    def _get_many_plan(self, keys: Iterable[Any], version: int | None) -> Plan:
        keys = keys if isinstance(keys, list | tuple) else list(keys)
        if len(keys) <= BATCH_SLICE:
            return (yield from self._get_slice_plan(keys, version))
        found: dict[Any, Any] = {}  # in slices: what a slice holds in flight is freed before the next
        for start in range(0, len(keys), BATCH_SLICE):
            found.update((yield from self._get_slice_plan(keys[start : start + BATCH_SLICE], version)))
        return found

    def _get_slice_plan(self, keys: Iterable[Any], version: int | None) -> Plan:
        physical = yield from self._physical_keys(keys, version)
        if not physical:
            return {}
        replies = yield [Call(p, ("GET", p), read=True) for p in physical]
        stored = {}
        for (location, key), data in zip(physical.items(), replies, strict=True):
            if data is None or (
                isinstance(data, BaseException) and not self._failures.check_item("get_many", data)
            ):
                continue
            stored[key] = (location, data)
        return (yield from self._valid_values(stored))

    def _set_many_plan(
        self, data: Mapping[Any, Any], timeout: Any, version: int | None, tags: Any = None, stamps: Any = None
    ) -> Plan:
        made = [(self._made_key(key, version), key) for key in data]
        expiry_ms = self._expiry_ms(timeout)
        prepared: list[Any] = [None] * len(made)
        if stamps is None:
            tags = validate_tags(tags)
            if tags:
                prepared = [self._prepared(data[key], key) for _, key in made]
            stamps = yield from self._stamps(tags, expiry_ms)
        head = yield from self._namespace.current()
        physical = [self._keys.entry(head, m) for m, _ in made]
        encoded = [
            self._encode(data[key], key, p, stamps, ready)
            for (_, key), p, ready in zip(made, physical, prepared, strict=True)
        ]
        calls = []
        for location, value in zip(physical, encoded, strict=True):
            args = ("DEL", location) if expiry_ms == 0 else self._set_args(location, value, expiry_ms)
            calls.append(Call(location, args, repairable=True))
        if not calls:
            return []
        replies = yield calls
        return [
            key
            for (_, key), reply in zip(made, replies, strict=True)
            if not self._failures.check_item("set_many", reply)
        ]

    def _invalidate_tags_plan(self, tags: Any) -> Plan:
        tags = validate_tags(tags, limit=None)
        if not tags:
            return 0
        return (yield from self._tags.invalidate(tags))

    def _delete_many_plan(self, keys: Iterable[Any], version: int | None) -> Plan:
        physical = yield from self._physical_keys(keys, version)
        if physical:
            replies = yield [Call(p, ("DEL", p), repairable=True) for p in physical]
            for reply in replies:
                self._failures.check_item("delete_many", reply)

    def _incr_plan(self, key: Any, delta: int, version: int | None, negate: bool = False) -> Plan:
        if isinstance(delta, bool) or not isinstance(delta, int):
            raise TypeError(f"incr/decr delta must be an int, got {type(delta).__name__}")
        if negate:
            delta = -delta
        if not _INT64_MIN <= delta <= _INT64_MAX:
            raise OverflowError(f"incr/decr delta {delta} does not fit in a 64-bit integer")
        physical = yield from self._physical_key(key, version)
        try:
            value = yield Call(
                physical,
                ("EVAL", scripts.INCR_IF_PRESENT, 1, physical, delta),
                idempotent=False,
                repairable=True,
            )
        except ResponseError as error:
            message = str(error)
            if "not an integer" in message:
                raise TypeError(f"cache value of {key!r} is not an integer") from error
            if "overflow" in message:
                raise OverflowError(f"incrementing {key!r} by {delta} overflows a 64-bit integer") from error
            raise
        if value is None:
            raise ValueError(f"Key '{key}' not found")
        return value

    def _touch_plan(self, key: Any, timeout: Any, version: int | None) -> Plan:
        physical = yield from self._physical_key(key, version)
        expiry_ms = self._expiry_ms(timeout)
        if expiry_ms is None:
            reply = yield Call(physical, ("EVAL", scripts.PERSIST_IF_PRESENT, 1, physical), repairable=True)
        elif expiry_ms == 0:
            reply = yield Call(physical, ("DEL", physical), repairable=True)
        else:
            reply = yield Call(physical, ("PEXPIRE", physical, expiry_ms), repairable=True)
        return bool(reply)

    def _ttl_plan(self, key: Any, version: int | None) -> Plan:
        physical = yield from self._physical_key(key, version)
        milliseconds = yield Call(physical, ("PTTL", physical), read=True)
        if milliseconds == -2:
            return 0
        if milliseconds == -1:
            return None
        return math.ceil(milliseconds / 1000)

    def _incr_version_plan(self, key: Any, delta: int, version: int | None) -> Plan:
        version = self.version if version is None else version
        old = yield from self._physical_key(key, version)
        new = yield from self._physical_key(key, version + delta)
        data, milliseconds = yield [Call(old, ("GET", old)), Call(old, ("PTTL", old))]
        for reply in (data, milliseconds):
            if isinstance(reply, BaseException):
                raise reply
        if data is not None:
            # The value moves with its envelope, tags and remaining lifetime; its signature is made anew
            # for the new key (it binds the version), once the old one verifies: as a get() would, a value
            # that does not verify counts as missing.
            try:
                data = self._codec.rebind(data, self._keys.identity(old), self._keys.identity(new))
            except (SignatureError, UndecodableValueError) as error:
                self._decode_failed(error)
                data = None
        if data is None:
            raise ValueError(f"Key '{key}' not found")
        expiry_ms = None if milliseconds < 0 else max(1, milliseconds)
        yield Call(new, self._set_args(new, data, expiry_ms), repairable=True)
        yield Call(old, ("DEL", old), repairable=True)
        return version + delta

    def _clear_plan(self) -> Plan:
        yield from self._namespace.bump()
        return True

    # -- Django's API, sync ---------------------------------------------------------------------------
    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        return self._run(self._get_plan(key, default, version), "get", default)

    def set(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
        tags: Iterable[str] | None = None,
    ) -> None:
        self._run(self._write_plan(key, value, timeout, version, tags, False), "set")

    def add(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
        tags: Iterable[str] | None = None,
    ) -> bool:
        return self._run(self._write_plan(key, value, timeout, version, tags, True), "add", False)

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
            return self._run(self._get_or_set_plan(key, default, timeout, version, tags), "get_or_set")
        policy = stampede.policy_for(self, stale, beta)
        return stampede.get_or_compute(self, key, version, default, timeout, tags, policy, "get_or_set")

    def delete(self, key: Any, version: int | None = None) -> bool:
        return self._run(self._delete_plan(key, version), "delete", False)

    def has_key(self, key: Any, version: int | None = None) -> bool:
        return self._run(self._has_key_plan(key, version), "has_key", False)

    def get_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        return self._run(self._get_many_plan(keys, version), "get_many", {})

    def set_many(
        self,
        data: Mapping[Any, Any],
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
        tags: Iterable[str] | None = None,
    ) -> list:
        return self._run(self._set_many_plan(data, timeout, version, tags), "set_many", list(data))

    def invalidate_tags(self, *tags: str) -> int:
        """Invalidate every entry carrying any of `tags`, in O(1) per tag. Outages raise CacheUnavailable:
        an invalidation is never silently dropped."""
        return self._run_strict(self._invalidate_tags_plan(tags), "invalidate_tags")

    def _run_strict(self, plan: Plan, operation: str) -> Any:
        return self._run(plan, operation, _STRICT)

    async def _arun_strict(self, plan: Plan, operation: str) -> Any:
        return await self._arun(plan, operation, _STRICT)

    def delete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        self._run(self._delete_many_plan(keys, version), "delete_many")

    def incr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        return self._incr_result(self._run(self._incr_plan(key, delta, version), "incr", _MISSING), key)

    def decr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        return self._incr_result(
            self._run(self._incr_plan(key, delta, version, negate=True), "incr", _MISSING), key
        )

    def touch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        return self._run(self._touch_plan(key, timeout, version), "touch", False)

    def incr_version(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        result = self._run(self._incr_version_plan(key, delta, version), "incr_version", _MISSING)
        return self._incr_result(result, key)

    def clear(self) -> bool:
        return self._run(self._clear_plan(), "clear", False)

    def close(self, **kwargs: Any) -> None:
        """Called by Django after every request; connections are pooled per process, so nothing to do."""

    # -- extensions, sync -----------------------------------------------------------------------------
    def ttl(self, key: Any, version: int | None = None) -> int | None:
        """Seconds left (rounded up); None if the key never expires; 0 if it does not exist."""
        return self._run(self._ttl_plan(key, version), "ttl", 0)

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
        return self._run(self._get_many_or_set_plan(keys, factory, timeout, version, tags), "get_many_or_set")

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
            client = self._shared.topology.client_for(physical)
        except OUTAGE_ERRORS as error:
            raise CacheUnavailable(f"cache lock: cannot reach the node for {key!r}: {error}") from error
        return client.lock(
            physical, timeout=timeout, sleep=sleep, blocking=blocking, blocking_timeout=blocking_timeout
        )

    # -- Django's API, async (native: asyncio connections, no thread hop) ----------------------------------
    async def aget(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        return await self._arun(self._get_plan(key, default, version), "get", default)

    async def aset(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
        tags: Iterable[str] | None = None,
    ) -> None:
        await self._arun(self._write_plan(key, value, timeout, version, tags, False), "set")

    async def aadd(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
        tags: Iterable[str] | None = None,
    ) -> bool:
        return await self._arun(self._write_plan(key, value, timeout, version, tags, True), "add", False)

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
            return await self._arun(self._get_or_set_plan(key, default, timeout, version, tags), "get_or_set")
        policy = stampede.policy_for(self, stale, beta)
        return await stampede.aget_or_compute(
            self, key, version, default, timeout, tags, policy, "get_or_set"
        )

    async def adelete(self, key: Any, version: int | None = None) -> bool:
        return await self._arun(self._delete_plan(key, version), "delete", False)

    async def ahas_key(self, key: Any, version: int | None = None) -> bool:
        return await self._arun(self._has_key_plan(key, version), "has_key", False)

    async def aget_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        return await self._arun(self._get_many_plan(keys, version), "get_many", {})

    async def aset_many(
        self,
        data: Mapping[Any, Any],
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
        tags: Iterable[str] | None = None,
    ) -> list:
        return await self._arun(self._set_many_plan(data, timeout, version, tags), "set_many", list(data))

    async def ainvalidate_tags(self, *tags: str) -> int:
        return await self._arun(self._invalidate_tags_plan(tags), "invalidate_tags", _STRICT)

    async def adelete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        await self._arun(self._delete_many_plan(keys, version), "delete_many")

    async def aincr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        return self._incr_result(
            await self._arun(self._incr_plan(key, delta, version), "incr", _MISSING), key
        )

    async def adecr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        return self._incr_result(
            await self._arun(self._incr_plan(key, delta, version, negate=True), "incr", _MISSING), key
        )

    @staticmethod
    def _incr_result(result: Any, key: Any) -> Any:
        # During an outage the key is as good as missing: Django's contract for that is ValueError.
        if result is _MISSING:
            raise ValueError(f"Key '{key}' not found (cache unavailable)")
        return result

    async def atouch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        return await self._arun(self._touch_plan(key, timeout, version), "touch", False)

    async def aincr_version(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        result = await self._arun(self._incr_version_plan(key, delta, version), "incr_version", _MISSING)
        return self._incr_result(result, key)

    async def aclear(self) -> bool:
        return await self._arun(self._clear_plan(), "clear", False)

    async def aclose(self, **kwargs: Any) -> None:
        """Connections are pooled per event loop and live as long as it does."""

    async def attl(self, key: Any, version: int | None = None) -> int | None:
        return await self._arun(self._ttl_plan(key, version), "ttl", 0)

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
        return await self._arun(plan, "get_many_or_set")

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
            client = await self._async_topology().client_for(physical)
        except OUTAGE_ERRORS as error:
            raise CacheUnavailable(f"cache lock: cannot reach the node for {key!r}: {error}") from error
        return client.lock(
            physical, timeout=timeout, sleep=sleep, blocking=blocking, blocking_timeout=blocking_timeout
        )

    def _lock_key(self, key: Any, version: int | None) -> bytes:
        return self._keys.beside("lock", self._made_key(key, version))

    # -- introspection -----------------------------------------------------------------------------------
    @property
    def failure_counts(self) -> dict[str, int]:
        """Outages turned into misses/dropped writes (and undecodable values), per operation, since this
        process first used this cluster; shared by every instance with the same connection settings."""
        return dict(self._failures.counts)

    def physical_key(self, key: Any, version: int | None = None) -> bytes:
        """The exact Redis key a cache key is stored under: `<KEY_PREFIX>:<generation>:<VERSION>:<key>`."""
        return self._run(self._physical_key(key, version), "physical_key")
