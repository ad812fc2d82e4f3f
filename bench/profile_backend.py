"""Where our backend spends its time: per-stage costs of get_many/set_many(100) and get/set, and cProfile.

    .venv/bin/python -m bench.profile_backend [--top 15] [--keep-cluster]

A diagnostic for missed targets, not a benchmark (bench.run_all does not run it). The stage timings call
the backend's internals (key making, codec, topology), so they follow those internals: if one was
renamed, its line says so instead of stopping the rest. Same servers and data as bench.bench_backend.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from . import harness
from .bench_backend import BATCH, VALUE, Bench, configure_django


def median_us(function: Callable[[], Any], calls: int = 200, reps: int = 5) -> float:
    """Median over `reps` of the wall time of one call, in microseconds, after a warm-up call."""
    function()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        for _ in range(calls):
            function()
        times.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(times)


def stages(bench: Bench) -> list[tuple[str, Callable[[], Any]]]:
    """(label, callable) for every stage; built lazily so that a renamed internal only loses its line."""
    from django_distcache.topology import Call
    from django_distcache.topology.base import group_by_node

    cache = bench.ours
    topology = cache.core.shared.topology
    codec = cache.core.codec
    keys = bench.groups[0]
    raw = bench.raw_groups[0]
    mapping = dict.fromkeys(keys, VALUE)
    raw_mapping = dict.fromkeys(raw, VALUE)
    made = [cache.core.made_key(key, None) for key in keys]
    cache.get(keys[0])  # makes sure the namespace prefix is loaded
    physical = [cache.core.physical_of(cache.core.namespace.head, key) for key in keys]
    identities = [cache.core.keys.identity(p) for p in physical]  # what each value's signature binds
    get_calls = [Call(p, ("GET", p), read=True) for p in physical]
    stored = topology.execute_batch(list(get_calls))
    set_calls = [
        Call(p, ("SET", p, codec.encode(VALUE, i), "PX", 300000))
        for p, i in zip(physical, identities, strict=True)
    ]
    pool = topology._pool(topology._route(get_calls[0]))
    connection = pool.get()  # only its (pure) pack_commands is used: back to the pool at once
    pool.put(connection)
    get_commands = [call.args for call in get_calls]
    set_commands = [call.args for call in set_calls]
    one_key, one_made, one_identity = keys[0], made[0], identities[0]
    n = BATCH
    return [
        (f"get_many({n}) total", lambda: cache.get_many(keys)),
        (
            f"  make_and_validate_key x{n} (cache.py _made_key)",
            lambda: [cache.core.made_key(k, None) for k in keys],
        ),
        (f"    make_key x{n} alone", lambda: [cache.make_key(k) for k in keys]),
        (
            f"    validate_key x{n} alone (Django's memcache checks)",
            lambda: [cache.validate_key(m) for m in made],
        ),
        (f"  Call objects x{n}", lambda: [Call(p, ("GET", p), read=True) for p in physical]),
        (f"  execute_batch({n} GETs) (topology/cluster.py)", lambda: topology.execute_batch(list(get_calls))),
        (
            f"    group_by_node x{n} (route: key_slot + slot map)",
            lambda: group_by_node(get_calls, topology._route),
        ),
        (f"    pack_commands({n} GETs) (redis-py)", lambda: connection.pack_commands(get_commands)),
        (
            f"  codec.decode x{n} (codec.py)",
            lambda: [codec.decode(data, i) for data, i in zip(stored, identities, strict=True)],
        ),
        (f"MGET {n}, standalone (reference)", lambda: bench.standalone.mget(raw)),
        (f"RedisCluster.mget_nonatomic({n}) (reference)", lambda: bench.cluster.mget_nonatomic(raw)),
        (f"set_many({n}) total", lambda: cache.set_many(mapping)),
        (f"  codec.encode x{n} (codec.py)", lambda: [codec.encode(VALUE, i) for i in identities]),
        (
            f"  execute_batch({n} SET PX) (topology/cluster.py)",
            lambda: topology.execute_batch(list(set_calls)),
        ),
        (f"    pack_commands({n} SET PX) (redis-py)", lambda: connection.pack_commands(set_commands)),
        (f"MSET {n}, standalone (reference)", lambda: bench.standalone.mset(raw_mapping)),
        (f"RedisCluster.mset_nonatomic({n}) (reference)", lambda: bench.cluster.mset_nonatomic(raw_mapping)),
        ("get total", lambda: cache.get(one_key)),
        ("  make_and_validate_key", lambda: cache.core.made_key(one_key, None)),
        ("  validate_key alone", lambda: cache.validate_key(one_made)),
        ("  codec.decode", lambda: codec.decode(stored[0], one_identity)),
        ("set total", lambda: cache.set(one_key, VALUE)),
        ("  codec.encode", lambda: codec.encode(VALUE, one_identity)),
        ("redis-py GET, standalone (reference)", lambda: bench.standalone.get(raw[0])),
    ]


def print_stages(bench: Bench) -> None:
    print("\nStage costs, wall time per call (median of 5), µs")
    print("-------------------------------------------------")
    try:
        rows = stages(bench)
    except Exception as error:  # an internal was renamed: say so, keep the profile below
        print(f"  n/a: could not reach the backend's internals ({error!r})")
        return
    for label, function in rows:
        try:
            calls = 20 if "total" in label or "reference" in label else 200
            print(f"{median_us(function, calls=calls):10.1f}  {label}")
        except Exception as error:
            print(f"{'n/a':>10}  {label} ({error!r})")


def print_profile(title: str, function: Callable[[], Any], calls: int, top: int) -> None:
    function()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        function()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    body = out.getvalue()
    body = body[body.find("   ncalls") :] if "   ncalls" in body else body
    print(
        f"\ncProfile: {calls} x {title}, top {top} by own time (profiler overhead inflates small functions)"
    )
    print(body.rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = harness.common_parser(__spec__.name, __doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=15, help="functions to list per profile (default 15)")
    args = parser.parse_args(argv)
    try:
        with harness.servers(args.base_port, args.keep_cluster, args.replicas) as environment:
            configure_django(environment)
            bench = Bench(environment, args.reps, args.scale)
            try:
                bench.populate()
                print_stages(bench)
                keys, mapping = bench.groups[0], dict.fromkeys(bench.groups[0], VALUE)
                print_profile(f"get_many({BATCH})", lambda: bench.ours.get_many(keys), 300, args.top)
                print_profile(f"set_many({BATCH})", lambda: bench.ours.set_many(mapping), 300, args.top)
                print_profile("get", lambda: bench.ours.get(keys[0]), 3000, args.top)
            finally:
                bench.close()
    except KeyboardInterrupt:
        harness.log("interrupted; servers stopped")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
