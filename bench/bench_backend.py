"""Our cache backend against raw redis-py (cluster and standalone), django-redis and Django's RedisCache.

    .venv/bin/python -m bench.bench_backend [--markdown] [--keep-cluster] [--reps 5] [--scale 1.0]

Single thread, 100-byte values, every key present (gets are hits). Ours runs on a local 3-primary
Redis Cluster, the standalone baselines on a redis-server of our own; all on loopback. Default TIMEOUT
300 s everywhere; the raw redis-py SETs carry the same PX 300000 so the commands match.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from . import harness
from .harness import Contender, Environment, Row, Target

VALUE = random.Random(100).randbytes(100)  # 100 bytes, the same for everyone
TTL = 300
KEY_COUNT = 1000
BATCH = 100

# A repetition is SLICES slices per contender, interleaved (see harness.measure). Operations per slice at
# --scale 1; per-op medians are reported, so the counts need not match between contenders.
SLICES = 20
SINGLE_OPS = 200
BATCH_CALLS = 15
SLOW_BATCH_CALLS = 3  # a Python loop of 100 RedisCluster GETs is ~10x slower than one get_many

# label -> (what the issue tracker asks for, the check on the row's ratio)
TARGETS = {
    "1": ("get: ours ≥ 1.2× raw RedisCluster.get (ops/s)", Target("1", at_least=1.2)),
    "2": ("get: ours ≥ 0.9× django-redis on standalone (ops/s)", Target("2", at_least=0.9)),
    "3a": ("set: ours ≥ 1.2× raw RedisCluster.set (ops/s)", Target("3a", at_least=1.2)),
    "3b": ("set: ours ≥ 0.9× django-redis on standalone (ops/s)", Target("3b", at_least=0.9)),
    "4a": ("get_many(100): ours ≤ 3× the time of a standalone MGET of 100", Target("4a", at_most=3.0)),
    "4b": ("get_many(100): ours ≥ 2× faster than RedisCluster.mget_nonatomic", Target("4b", at_least=2.0)),
    "4c": (
        "get_many(100): ours ≥ 1.0× django-redis on standalone (base/ours time)",
        Target("4c", at_least=1.0),
    ),
    "5a": ("set_many(100): ours ≤ 3× the time of a standalone MSET of 100", Target("5a", at_most=3.0)),
    "5b": ("set_many(100): ours ≥ 2× faster than RedisCluster.mset_nonatomic", Target("5b", at_least=2.0)),
    "6": ("async: ours aget ≤ 1.3× the time of ours sync get", Target("6", at_most=1.3)),
}


def configure_django(environment: Environment) -> None:
    import django
    from django.conf import settings

    standalone = environment.standalone.url  # database 0
    settings.configure(
        SECRET_KEY="bench-" + os.urandom(16).hex(),
        USE_TZ=True,
        CACHES={
            "default": {
                "BACKEND": "django_distcache.cache.RedisClusterCache",
                "LOCATION": environment.cluster_urls,
                "KEY_PREFIX": "bench",
                "TIMEOUT": TTL,
            },
            "django_redis": {
                "BACKEND": "django_redis.cache.RedisCache",
                "LOCATION": standalone,
                "KEY_PREFIX": "dr",
                "TIMEOUT": TTL,
                "OPTIONS": {"CLIENT_CLASS": "django_redis.client.DefaultClient"},
            },
            "django": {
                "BACKEND": "django.core.cache.backends.redis.RedisCache",
                "LOCATION": standalone,
                "KEY_PREFIX": "dj",
                "TIMEOUT": TTL,
            },
            "locmem": {
                "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
                "LOCATION": "bench",
                "TIMEOUT": TTL,
                "OPTIONS": {"MAX_ENTRIES": 10 * KEY_COUNT},
            },
        },
    )
    django.setup()


# --------------------------------------------------------------------------- loops


def windows(items: Sequence[Any], ops: int) -> Iterator[list[Any]]:
    """Endless successive windows of `ops` items (wrapping around), so that the slices use every item."""
    count = max(1, math.ceil(len(items) / ops))
    return itertools.cycle([[items[(w * ops + i) % len(items)] for i in range(ops)] for w in range(count)])


def each(function: Callable[[Any], Any], items: Sequence[Any], ops: int) -> Callable[[], None]:
    """A runner calling function(item) for the next `ops` items."""
    window = windows(items, ops)

    def run() -> None:
        for item in next(window):
            function(item)

    return run


def each_set(
    function: Callable[..., Any], keys: Sequence[Any], ops: int, **kwargs: Any
) -> Callable[[], None]:
    """A runner calling function(key, VALUE, **kwargs) for the next `ops` keys."""
    window = windows(keys, ops)

    def run() -> None:
        for key in next(window):
            function(key, VALUE, **kwargs)

    return run


def each_pair(
    pairs: Sequence[tuple[Callable[..., Any], Any]], ops: int, *extra: Any, **kwargs: Any
) -> Callable[[], None]:
    """A runner calling function(item, *extra, **kwargs) for the next `ops` (function, item) pairs."""
    window = windows(pairs, ops)

    def run() -> None:
        for function, item in next(window):
            function(item, *extra, **kwargs)

    return run


@dataclass
class Versus:
    """A baseline for one comparison: its target label (None: informational) and ratio kind (see Row)."""

    contender: Contender
    target: str | None = None
    kind: str | None = None


def expect(name: str, got: Any, wanted: Any) -> None:
    if got != wanted:
        raise RuntimeError(
            f"{name} returned {got!r:.80} instead of the stored value: the benchmark is broken"
        )


# --------------------------------------------------------------------------- the benchmark


class Bench:
    def __init__(self, environment: Environment, reps: int, scale: float) -> None:
        import redis
        from django.core.cache import caches
        from redis.cluster import RedisCluster

        self.reps = reps
        self.single = max(10, int(SINGLE_OPS * scale))
        self.batch = max(2, int(BATCH_CALLS * scale))
        self.slow_batch = max(1, int(SLOW_BATCH_CALLS * scale))
        self.ours = caches["default"]
        self.django_redis = caches["django_redis"]
        self.django = caches["django"]
        self.locmem = caches["locmem"]
        first = environment.cluster.ports[0]
        self.cluster = RedisCluster(host=harness.HOST, port=first)
        self.standalone = redis.Redis.from_url(environment.standalone.url)
        self.environment = environment
        self.keys = [f"key:{i:05d}" for i in range(KEY_COUNT)]
        self.raw_keys = [f"raw:{key}" for key in self.keys]
        self.groups = [self.keys[i : i + BATCH] for i in range(0, KEY_COUNT, BATCH)]
        self.raw_groups = [self.raw_keys[i : i + BATCH] for i in range(0, KEY_COUNT, BATCH)]
        self.rows: list[Row] = []
        # Plain redis-py clients to each primary, and each raw key with the client of the node owning it:
        # what a GET/SET costs on this cluster without any client-side routing (the floor for ours).
        self.node_clients: dict[int, redis.Redis] = {}
        self.owner_of: list[redis.Redis] = []
        for key in self.raw_keys:
            node = self.cluster.get_node_from_key(key)
            client = self.node_clients.get(node.port)
            if client is None:
                client = self.node_clients[node.port] = redis.Redis(host=node.host, port=node.port)
            self.owner_of.append(client)

    def close(self) -> None:
        for client in self.node_clients.values():
            client.close()
        self.cluster.close()
        self.standalone.close()

    def populate(self) -> None:
        harness.log(f"storing {KEY_COUNT} keys of {len(VALUE)} bytes in every contender")
        for cache in (self.ours, self.django_redis, self.django, self.locmem):
            for group in self.groups:
                cache.set_many(dict.fromkeys(group, VALUE), TTL)
        for group in self.raw_groups:
            self.cluster.mset_nonatomic(dict.fromkeys(group, VALUE))
            self.standalone.mset(dict.fromkeys(group, VALUE))
        key, raw = self.keys[0], self.raw_keys[0]
        for name, got in [
            ("ours", self.ours.get(key)),
            ("django-redis", self.django_redis.get(key)),
            ("Django RedisCache", self.django.get(key)),
            ("LocMemCache", self.locmem.get(key)),
            ("RedisCluster", self.cluster.get(raw)),
            ("standalone redis-py", self.standalone.get(raw)),
            ("redis-py on the owning node", self.owner_of[0].get(raw)),
        ]:
            expect(name, got, VALUE)
        expect("ours get_many", self.ours.get_many(self.groups[0]), dict.fromkeys(self.groups[0], VALUE))

    def compare(self, operation: str, ours: Contender, baselines: list[Versus], throughput: bool) -> None:
        """Time ours and the baselines together; one row per baseline."""
        samples = harness.measure([ours, *(v.contender for v in baselines)], self.reps, SLICES, operation)
        for versus in baselines:
            kind = versus.kind or ("speed" if throughput else "time")
            target = TARGETS[versus.target][1] if versus.target else None
            name = versus.contender.name
            self.rows.append(
                Row(operation, ours.name, samples[ours.name], name, samples[name], throughput, kind, target)
            )

    # -- rows 1 and 2 ------------------------------------------------------------------------------------
    def bench_get(self) -> None:
        n = self.single
        direct_get = [(client.get, key) for client, key in zip(self.owner_of, self.raw_keys, strict=True)]
        self.compare(
            "get",
            Contender("ours", each(self.ours.get, self.keys, n), n),
            [
                Versus(Contender("RedisCluster.get", each(self.cluster.get, self.raw_keys, n), n), "1"),
                Versus(Contender("django-redis", each(self.django_redis.get, self.keys, n), n), "2"),
                Versus(Contender("redis-py GET, standalone", each(self.standalone.get, self.raw_keys, n), n)),
                Versus(Contender("redis-py GET, owning cluster node", each_pair(direct_get, n), n)),
                Versus(Contender("Django RedisCache", each(self.django.get, self.keys, n), n)),
                Versus(Contender("LocMemCache", each(self.locmem.get, self.keys, n), n)),
            ],
            throughput=True,
        )

    # -- row 3 -------------------------------------------------------------------------------------------
    def bench_set(self) -> None:
        n, px = self.single, TTL * 1000
        raw_cluster_set = each_set(self.cluster.set, self.raw_keys, n, px=px)
        raw_standalone_set = each_set(self.standalone.set, self.raw_keys, n, px=px)
        direct_set = [(client.set, key) for client, key in zip(self.owner_of, self.raw_keys, strict=True)]
        self.compare(
            "set",
            Contender("ours", each_set(self.ours.set, self.keys, n), n),
            [
                Versus(Contender("RedisCluster.set", raw_cluster_set, n), "3a"),
                Versus(Contender("django-redis", each_set(self.django_redis.set, self.keys, n), n), "3b"),
                Versus(Contender("redis-py SET, standalone", raw_standalone_set, n)),
                Versus(
                    Contender("redis-py SET, owning cluster node", each_pair(direct_set, n, VALUE, px=px), n)
                ),
                Versus(Contender("Django RedisCache", each_set(self.django.set, self.keys, n), n)),
                Versus(Contender("LocMemCache", each_set(self.locmem.set, self.keys, n), n)),
            ],
            throughput=True,
        )

    # -- row 4 -------------------------------------------------------------------------------------------
    def bench_get_many(self) -> None:
        calls, slow = self.batch, self.slow_batch
        cluster_get = self.cluster.get

        def loop_of_gets(keys: list[str]) -> None:
            for key in keys:
                cluster_get(key)

        expect("mget_nonatomic", self.cluster.mget_nonatomic(self.raw_groups[0]), [VALUE] * BATCH)
        expect("MGET", self.standalone.mget(self.raw_groups[0]), [VALUE] * BATCH)
        mget_nonatomic = each(self.cluster.mget_nonatomic, self.raw_groups, calls)
        self.compare(
            "get_many(100)",
            Contender("ours", each(self.ours.get_many, self.groups, calls), calls),
            [
                Versus(
                    Contender("MGET, standalone", each(self.standalone.mget, self.raw_groups, calls), calls),
                    "4a",
                ),
                Versus(Contender("RedisCluster.mget_nonatomic", mget_nonatomic, calls), "4b", kind="speed"),
                Versus(Contender("100 x RedisCluster.get", each(loop_of_gets, self.raw_groups, slow), slow)),
                Versus(
                    Contender("django-redis", each(self.django_redis.get_many, self.groups, calls), calls),
                    "4c",
                    kind="speed",
                ),
            ],
            throughput=False,
        )

    # -- row 5 -------------------------------------------------------------------------------------------
    def bench_set_many(self) -> None:
        calls = self.batch
        mappings = [dict.fromkeys(group, VALUE) for group in self.groups]
        raw_mappings = [dict.fromkeys(group, VALUE) for group in self.raw_groups]
        mset_nonatomic = each(self.cluster.mset_nonatomic, raw_mappings, calls)
        self.compare(
            "set_many(100)",
            Contender("ours", each(self.ours.set_many, mappings, calls), calls),
            [
                Versus(
                    Contender("MSET, standalone", each(self.standalone.mset, raw_mappings, calls), calls),
                    "5a",
                ),
                Versus(Contender("RedisCluster.mset_nonatomic", mset_nonatomic, calls), "5b", kind="speed"),
                Versus(Contender("django-redis", each(self.django_redis.set_many, mappings, calls), calls)),
                Versus(Contender("Django RedisCache", each(self.django.set_many, mappings, calls), calls)),
            ],
            throughput=False,
        )

    # -- row 6 -------------------------------------------------------------------------------------------
    def bench_async(self) -> None:
        import redis.asyncio

        n = self.single
        django_calls = max(10, n // 4)  # Django's aget hops to a thread per call: slower, fewer calls
        loop = asyncio.new_event_loop()
        raw_async = redis.asyncio.Redis(host=harness.HOST, port=self.environment.standalone.port)

        async def sequential(function: Callable[[Any], Any], items: list[Any]) -> None:
            for item in items:
                await function(item)

        def in_loop(function: Callable[[Any], Any], items: Sequence[Any], ops: int) -> Callable[[], None]:
            window = windows(items, ops)
            return lambda: loop.run_until_complete(sequential(function, next(window)))

        try:
            expect("ours aget", loop.run_until_complete(self.ours.aget(self.keys[0])), VALUE)
            expect("redis.asyncio GET", loop.run_until_complete(raw_async.get(self.raw_keys[0])), VALUE)
            raw_aget = in_loop(raw_async.get, self.raw_keys, n)
            django_aget = in_loop(self.django.aget, self.keys, django_calls)
            self.compare(
                "async get",
                Contender("ours aget", in_loop(self.ours.aget, self.keys, n), n),
                [
                    Versus(Contender("ours sync get", each(self.ours.get, self.keys, n), n), "6"),
                    Versus(Contender("redis.asyncio GET, standalone", raw_aget, n)),
                    Versus(Contender("Django RedisCache aget", django_aget, django_calls)),
                ],
                throughput=False,
            )
        finally:
            loop.run_until_complete(self._close_async(raw_async))
            loop.close()

    async def _close_async(self, raw_async: Any) -> None:
        await raw_async.aclose()
        # Our async connections live per event loop; close them before the loop goes.
        shared = getattr(self.ours, "_shared", None)
        topologies = getattr(shared, "async_topologies", {})
        topology = topologies.get(asyncio.get_running_loop())
        if topology is not None and hasattr(topology, "close"):
            await topology.close()


def main(argv: list[str] | None = None) -> int:
    parser = harness.common_parser(__spec__.name, __doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    try:
        with harness.servers(args.base_port, args.keep_cluster, args.replicas) as environment:
            configure_django(environment)
            bench = Bench(environment, args.reps, args.scale)
            try:
                bench.populate()
                bench.bench_get()
                bench.bench_set()
                bench.bench_get_many()
                bench.bench_set_many()
                bench.bench_async()
            finally:
                bench.close()
            info = dict(environment.info)
            info["machine"] += ", at end: " + " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except KeyboardInterrupt:
        harness.log("interrupted; servers stopped")
        return 130
    report = harness.Report(
        "Backend: django_distcache vs raw redis-py, django-redis, Django's RedisCache",
        bench.rows,
        {label: text for label, (text, _) in TARGETS.items()},
        info,
        f"medians of {args.reps} timed reps after a warm-up; single thread; {len(VALUE)}-byte values; "
        f"{KEY_COUNT} keys, all present; per rep and contender {SLICES} interleaved slices of "
        f"{bench.single} ops (get/set/async) or {bench.batch} calls (get_many/set_many; "
        f"{bench.slow_batch} for the loop of 100 GETs)",
    )
    report.emit(args.markdown)
    return 1 if args.strict and report.misses() else 0


if __name__ == "__main__":
    sys.exit(main())
