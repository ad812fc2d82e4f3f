"""Large values and bytes per entry: get_many/set/set_many of 10 KB values, get_many of 100 B, and memory.

    .venv/bin/python -m bench.bench_values [--markdown] [--keep-cluster] [--reps 5] [--scale 1.0]

Single thread, every key present. Peers: raw redis-py `RedisCluster` on the same cluster (what a hand-written
cache would do: `mget_nonatomic` / `set` of `pickle.dumps` output, then `pickle.loads`), django-redis on a
standalone server, and django-valkey's cluster backend on the same cluster when it is installed (the `bench`
extra; the row says why it is skipped otherwise). Values: random bytes (incompressible), the same for all.

Memory: 100,000 five-field dicts stored with the same TTL on the cluster's primaries, once as raw pickle under
the keys Django's own backends make (`<KEY_PREFIX>:1:<key>`), once through our cache; the rows compare the
growth of `used_memory` summed over the primaries, per entry, and `MEMORY USAGE` of sampled keys.
"""

from __future__ import annotations

import os
import pickle
import random
import statistics
import sys
from typing import Any

from . import harness
from .bench_backend import Versus, each, expect, windows
from .harness import Contender, Environment, Row, Target

LARGE = random.Random(10).randbytes(10 * 1024)
SMALL = random.Random(100).randbytes(100)
TTL = 300
KEY_COUNT = 1000
BATCH = 100
SLICES = 20
SINGLE_OPS = 100
BATCH_CALLS = 4
RAW_PREFIX = "bench"  # the same KEY_PREFIX as ours: the keys differ by what ours adds only
ENTRIES = 100_000
SAMPLED = 300
TAGS = ["catalogue", "shop:12", "price-list"]

TARGETS = {
    "V1": ("get_many(100), 10 KB: ours ≥ 1.2× raw RedisCluster (mget_nonatomic + pickle.loads)", 1.2),
    "V2": ("get_many(100), 10 KB: ours ≥ 0.9× django-redis on standalone", 0.9),
    "V3": ("get_many(100), 100 B: ours ≥ 1.0× django-redis on standalone", 1.0),
    "V4": ("set, 10 KB: ours ≥ 0.95× django-redis on standalone", 0.95),
    "V5": ("set_many(100), 10 KB: ours ≥ 0.95× django-redis on standalone", 0.95),
    "M1": ("memory per entry: ours ≤ 1.10× raw pickle under Django's keys (used_memory)", None),
    "M2": ("memory per entry with 3 tags: ours ≤ 1.20× raw pickle under Django's keys", None),
}
MEMORY_LIMITS = {"M1": 1.10, "M2": 1.20}


def target(label: str) -> Target:
    if label in MEMORY_LIMITS:
        return Target(label, at_most=MEMORY_LIMITS[label])
    return Target(label, at_least=TARGETS[label][1])


def each_set(function: Any, keys: list[str], ops: int, value: bytes) -> Any:
    """A runner calling function(key, value) for the next `ops` keys."""
    window = windows(keys, ops)

    def run() -> None:
        for key in next(window):
            function(key, value)

    return run


def valkey_missing() -> str | None:
    import importlib.util

    if importlib.util.find_spec("django_valkey") is None:
        return "django-valkey is not installed (`pip install -e .[bench]` installs it)"
    return None


def configure_django(environment: Environment) -> None:
    import django
    from django.conf import settings

    caches: dict[str, Any] = {
        "default": {
            "BACKEND": "django_distcache.cache.RedisClusterCache",
            "LOCATION": environment.cluster_urls,
            "KEY_PREFIX": "bench",
            "TIMEOUT": TTL,
        },
        "django_redis": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": environment.standalone.url,
            "KEY_PREFIX": "dr",
            "TIMEOUT": TTL,
            "OPTIONS": {"CLIENT_CLASS": "django_redis.client.DefaultClient"},
        },
    }
    if valkey_missing() is None:
        caches["valkey"] = {
            "BACKEND": "django_valkey.cluster_cache.cache.ClusterValkeyCache",
            "LOCATION": environment.cluster_urls[0].replace("redis://", "valkey://"),
            "KEY_PREFIX": "dv",
            "TIMEOUT": TTL,
        }
    settings.configure(SECRET_KEY="bench-" + os.urandom(16).hex(), USE_TZ=True, CACHES=caches)
    django.setup()


