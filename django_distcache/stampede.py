"""Stampede protection: when a hot entry is missing or expiring, one caller in the fleet recomputes it.

Three layers, used by `get_or_set`, `@cached`, `@cached_view` and refresh-ahead:

1. *Single-flight* in the process: concurrent callers of one key wait for one computation.
2. *A distributed lease* (`SET NX` of a random token with a TTL, released only by its holder): across all
   processes one caller computes; the others poll for its value. A crashed holder's lease expires, so it
   never blocks the fleet for longer than the lease timeout; then another caller takes over.
3. *Probabilistic early recomputation* (XFetch, Vattani et al., VLDB 2015): an entry stores how long its
   computation took (delta) and its logical expiry; a read recomputes early when
   `now - delta * beta * ln(random()) >= expiry`, so on a hot key one reader refreshes shortly before
   expiry instead of every reader missing at once. With a `stale` window the entry is kept that much
   longer physically; a reader past the logical expiry is served the stale value while one caller (in the
   background, or through Celery) refreshes it.

Invalidated entries (a stale tag) are never served as stale: only entries past their timeout are.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import logging
import math
import os
import random
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from . import scripts
from .codec import SignatureError, UndecodableValueError
from .conf import MAX_EXPIRY_MS, is_number
from .core import MISSING, Compute, Core, Guarded, PlanOf, Sleep, Spawn
from .tags import stamps_are_current, validate_tags
from .topology import Call

logger = logging.getLogger("django_distcache.stampede")

POLL_FIRST, POLL_MAX = 0.01, 0.1  # seconds between two looks of a waiter, growing

RefreshQueue = Callable[[Any, int | None, str], object]
"""Queues the refresh of (key, version) elsewhere (Celery); the refresher releases the lease `token`."""


@dataclass(slots=True)
class Found:
    """What a stampede-aware read found: fresh, fresh but due for early recomputation, stale, or a miss."""

    state: Literal["fresh", "early", "stale", "miss"]
    value: Any = None


MISS = Found("miss")
UNREACHABLE: Any = object()
"""What fetch_plan(on_miss="return") returns when it could not reach the cache (a miss returns MISSING)."""


@dataclass(frozen=True, slots=True)
class Unstored:
    """What a computation returns for a value that must be handed back but not stored (a page that may
    not be shared): the callers get the wrapper, the cache gets nothing."""

    value: Any


@dataclass(frozen=True, slots=True)
class Policy:
    """How one call protects itself. `stale`: seconds an expired entry may still be served while it is
    refreshed; `beta`: XFetch's eagerness (0 turns early recomputation off, 1 is the paper's default);
    `lease_timeout`: how long one computation may hold the lease; `refresh`: how a stale or early entry
    is refreshed — "inline" (the reader that got the lease computes), "thread" (a background thread) or a
    callable that queues it elsewhere (Celery)."""

    stale: float = 0.0
    beta: float = 1.0
    lease_timeout: float = 10.0
    refresh: str | RefreshQueue = "inline"


def policy_for(
    core: Core,
    stale: float | None = None,
    beta: float | None = None,
    refresh: str | RefreshQueue | None = None,
) -> Policy:
    settings = core.settings
    stale = 0.0 if stale is None else stale
    if not is_number(stale) or not 0 <= stale < math.inf:
        raise ValueError(f"stale must be a finite number of seconds >= 0, got {stale!r}")
    beta = settings.xfetch_beta if beta is None else beta
    if not is_number(beta) or not 0 <= beta < math.inf:
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if refresh is None:
        refresh = "thread" if stale else "inline"
    if refresh not in ("inline", "thread") and not callable(refresh):
        raise ValueError(f"refresh must be 'inline', 'thread' or a callable, got {refresh!r}")
    return Policy(float(stale), float(beta), settings.stampede_lease_timeout, refresh)


# -- reads ------------------------------------------------------------------------------------------------
def xfetch_due(soft_expiry: float, recompute_time: float, beta: float, now: float, draw: float) -> bool:
    """XFetch's test; `draw` is uniform in (0, 1]."""
    if beta <= 0 or recompute_time <= 0:
        return False
    return now - recompute_time * beta * math.log(draw) >= soft_expiry


