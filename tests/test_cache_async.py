"""The async API is native (asyncio connections) and behaves exactly like the sync one."""

from __future__ import annotations

import asyncio
import threading

import pytest

from django_distcache.topology import AsyncClusterTopology
from tests.conftest import make_cache


async def test_async_api_round_trip(cache):
    await cache.aset("a", {"x": 1})
    assert await cache.aget("a") == {"x": 1}
    assert await cache.aadd("a", "other") is False
    assert await cache.aadd("b", "new") is True
    assert await cache.ahas_key("b") is True
    assert await cache.aget_many(["a", "b", "c"]) == {"a": {"x": 1}, "b": "new"}
    assert await cache.aset_many({f"k{i}": i for i in range(50)}) == []
    assert await cache.aget_many([f"k{i}" for i in range(50)]) == {f"k{i}": i for i in range(50)}
    await cache.adelete_many([f"k{i}" for i in range(50)])
    assert await cache.aget_many([f"k{i}" for i in range(50)]) == {}
    assert await cache.adelete("a") is True
    assert await cache.adelete("a") is False
    # What one API writes, the other reads.
    cache.set("sync", "written sync")
    assert await cache.aget("sync") == "written sync"


async def test_async_incr_ttl_touch_versions(cache):
    with pytest.raises(ValueError):
        await cache.aincr("missing")
    await cache.aset("n", 10, timeout=100)
    assert await cache.aincr("n", 5) == 15
    assert await cache.adecr("n") == 14
    assert 99 <= await cache.attl("n") <= 100
    assert await cache.atouch("n", 10) is True
    assert await cache.attl("n") <= 10
    assert await cache.apersist("n") is True
    assert await cache.attl("n") is None
    assert await cache.aexpire("n", 30) is True
    assert await cache.aincr_version("n") == 2
    assert await cache.aget("n", version=2) == 14
    assert await cache.aget("n") is None
    assert 29 <= await cache.attl("n", version=2) <= 30  # the remaining lifetime moved with the value
    assert await cache.adecr_version("n", version=2) == 1
    assert await cache.aget_or_set("g", lambda: "computed") == "computed"
    assert await cache.aget_or_set("g", lambda: "again") == "computed"


async def test_async_get_many_or_set_accepts_async_factories(cache):
    seen = []

    async def factory(missing):
        seen.append(missing)
        await asyncio.sleep(0)
        return {key: key * 2 for key in missing}

    await cache.aset("a", "cached")
    assert await cache.aget_many_or_set(["a", "b"], factory) == {"a": "cached", "b": "bb"}
    assert seen == [["b"]]


async def test_async_clear(cache):
    await cache.aset("k", "v")
    assert await cache.aclear() is True
    assert await cache.aget("k") is None


async def test_async_lock(cache):
    lock = await cache.alock("res", timeout=5)
    assert await lock.acquire(blocking=False)
    other = await cache.alock("res", timeout=5)
    assert not await other.acquire(blocking=False)
    await lock.release()


async def test_async_uses_asyncio_connections_not_threads(cache, monkeypatch):
    """Native async: the reply is read on the event loop's thread, through the asyncio topology."""
    used = []
    real = AsyncClusterTopology.execute

    async def spy(self, call):
        used.append(threading.current_thread())
        return await real(self, call)

    monkeypatch.setattr(AsyncClusterTopology, "execute", spy)
    await cache.aset("k", "v")
    assert await cache.aget("k") == "v"
    assert used and all(thread is threading.current_thread() for thread in used)


async def test_concurrent_async_calls_share_the_loop_safely():
    cache = make_cache()
    await cache.aset_many({f"k{i}": i for i in range(200)})
    results = await asyncio.gather(*(cache.aget(f"k{i}") for i in range(200)))
    assert results == list(range(200))


def test_each_event_loop_gets_its_own_connections(cache):
    cache.set("k", "v")
    assert asyncio.run(cache.aget("k")) == "v"
    assert asyncio.run(cache.aget("k")) == "v"  # a second loop: no "attached to a different loop"
