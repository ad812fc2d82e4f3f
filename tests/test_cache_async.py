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


def _connections_received(cluster) -> int:
    import redis

    return sum(redis.Redis(port=port).info("stats")["total_connections_received"] for port in cluster.ports)


def _primaries(cluster) -> list[int]:
    import redis

    return [port for port in cluster.ports if redis.Redis(port=port).info("replication")["role"] == "master"]


async def test_concurrent_async_calls_share_one_connection_per_node(cluster):
    # The default (short) connect timeout: a burst opens no connection of its own, so a machine too busy
    # to answer 200 connects in time has nothing to time out.
    cache = make_cache()
    before, failures_before = _connections_received(cluster), cache.failure_counts
    await cache.aset_many({f"k{i}": i for i in range(200)})
    results = await asyncio.gather(*(cache.aget(f"k{i}") for i in range(200)))
    results += await asyncio.gather(*(cache.aget(f"k{i}") for i in range(200)))
    opened = _connections_received(cluster) - before - len(cluster.ports)  # less the counting's own
    assert results == list(range(200)) * 2
    assert cache.failure_counts == failures_before
    # One connection per primary for this event loop, whatever the width of the burst (it was ~330 for
    # these 200 reads before the connections were shared).
    assert opened <= len(_primaries(cluster))


async def test_cancelled_callers_never_shift_the_replies_of_the_others(cluster):
    cache = make_cache()
    values = {f"c{i}": f"value {i}" * (1 + i % 7) for i in range(300)}
    await cache.aset_many(values)
    failures_before = cache.failure_counts
    tasks = {key: asyncio.ensure_future(cache.aget(key)) for key in values}
    await asyncio.sleep(0)  # every task has sent its GET (or is about to): its reply is owed
    cancelled = set(list(values)[::3])
    for key in cancelled:
        tasks[key].cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    for key, task in tasks.items():
        if key in cancelled:
            assert task.cancelled()
        else:
            assert task.result() == values[key]
    # The connections go on serving in order: a batch and single reads right after get their own values.
    assert await cache.aget_many(list(values)) == values
    keys = list(values)[:50]
    assert await asyncio.gather(*(cache.aget(key) for key in keys)) == [values[key] for key in keys]
    assert cache.failure_counts == failures_before


async def test_a_busy_event_loop_does_not_make_a_healthy_node_look_hung(cluster):
    """Replies that arrived while the loop was blocked longer than SOCKET_TIMEOUT are read before the
    timeout is judged: the node answered in time, the loop was late."""
    import time

    cache = make_cache(OPTIONS={"SOCKET_TIMEOUT": 0.2, "SOCKET_CONNECT_TIMEOUT": 0.2})
    await cache.aset_many({f"b{i}": i for i in range(100)})
    failures_before = cache.failure_counts
    tasks = [asyncio.ensure_future(cache.aget(f"b{i}")) for i in range(100)]
    for _ in range(3):
        await asyncio.sleep(0)  # the GETs leave
    time.sleep(0.8)  # the loop is busy elsewhere (a CPU-bound view, a loaded machine) for 4 timeouts
    assert await asyncio.gather(*tasks) == list(range(100))
    assert cache.failure_counts == failures_before
    assert all(
        cache.core.shared.state.breakers(node).state == "closed" for node in cache.core.topology.primaries()
    )


def test_a_connect_the_loop_was_too_busy_to_finish_in_time_is_not_a_node_failure(cluster):
    """The process did not run for longer than SOCKET_CONNECT_TIMEOUT while its connects were under way
    (a loaded machine): the kernel connected the sockets meanwhile, so the nodes answered in time. The
    stall comes after 0 to 7 turns of a new event loop, so that it lands at every stage of the opens."""
    import time

    cache = make_cache(OPTIONS={"SOCKET_CONNECT_TIMEOUT": 0.1})
    cache.set_many({f"n{i}": i for i in range(60)})
    failures_before = cache.failure_counts

    async def stalled_after(turns: int) -> list[int]:
        tasks = [asyncio.ensure_future(cache.aget(f"n{i}")) for i in range(60)]
        for _ in range(turns):
            await asyncio.sleep(0)
        time.sleep(0.3)  # three connect timeouts without the process running
        try:
            return await asyncio.gather(*tasks)
        finally:
            await cache.core.async_topology().close()

    for turns in range(8):
        assert asyncio.run(stalled_after(turns)) == list(range(60)), turns
    assert cache.failure_counts == failures_before


async def test_a_connection_the_server_closed_is_replaced_and_the_read_sent_again(cluster):
    import redis

    cache = make_cache(OPTIONS={"RETRIES": 1})
    await cache.aset_many({f"d{i}": i for i in range(30)})
    assert await cache.aget("d0") == 0
    for port in _primaries(cluster):
        node = redis.Redis(port=port)
        node.client_kill_filter(_type="normal", skipme=True)
        node.close()
    failures_before = cache.failure_counts
    # Every shared connection is dead now; the first reads on each find out, open a new one, and retry.
    assert await asyncio.gather(*(cache.aget(f"d{i}") for i in range(30))) == list(range(30))
    assert cache.failure_counts == failures_before


def test_sync_reads_after_the_server_closed_every_pooled_connection_need_one_retry(cluster):
    """The sync pool keeps idle connections per node; when one turns out dead, the others opened before
    it are dropped with it, so RETRIES=1 is enough however many idle connections there were."""
    import threading

    import redis

    cache = make_cache(OPTIONS={"RETRIES": 1})
    cache.set_many({f"s{i}": i for i in range(30)})
    barrier = threading.Barrier(8)

    def read():  # eight threads at once: eight connections per node end up idle in the pool
        barrier.wait()
        return [cache.get(f"s{i}") for i in range(30)]

    threads = [threading.Thread(target=read) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for port in _primaries(cluster):
        node = redis.Redis(port=port)
        node.client_kill_filter(_type="normal", skipme=True)
        node.close()
    failures_before = cache.failure_counts
    assert [cache.get(f"s{i}") for i in range(30)] == list(range(30))
    assert cache.failure_counts == failures_before


def test_a_batch_whose_pooled_connections_the_server_closed_is_sent_again(cluster):
    import redis

    cache = make_cache(OPTIONS={"RETRIES": 1})
    cache.set_many({f"m{i}": i for i in range(100)})
    for port in _primaries(cluster):
        node = redis.Redis(port=port)
        node.client_kill_filter(_type="normal", skipme=True)
        node.close()
    failures_before = cache.failure_counts
    assert cache.set_many({f"m{i}": -i for i in range(100)}) == []
    assert cache.get_many([f"m{i}" for i in range(100)]) == {f"m{i}": -i for i in range(100)}
    assert cache.failure_counts == failures_before