def read_plan(core: Core, physical: bytes, beta: float) -> PlanOf[Found]:
    data = yield Call(physical, ("GET", physical), read=True)
    if data is None:
        return MISS
    try:
        envelope = core.codec.decode_envelope(data, core.keys.identity(physical))
    except (SignatureError, UndecodableValueError) as error:
        core.decode_failed(error)
        return MISS
    if envelope.tags:
        verdict = core.tags.held_verdict(envelope.tags)
        if verdict is None:
            current = yield from core.tags.current(list(envelope.tags))
            verdict = stamps_are_current(envelope.tags, current)
        if not verdict:
            return MISS  # invalidated: never served, not even as stale
    if envelope.soft_expiry is None:
        return Found("fresh", envelope.value)
    now = time.time()
    if now >= envelope.soft_expiry:
        return Found("stale", envelope.value)
    if xfetch_due(envelope.soft_expiry, envelope.recompute_time or 0.0, beta, now, 1.0 - random.random()):
        return Found("early", envelope.value)
    return Found("fresh", envelope.value)


# -- leases -----------------------------------------------------------------------------------------------
def lease_key(core: Core, made_key: str) -> bytes:
    """`<KEY_PREFIX>:~lease:<VERSION>:<key>`: outside the namespace, so clear() never voids a lease."""
    return core.keys.beside("lease", made_key)


def new_token() -> str:
    return os.urandom(12).hex()


def acquire_plan(lease: bytes, token: str, timeout: float) -> PlanOf[bool]:
    return bool((yield Call(lease, ("SET", lease, token, "NX", "PX", max(1, int(timeout * 1000))))))


def release_plan(lease: bytes, token: str) -> PlanOf[None]:
    yield Call(lease, ("EVAL", scripts.RELEASE_IF_OWNER, 1, lease, token))


def held_plan(lease: bytes) -> PlanOf[bool]:
    return bool((yield Call(lease, ("EXISTS", lease), read=False)))


# -- writes -----------------------------------------------------------------------------------------------
def store_plan(
    core: Core,
    physical: bytes,
    key: Any,
    value: Any,
    timeout: Any,
    stale: float,
    stamps: dict[str, int] | None,
    recompute_time: float,
) -> PlanOf[bool]:
    """SET with the logical expiry and the computation's duration in the envelope; kept `stale` longer."""
    expiry_ms = core.expiry_ms(timeout)
    if expiry_ms == 0:
        yield Call(physical, ("DEL", physical), repairable=True)
        return False
    now = time.time()
    soft_expiry = None if expiry_ms is None else now + expiry_ms / 1000
    if type(value) is int and not stamps and not stale:
        soft_expiry = None  # stored as a bare integer, so incr()/decr() keep working on it
    try:
        data = core.codec.encode(
            value,
            core.keys.identity(physical),
            soft_expiry=soft_expiry,
            recompute_time=recompute_time,
            tags=stamps or None,
            now=now,
        )
    except Exception as error:
        error.add_note(f"while encoding the value for cache key {key!r}; nothing was written")
        raise
    args = core.set_args(physical, data, kept_ms(expiry_ms, stale))
    return bool((yield Call(physical, args, repairable=True)))


def kept_ms(expiry_ms: int | None, stale: float) -> int | None:
    """How long Redis keeps an entry of logical expiry `expiry_ms`: `stale` seconds more (None: forever)."""
    return min(MAX_EXPIRY_MS, expiry_ms + int(stale * 1000)) if expiry_ms else expiry_ms


# -- the whole fetch ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Entry:
    """One entry under stampede protection: where it lives, its lease, and how it is computed and stored."""

    core: Core
    key: Any
    version: int | None
    physical: bytes
    lease: bytes
    compute: Callable[[], Any]
    timeout: Any
    tags: list[str]
    policy: Policy


def fetch_plan(
    core: Core,
    key: Any,
    version: int | None,
    compute: Callable[[], Any],
    timeout: Any,
    tags: Iterable[str] | None,
    policy: Policy,
    on_miss: Literal["compute", "return"] = "compute",
) -> PlanOf[Any]:
    """The value of `key`, computing it (once in the fleet) when it is missing, due, or stale. With
    `on_miss="return"`, a miss returns MISSING instead, and an unreachable cache UNREACHABLE (the caller
    then joins the process's single-flight for the computation: hits never wait behind it)."""
    checked_tags = validate_tags(tags)
    core.expiry_ms(timeout)  # a bad timeout is refused before anything is computed or written
    lease = lease_key(core, core.made_key(key, version))
    physical = yield Guarded(core.physical_key(key, version), "get", None)
    if physical is None:  # the cache is unreachable: compute, store nothing
        if on_miss == "return":
            return UNREACHABLE  # (computed once in the process all the same, by the single-flight)
        return (yield Compute(compute))
    entry = Entry(core, key, version, physical, lease, compute, timeout, checked_tags, policy)
    found = yield Guarded(read_plan(core, physical, policy.beta), "get", MISS)
    if found.state == "fresh":
        return found.value
    if found.state == "early" or (found.state == "stale" and policy.stale):
        return (yield from serve_held_plan(entry, found.value))
    # A miss (or stale while the caller allows no staleness): one caller computes, the others wait for it.
    if on_miss == "return":
        return MISSING
    return (yield from compute_once_plan(entry))


