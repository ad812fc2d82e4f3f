"""Async bursts: many coroutines of one event loop reading at once, on a quiet and on a loaded machine.

    .venv/bin/python -m bench.bench_async_burst [--markdown] [--keep-cluster] [--reps 5] [--scale 1.0]

A burst is BURST `aget`s started together (asyncio.gather) on one event loop, of 100-byte values that are
all present. Ours against raw redis-py's asyncio `RedisCluster` on the same cluster, django-valkey's
cluster backend (when installed: `pip install django-valkey`, in the `bench` extra; it has no async API,
so through `sync_to_async`) and Django's `RedisCache` on a standalone server (whose `aget` hops to a thread
per call).

Then two counts with absolute targets:
- connections opened per node and event loop by 10 bursts in a new event loop (the servers'
  `total_connections_received`, less the counting's own);
- reads that failed (a miss or an error where the value is present) in 200-wide bursts while LOAD_BURNERS
  processes burn CPU beside the benchmark on this machine, each round of bursts in a new event loop so
  that connections are opened under the load too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from . import harness
from .harness import Check, Contender, Row, Target

VALUE = random.Random(100).randbytes(100)
TTL = 300
KEY_COUNT = 1000
BURST = 200
SLICES = 10
BURSTS_PER_SLICE = 5
SLOW_BURSTS_PER_SLICE = 1  # the thread-hop backends take ~10x longer per burst
LOAD_BURNERS = 3
LOAD_ROUNDS = 30  # at --scale 1: 30 rounds x 5 bursts x 200 reads = 30,000 reads under load
LOAD_BURSTS_PER_ROUND = 5

TARGETS = {
    "A1": (
        f"{BURST} concurrent aget: ours ≥ 1.5× raw redis.asyncio RedisCluster",
        Target("A1", at_least=1.5),
    ),
    "A2": (
        "connections opened per node and event loop by 2,000 reads in bursts: ≤ 4",
        Target("A2", at_most=4),
    ),
    "A3": (
        f"failed reads in {BURST}-wide bursts with {LOAD_BURNERS} CPU burners beside: 0",
        Target("A3", at_most=0),
    ),
}


def configure_django(environment: harness.Environment) -> bool:
    """Our cache, Django's RedisCache and (if installed) django-valkey's cluster backend; whether the
    latter is there."""
    import django
    from django.conf import settings

    try:
        import django_valkey  # noqa: F401
    except ImportError:
        valkey = False
    else:
        valkey = True
    caches: dict[str, Any] = {
        "default": {
            "BACKEND": "django_distcache.cache.RedisClusterCache",
            "LOCATION": environment.cluster_urls,
            "KEY_PREFIX": "burst",
            "TIMEOUT": TTL,
        },
        "django": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": environment.standalone.url,
            "KEY_PREFIX": "dj",
            "TIMEOUT": TTL,
        },
    }
    if valkey:
        caches["valkey"] = {
            "BACKEND": "django_valkey.cluster_cache.cache.ClusterValkeyCache",
            "LOCATION": environment.cluster_urls[0].replace("redis://", "valkey://"),
            "KEY_PREFIX": "vk",
            "TIMEOUT": TTL,
        }
    settings.configure(SECRET_KEY="bench-" + os.urandom(16).hex(), USE_TZ=True, CACHES=caches)
    django.setup()
    return valkey


def _connections_received(ports: list[int]) -> int:
    import redis

    total = 0
    for port in ports:
        client = redis.Redis(host=harness.HOST, port=port)
        try:
            total += int(client.info("stats")["total_connections_received"])
        finally:
            client.close()
    return total


@contextlib.contextmanager
def cpu_burners(count: int) -> Iterator[None]:
    burners = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for burner in burners:
            burner.kill()
        for burner in burners:
            burner.wait()


class Bench:
    def __init__(self, environment: harness.Environment, reps: int, scale: float, valkey: bool) -> None:
        from django.core.cache import caches
        from redis.asyncio.cluster import RedisCluster

        self.environment = environment
        self.reps = reps
        self.scale = scale
        self.ours = caches["default"]
        self.django = caches["django"]
        self.valkey = caches["valkey"] if valkey else None
        self.loop = asyncio.new_event_loop()
        self.raw = RedisCluster(host=harness.HOST, port=environment.cluster.ports[0])
        self.keys = [f"key:{i:05d}" for i in range(KEY_COUNT)]
        self.raw_keys = [f"raw:{key}" for key in self.keys]
        self.primaries = self._primary_ports()
        self.rows: list[Row] = []
        self.checks: list[Check] = []
        self.bursts = max(1, int(BURSTS_PER_SLICE * scale))
        self.slow_bursts = max(1, int(SLOW_BURSTS_PER_SLICE * scale))

    def _primary_ports(self) -> list[int]:
        import redis

        ports = []
        for port in self.environment.cluster.ports:
            client = redis.Redis(host=harness.HOST, port=port)
            try:
                if client.info("replication")["role"] == "master":
                    ports.append(port)
            finally:
                client.close()
        return ports

    def close(self) -> None:
        self.loop.run_until_complete(self.raw.aclose())
        self.loop.run_until_complete(self._close_ours())
        self.loop.close()

    async def _close_ours(self) -> None:
        topology = self.ours.core.shared.async_topologies.get(asyncio.get_running_loop())
        if topology is not None:
            await topology.close()

    def populate(self) -> None:
        import redis

        harness.log(f"storing {KEY_COUNT} keys of {len(VALUE)} bytes in every contender")
        for cache in (self.ours, self.django):
            cache.set_many(dict.fromkeys(self.keys, VALUE), TTL)
        if self.valkey is not None:  # one by one: its set_many leaves keys unset on a cluster (0.4.1)
            for key in self.keys:
                self.valkey.set(key, VALUE, TTL)
        cluster = redis.RedisCluster(host=harness.HOST, port=self.environment.cluster.ports[0])
        try:
            cluster.mset_nonatomic(dict.fromkeys(self.raw_keys, VALUE))
        finally:
            cluster.close()

    def burst_keys(self, seed: int, keys: list[str]) -> list[str]:
        return random.Random(seed).sample(keys, BURST)

    def contender(
        self, name: str, get: Callable[[str], Coroutine[Any, Any, Any]], keys: list[str], bursts: int
    ) -> Contender:
        rounds = iter(range(10**9))

        async def run_bursts() -> None:
            for _ in range(bursts):
                chosen = self.burst_keys(next(rounds), keys)
                got = await asyncio.gather(*(get(key) for key in chosen))
                if got[0] != VALUE:
                    raise AssertionError(f"{name}: read {got[0]!r}")

        return Contender(name, lambda: self.loop.run_until_complete(run_bursts()), bursts)

    # -- A1 ------------------------------------------------------------------------------------------------
    def bench_bursts(self) -> None:
        ours = self.contender("ours", self.ours.aget, self.keys, self.bursts)
        raw = self.contender("redis.asyncio RedisCluster", self.raw.get, self.raw_keys, self.bursts)
        peers = [raw]
        if self.valkey is not None:
            # Its cluster backend has no async API: what a Django view would do is hop to a thread.
            from asgiref.sync import sync_to_async

            valkey_get = sync_to_async(self.valkey.get)
            name = "django-valkey cluster, sync_to_async(get)"
            peers.append(self.contender(name, valkey_get, self.keys, self.slow_bursts))
        else:
            harness.log("django-valkey is not installed: its row is left out (pip install django-valkey)")
        peers.append(self.contender("Django RedisCache aget", self.django.aget, self.keys, self.slow_bursts))
        operation = f"{BURST} concurrent aget"
        samples = harness.measure([ours, *peers], self.reps, SLICES, operation)
        for peer in peers:
            target = TARGETS["A1"][1] if peer is raw else None
            self.rows.append(
                Row(operation, "ours", samples["ours"], peer.name, samples[peer.name], False, "speed", target)
            )

    # -- A2 ------------------------------------------------------------------------------------------------
    def count_connections(self) -> None:
        from redis.asyncio.cluster import RedisCluster

        ours, raw = [], []
        raw_errors: list[str] = []
        ports = self.environment.cluster.ports
        for rep in range(self.reps):

            async def ours_bursts(rep: int = rep) -> None:
                for i in range(10):
                    chosen = self.burst_keys(rep * 100 + i, self.keys)
                    await asyncio.gather(*(self.ours.aget(key) for key in chosen))
                await self._close_ours()

            async def raw_bursts(rep: int = rep) -> None:
                client = RedisCluster(host=harness.HOST, port=self.environment.cluster.ports[0])
                for i in range(10):
                    chosen = self.burst_keys(rep * 100 + i, self.raw_keys)
                    # Its first burst on a new loop can fail some calls (redis-py 8.1: a connection used
                    # before its connect finished); counted, not fatal to the benchmark.
                    got = await asyncio.gather(*(client.get(key) for key in chosen), return_exceptions=True)
                    raw_errors.extend(type(value).__name__ for value in got if isinstance(value, Exception))
                await client.aclose()

            for bursts, counts in ((ours_bursts, ours), (raw_bursts, raw)):
                before = _connections_received(ports)
                asyncio.run(bursts())
                opened = _connections_received(ports) - before - len(ports)  # less the second count's own
                counts.append(opened / len(self.primaries))
        self.checks.append(
            Check(
                "A2",
                "connections opened per node and event loop, 10 bursts of 200 (ours)",
                ours,
                "conn.",
                TARGETS["A2"][1],
            )
        )
        self.environment.info["raw RedisCluster, same 10 bursts"] = (
            f"{sorted(raw)[len(raw) // 2]:g} connections opened per node (min {min(raw):g}, max {max(raw):g}); "
            f"{len(raw_errors)} of its {self.reps * 10 * BURST} reads failed"
            + (f" ({', '.join(sorted(set(raw_errors)))})" if raw_errors else "")
        )

    # -- A3 ------------------------------------------------------------------------------------------------
    def under_load(self) -> None:
        rounds = max(1, int(LOAD_ROUNDS * self.scale))
        failed_per_rep: list[float] = []
        reads = 0
        harness.log(f"under load: {LOAD_BURNERS} CPU burners, {self.reps} x {rounds} rounds of bursts")
        with cpu_burners(LOAD_BURNERS):
            time.sleep(1.0)  # let the load settle in
            for rep in range(self.reps):
                failed = 0
                for round_ in range(rounds):

                    async def bursts(seed: int) -> list[int]:
                        misses = []
                        for i in range(LOAD_BURSTS_PER_ROUND):
                            chosen = self.burst_keys(seed * 10 + i, self.keys)
                            got = await asyncio.gather(*(self.ours.aget(key) for key in chosen))
                            misses.append(sum(1 for value in got if value != VALUE))
                        await self._close_ours()
                        return misses

                    failed += sum(asyncio.run(bursts(rep * 1000 + round_)))
                    reads += LOAD_BURSTS_PER_ROUND * BURST
                failed_per_rep.append(failed)
                harness.log(
                    f"under load, rep {rep + 1}: {failed} failed reads; load {os.getloadavg()[0]:.1f}"
                )
        self.checks.append(
            Check(
                "A3",
                f"failed reads per {rounds * LOAD_BURSTS_PER_ROUND * BURST:,} in {BURST}-wide bursts, "
                f"{LOAD_BURNERS} CPU burners beside (ours)",
                failed_per_rep,
                "failed",
                TARGETS["A3"][1],
            )
        )
        self.environment.info["reads under load"] = (
            f"{reads:,} in all, failure counts {self.ours.failure_counts}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = harness.common_parser(__spec__.name, __doc__.split("\n\n")[0])
    parser.add_argument("--no-load", action="store_true", help="leave out the run beside CPU burners")
    args = parser.parse_args(argv)
    try:
        with harness.servers(args.base_port, args.keep_cluster, args.replicas) as environment:
            valkey = configure_django(environment)
            bench = Bench(environment, args.reps, args.scale, valkey)
            try:
                bench.populate()
                bench.bench_bursts()
                bench.count_connections()
                if not args.no_load:
                    bench.under_load()
            finally:
                bench.close()
            info = dict(environment.info)
            info["machine"] += ", at end: " + " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except KeyboardInterrupt:
        harness.log("interrupted; servers stopped")
        return 130
    report = harness.Report(
        "Async bursts: django_distcache vs raw redis.asyncio RedisCluster, django-valkey, Django's RedisCache",
        bench.rows,
        {label: text for label, (text, _) in TARGETS.items()},
        info,
        f"medians of {args.reps} timed reps after a warm-up; one event loop; {len(VALUE)}-byte values, "
        f"{KEY_COUNT} keys, all present; per rep and contender {SLICES} interleaved slices of {bench.bursts} "
        f"bursts of {BURST} ({bench.slow_bursts} for the thread-hop backends); time per burst",
        bench.checks,
    )
    report.emit(args.markdown)
    return 1 if args.strict and report.misses() else 0


if __name__ == "__main__":
    sys.exit(main())
