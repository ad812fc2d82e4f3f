"""Stampede protection (stampede.py) through get_or_set and @cached, with real threads and processes."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import django_distcache
from django_distcache import stampede
from tests.conftest import Peer, make_cache


def test_xfetch_test_is_the_papers_formula():
    # now - delta * beta * ln(draw) >= expiry
    assert stampede.xfetch_due(soft_expiry=100.0, recompute_time=1.0, beta=1.0, now=99.0, draw=0.3)
    assert not stampede.xfetch_due(soft_expiry=100.0, recompute_time=1.0, beta=1.0, now=90.0, draw=0.3)
    assert not stampede.xfetch_due(soft_expiry=100.0, recompute_time=1.0, beta=0.0, now=99.99, draw=0.01)
    assert not stampede.xfetch_due(soft_expiry=100.0, recompute_time=0.0, beta=1.0, now=99.99, draw=0.01)


def _concurrently(count, function):
    barrier = threading.Barrier(count)
    results, errors = [], []

    def run():
        barrier.wait()
        try:
            results.append(function())
        except Exception as error:  # noqa: BLE001 - reported by the caller's assertions
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors


def _count_asking(monkeypatch, flight, callers):
    """Counts the callers that missed and asked `flight` (the process's single-flight) for the computation;
    the event is set once `callers` have. A loader that waits for it holds its value back until every
    caller has missed, so that none finds the value stored and skips the sharing, however the threads or
    the loop happen to be scheduled. (A caller that computes on its own never asks: the counts fail.)"""
    asked, all_asked = [], threading.Event()
    join_flight = flight.do

    def note():
        asked.append(1)
        if len(asked) == callers:
            all_asked.set()

    def do(key, function):
        note()
        return join_flight(key, function)

    async def ado(key, function):
        note()
        return await join_flight(key, function)

    monkeypatch.setattr(flight, "do", ado if isinstance(flight, stampede.AsyncSingleFlight) else do)
    return asked, all_asked


def test_fifty_threads_missing_one_key_run_the_loader_once(cache, monkeypatch):
    calls = []
    asked, all_asked = _count_asking(monkeypatch, stampede.single_flight, 50)

    def loader():
        calls.append(1)
        all_asked.wait(30)
        return "value"

    results, errors = _concurrently(50, lambda: cache.get_or_set("hot", loader, timeout=60))
    assert (len(calls), len(asked), errors, results) == (1, 50, [], ["value"] * 50)


# Timeouts that a machine busy with other work still meets, for tests of what healthy processes do: a lease
# call that times out is answered by the failure policy (compute anyway: a slow page, never an error page),
# which test_failure_policy.py tests, and must not decide what a test of the lease sees.
PATIENT = {"SOCKET_TIMEOUT": 5.0, "SOCKET_CONNECT_TIMEOUT": 5.0}


def test_fifty_misses_across_two_processes_run_the_loader_once():
    cache = make_cache(OPTIONS=PATIENT)
    cache.set("loader-calls", 0)
    with Peer(cache.key_prefix, PATIENT) as one, Peer(cache.key_prefix, PATIENT) as two:
        start_at = time.time() + 1.0
        # Both processes are asked at once: each answers when its 25 threads are done.
        for peer in (one, two):
            peer.process.stdin.write(
                peer._json.dumps(["stampede", "shared", "loader-calls", 25, start_at, 0.2]) + "\n"
            )
            peer.process.stdin.flush()
        answers = [one._read(), two._read()]
    assert [len(answer) for answer in answers] == [25, 25]
    assert {value for answer in answers for value in answer} == {"computed"}
    assert cache.get("loader-calls") == 1


def test_a_value_stored_between_a_miss_and_taking_the_lease_is_served_not_recomputed(cache, monkeypatch):
    """Another process's holder can store its value and release the lease between this caller's read (a
    miss) and its acquire; the caller then holds a free lease on a fresh entry and must not compute again.
    (Across two loaded processes this made the loader run twice now and then.)"""
    real_acquire = stampede.acquire_plan

    def acquire_just_after_another_holder_finished(lease, token, timeout):
        cache.set("raced", "theirs")  # the other holder stored its value and released the lease
        return (yield from real_acquire(lease, token, timeout))

    monkeypatch.setattr(stampede, "acquire_plan", acquire_just_after_another_holder_finished)
    calls = []
    assert cache.get_or_set("raced", lambda: calls.append(1) or "ours", timeout=60) == "theirs"
    assert calls == []
    made = cache.make_and_validate_key("raced")
    assert (
        cache.core.run(stampede.held_plan(stampede.lease_key(cache.core, made)), "test") is False
    )  # released


def test_a_crashed_lease_holder_blocks_nobody_past_the_lease_timeout():
    cache = make_cache(OPTIONS={"STAMPEDE_LEASE_TIMEOUT": 0.5})
    made = cache.make_and_validate_key("orphan")
    # A process took the lease and died without releasing it.
    cache.core.run(stampede.acquire_plan(stampede.lease_key(cache.core, made), "dead-process", 0.5), "test")
    started = time.monotonic()
    assert cache.get_or_set("orphan", lambda: "recomputed", timeout=60) == "recomputed"
    # It waited for the lease to expire (0.5 s), and not for anything much longer. (The upper bound only
    # tells the one from the other: a loaded machine may take seconds more.)
    assert 0.3 <= time.monotonic() - started < 10.0


def test_a_failing_loader_releases_the_lease_at_once(cache):
    def failing():
        raise RuntimeError("database down")

    with pytest.raises(RuntimeError, match="database down"):
        cache.get_or_set("fragile", failing, timeout=60)
    assert not _lease_held(cache, "fragile")  # released: nobody waits 10 s for it to expire
    assert cache.get_or_set("fragile", lambda: "ok", timeout=60) == "ok"


def _lease_held(cache, key):
    lease = stampede.lease_key(cache.core, cache.make_and_validate_key(key))
    return cache.core.run(stampede.held_plan(lease), "test")


def test_loader_errors_reach_every_waiting_thread(cache):
    def failing():
        time.sleep(0.1)
        raise ValueError("bad")

    results, errors = _concurrently(10, lambda: cache.get_or_set("bad", failing, timeout=60))
    assert results == [] and len(errors) == 10 and all(isinstance(e, ValueError) for e in errors)


def test_stale_while_revalidate_serves_the_old_value_and_refreshes_in_the_background(cache):
    versions = iter(["v1", "v2"])
    served = threading.Event()

    def loader():
        value = next(versions)
        if value == "v2":
            served.wait(30)  # the refresh cannot finish before the stale value was served
        return value

    assert cache.get_or_set("swr", loader, timeout=0.3, stale=30) == "v1"
    time.sleep(0.4)
    assert cache.get("swr") is None  # past its timeout: a plain read misses
    # Stale, at once: a caller that waited for the refresh would wait for `served`, which only this sets.
    assert cache.get_or_set("swr", loader, timeout=0.3, stale=30) == "v1"
    served.set()
    deadline = time.monotonic() + 30
    while cache.get("swr") != "v2":
        assert time.monotonic() < deadline, "the background refresh did not store v2"
        time.sleep(0.02)


def test_an_invalidated_entry_is_never_served_stale(cache):
    values = iter(["old", "new"])
    assert cache.get_or_set("tagged", lambda: next(values), timeout=60, tags=["t"], stale=60) == "old"
    cache.invalidate_tags("t")
    assert cache.get_or_set("tagged", lambda: next(values), timeout=60, tags=["t"], stale=60) == "new"


class _Clock:
    """Stands in for the `time` module inside stampede.py. The wall clock, against which soft expiries are
    set and read, is the test's to move; `monotonic`, which times a computation (XFetch's delta), runs
    `ahead` seconds ahead of the real one, so a loader can take a known time without sleeping it."""

    def __init__(self) -> None:
        self.wall = time.time()
        self.ahead = 0.0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return time.monotonic() + self.ahead


def _expiry_burst(cache, beta, monkeypatch, readers=8, timeout=600.0, recompute=1.0):
    """One hot key read up to its expiry, then by `readers` threads at once just past it, on a clock the
    test moves (Redis keeps the entry: only the logical expiry is passed). Returns (loader calls before the
    expiry, loader calls in the burst, waits in the burst): a wait is a reader that found the entry expired
    and did not run the loader itself, i.e. it waited for another's computation.

    Before the expiry one reader reads every 0.05 s over the last 10 s (10 deltas): with XFetch one of them
    recomputes early, and the chance that none does is below 1e-12. In the burst, the computation holds
    until every reader that found the entry expired has asked for it, so the count of waits does not
    depend on how the threads happen to be scheduled."""
    clock = _Clock()
    monkeypatch.setattr(stampede, "time", clock)
    calls, waits, asked = [], [], []
    all_asked = threading.Event()
    flight = stampede.single_flight
    join_flight = flight.do

    def counting_do(key, function):
        me, before = threading.get_ident(), len(calls)
        asked.append(me)
        if len(asked) == readers:
            all_asked.set()
        try:
            return join_flight(key, function)
        finally:
            if me not in calls[before:]:
                waits.append(me)

    monkeypatch.setattr(flight, "do", counting_do)

    def loader():
        calls.append(threading.get_ident())
        if burst_started.is_set():
            all_asked.wait(30)  # (a reader that never asks makes the counts, and the test, fail)
        clock.ahead += recompute
        return "page"

    burst_started = threading.Event()
    cache.get_or_set("hot", loader, timeout=timeout, beta=beta)
    expiry = clock.wall + timeout
    del calls[:], waits[:], asked[:]
    for step in range(200, 0, -1):
        clock.wall = expiry - step * 0.05
        assert cache.get_or_set("hot", loader, timeout=timeout, beta=beta) == "page"
    early = len(calls)
    clock.wall = expiry + 0.01
    del calls[:], waits[:], asked[:]
    burst_started.set()
    results, errors = _concurrently(
        readers, lambda: cache.get_or_set("hot", loader, timeout=timeout, beta=beta)
    )
    assert (errors, results) == ([], ["page"] * readers)
    monkeypatch.undo()
    return early, len(calls), len(waits)


def test_xfetch_removes_the_burst_of_misses_at_expiry(monkeypatch):
    # Without XFetch the entry expires under its readers: one recomputes, the seven others wait for it.
    assert _expiry_burst(make_cache(), 0.0, monkeypatch) == (0, 1, 7)
    # With it, one reader recomputed shortly before the expiry, alone, while the others kept reading the
    # live entry; at the expiry nobody misses.
    assert _expiry_burst(make_cache(), 1.0, monkeypatch) == (1, 0, 0)


def test_get_or_set_keeps_integers_incrementable(cache):
    assert cache.get_or_set("count", lambda: 5, timeout=60) == 5
    assert cache.incr("count") == 6


async def test_async_callers_of_one_key_share_one_computation(cache, monkeypatch):
    callers, calls, acquired = 20, [], []
    asked, all_asked = _count_asking(monkeypatch, stampede.async_single_flight, callers)
    acquire = stampede.acquire_plan

    def counting_acquire(lease, token, timeout):
        acquired.append(token)
        return (yield from acquire(lease, token, timeout))

    monkeypatch.setattr(stampede, "acquire_plan", counting_acquire)

    async def loader():
        calls.append(1)
        await asyncio.to_thread(all_asked.wait, 30)
        return "async-value"

    results = await asyncio.gather(
        *(cache.aget_or_set("async-hot", loader, timeout=60) for _ in range(callers))
    )
    assert results == ["async-value"] * callers
    # One computation, and one lease taken for it: the others waited in the process, not on the lease.
    assert (len(calls), len(asked), len(acquired)) == (1, callers, 1)


def _unreachable_cache():
    """A cache whose only node does not exist: every call meets a refused connection."""
    return make_cache(LOCATION=["redis://127.0.0.1:1"], OPTIONS={"SOCKET_CONNECT_TIMEOUT": 0.1})


def test_threads_share_one_computation_while_the_cache_is_unreachable(monkeypatch):
    """The lease needs the cache; the process's own single-flight does not, and is what keeps a cache
    outage from sending every concurrent caller to the database at once."""
    cache, callers, calls = _unreachable_cache(), 10, []
    asked, all_asked = _count_asking(monkeypatch, stampede.single_flight, callers)

    def loader():
        calls.append(1)
        all_asked.wait(30)
        return "computed"

    results, errors = _concurrently(callers, lambda: cache.get_or_set("down", loader, timeout=60))
    assert (len(calls), len(asked), errors, results) == (1, callers, [], ["computed"] * callers)


# -- @cached --------------------------------------------------------------------------------------------
def test_cached_memoizes_with_tags_and_invalidate(settings):
    calls = []

    @django_distcache.cached(timeout=60, tags=lambda slug, page=1: [f"product:{slug}"])
    def summary(slug, page=1):
        calls.append((slug, page))
        return f"{slug}/{page}/{len(calls)}"

    assert summary("shoe") == "shoe/1/1"
    assert summary("shoe", page=1) == "shoe/1/1"  # defaults bound: one entry
    assert summary(slug="shoe") == "shoe/1/1"
    assert summary("shoe", 2) == "shoe/2/2"
    summary.invalidate("shoe")
    assert summary("shoe") == "shoe/1/3"
    django_distcache.invalidate_tags("product:shoe")
    assert summary("shoe", 2) == "shoe/2/4"
    summary.invalidate("shoe")
    summary.invalidate("shoe", 2)


def test_cached_key_template_and_bad_arguments():
    @django_distcache.cached(timeout=60, key="greeting:{name}")
    def greet(name):
        return f"hello {name}"

    assert greet.key_for("ann") == "greeting:ann"
    assert greet("ann") == "hello ann"
    with pytest.raises(ValueError, match="refresh"):
        django_distcache.cached(refresh="later")
    with pytest.raises(TypeError, match="tags must be a list"):
        django_distcache.cached(tags="one")
    with pytest.raises(ValueError, match="stale"):
        django_distcache.cached(stale=-1)
    greet.invalidate("ann")


async def test_cached_async_function():
    calls = []

    @django_distcache.cached(timeout=60)
    async def fetch(number):
        calls.append(number)
        await asyncio.sleep(0.05)
        return number * 2

    results = await asyncio.gather(*(fetch(21) for _ in range(10)))
    assert set(results) == {42} and calls == [21]
    assert await fetch(21) == 42 and calls == [21]
    await fetch.ainvalidate(21)
    assert await fetch(21) == 42 and calls == [21, 21]
    await fetch.ainvalidate(21)


def test_refresh_ahead_through_celery_recomputes_in_the_worker(start_worker):
    import os

    from tests.stampede_functions import computed_where

    start_worker("refresher")
    computed_where.invalidate("x")
    assert computed_where("x") == f"x@{os.getpid()}"  # a miss: computed by the caller
    time.sleep(0.7)  # past the timeout, inside the stale window
    assert computed_where("x") == f"x@{os.getpid()}"  # served stale...
    deadline = time.monotonic() + 30
    while True:  # ...while the worker recomputes it
        value = make_cache(KEY_PREFIX="tests").get(computed_where.key_for("x"))
        if value is not None and value != f"x@{os.getpid()}":
            break
        assert time.monotonic() < deadline, "the Celery refresh did not store a new value"
        time.sleep(0.05)
    assert value.startswith("x@") and value != f"x@{os.getpid()}"
    computed_where.invalidate("x")


def test_a_refresh_that_cannot_be_queued_still_serves_the_stale_value(cache):
    from django_distcache.stampede import policy_for

    attempts = []

    def broken_queue(key, version, token):
        attempts.append(token)
        raise ConnectionError("broker down")

    values = iter(["v1", "v2"])
    policy = policy_for(cache.core, stale=30, refresh=broken_queue)
    from django_distcache import stampede as module

    def fetch():
        return module.get_or_compute(
            cache.core, "queued", None, lambda: next(values), 0.2, None, policy, "test"
        )

    assert fetch() == "v1"
    time.sleep(0.3)
    assert fetch() == "v1"  # stale, served although the refresh could not be queued
    assert not _lease_held(cache, "queued")  # the lease was given back...
    assert fetch() == "v1"
    assert len(attempts) == 2  # ...so the next reader took it and tried to queue the refresh again


def test_a_failing_early_or_stale_recompute_serves_the_value_held(cache):
    def failing():
        raise RuntimeError("database down")

    assert cache.get_or_set("fail-safe", lambda: "kept", timeout=0.2, stale=30) == "kept"
    time.sleep(0.3)
    # A stale entry refreshed inline (refresh="inline" is what get_or_set does without a stale window; here
    # policy_for picks "thread" for stale, so use @cached's inline path through fetch_plan directly).
    from django_distcache import stampede as module

    policy = module.policy_for(cache.core, stale=30, refresh="inline")
    value = module.get_or_compute(cache.core, "fail-safe", None, failing, 0.2, None, policy, "test")
    assert value == "kept"


def test_a_command_error_during_an_inline_refresh_is_raised_not_served_stale(cache, cluster):
    """Only outages and the user's own exceptions may be answered with the value held: a WRONGTYPE met
    while refreshing (here: the refresh's tag key holds a list) is a bug and reaches the caller."""
    from redis.cluster import RedisCluster
    from redis.exceptions import ResponseError

    assert cache.get_or_set("early", lambda: "kept", timeout=60, tags=["fine"]) == "kept"
    client = RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    try:
        client.rpush(cache.core.tags.tag_key("a-list"), "not a version")
        # beta so large that XFetch always finds the entry due: this read refreshes it inline.
        policy = stampede.policy_for(cache.core, beta=1e12, refresh="inline")
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            stampede.get_or_compute(cache.core, "early", None, lambda: "new", 60, ["a-list"], policy, "test")
        failing = stampede.policy_for(cache.core, beta=1e12, refresh="inline")

        def broken():
            raise RuntimeError("database down")

        assert (
            stampede.get_or_compute(cache.core, "early", None, broken, 60, ["fine"], failing, "test")
            == "kept"
        )
    finally:
        client.delete(cache.core.tags.tag_key("a-list"))
        client.close()


def test_an_unsaved_model_instance_is_never_a_key(cache):
    """Keyed by label and pk, two unsaved instances (or one given the pk of a saved row) would share one
    entry and get each other's results."""
    from django.contrib.auth.models import User

    calls = []

    @django_distcache.cached(timeout=60)
    def greeting(user):
        calls.append(user.username)
        return f"hello {user.username}"

    assert greeting(User(username="alice")) == "hello alice"
    assert greeting(User(username="mallory")) == "hello mallory"
    assert greeting(User(pk=1, username="eve")) == "hello eve"
    assert greeting(User(pk=1, username="bob")) == "hello bob"
    assert calls == ["alice", "mallory", "eve", "bob"]  # computed every time, nothing shared
    with pytest.raises(ValueError, match="unsaved"):
        greeting.key_for(User(username="alice"))
