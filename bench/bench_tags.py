"""Tags: invalidating a tag against django-redis delete_pattern, and what tags cost on get and set.

    .venv/bin/python -m bench.bench_tags [--markdown] [--keep-cluster] [--reps 5] [--scale 1.0]

Single thread, 100-byte values. Ours runs on a local 3-primary Redis Cluster, django-redis on a
redis-server of our own; all on loopback; TIMEOUT 300 s everywhere.

Invalidation (rows T1, T2): every repetition first stores 100,000 entries tagged "group" (set_many in
chunks) and one entry tagged "single", checks that a sample of them reads as hits, then times one
`invalidate_tags("group")` and one `invalidate_tags("single")` (order alternating between repetitions),
and checks that the sample now reads as misses. django-redis gets 100,000 keys `group:*` written before
each of its (fewer, it is slow) repetitions, and only `delete_pattern("group:*")` is timed; it must
report 100,000 deletions and the sample must read as misses afterwards.

Tagged reads and writes (rows T3, T4 and the strict-mode row): 1,000 entries with 3 tags each and 1,000
without tags, paired by hash tag (`tagged:{0001}`, `plain:{0001}`) so that both sides hit the same nodes
in the same proportions. Each row is one pair of contenders taking turns slice by slice (harness.measure).
Steady state: the invalidation channel is live and the tag versions are held in-process (VERSION_CHECK_INTERVAL
1 s, the default); the strict row reads the same tagged entries through a second cache with
VERSION_CHECK_INTERVAL 0, so every read also fetches the 3 tag versions from Redis.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import harness
from .harness import Contender, Environment, Row, Target

VALUE = random.Random(100).randbytes(100)  # 100 bytes, as in bench_backend
TTL = 300
KEY_PREFIX = "tagbench"

COVERAGE = 100_000  # entries under the big tag
CHUNK = 1_000  # keys per set_many call when populating
SAMPLE = 500  # entries read back before and after each invalidation
DELETE_PATTERN_REPS = 3  # delete_pattern takes seconds: at most this many repetitions
ITERSIZE = 1_000  # the informational delete_pattern row with a larger SCAN COUNT

KEY_COUNT = 1_000  # tagged and untagged entries for the get/set rows
SLICES = 20
SINGLE_OPS = 200


def tags_of(i: int) -> list[str]:
    """Three tags per entry, from a pool of 41: shared by all, by a tenth, and by a thirtieth."""
    return ["site", f"owner:{i % 10}", f"page:{i % 30}"]


TAG_POOL = {tag for i in range(KEY_COUNT) for tag in tags_of(i)}


class Within(Target):
    """A ratio that must stay between `at_least` and `at_most` (both set)."""

    def describe(self) -> str:
        return f"{self.at_least:.2f}–{self.at_most:.2f}"


TARGETS = {
    "T1": (
        "invalidate a tag on 100,000 entries: ours ≥ 500× faster than django-redis delete_pattern",
        Target("T1", at_least=500.0),
    ),
    "T2": (
        "invalidate_tags: a tag on 100,000 entries within 2× the time of a tag on 1 entry",
        Within("T2", at_least=0.5, at_most=2.0),
    ),
    "T3": ("get with 3 tags ≤ 1.15× the time of an untagged get (steady state)", Target("T3", at_most=1.15)),
    "T4": ("set with 3 tags ≤ 1.3× the time of an untagged set (steady state)", Target("T4", at_most=1.3)),
}


class UnpairedRow(Row):
    """A row whose two sides have different numbers of repetitions (delete_pattern runs fewer).

    The ratio is still the ratio of the medians; the range is over every pair of samples.
    """

    def ratio_range(self) -> tuple[float, float]:
        if self.ratio_kind == "speed":
            return min(self.baseline) / max(self.ours), max(self.baseline) / min(self.ours)
        return min(self.ours) / max(self.baseline), max(self.ours) / min(self.baseline)


def configure_django(environment: Environment) -> None:
    import django
    from django.conf import settings

    ours = {
        "BACKEND": "django_distcache.cache.RedisClusterCache",
        "LOCATION": environment.cluster_urls,
        "KEY_PREFIX": KEY_PREFIX,
        "TIMEOUT": TTL,
    }
    settings.configure(
        SECRET_KEY="bench-" + os.urandom(16).hex(),
        USE_TZ=True,
        CACHES={
            "default": ours,  # VERSION_CHECK_INTERVAL 1 s, the default
            # The same entries (same prefix and secret), read without in-process tag versions.
            "strict": {**ours, "OPTIONS": {"VERSION_CHECK_INTERVAL": 0}},
            "django_redis": {
                "BACKEND": "django_redis.cache.RedisCache",
                "LOCATION": environment.standalone.url,
                "KEY_PREFIX": "dr",
                "TIMEOUT": TTL,
                "OPTIONS": {"CLIENT_CLASS": "django_redis.client.DefaultClient"},
            },
        },
    )
    django.setup()


def each(function: Callable[[Any], Any], items: Sequence[Any], ops: int) -> Callable[[], None]:
    """A runner calling function(item) for the next `ops` items, wrapping around the list."""
    cycle = itertools.cycle(items)

    def run() -> None:
        for item in itertools.islice(cycle, ops):
            function(item)

    return run


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds taken by one call, with the garbage collector off (as in harness.measure)."""
    gc.collect()
    gc.disable()
    try:
        started = time.perf_counter()
        result = function()
        return time.perf_counter() - started, result
    finally:
        gc.enable()