def serve_held_plan(entry: Entry, held: Any) -> PlanOf[Any]:
    """Serve `held` (early or stale) and have it refreshed by whoever gets the lease: inline, in the
    background, or queued, as the policy says; a reader that does not get the lease just serves it."""
    token = new_token()
    if not (yield Guarded(acquire_plan(entry.lease, token, entry.policy.lease_timeout), "lease", False)):
        return held
    refresh = entry.policy.refresh
    if refresh == "inline":
        return (yield from _refresh_inline_plan(entry, token, held))
    if refresh == "thread":
        yield Spawn(functools.partial(refresh_plan, entry, token), "refresh")
    elif callable(refresh):
        yield from _queue_refresh_plan(entry, refresh, token)
    return held


def _refresh_inline_plan(entry: Entry, token: str, held: Any) -> PlanOf[Any]:
    """Recompute now; if the user's computation fails, serve `held` (fail-safe: it is still good)."""
    failures: list[BaseException] = []
    noting = dataclasses.replace(entry, compute=_noting(entry.compute, failures))
    try:
        return (yield from refresh_plan(noting, token))
    except Exception as error:
        if not any(error is failure for failure in failures):
            raise  # not the user's computation failing (a WRONGTYPE, a bug): never hidden
        logger.warning(
            "recomputing %r failed (%s: %s); served the value held", entry.key, type(error).__name__, error
        )
        return held


def _queue_refresh_plan(entry: Entry, queue: RefreshQueue, token: str) -> PlanOf[None]:
    """Hand the refresh (and the lease) to `queue`; if it cannot be queued, give the lease back."""
    try:
        yield Compute(queue, (entry.key, entry.version, token))
    except Exception as error:  # noqa: BLE001 - the broker is not ours: the held value is served anyway
        logger.warning("could not queue the refresh of %r: %s", entry.key, error)
        yield Guarded(release_plan(entry.lease, token), "lease", None)


def compute_once_plan(entry: Entry) -> PlanOf[Any]:
    """A miss: the caller that takes the lease computes and stores; the others wait for its value, and
    take over if it finishes without storing one or dies."""
    core, lease = entry.core, entry.lease
    while True:
        token = new_token()
        acquired = yield Guarded(acquire_plan(lease, token, entry.policy.lease_timeout), "lease", None)
        if acquired:
            # Looked at again now that the lease is ours: a holder that stored the value and released the
            # lease between our read (a miss) and our acquire has done the work (the lease orders the two).
            found = yield Guarded(read_plan(core, entry.physical, 0.0), "get", MISS)
            if found.state == "fresh":
                yield Guarded(release_plan(lease, token), "lease", None)
                return found.value
        if acquired is not False:  # ours, or the cache is down (then everyone computes: nothing to share)
            return (yield from refresh_plan(entry, token if acquired else None))
        found = yield from _wait_for_holder_plan(entry)
        if found is not None:
            return found.value


def _wait_for_holder_plan(entry: Entry) -> PlanOf[Found | None]:
    """Poll, backing off, for the lease holder's value; None when the lease is free again (the holder
    finished without storing, or died and its lease expired) or the lease timeout has passed: our turn."""
    pause, deadline = POLL_FIRST, time.monotonic() + entry.policy.lease_timeout
    while time.monotonic() < deadline:
        yield Sleep(pause)
        pause = min(POLL_MAX, pause * 2)
        found: Found = yield Guarded(read_plan(entry.core, entry.physical, 0.0), "get", MISS)
        if found.state in ("fresh", "early"):
            return found
        if not (yield Guarded(held_plan(entry.lease), "lease", False)):
            return None
    return None


def _noting(compute: Callable[[], Any], failures: list[BaseException]) -> Callable[[], Any]:
    """`compute`, noting in `failures` what it raises (when called, or when its awaitable is awaited), so
    that a fail-safe serves the value held for the user's own errors and for nothing else."""

    def run() -> Any:
        try:
            result = compute()
        except Exception as error:
            failures.append(error)
            raise
        return _anoting(result, failures) if inspect.isawaitable(result) else result

    return run


