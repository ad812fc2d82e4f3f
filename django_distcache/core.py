"""The core every feature speaks to: plans, the two drivers, the failure policy, key making and encoding.

Each operation is written once, as a *plan*: a generator that yields what it needs — a `Call` or a list of
calls for the topology, or one of the steps below — and receives the replies. `Core.run` drives a plan
with the blocking topology, `Core.arun` with the asyncio one, so key making, encoding and decisions are
shared and only the I/O differs. The drivers are also the one place where an outage becomes the
configured failure policy.

Features (tags, stampede, models, views, warming, memoize) take a `Core`; the Django backend
(`cache.RedisClusterCache`) is Django's API over one. `core_for(alias)` finds the core of a CACHES alias.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast, overload

from django.core.cache import InvalidCacheBackendError, caches
from django.core.cache.backends.base import DEFAULT_TIMEOUT, InvalidCacheKey
from django.core.exceptions import ImproperlyConfigured

from .backplane import Backplane, Subscriber
from .codec import EXPIRED, Codec, SignatureError, TagStamps, UndecodableValueError
from .conf import OUTBOX_SIZE, CacheSettings, build_codec, expiry_ms
from .forksafe import renew_locks_after_fork
from .keys import KeyLayout
from .outbox import Outbox, run_plan
from .plans import MISSING, STRICT, CacheUnavailable, Compute, Guarded, Plan, PlanOf, Sleep, Spawn, T
from .tags import TagVersions, stamps_are_current, validate_tags
from .topology import (
    OUTAGE_ERRORS,
    AsyncClusterTopology,
    Call,
    ClusterTopology,
    CommandError,
    PermissionRefusedError,
    is_outage,
    key_slot,
)
from .topology.base import TopologyState
from .versioning import Namespace, Purger

__all__ = [
    "MISSING",
    "STRICT",
    "CacheUnavailable",
    "Compute",
    "Core",
    "FailurePolicy",
    "Guarded",
    "Plan",
    "PlanOf",
    "SharedState",
    "Sleep",
    "Spawn",
    "core_for",
    "core_of",
]

logger = logging.getLogger("django_distcache")
F = TypeVar("F")


# -- the background spawner ---------------------------------------------------------------------------------
class _Background:
    """Where spawned plans run: four threads for sync callers, tasks on the caller's loop for async ones."""

    def __init__(self) -> None:
        self.pool: ThreadPoolExecutor | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.lock = threading.Lock()
        renew_locks_after_fork(self, "lock")
        os.register_at_fork(after_in_child=self._forget_threads)

    def _forget_threads(self) -> None:
        self.pool = None  # a forked child has none of its parent's threads

    def thread(self, core: Core, request: Spawn) -> None:
        with self.lock:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="distcache-refresh")
            pool = self.pool
        pool.submit(self._run_logged, core, request)

    @staticmethod
    def _run_logged(core: Core, request: Spawn) -> None:
        try:
            core.run(request.plan_factory(), request.operation, None)
        except Exception:  # noqa: BLE001 - a background refresh has no caller to raise to: it logs
            logger.exception("background %s failed", request.operation)
        finally:
            from django.db import close_old_connections  # (a refresh may have read the database)

            close_old_connections()

    def task(self, core: Core, request: Spawn) -> None:
        async def run() -> None:
            try:
                await core.arun(request.plan_factory(), request.operation, None)
            except Exception:  # noqa: BLE001 - as _run_logged
                logger.exception("background %s failed", request.operation)

        task = asyncio.get_running_loop().create_task(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


_background = _Background()


# -- the failure policy -------------------------------------------------------------------------------------
FailureListener = Callable[[str], None]


class FailureCounts:
    """Failures counted per name, and who wants to hear of each: one per cluster (in SharedState)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.listeners: list[FailureListener] = []
        self.lock = threading.Lock()
        renew_locks_after_fork(self, "lock")

    def add(self, what: str) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1
        for listener in list(self.listeners):
            try:
                listener(what)
            except Exception:  # noqa: BLE001 - an observer's bug must not turn a degraded call into an error
                logger.exception("a failure listener raised while %r was counted", what)


class FailurePolicy:
    """Turns outages into misses/dropped writes (logged, counted), or raises when the user chose that.

    `listeners` are called with the name of every failure counted (an operation, or a feature's own
    name such as "namespace" or "undecodable"): the hook for metrics.
    """

    LOG_EVERY = 10.0  # seconds between two warnings for the same operation

    def __init__(self, policy: str, counted: FailureCounts | None = None) -> None:
        self.policy = policy
        self.counted = FailureCounts() if counted is None else counted
        self._last_logged: dict[str, float] = {}

    @property
    def counts(self) -> dict[str, int]:
        return self.counted.counts

    @property
    def listeners(self) -> list[FailureListener]:
        return self.counted.listeners

    def count(self, what: str) -> None:
        self.counted.add(what)

    def note(self, what: str, message: str, *args: Any) -> None:
        """Count `what` and log `message` as a warning, at most once per LOG_EVERY seconds."""
        self.count(what)
        if self._log_due(what):
            logger.warning(message + "; %d so far", *args, self.counts[what])

    def handle(self, operation: str, error: BaseException, fallback: Any) -> Any:
        self.count(operation)
        if self.policy == "raise" or fallback is STRICT:
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


# -- what every core on one cluster shares ------------------------------------------------------------------
@dataclass
class SharedState:
    """What every core with the same cluster settings shares: pools, slot map, namespaces, tag versions,
    and per KEY_PREFIX the invalidation channel's subscriber.

    Django makes a backend instance per thread (and per async context), so keeping connections on the
    instance would open new connections for every request under ASGI.
    """

    state: TopologyState
    topology: ClusterTopology
    purger: Purger
    backplanes: dict[str, Backplane] = field(default_factory=dict)
    subscribers: dict[int, Subscriber] = field(default_factory=dict)  # by the slot of their channels
    failures: FailureCounts = field(default_factory=FailureCounts)
    async_topologies: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncClusterTopology] = field(
        default_factory=weakref.WeakKeyDictionary
    )
    namespaces: dict[tuple[str, float], Namespace] = field(default_factory=dict)
    tag_versions: dict[tuple[str, float], TagVersions] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        renew_locks_after_fork(self, "lock")


class _SharedRegistry:
    def __init__(self) -> None:
        self.by_settings: dict[str, SharedState] = {}
        self.lock = threading.Lock()
        renew_locks_after_fork(self, "lock")

    def for_settings(self, settings: CacheSettings) -> SharedState:
        key = repr(settings.connection)
        shared = self.by_settings.get(key)
        if shared is None:
            with self.lock:
                shared = self.by_settings.get(key)
                if shared is None:
                    state = TopologyState(settings.connection)
                    topology = ClusterTopology(state)
                    shared = self.by_settings[key] = SharedState(state, topology, Purger(topology))
        return shared


_shared = _SharedRegistry()


async def _maybe_await(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


# -- the core -----------------------------------------------------------------------------------------------
class Core:
    """One cache's view of the cluster: its key layout, codec, namespace, tag versions, failure policy,
    and the drivers that run its plans. Everything a feature needs, under names it may rely on."""

    def __init__(
        self,
        settings: CacheSettings,
        *,
        key_prefix: str,
        version: int,
        default_timeout: float | None,
        make_key: Callable[[str, int | None], str],
        strips_prefix: bool,
    ) -> None:
        self.settings = settings
        self.key_prefix = key_prefix
        self.version = version
        self.default_timeout = default_timeout
        self._make_key = make_key
        self.keys = KeyLayout(key_prefix, strips_prefix)
        self.codec: Codec = build_codec(settings, key_prefix)
        self.shared = shared = _shared.for_settings(settings)
        self.topology = shared.topology
        self.failures = FailurePolicy(settings.failure_policy, shared.failures)
        with shared.lock:
            if key_prefix not in shared.backplanes:
                slot = key_slot(self.keys.channel)
                if slot not in shared.subscribers:
                    shared.subscribers[slot] = Subscriber(shared.topology)
                shared.backplanes[key_prefix] = Backplane(shared.subscribers[slot], self.keys.channel)
            self.backplane = shared.backplanes[key_prefix]
            interval = settings.namespace_check_interval
            namespace_id = (key_prefix, interval)
            if namespace_id not in shared.namespaces:
                shared.namespaces[namespace_id] = Namespace(
                    self.keys, interval, shared.purger, self.backplane
                )
            self.namespace = shared.namespaces[namespace_id]
            tags_id = (key_prefix, settings.version_check_interval)
            if tags_id not in shared.tag_versions:
                tag_versions = TagVersions(key_prefix, tags_id[1], self.backplane)
                tag_versions.outbox = self._make_outbox(tag_versions)
                shared.tag_versions[tags_id] = tag_versions
            self.tags = shared.tag_versions[tags_id]

    def _make_outbox(self, tag_versions: TagVersions) -> Outbox:
        topology, namespace, prefix, backplane = (
            self.topology,
            self.namespace,
            self.key_prefix,
            self.backplane,
        )

        def publish(landed: dict[str, int]) -> None:
            topology.execute_batch(
                [backplane.publish_call("tag", prefix, tag, version) for tag, version in landed.items()]
            )

        return Outbox(
            prefix,
            topology,
            OUTBOX_SIZE,
            self.settings.outbox_dir,
            tag_versions.tag_key,
            publish,
            lambda: run_plan(topology, namespace.bump()),
            self.failures.count,
        )

    # -- drivers: the only place that does I/O and applies the failure policy ------------------------------
    @overload
    def run(self, plan: PlanOf[T], operation: str) -> T | None: ...
    @overload
    def run(self, plan: PlanOf[T], operation: str, fallback: F) -> T | F: ...
    def run(self, plan: PlanOf[Any], operation: str, fallback: Any = None) -> Any:
        """Drive `plan` with blocking I/O; an outage becomes `fallback` (or CacheUnavailable)."""
        topology = self.topology
        try:
            request = next(plan)
            while True:
                try:
                    kind = type(request)
                    if kind is Call:
                        reply = topology.execute(request)
                    elif kind is Guarded:
                        reply = self.run(request.plan, request.operation, request.fallback)
                    elif kind is Compute:
                        try:
                            reply = request.function(*request.args)
                        except Exception as error:  # user code: the plan may clean up (release a lease)
                            request = plan.throw(error)
                            continue
                    elif kind is Sleep:
                        time.sleep(request.seconds)
                        reply = None
                    elif kind is Spawn:
                        _background.thread(self, request)
                        reply = None
                    else:
                        reply = topology.execute_batch(request)
                except CommandError as error:
                    # A command error (not an outage) goes back into the plan, which may translate it.
                    request = plan.throw(error)
                    continue
                request = plan.send(reply)
        except StopIteration as done:
            return done.value
        except OUTAGE_ERRORS as error:
            return self.failures.handle(operation, error, fallback)
        except PermissionRefusedError as error:
            self._note_acl(error)
            raise

    @overload
    async def arun(self, plan: PlanOf[T], operation: str) -> T | None: ...
    @overload
    async def arun(self, plan: PlanOf[T], operation: str, fallback: F) -> T | F: ...
    async def arun(self, plan: PlanOf[Any], operation: str, fallback: Any = None) -> Any:
        """Drive `plan` with asyncio I/O on the running loop; same outcomes as `run`."""
        topology = self.async_topology()
        try:
            request = next(plan)
            while True:
                try:
                    kind = type(request)
                    if kind is Call:
                        reply = await topology.execute(request)
                    elif kind is Guarded:
                        reply = await self.arun(request.plan, request.operation, request.fallback)
                    elif kind is Compute:
                        try:
                            reply = await _maybe_await(request.function(*request.args))
                        except Exception as error:  # user code: the plan may clean up (release a lease)
                            request = plan.throw(error)
                            continue
                    elif kind is Sleep:
                        await asyncio.sleep(request.seconds)
                        reply = None
                    elif kind is Spawn:
                        _background.task(self, request)
                        reply = None
                    else:
                        reply = await topology.execute_batch(request)
                except CommandError as error:
                    request = plan.throw(error)
                    continue
                request = plan.send(reply)
        except StopIteration as done:
            return done.value
        except OUTAGE_ERRORS as error:
            return self.failures.handle(operation, error, fallback)
        except PermissionRefusedError as error:
            self._note_acl(error)
            raise

    def run_strict(self, plan: PlanOf[T], operation: str) -> T:
        """Drive a plan that must not degrade: an outage raises CacheUnavailable whatever the policy."""
        return cast(T, self.run(plan, operation, STRICT))  # STRICT is never returned: it raises

    async def arun_strict(self, plan: PlanOf[T], operation: str) -> T:
        return cast(T, await self.arun(plan, operation, STRICT))

    def _note_acl(self, error: PermissionRefusedError) -> None:
        if not getattr(error, "acl_noted", False):  # a nested plan's driver may have seen it first
            error.acl_noted = True  # type: ignore[attr-defined]
            error.add_note(
                f"Every key and the channel of KEY_PREFIX {self.key_prefix!r} are covered by the ACL patterns "
                f"{self.keys.acl_patterns()}"
            )

    def async_topology(self) -> AsyncClusterTopology:
        """The asyncio topology of the running loop (connections belong to one loop)."""
        loop = asyncio.get_running_loop()
        topology = self.shared.async_topologies.get(loop)
        if topology is None:
            topology = self.shared.async_topologies[loop] = AsyncClusterTopology(self.shared.state)
        return topology

    def replicas_listed(self, key: bytes) -> int:
        """How many replicas the slot map lists for `key`'s slot; as many as anyone asks before one is loaded."""
        slot_map = self.shared.state.slot_map
        return slot_map.replica_count(key) if slot_map is not None else sys.maxsize

    # -- keys ---------------------------------------------------------------------------------------------
    def made_key(self, key: Any, version: int | None) -> str:
        """Django's key for `key` (KEY_FUNCTION, KEY_PREFIX, VERSION), validated; TypeError for a non-str."""
        if not isinstance(key, str):
            raise TypeError(f"cache keys must be str, got {type(key).__name__}: {key!r}")
        made = self._make_key(key, version)
        if not made.isascii():
            try:
                made.encode()
            except UnicodeEncodeError as error:  # a lone surrogate: no UTF-8 form, so no Redis key
                raise InvalidCacheKey(
                    f"cache key {key!r} cannot be encoded as UTF-8: {error.reason}"
                ) from None
        return made

    def physical_key(self, key: Any, version: int | None) -> PlanOf[bytes]:
        """The Redis key of `key` under the current namespace generation."""
        made = self.made_key(key, version)
        head = yield from self.namespace.current()
        return self.keys.entry(head, made)

    def physical_keys(self, keys: Iterable[Any], version: int | None) -> PlanOf[dict[bytes, Any]]:
        """{Redis key: key} of `keys` under one read of the namespace generation."""
        make = self._make_key
        made = {}
        for key in keys:  # made_key, with its checks run in full only for what they could refuse
            one = make(key, version) if type(key) is str else self.made_key(key, version)
            if not one.isascii():
                one = self.made_key(key, version)
            made[one] = key
        head = yield from self.namespace.current()
        return dict(zip(self.keys.entries(head, made), made.values(), strict=True))

    def physical_of(self, head: bytes, key: Any, version: int | None = None) -> bytes:
        """The physical key of `key` under `head` (what `namespace.current()` gave): for features that
        make several keys under one namespace read."""
        return self.keys.entry(head, self.made_key(key, version))

    def expiry_ms(self, timeout: Any) -> int | None:
        """Milliseconds to live: None for 'forever', 0 for 'do not keep' (Django's 0 and negatives)."""
        return expiry_ms(self.default_timeout if timeout is DEFAULT_TIMEOUT else timeout)

    @staticmethod
    def set_args(physical: bytes, data: bytes, expiry_ms: int | None, *flags: str) -> tuple[Any, ...]:
        """The SET command storing `data` for `expiry_ms` (None: forever)."""
        if expiry_ms is None:
            return ("SET", physical, data, *flags)
        return ("SET", physical, data, "PX", expiry_ms, *flags)

    # -- values -------------------------------------------------------------------------------------------
    def encode(
        self,
        value: Any,
        key: Any,
        physical: bytes,
        stamps: dict[str, int] | None = None,
        prepared: tuple[bytes, int] | None = None,
    ) -> bytes:
        """The bytes to store under `physical` (the signature binds it); `key` names it in errors."""
        try:
            return self.codec.encode(value, self.keys.identity(physical), tags=stamps, prepared=prepared)
        except Exception as error:
            error.add_note(f"while encoding the value for cache key {key!r}; nothing was written")
            raise

    def prepared(self, value: Any, key: Any) -> tuple[bytes, int]:
        """What `encode` needs of `value`, made before a tagged write touches its tag keys: a value that
        cannot be stored is refused with nothing written, tag keys included."""
        try:
            return self.codec.prepare(value)
        except Exception as error:
            error.add_note(f"while encoding the value for cache key {key!r}; nothing was written")
            raise

    def decode(self, data: bytes, physical: bytes) -> tuple[Any, TagStamps | None]:
        """(value, tag stamps) of what `physical` holds. A value that fails verification or decoding is
        MISSING (counted, logged)."""
        try:
            value, tags = self.codec.decode_stamped(data, self.keys.identity(physical))
            if value is EXPIRED:
                return MISSING, None
            return value, tags
        except (SignatureError, UndecodableValueError) as error:
            self.decode_failed(error)
            return MISSING, None

    def decode_failed(self, error: Exception) -> None:
        self.failures.count("undecodable")
        logger.warning("ignoring a stored value that cannot be used (%s: %s)", type(error).__name__, error)

    def valid_values(self, stored: Mapping[Any, tuple[bytes, bytes]]) -> PlanOf[dict[Any, Any]]:
        """Decode stored bytes (key -> (physical key, bytes)); drop what cannot be decoded and what carries
        a stale or missing tag."""
        values: dict[Any, Any] = {}
        stamps: dict[Any, TagStamps] = {}
        held_verdict = self.tags.held_verdict
        decode, identity_at = self.codec.decode_stamped, self.keys.identity_at  # self.decode, inlined
        for key, (physical, data) in stored.items():
            try:
                value, tags = decode(data, physical[identity_at:])
            except (SignatureError, UndecodableValueError) as error:
                self.decode_failed(error)
                continue
            if value is EXPIRED:
                continue
            if tags:
                verdict = held_verdict(tags)  # usually settled in-process, without a round trip
                if verdict is False:
                    continue
                if verdict is None:
                    stamps[key] = tags
            values[key] = value
        if stamps:
            yield from self._drop_stale(values, stamps)
        return values

    def valid_replies(
        self, physical: Mapping[bytes, Any], replies: list[Any], operation: str
    ) -> PlanOf[dict[Any, Any]]:
        """`valid_values` of a batch of GET `replies`, one per item of `physical` ({physical key: key}), in
        one pass: misses skipped, a reply that is an outage counted under `operation` (a bug raises)."""
        values: dict[Any, Any] = {}
        stamps: dict[Any, TagStamps] = {}
        held_verdict = self.tags.held_verdict
        decode, identity_at = self.codec.decode_stamped, self.keys.identity_at
        check_item = self.failures.check_item
        for (location, key), data in zip(physical.items(), replies, strict=True):
            if data is None:
                continue
            if isinstance(data, BaseException):
                check_item(operation, data)  # raises a bug; an outage is counted
                continue
            try:
                value, tags = decode(data, location[identity_at:])
            except (SignatureError, UndecodableValueError) as error:
                self.decode_failed(error)
                continue
            if value is EXPIRED:
                continue
            if tags:
                verdict = held_verdict(tags)
                if verdict is False:
                    continue
                if verdict is None:
                    stamps[key] = tags
            values[key] = value
        if stamps:
            yield from self._drop_stale(values, stamps)
        return values

    def _drop_stale(self, values: dict[Any, Any], stamps: dict[Any, TagStamps]) -> Plan:
        """Remove from `values` the keys whose tag `stamps` are not current (one read of the tags)."""
        needed = list(dict.fromkeys(tag for tags in stamps.values() for tag in tags))
        current = yield from self.tags.current(needed)
        for key, tags in stamps.items():
            if not stamps_are_current(tags, current):
                del values[key]

    def stamps(self, tags: list[str], expiry_ms: int | None) -> Plan:
        """Current versions of (validated) `tags` for an entry that Redis keeps `expiry_ms` (None: forever):
        read before any value is computed; the tag keys are created if missing and made to outlive it."""
        if not tags:
            return None
        return (yield from self.tags.for_write(tags, expiry_ms))

    def invalidate_tags_plan(self, tags: Any) -> PlanOf[int]:
        """Invalidate every entry carrying any of `tags` (validated here): O(1) per tag."""
        tags = validate_tags(tags, limit=None)
        if not tags:
            return 0
        invalidated: int = yield from self.tags.invalidate(tags)
        return invalidated

    def set_many_plan(
        self,
        data: Mapping[Any, Any],
        timeout: Any,
        version: int | None,
        tags: Any = None,
        stamps: dict[str, int] | None = None,
    ) -> PlanOf[list[Any]]:
        """Store `data` in one batch (tagged with `tags`, or with `stamps` already read); returns the keys
        that could not be stored."""
        made = [(self.made_key(key, version), key) for key in data]
        expiry_ms = self.expiry_ms(timeout)
        prepared: list[tuple[bytes, int] | None] = [None] * len(made)
        if stamps is None:
            tags = validate_tags(tags)
            if tags:
                prepared = [self.prepared(data[key], key) for _, key in made]
            stamps = yield from self.stamps(tags, expiry_ms)
        head = yield from self.namespace.current()
        physical = [self.keys.entry(head, m) for m, _ in made]
        encoded = [
            self.encode(data[key], key, p, stamps, ready)
            for (_, key), p, ready in zip(made, physical, prepared, strict=True)
        ]
        calls = []
        for location, value in zip(physical, encoded, strict=True):
            args = ("DEL", location) if expiry_ms == 0 else self.set_args(location, value, expiry_ms)
            calls.append(Call(location, args, repairable=True))
        if not calls:
            return []
        replies = yield calls
        return [
            key
            for (_, key), reply in zip(made, replies, strict=True)
            if not self.failures.check_item("set_many", reply)
        ]


def core_for(alias: str) -> Core:
    """The core of CACHES[alias]; ImproperlyConfigured if that cache is not this package's backend."""
    try:
        backend = caches[alias]
    except InvalidCacheBackendError as error:
        raise ImproperlyConfigured(f"django_distcache: no cache {alias!r} in CACHES ({error})") from error
    return core_of(backend, alias)


def core_of(backend: object, alias: str = "") -> Core:
    """The core of a cache backend instance; ImproperlyConfigured if it is not this package's backend."""
    core = getattr(backend, "core", None)
    if not isinstance(core, Core):
        name = f"CACHES[{alias!r}]" if alias else "the cache"
        raise ImproperlyConfigured(
            f"django_distcache: {name} is {type(backend).__module__}.{type(backend).__name__}, "
            "not django_distcache.cache.RedisClusterCache"
        )
    return core