def check(condition: bool, what: str) -> None:
    if not condition:
        raise RuntimeError(f"correctness check failed: {what}: the benchmark is broken")


class Bench:
    def __init__(self, environment: Environment, reps: int, scale: float) -> None:
        from django.core.cache import caches

        self.reps = reps
        self.single = max(10, int(SINGLE_OPS * scale))
        self.ours = caches["default"]
        self.strict = caches["strict"]
        self.django_redis = caches["django_redis"]
        self.rng = random.Random(7)
        self.group_keys = [f"group:{i:06d}" for i in range(COVERAGE)]
        # Pairs with the same hash tag: tagged and untagged entry i live in one slot, so on one node (the
        # nodes' latencies differ by tens of µs on a shared machine; that must not enter the ratio).
        self.tagged_keys = [f"tagged:{{{i:04d}}}" for i in range(KEY_COUNT)]
        self.plain_keys = [f"plain:{{{i:04d}}}" for i in range(KEY_COUNT)]
        self.rows: list[Row] = []
        self.notes: list[str] = []

    # -- setup -------------------------------------------------------------------------------------------
    def wait_for_channel(self, timeout: float = 15.0) -> None:
        """Tag versions are held in-process only while the invalidation channel is live: wait for it."""
        self.ours.get("warm-up")  # the first use starts the subscriber thread (if the backend has not yet)
        backplane = self.ours.core.backplane
        deadline = time.monotonic() + timeout
        while not backplane.connected:
            if time.monotonic() > deadline:
                raise RuntimeError("the invalidation channel did not come up: tag versions would not be held")
            time.sleep(0.02)
        harness.log(f"invalidation channel live after the first use (drops so far: {backplane.drops})")

    def channel_state(self) -> tuple[bool, int]:
        backplane = self.ours.core.backplane
        return backplane.connected, backplane.drops

    def populate_ours(self) -> float:
        started = time.perf_counter()
        for at in range(0, COVERAGE, CHUNK):
            failed = self.ours.set_many(
                dict.fromkeys(self.group_keys[at : at + CHUNK], VALUE), TTL, tags=["group"]
            )
            check(not failed, f"set_many with tags could not store {len(failed)} keys")
        self.ours.set("single:0", VALUE, TTL, tags=["single"])
        return time.perf_counter() - started

    def populate_django_redis(self) -> float:
        started = time.perf_counter()
        for at in range(0, COVERAGE, CHUNK):
            self.django_redis.set_many(dict.fromkeys(self.group_keys[at : at + CHUNK], VALUE), TTL)
        return time.perf_counter() - started

    def sample(self) -> list[str]:
        return self.rng.sample(self.group_keys, SAMPLE)

    def expect_hits(self, cache: Any, keys: Sequence[str], what: str) -> None:
        got = cache.get_many(keys)
        check(len(got) == len(keys) and all(v == VALUE for v in got.values()), f"{what}: not all hits")

    def expect_misses(self, cache: Any, keys: Sequence[str], what: str) -> None:
        got = cache.get_many(keys)
        check(not got, f"{what}: {len(got)} of {len(keys)} sampled entries still read as hits")

    # -- rows T1 and T2 ----------------------------------------------------------------------------------
    def bench_invalidation(self) -> None:
        ours_group: list[float] = []
        ours_single: list[float] = []
        dp_reps = min(self.reps, DELETE_PATTERN_REPS)
        delete_pattern: list[float] = []
        delete_pattern_wide: list[float] = []
        populate_times: list[float] = []
        harness.log(
            f"invalidation: {self.reps} reps of (store {COVERAGE:,} tagged entries, time invalidate_tags); "
            f"{dp_reps} reps each of (store {COVERAGE:,} keys, time delete_pattern) with the default "
            f"SCAN COUNT and with itersize={ITERSIZE}"
        )
        for rep in range(self.reps):
            populate_times.append(self.populate_ours())
            sample = self.sample()
            self.expect_hits(self.ours, sample, "before invalidate_tags('group')")
            check(self.ours.get("single:0") == VALUE, "before invalidate_tags('single'): entry missing")
            time.sleep(0.2)  # let the replicas catch up with the 100,000 writes before timing
            order = ["group", "single"] if rep % 2 == 0 else ["single", "group"]
            for tag in order:
                seconds, count = timed(lambda tag=tag: self.ours.invalidate_tags(tag))
                check(count == 1, f"invalidate_tags({tag!r}) returned {count}")
                (ours_group if tag == "group" else ours_single).append(seconds)
            self.expect_misses(self.ours, sample, "after invalidate_tags('group')")
            check(self.ours.get("single:0") is None, "after invalidate_tags('single'): entry still a hit")
            if rep == 0:
                # Once, every entry rather than a sample: all 100,000 must be misses now.
                for at in range(0, COVERAGE, CHUNK):
                    self.expect_misses(self.ours, self.group_keys[at : at + CHUNK], "full check")
            if rep < dp_reps:
                for itersize, samples in ((None, delete_pattern), (ITERSIZE, delete_pattern_wide)):
                    self.populate_django_redis()
                    sample = self.sample()
                    self.expect_hits(self.django_redis, sample, "before delete_pattern")
                    time.sleep(0.2)
                    seconds, deleted = timed(
                        lambda i=itersize: self.django_redis.delete_pattern("group:*", itersize=i)
                    )
                    check(deleted == COVERAGE, f"delete_pattern deleted {deleted}, not {COVERAGE}")
                    self.expect_misses(self.django_redis, sample, "after delete_pattern")
                    samples.append(seconds)
        harness.log(
            f"storing {COVERAGE:,} tagged entries took {statistics.median(populate_times):.2f} s (median)"
        )
        coverage = f"tag on {COVERAGE:,} entries"
        operation = f"invalidate {COVERAGE:,} entries"
        self.rows.append(
            UnpairedRow(
                operation,
                "ours invalidate_tags",
                ours_group,
                "django-redis delete_pattern",
                delete_pattern,
                False,
                "speed",
                TARGETS["T1"][1],
            )
        )
        self.rows.append(
            UnpairedRow(
                operation,
                "ours invalidate_tags",
                ours_group,
                f"django-redis delete_pattern, itersize={ITERSIZE}",
                delete_pattern_wide,
                False,
                "speed",
            )
        )
        self.rows.append(
            Row(
                "invalidate_tags by coverage",
                coverage,
                ours_group,
                "tag on 1 entry",
                ours_single,
                False,
                "time",
                TARGETS["T2"][1],
            )
        )

    # -- rows T3, T4 and strict mode -----------------------------------------------------------------------
    def populate_small(self) -> None:
        for i, key in enumerate(self.tagged_keys):
            self.ours.set(key, VALUE, TTL, tags=tags_of(i))
        self.ours.set_many(dict.fromkeys(self.plain_keys, VALUE), TTL)

    def steady_state(self) -> None:
        """Warm-up reads: every tag version of the pool held in-process, every entry a hit."""
        for key in self.tagged_keys:
            check(self.ours.get(key) == VALUE, f"tagged get of {key}")
        for key in self.plain_keys[:10]:
            check(self.ours.get(key) == VALUE, f"untagged get of {key}")
        for key in self.tagged_keys[:10]:
            check(self.strict.get(key) == VALUE, f"VERSION_CHECK_INTERVAL=0 get of {key}")
        held = self.ours.core.tags.held_count()
        check(held >= len(TAG_POOL), f"only {held} of {len(TAG_POOL)} tag versions held in-process")
        check(
            self.strict.core.tags.held_count() == 0, "VERSION_CHECK_INTERVAL=0 holds tag versions in-process"
        )

    def bench_get(self) -> None:
        """Tagged vs untagged get, then (separately) strict mode vs untagged get.

        Two measurements rather than one of three contenders: the in-process versions expire after
        VERSION_CHECK_INTERVAL of wall time, so a third contender's time between the tagged slices would add
        re-fetches to the tagged get's cost that a pair does not see.
        """
        n = self.single
        self.steady_state()
        before = self.channel_state()
        for ours_name, cache, label, target in (
            ("tagged get", self.ours, "3 tags", TARGETS["T3"][1]),
            ("tagged get, VERSION_CHECK_INTERVAL=0", self.strict, "3 tags, VERSION_CHECK_INTERVAL=0", None),
        ):
            samples = harness.measure(
                [
                    Contender(ours_name, each(cache.get, self.tagged_keys, n), n),
                    Contender("untagged get", each(self.ours.get, self.plain_keys, n), n),
                ],
                self.reps,
                SLICES,
                f"get: {ours_name} vs untagged",
            )
            self.rows.append(
                Row(
                    "get",
                    label,
                    samples[ours_name],
                    "untagged",
                    samples["untagged get"],
                    False,
                    "time",
                    target,
                )
            )
        self.channel_kept("get", before)

    def bench_set(self) -> None:
        n = self.single
        tagged = [(key, tags_of(i)) for i, key in enumerate(self.tagged_keys)]
        ours_set = self.ours.set

        def set_tagged(item: tuple[str, list[str]]) -> None:
            ours_set(item[0], VALUE, TTL, tags=item[1])

        def set_untagged(key: str) -> None:
            ours_set(key, VALUE, TTL)

        before = self.channel_state()
        samples = harness.measure(
            [
                Contender("tagged set", each(set_tagged, tagged, n), n),
                Contender("untagged set", each(set_untagged, self.plain_keys, n), n),
            ],
            self.reps,
            SLICES,
            "set, tagged vs untagged",
        )
        self.channel_kept("set", before)
        self.rows.append(
            Row(
                "set",
                "3 tags",
                samples["tagged set"],
                "untagged",
                samples["untagged set"],
                False,
                "time",
                TARGETS["T4"][1],
            )
        )

    def channel_kept(self, what: str, before: tuple[bool, int]) -> None:
        connected, drops = self.channel_state()
        if not (before[0] and connected and drops == before[1]):
            self.notes.append(f"the invalidation channel dropped during the {what} rows")
            harness.log(f"warning: the invalidation channel dropped during the {what} rows")

    def check_tagged_entries(self) -> None:
        """The entries timed above really are checked against their tags: invalidate one, they miss."""
        self.ours.invalidate_tags("owner:3")
        for cache, name in ((self.ours, "ours"), (self.strict, "VERSION_CHECK_INTERVAL=0")):
            got = cache.get_many(self.tagged_keys)
            gone = [i for i, key in enumerate(self.tagged_keys) if key not in got]
            check(gone == [i for i in range(KEY_COUNT) if i % 10 == 3], f"{name}: wrong entries invalidated")
        got = self.ours.get_many(self.plain_keys)
        check(len(got) == KEY_COUNT, "untagged entries were lost")