def five_fields(i: int) -> dict[str, Any]:
    """A small record, as a model row or an API object cached by id."""
    return {"id": i, "name": f"item {i}", "price": 19.99 + i % 100, "active": bool(i % 3), "stock": i % 250}


class MemoryRow(Row):
    """A row whose samples are bytes per entry (lower is better; the ratio is ours ÷ baseline)."""

    def format(self, samples: list[float]) -> str:
        return f"{statistics.median(samples):,.1f} B/entry"

    def ratio_meaning(self) -> str:
        return "ours/base bytes"


class Bench:
    def __init__(self, environment: Environment, reps: int, scale: float) -> None:
        from django.core.cache import caches
        from redis.cluster import RedisCluster

        self.reps = reps
        self.scale = scale
        self.single = max(10, int(SINGLE_OPS * scale))
        self.batch = max(2, int(BATCH_CALLS * scale))
        self.ours = caches["default"]
        self.django_redis = caches["django_redis"]
        self.valkey = caches["valkey"] if valkey_missing() is None else None
        self.cluster = RedisCluster(host=harness.HOST, port=environment.cluster.ports[0])
        self.environment = environment
        self.keys = [f"key:{i:05d}" for i in range(KEY_COUNT)]
        self.raw_keys = [f"raw:{key}" for key in self.keys]
        self.groups = [self.keys[i : i + BATCH] for i in range(0, KEY_COUNT, BATCH)]
        self.raw_groups = [self.raw_keys[i : i + BATCH] for i in range(0, KEY_COUNT, BATCH)]
        self.rows: list[Row] = []
        self.notes: list[str] = []

    def close(self) -> None:
        self.cluster.close()

    def peers(self) -> list[tuple[str, Any]]:
        named = [("ours", self.ours), ("django-redis", self.django_redis)]
        return named + ([("django-valkey cluster", self.valkey)] if self.valkey is not None else [])

    def populate(self, value: bytes) -> None:
        harness.log(f"storing {KEY_COUNT} keys of {len(value)} bytes in every contender")
        for name, cache in self.peers():
            for group in self.groups:
                if name.startswith(
                    "django-valkey"
                ):  # its set_many writes nothing here (valkey_set_many_works)
                    for key in group:
                        cache.set(key, value, TTL)
                else:
                    cache.set_many(dict.fromkeys(group, value), TTL)
        pickled = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
        for group in self.raw_groups:
            self.cluster.mset_nonatomic(dict.fromkeys(group, pickled))
        for name, cache in self.peers():
            expect(f"{name} get_many", cache.get_many(self.groups[0]), dict.fromkeys(self.groups[0], value))
        expect("raw get", self.raw_get_many(self.raw_groups[0]), [value] * BATCH)

    def raw_get_many(self, keys: list[str]) -> list[Any]:
        loads = pickle.loads
        return [None if data is None else loads(data) for data in self.cluster.mget_nonatomic(keys)]

    def compare(self, operation: str, ours: Contender, baselines: list[Versus]) -> None:
        samples = harness.measure([ours, *(v.contender for v in baselines)], self.reps, SLICES, operation)
        for versus in baselines:
            name = versus.contender.name
            row_target = target(versus.target) if versus.target else None
            self.rows.append(
                Row(operation, ours.name, samples[ours.name], name, samples[name], False, "speed", row_target)
            )

    def skipped(self, operation: str) -> None:
        reason = valkey_missing()
        if reason:
            note = f"{operation}: django-valkey row skipped: {reason}"
            harness.log(note)
            self.notes.append(note)

    def bench_get_many(self, size: str, targets: dict[str, str]) -> None:
        calls = self.batch if size == "10 KB" else self.batch * 4
        operation = f"get_many(100), {size}"
        baselines = [
            Versus(
                Contender(
                    "RedisCluster mget_nonatomic+loads",
                    each(self.raw_get_many, self.raw_groups, calls),
                    calls,
                ),
                targets.get("raw"),
            ),
            Versus(
                Contender("django-redis", each(self.django_redis.get_many, self.groups, calls), calls),
                targets.get("django-redis"),
            ),
        ]
        if self.valkey is not None:
            baselines.append(
                Versus(
                    Contender("django-valkey cluster", each(self.valkey.get_many, self.groups, calls), calls)
                )
            )
        self.skipped(operation)
        self.compare(
            operation, Contender("ours", each(self.ours.get_many, self.groups, calls), calls), baselines
        )

    def bench_set(self) -> None:
        n, px = self.single, TTL * 1000
        window = windows(self.raw_keys, n)
        cluster_set, dumps = self.cluster.set, pickle.dumps

        def raw_set() -> None:
            for key in next(window):
                cluster_set(key, dumps(LARGE, pickle.HIGHEST_PROTOCOL), px=px)

        baselines = [
            Versus(Contender("django-redis", each_set(self.django_redis.set, self.keys, n, LARGE), n), "V4"),
            Versus(Contender("RedisCluster set(dumps)", raw_set, n)),
        ]
        if self.valkey is not None:
            baselines.append(
                Versus(Contender("django-valkey cluster", each_set(self.valkey.set, self.keys, n, LARGE), n))
            )
        self.skipped("set, 10 KB")
        self.compare(
            "set, 10 KB", Contender("ours", each_set(self.ours.set, self.keys, n, LARGE), n), baselines
        )

    def valkey_set_many_works(self) -> bool:
        """django-valkey 6.2's set_many with a timeout, on this cluster, answers True and stores nothing (its
        set() works): a row timing it would time nothing."""
        assert self.valkey is not None
        keys = [f"probe:{i}" for i in range(BATCH)]
        self.valkey.set_many(dict.fromkeys(keys, SMALL), TTL)
        if len(self.valkey.get_many(keys)) == BATCH:
            return True
        note = (
            "set_many(100), 10 KB: django-valkey row skipped: its set_many(mapping, timeout) stored nothing"
        )
        harness.log(note)
        self.notes.append(note)
        return False

    def bench_set_many(self) -> None:
        calls = self.batch
        mappings = [dict.fromkeys(group, LARGE) for group in self.groups]
        baselines = [
            Versus(Contender("django-redis", each(self.django_redis.set_many, mappings, calls), calls), "V5"),
        ]
        if self.valkey is not None and self.valkey_set_many_works():
            baselines.append(
                Versus(Contender("django-valkey cluster", each(self.valkey.set_many, mappings, calls), calls))
            )
        self.skipped("set_many(100), 10 KB")
        self.compare(
            "set_many(100), 10 KB",
            Contender("ours", each(self.ours.set_many, mappings, calls), calls),
            baselines,
        )

    # -- memory ------------------------------------------------------------------------------------------
    def primaries(self) -> list[Any]:
        return [self.cluster.get_redis_connection(node) for node in self.cluster.get_primaries()]

    def used_memory(self) -> int:
        return sum(int(client.info("memory")["used_memory"]) for client in self.primaries())

    def flush(self) -> None:
        """Remove every entry (ours and raw), keeping our own keys (namespace, tag versions): what the cache
        holds in-process about them stays true."""
        for client in self.primaries():
            pipe = client.pipeline(transaction=False)
            for key in client.scan_iter(match=f"{RAW_PREFIX}:[^~]*", count=1000):
                pipe.unlink(key)
            pipe.execute()

    def store_raw(self, count: int) -> list[str]:
        keys = [f"{RAW_PREFIX}:1:item:{i:06d}" for i in range(count)]
        for start in range(0, count, 1000):
            chunk = keys[start : start + 1000]
            pipe = self.cluster.pipeline()
            for offset, key in enumerate(chunk):
                pipe.set(
                    key, pickle.dumps(five_fields(start + offset), pickle.HIGHEST_PROTOCOL), px=TTL * 1000
                )
            pipe.execute()
        return keys

    def store_ours(self, count: int, tags: list[str] | None) -> list[bytes]:
        for start in range(0, count, BATCH):
            mapping = {f"item:{i:06d}": five_fields(i) for i in range(start, min(count, start + BATCH))}
            self.ours.set_many(mapping, TTL, tags=tags)
        expect("ours get", self.ours.get("item:000007"), five_fields(7))
        core = self.ours.core
        return [
            core.physical_of(core.namespace.head, f"item:{i:06d}") for i in range(0, count, count // SAMPLED)
        ]

    def memory_usage(self, keys: list[Any]) -> float:
        return statistics.mean(int(self.cluster.memory_usage(key, samples=0)) for key in keys)

    def measured(self, store: Any) -> tuple[float, float]:
        """(used_memory growth per entry, mean MEMORY USAGE of sampled keys) of one fresh store."""
        count = max(1000, int(ENTRIES * min(1.0, self.scale)))
        self.flush()
        before = self.used_memory()
        sampled = store(count)
        after = self.used_memory()
        return (after - before) / count, self.memory_usage(sampled[:: max(1, len(sampled) // SAMPLED)])

    def bench_memory(self) -> None:
        reps = min(self.reps, 3)
        harness.log(
            f"memory: {ENTRIES} five-field dicts x {reps} reps, raw pickle vs ours, untagged and tagged"
        )
        raw: list[tuple[float, float]] = []
        plain: list[tuple[float, float]] = []
        tagged: list[tuple[float, float]] = []
        for _ in range(reps):
            raw.append(self.measured(self.store_raw))
            plain.append(self.measured(lambda count: self.store_ours(count, None)))
            tagged.append(self.measured(lambda count: self.store_ours(count, TAGS)))
        self.flush()
        base = [used for used, _ in raw]
        for operation, ours, label in (
            ("memory per entry", plain, "M1"),
            ("memory per entry, 3 tags", tagged, "M2"),
        ):
            self.rows.append(
                MemoryRow(
                    operation, "ours", [u for u, _ in ours], "raw pickle", base, False, "time", target(label)
                )
            )
            self.rows.append(
                MemoryRow(
                    operation.replace("memory per entry", "MEMORY USAGE per key"),
                    "ours",
                    [m for _, m in ours],
                    "raw pickle",
                    [m for _, m in raw],
                    False,
                    "time",
                )
            )


def main(argv: list[str] | None = None) -> int:
    parser = harness.common_parser(__spec__.name, __doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("speed", "memory"), help="run one half only")
    args = parser.parse_args(argv)
    try:
        with harness.servers(args.base_port, args.keep_cluster, args.replicas) as environment:
            configure_django(environment)
            bench = Bench(environment, args.reps, args.scale)
            try:
                if args.only != "memory":
                    bench.populate(LARGE)
                    bench.bench_get_many("10 KB", {"raw": "V1", "django-redis": "V2"})
                    bench.bench_set()
                    bench.bench_set_many()
                    bench.populate(SMALL)
                    bench.bench_get_many("100 B", {"django-redis": "V3"})
                if args.only != "speed":
                    bench.bench_memory()
            finally:
                bench.close()
            info = dict(environment.info)
            info["machine"] += ", at end: " + " / ".join(f"{v:.2f}" for v in os.getloadavg())
            for note in bench.notes:
                info.setdefault("skipped", "")
                info["skipped"] += note + "; "
    except KeyboardInterrupt:
        harness.log("interrupted; servers stopped")
        return 130
    report = harness.Report(
        "Values: large values and bytes per entry, vs raw RedisCluster, django-redis, django-valkey",
        bench.rows,
        {label: text for label, (text, _) in TARGETS.items()},
        info,
        f"medians of {args.reps} timed reps after a warm-up; single thread; {KEY_COUNT} keys, all present; "
        f"per rep and contender {SLICES} interleaved slices of {bench.single} ops (set) or {bench.batch} calls "
        f"(10 KB batches; 4x that for 100 B); memory: {ENTRIES} entries, TTL {TTL} s, medians of "
        f"{min(args.reps, 3)} fresh stores, MEMORY USAGE means over {SAMPLED} sampled keys",
    )
    report.emit(args.markdown)
    return 1 if args.strict and report.misses() else 0


if __name__ == "__main__":
    sys.exit(main())