async def _anoting(awaitable: Awaitable[Any], failures: list[BaseException]) -> Any:
    try:
        return await awaitable
    except Exception as error:
        failures.append(error)
        raise


def refresh_plan(entry: Entry, token: str | None) -> PlanOf[Any]:
    """Compute under the lease (`token`, released at the end; None: none held) and store; tag versions
    are read before the computation starts."""
    core, policy = entry.core, entry.policy
    try:
        stamps = None
        if entry.tags:
            expiry_ms = kept_ms(core.expiry_ms(entry.timeout), policy.stale)
            stamps = yield Guarded(core.stamps(entry.tags, expiry_ms), "get_or_set", MISSING)
        started = time.monotonic()
        value = yield Compute(entry.compute)
        elapsed = time.monotonic() - started
        if stamps is not MISSING and not isinstance(value, Unstored):
            store = store_plan(
                core, entry.physical, entry.key, value, entry.timeout, policy.stale, stamps, elapsed
            )
            yield Guarded(store, "set", False)
        return value
    finally:
        if token is not None:
            yield Guarded(release_plan(entry.lease, token), "lease", None)


# -- single-flight ------------------------------------------------------------------------------------
class _Flight:
    __slots__ = ("done", "result", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class SingleFlight:
    """Concurrent callers of one key in this process share one computation (threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[Hashable, _Flight] = {}

    def do(self, key: Hashable, function: Callable[[], Any]) -> Any:
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.result
        try:
            flight.result = function()
            return flight.result
        except BaseException as error:
            flight.error = error
            raise
        finally:
            with self._lock:
                self._flights.pop(key, None)
            flight.done.set()


class AsyncSingleFlight:
    """The same for coroutines, per event loop."""

    def __init__(self) -> None:
        self._flights: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[Hashable, asyncio.Future[Any]]
        ] = weakref.WeakKeyDictionary()

    async def do(self, key: Hashable, function: Callable[[], Awaitable[Any]]) -> Any:
        loop = asyncio.get_running_loop()
        flights = self._flights.setdefault(loop, {})
        future = flights.get(key)
        if future is not None:
            return await asyncio.shield(future)
        future = flights[key] = loop.create_future()
        try:
            result = await function()
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        else:
            future.set_result(result)
            return result
        finally:
            flights.pop(key, None)


single_flight = SingleFlight()
async_single_flight = AsyncSingleFlight()


def flight_key(core: Core, key: Any, version: int | None) -> tuple[int, str]:
    return (id(core.shared), core.made_key(key, version))


def get_or_compute(
    core: Core,
    key: Any,
    version: int | None,
    compute: Callable[[], Any],
    timeout: Any,
    tags: Iterable[str] | None,
    policy: Policy,
    operation: str,
) -> Any:
    """A read (hits, early and stale refreshes) and, on a miss, one computation per process (threads
    wait for it) and per fleet (the lease)."""
    fetch = functools.partial(fetch_plan, core, key, version, compute, timeout, tags, policy)
    value = core.run_strict(fetch(on_miss="return"), operation)
    leader_plan = _leader_plan(value, fetch, compute)
    if leader_plan is None:
        return value
    return single_flight.do(flight_key(core, key, version), lambda: core.run_strict(leader_plan(), operation))


async def aget_or_compute(
    core: Core,
    key: Any,
    version: int | None,
    compute: Callable[[], Any],
    timeout: Any,
    tags: Iterable[str] | None,
    policy: Policy,
    operation: str,
) -> Any:
    """`get_or_compute` on the running loop: the same plan, coroutines sharing one computation."""
    fetch = functools.partial(fetch_plan, core, key, version, compute, timeout, tags, policy)
    value = await core.arun_strict(fetch(on_miss="return"), operation)
    leader_plan = _leader_plan(value, fetch, compute)
    if leader_plan is None:
        return value
    return await async_single_flight.do(
        flight_key(core, key, version), lambda: core.arun_strict(leader_plan(), operation)
    )


def _leader_plan(
    found: Any, fetch: Callable[[], PlanOf[Any]], compute: Callable[[], Any]
) -> Callable[[], PlanOf[Any]] | None:
    """What the single-flight's leader runs after a first read found `found`: the whole fetch after a
    miss; only the computation when the cache was just found unreachable (a hung node would cost every
    caller a second timeout); nothing after a hit."""
    if found is MISSING:
        return fetch
    if found is UNREACHABLE:
        return functools.partial(_compute_plan, compute)
    return None


def _compute_plan(compute: Callable[[], Any]) -> PlanOf[Any]:
    return (yield Compute(compute))