def main(argv: list[str] | None = None) -> int:
    parser = harness.common_parser(__spec__.name, __doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        with harness.servers(args.base_port, args.keep_cluster, args.replicas) as environment:
            configure_django(environment)
            bench = Bench(environment, args.reps, args.scale)
            bench.wait_for_channel()
            bench.bench_invalidation()
            bench.populate_small()
            bench.bench_get()
            bench.bench_set()
            bench.check_tagged_entries()
            info = dict(environment.info)
            info["machine"] += ", at end: " + " / ".join(f"{v:.2f}" for v in os.getloadavg())
            # The subscriber thread outlives the bench; stopping the servers is not a drop worth a warning.
            logging.getLogger("django_distcache.backplane").setLevel(logging.ERROR)
    except KeyboardInterrupt:
        harness.log("interrupted; servers stopped")
        return 130
    harness.log(f"done in {time.monotonic() - started:.0f}s")
    settings = (
        f"invalidation: medians of {args.reps} reps of one timed call each after storing {COVERAGE:,} "
        f"tagged entries (ours), {min(args.reps, DELETE_PATTERN_REPS)} reps for delete_pattern; get/set: "
        f"medians of {args.reps} reps after a warm-up, {SLICES} interleaved slices of {bench.single} ops "
        f"per rep and contender over {KEY_COUNT:,} entries (3 tags each from a pool of {len(TAG_POOL)}, "
        f"or none); {len(VALUE)}-byte values; single thread"
    )
    if bench.notes:
        settings += "; " + "; ".join(bench.notes)
    report = harness.Report(
        "Tags: invalidate_tags vs django-redis delete_pattern, tagged get/set overhead",
        bench.rows,
        {label: text for label, (text, _) in TARGETS.items()},
        info,
        settings,
    )
    report.emit(args.markdown)
    return 1 if args.strict and report.misses() else 0


if __name__ == "__main__":
    sys.exit(main())
