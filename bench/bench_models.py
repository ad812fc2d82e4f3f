"""Model caching on PostgreSQL: get_cached vs the ORM, save_behind vs save, write-behind coalescing and lag.

    .venv/bin/python -m bench.bench_models [--markdown] [--keep-cluster] [--reps 5] [--scale 1.0]
        [--hot-rate 2000] [--hot-seconds 15] [--hot-rows 100] [--drain-intervals 0,1,5] [--profile CALLS]

Ours runs on a local 3-primary Redis Cluster (harness.servers), the database is the machine's PostgreSQL on
loopback (user postgres, trust auth; --pg-host/--pg-port/--pg-user): a database `distcache_bench` of our
own, created if missing and dropped at the end (when it already existed, only our tables are created and
dropped). Django is configured in-process; the models live in this file under the app label `bench`,
their tables are created with the schema editor.

M1, get_cached hit vs ORM get: 1,000 rows of a write-through model (5 columns), all in the cache (one
get_cached each beforehand; a checked pass runs no SQL and returns the database's values), read by pk in
turn, single thread, interleaved slices (harness.measure). Informational: a prepared psycopg SELECT (the
database without the ORM) and cache.get of the same row tuple (one Redis round trip, no model).

M2, save_behind vs save: `obj.views += 1` then `save_behind(obj, update_fields=["views"])` on 1,000 cached
rows of a write-behind model, against `obj.save(update_fields=["views"])` on 1,000 rows of the same shape
not registered with cache_model (plain Django on PostgreSQL, autocommit: one UPDATE and one commit per
call), and against `cache.set` of the same entry (the row's values under a key of the row: what
save_behind costs beyond storing the entry). In the same interleaved run: `incr_behind(Model, pk,
"views", 1)` (when the code has it) against `Model.objects.filter(pk=...).update(views=F("views") + 1)`.
Informational: the same save() on a write-through model. No drainer runs while timing; the queue is
drained afterwards and the database checked against the last values written and the increments counted.

M3, hot rows: save_behind at `--hot-rate` calls/s (default 2,000, paced, HOT_WRITERS threads each on rows
of its own) for `--hot-seconds` (15) on `--hot-rows` rows (default 100, chosen at random), while ONE
drainer in a separate process (this script with --drainer) runs `flush_behind()` shard by shard, in a
loop: continuously, or once per interval as Celery beat would (`--drain-intervals`, one run per value).
Per shard pass the drainer notes PostgreSQL's n_tup_upd of the table (its own statistics flushed with
pg_stat_force_next_flush() after each pass) and the newest stream id the pass read; the changes the
writers queued between two passes' ids give the distinct rows each pass had to write. See
docs/benchmarks.md for what each figure measures.

--profile CALLS: instead of the benchmark, the round trips and cProfile listings of get_cached and
save_behind (a diagnostic, as bench/profile_backend.py is for the backend).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import gc
import itertools
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from . import harness
from .harness import Contender, Environment, Report, Row, Target

APP_LABEL = "bench"
DATABASE = "distcache_bench"
DRAINER_ENV = "DISTCACHE_BENCH_DRAINER"

ROWS = 1_000  # rows per table for M1 and M2
SLICES = 20
READ_OPS = 200  # per slice at --scale 1
SAVE_OPS = 50  # saves are slower (a commit each)
HOT_RATE = 2_000  # save_behind calls per second in M3, spread over HOT_WRITERS threads
HOT_SECONDS = 15.0  # of writing per M3 run
HOT_WRITERS = 4
HOT_ROWS = 100
LAG_MARGIN = 0.5  # M3b: the lag p99 may exceed the drain interval by this much
LAG_SAMPLE_EVERY = 0.2  # seconds between behind_metrics() samples during M3
DRAIN_TIMEOUT = 180.0

TARGETS = {
    "M1": ("get_cached hit ≥ 10× faster than Model.objects.get(pk=...) on PostgreSQL", Target("M1", 10.0)),
    "M2": ("save_behind ≥ 4× the calls/s of obj.save(update_fields=...) on PostgreSQL", Target("M2", 4.0)),
    "M2b": (
        "save_behind ≤ 1.5× the time of a plain cache.set of the same entry",
        Target("M2b", at_most=1.5),
    ),
    "M3": (
        "each drain pass writes each changed row at most once (pg_stat_user_tables.n_tup_upd per pass ≤ "
        "the distinct rows changed in it)",
        None,
    ),
    "M3b": (
        f"lag p99 ≤ drain interval + {LAG_MARGIN:g} s at {HOT_RATE:,} save_behind calls/s on {HOT_ROWS} hot rows",
        None,
    ),
}


# --------------------------------------------------------------------------- Django and PostgreSQL


@dataclass
class Setup:
    """Everything the drainer process needs to see the same cache, database and models as the writer."""

    cluster_urls: list[str]
    key_prefix: str
    secret_key: str
    database: dict[str, str]
    batch_size: int | None = None  # BEHIND_BATCH_SIZE, when not the library's default


def configure_django(setup: Setup) -> None:
    import django
    from django.conf import settings

    settings.configure(
        SECRET_KEY=setup.secret_key,
        USE_TZ=True,
        INSTALLED_APPS=["django_distcache", "bench"],
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        DATABASES={"default": {"ENGINE": "django.db.backends.postgresql", **setup.database}},
        CACHES={
            "default": {
                "BACKEND": "django_distcache.cache.RedisClusterCache",
                "LOCATION": setup.cluster_urls,
                "KEY_PREFIX": setup.key_prefix,
                "TIMEOUT": 300,
                # The drains are ours (a drainer process); there is no Celery broker to trigger.
                "OPTIONS": {
                    "BEHIND_TRIGGER_BACKLOG": 0,
                    **({"BEHIND_BATCH_SIZE": setup.batch_size} if setup.batch_size else {}),
                },
            }
        },
    )
    django.setup()


@dataclass
class Models:
    product: Any  # write-through, cached by pk and slug (M1)
    behind: Any  # write-behind (M2)
    plain: Any  # not cached: the baseline of M2
    through: Any  # write-through: an informational baseline of M2
    hot: Any  # write-behind, only written by the drainer (M3; its UPDATE count is PostgreSQL's)
    counted: Any  # write-behind, counted with incr_behind (M2)
    updated: Any  # not cached, counted with update(views=F("views") + 1): the baseline of incr_behind

    def all(self) -> list[Any]:
        from django_distcache.models import BehindApplied  # the drain's applied marks

        return [
            self.product,
            self.behind,
            self.plain,
            self.through,
            self.hot,
            self.counted,
            self.updated,
            BehindApplied,
        ]


def define_models() -> Models:
    """The bench's models, registered as an app would; defined after django.setup() (they need the app
    registry), in the writer and in the drainer alike, so both compute the same model fingerprints."""
    from django.db import models
    from django.utils import timezone

    import django_distcache

    def model(name: str, columns: dict[str, Any]) -> Any:
        meta = type("Meta", (), {"app_label": APP_LABEL, "db_table": f"distcache_bench_{name.lower()}"})
        return type(name, (models.Model,), {"__module__": __name__, "Meta": meta, **columns})

    def counter_columns() -> dict[str, Any]:
        return {
            "name": models.CharField(max_length=50),
            "views": models.IntegerField(default=0),
            "note": models.CharField(max_length=20, default=""),
        }

    product = model(
        "Product",
        {
            "name": models.CharField(max_length=100),
            "slug": models.SlugField(unique=True),
            "price": models.DecimalField(max_digits=8, decimal_places=2, default=0),
            "stock": models.IntegerField(default=0),
            "updated_at": models.DateTimeField(default=timezone.now),
        },
    )
    behind, plain, through, hot, counted, updated = (
        model(name, counter_columns())
        for name in (
            "BehindCounter",
            "PlainCounter",
            "ThroughCounter",
            "HotCounter",
            "CountedCounter",
            "UpdatedCounter",
        )
    )
    django_distcache.cache_model(product, lookups=("pk", "slug"))
    django_distcache.cache_model(behind, write="behind")
    django_distcache.cache_model(through)
    django_distcache.cache_model(hot, write="behind")
    django_distcache.cache_model(counted, write="behind")
    return Models(product, behind, plain, through, hot, counted, updated)


def command_counts(ports: list[int]) -> Counter[str]:
    """Calls per command, summed over the given nodes (INFO commandstats: counted by the servers, so
    without any cost to the timed client)."""
    import redis

    counts: Counter[str] = Counter()
    for port in ports:
        with redis.Redis(host=harness.HOST, port=port) as client:
            for name, stats in client.info("commandstats").items():
                counts[name.removeprefix("cmdstat_")] += int(stats["calls"])
    return counts


def postgres_problem(host: str, port: int, user: str) -> str | None:
    """Why the benchmark cannot use PostgreSQL (checked before any server is started), or None."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed"
    try:
        with admin_connection({"HOST": host, "PORT": str(port), "USER": user}):
            return None
    except psycopg.Error as error:
        return str(error).strip()


def admin_connection(database: dict[str, str], name: str = "postgres") -> Any:
    import psycopg

    return psycopg.connect(
        host=database["HOST"], port=database["PORT"], user=database["USER"], dbname=name, autocommit=True
    )


@contextlib.contextmanager
def bench_database(host: str, port: int, user: str, name: str) -> Iterator[dict[str, str]]:
    """Our database: created if missing and then dropped at the end; if it existed, left in place."""
    from psycopg import sql

    database = {"HOST": host, "PORT": str(port), "USER": user, "NAME": name}
    with admin_connection(database) as admin:
        existed = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if not existed:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            harness.log(f"created the PostgreSQL database {name} on {host}:{port}")
        else:
            harness.log(f"PostgreSQL database {name} exists: using it, only our tables will be dropped")
    try:
        yield database
    finally:
        with harness.shielded():
            from django.db import connections

            with contextlib.suppress(Exception):
                connections.close_all()
            if not existed:
                try:
                    with admin_connection(database) as admin:
                        admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
                    harness.log(f"dropped the PostgreSQL database {name}")
                except Exception as error:  # keep going: the servers must still come down
                    harness.log(f"could not drop the PostgreSQL database {name}: {error!r}")


def create_tables(models_: Models) -> None:
    from django.db import connection

    drop_tables(models_)
    with connection.schema_editor() as editor:
        for model in models_.all():
            editor.create_model(model)


def drop_tables(models_: Models) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        for model in models_.all():
            cursor.execute(f'DROP TABLE IF EXISTS "{model._meta.db_table}"')


def postgres_description(database: dict[str, str]) -> str:
    with admin_connection(database, database["NAME"]) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
        synchronous = conn.execute("SHOW synchronous_commit").fetchone()[0]
        fsync = conn.execute("SHOW fsync").fetchone()[0]
    return (
        f"PostgreSQL {version} on {database['HOST']}:{database['PORT']} (the machine's), database "
        f"{database['NAME']}; synchronous_commit={synchronous}, fsync={fsync}; psycopg "
        f"{harness._version('psycopg')}"
    )


def updated_rows(database: dict[str, str], table: str, expect: int, timeout: float = 10.0) -> int:
    """PostgreSQL's own count of rows UPDATEd in `table` (pg_stat_user_tables.n_tup_upd).

    A backend reports its counts at most once a second and when it exits; the drainer has exited when this
    runs, so the count settles within moments: wait until it reaches `expect` or stops moving."""
    deadline = time.monotonic() + timeout
    last, stable_since = -1, time.monotonic()
    with admin_connection(database, database["NAME"]) as conn:
        while True:
            conn.execute("SELECT pg_stat_clear_snapshot()")
            row = conn.execute(
                "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = %s", [table]
            ).fetchone()
            count = int(row[0]) if row else 0
            if count != last:
                last, stable_since = count, time.monotonic()
            if count >= expect or time.monotonic() > deadline or time.monotonic() - stable_since > 3.0:
                return count
            time.sleep(0.1)


# --------------------------------------------------------------------------- result rows


class FigureRow(Row):
    """A row whose figure is not a ratio of two timings: a share, a count check, or a lag."""

    def __init__(
        self,
        operation: str,
        ours: str,
        baseline: str,
        figure: str,
        target_text: str,
        result: str,
        label: str | None = None,
    ) -> None:
        self.operation, self.ours_text, self.baseline_text = operation, ours, baseline
        self.figure, self.target_text, self.outcome, self.label = figure, target_text, result, label
        self.target = None

    def result(self) -> str:
        return self.outcome

    def cells(self) -> list[str]:
        return [
            self.operation,
            self.ours_text,
            self.baseline_text,
            self.figure,
            self.target_text,
            self.outcome,
        ]


class ModelReport(Report):
    """Targets of ratio rows and of figure rows (FigureRow carries its own label and figure)."""

    def target_rows(self) -> list[list[str]]:
        rows = []
        for row in self.rows:
            if isinstance(row, FigureRow):
                if row.label is not None:
                    rows.append([row.label, self.target_texts[row.label], row.figure, row.outcome])
            elif row.target is not None:
                rows.append(
                    [
                        row.target.label,
                        self.target_texts[row.target.label],
                        f"{row.ratio():.2f}×",
                        row.result(),
                    ]
                )
        return rows

    def misses(self) -> int:
        return sum(1 for row in self.rows if row.result() in ("MISS", "FAIL"))


# --------------------------------------------------------------------------- helpers


def each(function: Callable[[Any], Any], items: Sequence[Any], ops: int) -> Callable[[], None]:
    """A runner calling function(item) for the next `ops` items, wrapping around the list."""
    cycle = itertools.cycle(items)

    def run() -> None:
        for item in itertools.islice(cycle, ops):
            function(item)

    return run


def check(condition: bool, what: str) -> None:
    if not condition:
        raise RuntimeError(f"correctness check failed: {what}: the benchmark is broken")


@contextlib.contextmanager
def counting_queries() -> Iterator[list[str]]:
    """The SQL statements Django runs inside the block."""
    from django.db import connection

    statements: list[str] = []

    def wrapper(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        statements.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(wrapper):
        yield statements


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def stream_id(text: str | bytes) -> tuple[int, int]:
    if isinstance(text, bytes):
        text = text.decode()
    millis, _, sequence = text.partition("-")
    return int(millis), int(sequence or 0)


def seconds_text(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1000:.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.1f} ms"


# --------------------------------------------------------------------------- the drainer process


def _profiled(function: Any) -> tuple[Any, str]:
    """Run `function()` under cProfile: its result, and the top of the profile by own and total time."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    result = function()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(22)
    stats.sort_stats("cumulative").print_stats(30)
    return result, out.getvalue()


def drainer_main() -> int:
    """Runs in its own process: drain every shard, over and over, until stdin closes; then print what it
    did as JSON. Per shard and pass it notes when the pass ended and the newest stream id the drain read:
    every change up to that id is in the database by then (a pass reads until the stream is empty)."""
    config = json.loads(os.environ[DRAINER_ENV])
    setup = Setup(**config["setup"])
    interval = float(config["interval"])
    configure_django(setup)
    define_models()
    from django.core.cache import caches

    from django_distcache.models import drain as behind
    from django_distcache.models import flush_behind
    from django_distcache.models.drain import DrainReport

    cache = caches["default"]
    shards = range(cache.core.settings.behind_shards)
    # The newest stream id each shard's drain has read (and so, once its pass returns, committed): the
    # drain reads its stream from the head, so every change up to it is in the database by then.
    last_read: dict[int, str] = {}
    apply_batch = behind._apply_batch

    def noting_apply_batch(cache_: Any, shard: int, keys: Any, entries: Any, *rest: Any) -> Any:
        result = apply_batch(cache_, shard, keys, entries, *rest)
        if entries:
            last = entries[-1][0]
            last_read[shard] = last.decode() if isinstance(last, bytes) else str(last)
        return result

    behind._apply_batch = noting_apply_batch
    stop = threading.Event()

    def wait_for_eof() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    from django.db import connection

    flush_behind()  # connections up before the writer starts
    table = config["table"]
    stats = admin_connection(setup.database, setup.database["NAME"])

    def updates_so_far() -> int:
        """The table's n_tup_upd once this process's own counts are in: a backend reports its statistics
        when it goes idle, at most once a second unless asked to (pg_stat_force_next_flush, PostgreSQL 15)."""
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_stat_force_next_flush()")
        row = stats.execute(
            "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = %s", [table]
        ).fetchone()
        return int(row[0]) if row else 0

    updates = updates_so_far()
    print("ready", flush=True)
    total = DrainReport()
    # (time the shard's pass ended, shard, newest id read, rows UPDATEd by the pass per PostgreSQL)
    passes: list[tuple[float, int, str, int]] = []
    sweeps = idle_sweeps = 0
    busy = 0.0
    while not stop.is_set():
        started = time.monotonic()
        read = 0
        for shard in shards:
            report = flush_behind(shards=[shard])
            ended = time.time()
            after = updates_so_far() if report.changes_read else updates
            passes.append((ended, shard, last_read.get(shard, "0-0"), after - updates))
            updates = after
            total.add(report)
            read += report.changes_read
        sweeps += 1
        busy += time.monotonic() - started
        if interval:
            stop.wait(max(0.0, interval - (time.monotonic() - started)))  # a beat-like schedule
        elif not read:
            idle_sweeps += 1
            stop.wait(0.005)
    stats.close()
    result = {
        "passes": passes,
        "sweeps": sweeps,
        "idle_sweeps": idle_sweeps,
        "busy_seconds": busy,
        "report": {
            name: getattr(total, name)
            for name in (
                "changes_read",
                "changes_applied",
                "rows_written",
                "batches",
                "failed_rows",
                "dead_lettered",
            )
        },
    }
    print(json.dumps(result), flush=True)
    return 0


class Drainer:
    """The drainer process, started and stopped by the writer; it also dies with us if we are killed."""

    def __init__(self, setup: Setup, interval: float, table: str) -> None:
        self.setup, self.interval, self.table = setup, interval, table
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        config = {"setup": self.setup.__dict__, "interval": self.interval, "table": self.table}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.bench_models", "--drainer"],
            cwd=harness.ROOT,
            env={**os.environ, DRAINER_ENV: json.dumps(config)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=harness._die_with_parent,
        )
        line = self.process.stdout.readline().strip()
        if line != "ready":
            self.kill()
            raise RuntimeError(f"the drainer process did not start (said {line!r})")
        harness.log(f"drainer process {self.process.pid} ready (interval: {self.interval or 'continuous'})")

    def stop(self, timeout: float = 60.0) -> dict[str, Any]:
        assert self.process is not None
        output, _ = self.process.communicate(timeout=timeout)  # closes its stdin: it finishes its sweep
        status = self.process.returncode
        self.process = None
        if status != 0:
            raise RuntimeError(f"the drainer process exited with status {status}")
        return json.loads(output.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None


# --------------------------------------------------------------------------- the benchmark


@dataclass
class HotRun:
    interval: float
    batch_size: int | None
    calls: int
    rows: int
    write_seconds: float
    drained_after: float  # seconds from the last call to an empty queue
    updates: int  # pg_stat_user_tables.n_tup_upd
    drainer: dict[str, Any]
    metrics_delta: dict[str, int]
    lags: list[float]
    metric_lags: list[float]
    mismatched: list[Any]
    cache_mismatched: list[Any]
    max_shard_backlog: int  # the most changes one shard held in the samples (cf. BEHIND_TRIGGER_BACKLOG)
    rate: int  # the calls per second asked of the writers
    pass_writes: list[tuple[int, int]] = field(default_factory=list)  # per pass: (rows UPDATEd, distinct)
    notes: list[str] = field(default_factory=list)


class Bench:
    def __init__(
        self, setup: Setup, models_: Models, reps: int, scale: float, primary_ports: list[int]
    ) -> None:
        from django.core.cache import caches

        self.setup = setup
        self.primary_ports = primary_ports
        self.models = models_
        self.reps = reps
        self.read_ops = max(10, int(READ_OPS * scale))
        self.save_ops = max(5, int(SAVE_OPS * scale))
        self.cache = caches["default"]
        self.rows: list[Row] = []
        self.notes: list[str] = []

    # -- data --------------------------------------------------------------------------------------------
    def populate(self) -> None:
        from django.utils import timezone

        models_ = self.models
        now = timezone.now()
        models_.product.objects.bulk_create(
            models_.product(
                name=f"Product {i}",
                slug=f"product-{i}",
                price=Decimal(i % 500) + Decimal("0.99"),
                stock=i,
                updated_at=now,
            )
            for i in range(ROWS)
        )
        counters = (models_.behind, models_.plain, models_.through, models_.counted, models_.updated)
        for model in counters:
            model.objects.bulk_create(model(name=f"counter {i}") for i in range(ROWS))
        harness.log(f"inserted {ROWS:,} rows in each of {1 + len(counters)} tables")

    # -- M1 ----------------------------------------------------------------------------------------------
    def cache_products(self) -> list[Any]:
        """Every product in the cache, checked: a pass of get_cached runs no SQL and returns the database's
        values. Also stores each row's stored form under a plain key, for the cache.get floor."""
        from django_distcache.models import get_cached

        product = self.models.product
        fields = [f.attname for f in product._meta.concrete_fields]
        expected = {row[0]: row for row in product.objects.order_by("pk").values_list(*fields)}
        pks = list(expected)
        for pk in pks:  # misses: each fills the cache (keys by pk and by slug)
            get_cached(product, pk=pk)
        with counting_queries() as statements:
            for pk in pks:
                row = get_cached(product, pk=pk)
                check(tuple(getattr(row, name) for name in fields) == expected[pk], f"get_cached pk={pk}")
        check(not statements, f"get_cached of cached rows ran {len(statements)} SQL statements")
        for pk, row in expected.items():  # what get_cached's entry holds (pickle), without tags
            self.cache.set(f"plain-row:{pk}", ("row", row))
        harness.log(f"all {len(pks):,} rows cached: a pass of get_cached ran no SQL and matched the database")
        return pks

    def bench_reads(self) -> None:
        import psycopg

        from django_distcache.models import get_cached

        product = self.models.product
        pks = self.cache_products()
        fields = [f.attname for f in product._meta.concrete_fields]
        plain_keys = [f"plain-row:{pk}" for pk in pks]
        check(self.cache.get(plain_keys[0]) is not None, "the plain copy of a row")
        database = self.setup.database
        raw = psycopg.connect(
            host=database["HOST"],
            port=database["PORT"],
            user=database["USER"],
            dbname=database["NAME"],
            autocommit=True,
            prepare_threshold=0,  # prepared from the first call: the fastest single-row SELECT psycopg has
        )
        select = f'SELECT {", ".join(fields)} FROM "{product._meta.db_table}" WHERE id = %s'
        try:
            n = self.read_ops
            objects = product.objects
            hot = pks[:HOT_ROWS]
            before = command_counts(self.primary_ports)
            samples = harness.measure(
                [
                    Contender("get_cached", each(lambda pk: get_cached(product, pk=pk), pks, n), n),
                    Contender("get_cached hot", each(lambda pk: get_cached(product, pk=pk), hot, n), n),
                    Contender("ORM get", each(lambda pk: objects.get(pk=pk), pks, n), n),
                    Contender("psycopg", each(lambda pk: raw.execute(select, [pk]).fetchone(), pks, n), n),
                    Contender("cache.get", each(self.cache.get, plain_keys, n), n),
                ],
                self.reps,
                SLICES,
                "get_cached hit vs Model.objects.get, a prepared psycopg SELECT, cache.get",
            )
            commands = command_counts(self.primary_ports) - before
        finally:
            raw.close()
        # Every GET beyond one per call of the three cache contenders re-read a tag version (held in-process
        # for VERSION_CHECK_INTERVAL, 1 s: the 100 hot rows come back within it, the 1,000 rows in turn often do
        # not); an EVAL would be a fill, i.e. a miss.
        calls = (1 + self.reps * SLICES) * n
        check(commands["eval"] == 0, f"{commands['eval']} fills while timing get_cached: not all hits")
        extra = (commands["get"] - 3 * calls) / calls
        self.notes.append(
            f"M1: {commands['get']:,} GETs on the primaries for 3 × {calls:,} calls of get_cached (1,000 rows "
            f"in turn, 100 hot rows) and cache.get, no fill: up to {1 + extra:.2f} GETs per get_cached hit "
            "on the 1,000 rows (a row's tag version is held in-process for 1 s; a row read less often "
            "re-reads it, one more round trip)"
        )
        harness.log(self.notes[-1])
        cached_rows = f"get_cached hit, {len(pks):,} rows in turn"
        hot_rows = f"get_cached hit, {len(hot)} hot rows"
        orm = "Model.objects.get(pk=…)"
        floor = "cache.get of the same row tuple"
        self.rows += [
            Row(
                "get by pk",
                cached_rows,
                samples["get_cached"],
                orm,
                samples["ORM get"],
                False,
                "speed",
                TARGETS["M1"][1],
            ),
            Row("get by pk", hot_rows, samples["get_cached hot"], orm, samples["ORM get"], False, "speed"),
            Row(
                "get by pk",
                cached_rows,
                samples["get_cached"],
                "psycopg prepared SELECT, no ORM",
                samples["psycopg"],
                False,
                "speed",
            ),
            Row("get by pk", cached_rows, samples["get_cached"], floor, samples["cache.get"], False, "time"),
            Row("get by pk", hot_rows, samples["get_cached hot"], floor, samples["cache.get"], False, "time"),
        ]

    # -- diagnostics (--profile) -------------------------------------------------------------------------
    def profile(self, calls: int) -> None:
        """Where the time of a get_cached hit and of a save_behind goes (to stderr): the round trips and
        commands of one call, the median time per call without a profiler, then cProfile listings."""
        from django_distcache.models import flush_behind, get_cached, save_behind

        product, behind = self.models.product, self.models.behind
        pks = self.cache_products()
        counters = list(behind.objects.order_by("pk"))
        for obj in counters:
            get_cached(behind, pk=obj.pk)

        def read(pk: Any) -> None:
            get_cached(product, pk=pk)

        def write(obj: Any) -> None:
            obj.views += 1
            save_behind(obj, update_fields=["views"])

        topology = self.cache.core.shared.topology
        for name, function, items in (
            ("get_cached hit", read, pks),
            ("cache.get", self.cache.get, [f"plain-row:{pk}" for pk in pks]),
            ("Model.objects.get", lambda pk: product.objects.get(pk=pk), pks),
            ("save_behind", write, counters),
        ):
            each(function, items, 200)()  # warm
            trips: list[str] = []
            execute, execute_batch = topology.execute, topology.execute_batch

            def one(call: Any, execute: Any = execute, trips: list[str] = trips) -> Any:
                trips.append(str(call.args[0]))
                return execute(call)

            def batch(batch_calls: Any, execute_batch: Any = execute_batch, trips: list[str] = trips) -> Any:
                trips.append(" + ".join(str(call.args[0]) for call in batch_calls))
                return execute_batch(batch_calls)

            topology.execute, topology.execute_batch = one, batch
            try:
                each(function, items, 200)()
            finally:
                del topology.execute, topology.execute_batch
            per_call = Counter(trips)
            shape = ", ".join(f"{text} ×{count / 200:.2f}" for text, count in per_call.most_common())
            timings, cpu = [], []  # wall time, and this thread's CPU time (Python plus its system calls)
            for _ in range(5):
                started, cpu_started = time.perf_counter(), time.thread_time()
                each(function, items, calls // 5)()
                timings.append((time.perf_counter() - started) / (calls // 5))
                cpu.append((time.thread_time() - cpu_started) / (calls // 5))
            out = _profiled(each(function, items, calls))[1]
            harness.log(
                f"PROFILE {name}: {len(trips) / 200:.2f} round trips per call ({shape}); "
                f"{sorted(timings)[2] * 1e6:.0f} µs per call, {sorted(cpu)[2] * 1e6:.0f} µs of it on this "
                f"thread's CPU (medians of 5 × {calls // 5}, no profiler)"
            )
            print(f"\n===== {name}: cProfile of {calls} calls =====\n{out}", file=sys.stderr)
        flush_behind()
        # The drain: `calls` changes queued on 100 hot rows, then one flush_behind() under the profiler.
        hot = counters[:HOT_ROWS]
        each(write, hot, calls)()
        report, out = _profiled(flush_behind)
        harness.log(
            f"PROFILE flush_behind: {report.changes_applied:,} changes on {len(hot)} rows, "
            f"{report.rows_written:,} rows written in {report.batches} batches, {report.seconds:.2f} s "
            "(under the profiler)"
        )
        print(f"\n===== flush_behind of {calls} changes =====\n{out}", file=sys.stderr)

    # -- M2 ----------------------------------------------------------------------------------------------
    def bench_saves(self) -> None:
        from django.db.models import F

        from django_distcache import models as model_api
        from django_distcache.models import flush_behind, get_cached, save_behind

        incr_behind = getattr(model_api, "incr_behind", None)
        models_ = self.models
        behind = list(models_.behind.objects.order_by("pk"))
        plain = list(models_.plain.objects.order_by("pk"))
        through = list(models_.through.objects.order_by("pk"))
        counted = list(models_.counted.objects.order_by("pk"))
        updated = list(models_.updated.objects.order_by("pk"))
        fields = ["views"]
        for obj in behind + counted:  # cached, as rows written behind are
            get_cached(type(obj), pk=obj.pk)

        def queue(obj: Any) -> None:
            obj.views += 1
            save_behind(obj, update_fields=fields)

        def save(obj: Any) -> None:
            obj.views += 1
            obj.save(update_fields=fields)

        def plain_set(obj: Any) -> None:
            # The same entry as save_behind's: the row's values under a key of the row, no tags, no queue.
            obj.views += 1
            self.cache.set(f"plain-behind:{obj.pk}", ("row", (obj.pk, obj.name, obj.views, obj.note)))

        increments: Counter[Any] = Counter()
        f_updates: Counter[Any] = Counter()

        def count_behind(obj: Any) -> None:
            incr_behind(models_.counted, obj.pk, "views", 1)
            increments[obj.pk] += 1

        def count_in_database(obj: Any) -> None:
            models_.updated.objects.filter(pk=obj.pk).update(views=F("views") + 1)
            f_updates[obj.pk] += 1

        # What one save_behind sends, counted by the servers (untimed, so the timed runs are not muddled).
        probe = behind[: min(200, len(behind))]
        before = command_counts(self.primary_ports)
        each(queue, probe, len(probe))()
        commands = command_counts(self.primary_ports) - before
        self.notes.append(
            "M2: Redis commands per save_behind, counted by the servers (INFO commandstats, which also counts "
            "the commands scripts run): "
            + ", ".join(f"{name} {count / len(probe):.2f}" for name, count in commands.most_common())
        )
        harness.log(self.notes[-1])

        n = self.save_ops
        contenders = [
            Contender("save_behind", each(queue, behind, n), n),
            Contender("save", each(save, plain, n), n),
            Contender("cache.set", each(plain_set, behind, n), n),
            Contender("update F", each(count_in_database, updated, n), n),
        ]
        if incr_behind is not None:
            contenders.append(Contender("incr_behind", each(count_behind, counted, n), n))
        samples = harness.measure(
            contenders,
            self.reps,
            SLICES,
            "save_behind vs save(update_fields=...) vs cache.set; incr_behind vs update(F() + 1)",
        )
        versus_through = harness.measure(
            [
                Contender("save_behind", each(queue, behind, n), n),
                Contender("save, write-through", each(save, through, n), n),
            ],
            self.reps,
            SLICES,
            "save_behind vs save(update_fields=...) on a write-through model",
        )
        queued = sum(obj.views for obj in behind)
        gc.collect()
        started = time.perf_counter()
        report = flush_behind()
        drain_seconds = time.perf_counter() - started
        in_db = dict(models_.behind.objects.values_list("pk", "views"))
        check(all(in_db[obj.pk] == obj.views for obj in behind), "after the drain the database differs")
        for model, objs in ((models_.plain, plain), (models_.through, through)):
            in_db = dict(model.objects.values_list("pk", "views"))
            check(all(in_db[obj.pk] == obj.views for obj in objs), f"{model.__name__}: saves did not land")
        in_db = dict(models_.updated.objects.values_list("pk", "views"))
        check(all(in_db[pk] == count for pk, count in f_updates.items()), "update(F() + 1) did not land")
        if incr_behind is not None:
            in_db = dict(models_.counted.objects.values_list("pk", "views"))
            lost = sum(count - in_db[pk] for pk, count in increments.items())
            check(
                lost == 0, f"incr_behind: {lost} of {sum(increments.values())} increments not in the database"
            )
        self.notes.append(
            f"M2's queue ({queued:,} save_behind and {sum(increments.values()):,} incr_behind calls on "
            f"{ROWS:,} rows each) drained afterwards by one flush_behind() in {drain_seconds:.2f} s "
            f"({report.rows_written:,} rows written in {report.batches} batches), every value checked"
        )
        harness.log(self.notes[-1])
        save_label = "obj.save(update_fields=…), not cached"
        self.rows += [
            Row("save one field", "save_behind", samples["save_behind"], save_label, samples["save"], True,
                "speed", TARGETS["M2"][1]),
            Row("save one field", "save_behind", samples["save_behind"], "cache.set of the same entry",
                samples["cache.set"], False, "time", TARGETS["M2b"][1]),
            Row("save one field", "save_behind", versus_through["save_behind"],
                "obj.save(update_fields=…), write-through model", versus_through["save, write-through"], True,
                "speed"),
        ]  # fmt: skip
        f_label = "filter(pk=…).update(views=F('views') + 1)"
        if incr_behind is not None:
            self.rows.append(
                Row("count one view", "incr_behind", samples["incr_behind"], f_label, samples["update F"],
                    True, "speed")
            )  # fmt: skip
        else:
            self.rows.append(
                FigureRow("count one view", "incr_behind: not in this code", f"{f_label}: "
                          f"{1 / statistics.median(samples['update F']):,.0f} ops/s", "—", "—", "info")
            )  # fmt: skip

    # -- M3 ----------------------------------------------------------------------------------------------
    def bench_hot(
        self, rate: int, seconds: float, row_count: int, interval: float, batch_size: int | None
    ) -> HotRun:
        from django_distcache.models import behind_metrics, get_cached, save_behind
        from django_distcache.models.streams import shard_of

        hot = self.models.hot
        hot.objects.all().delete()
        hot.objects.bulk_create(hot(name=f"hot {i}") for i in range(row_count))
        objs = list(hot.objects.order_by("pk"))
        label = hot._meta.label_lower
        shards = [shard_of(self.cache.core, label, obj.pk) for obj in objs]
        for obj in objs:
            get_cached(hot, pk=obj.pk)  # cached, as hot rows are
        writers = min(HOT_WRITERS, row_count)
        per_writer = max(1, int(rate * seconds / writers))
        calls = per_writer * writers
        updates_before = updated_rows(self.setup.database, hot._meta.db_table, 0, timeout=0)
        metrics_before = behind_metrics()

        samples: list[float] = []
        shard_backlogs: list[int] = [0]
        sampling = threading.Event()

        def sample_lag() -> None:
            while not sampling.wait(LAG_SAMPLE_EVERY):
                metrics = behind_metrics()
                samples.append(metrics["lag_seconds"])
                shard_backlogs.append(max(shard["backlog"] for shard in metrics["shards"]))

        # Each writer thread owns its rows (a row's values increase in one thread) and keeps its pace:
        # call k is due at start + k / (rate / writers); a writer that falls behind calls without sleeping.
        done_calls: list[list[tuple[str, float, int]]] = [[] for _ in range(writers)]  # (id, returned, row)
        errors: list[BaseException] = []

        def write(number: int, start: float) -> None:
            mine = list(range(number, row_count, writers))
            rng = random.Random(11 + number + int(interval * 1000))
            period = writers / rate
            log = done_calls[number]
            try:
                for k in range(per_writer):
                    pause = start + number / rate + k * period - time.perf_counter()
                    if pause > 0:
                        time.sleep(pause)
                    index = mine[rng.randrange(len(mine))]
                    obj = objs[index]
                    obj.views += 1
                    log.append((save_behind(obj, update_fields=["views"]), time.time(), index))
            except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
                errors.append(error)

        drainer = Drainer(
            dataclasses.replace(self.setup, batch_size=batch_size or self.setup.batch_size),
            interval,
            hot._meta.db_table,
        )
        drainer.start()
        sampler = threading.Thread(target=sample_lag, daemon=True)
        try:
            sampler.start()
            harness.log(
                f"M3: {calls:,} save_behind calls on {row_count} rows at {rate:,}/s ({writers} threads), "
                "drainer running"
            )
            started = time.perf_counter()
            threads = [threading.Thread(target=write, args=(n, started)) for n in range(writers)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if errors:
                raise errors[0]
            write_seconds = time.perf_counter() - started
            done = time.perf_counter()
            while behind_metrics()["backlog"]:
                if time.perf_counter() - done > DRAIN_TIMEOUT:
                    raise RuntimeError(f"the queue was not drained {DRAIN_TIMEOUT:.0f} s after the writes")
                time.sleep(0.01)
            drained_after = time.perf_counter() - done
            sampling.set()
            sampler.join()
            result = drainer.stop()
        finally:
            sampling.set()
            drainer.kill()
        made = [call for log in done_calls for call in log]
        ids = [change for change, _, _ in made]
        returned = [when for _, when, _ in made]
        rows_called = [index for _, _, index in made]
        metrics_after = behind_metrics()
        delta = {
            name: metrics_after[name] - metrics_before[name]
            for name in ("changes_applied", "rows_written", "batches")
        }
        run = HotRun(
            interval=interval,
            batch_size=batch_size,
            calls=calls,
            rows=row_count,
            write_seconds=write_seconds,
            drained_after=drained_after,
            updates=0,
            drainer=result,
            metrics_delta=delta,
            lags=self.lags(result["passes"], returned, ids, [shards[index] for index in rows_called]),
            metric_lags=samples,
            mismatched=[],
            cache_mismatched=[],
            max_shard_backlog=max(shard_backlogs),
            rate=rate,
        )
        run.pass_writes = self.pass_writes(
            result["passes"], ids, [shards[index] for index in rows_called], rows_called
        )
        run.updates = (
            updated_rows(self.setup.database, hot._meta.db_table, updates_before + delta["rows_written"])
            - updates_before
        )
        in_db = dict(hot.objects.values_list("pk", "views"))
        run.mismatched = [
            (obj.pk, obj.views, in_db.get(obj.pk)) for obj in objs if in_db.get(obj.pk) != obj.views
        ]
        run.cache_mismatched = [obj.pk for obj in objs if get_cached(hot, pk=obj.pk).views != obj.views]
        check(sum(obj.views for obj in objs) == calls, "the writer's own count")
        if delta["changes_applied"] != calls:
            run.notes.append(
                f"behind_metrics counted {delta['changes_applied']:,} changes applied, not {calls:,}"
            )
        if run.updates != delta["rows_written"]:
            run.notes.append(
                f"PostgreSQL counted {run.updates:,} row updates, behind_metrics {delta['rows_written']:,} rows written"
            )
        return run

    @staticmethod
    def lags(
        passes: list[list[Any]], returned: list[float], ids: list[str], shards: list[int]
    ) -> list[float]:
        """For each call: from save_behind's return to the end of the drainer's first pass over its shard
        whose newest id read reached the call's stream id (the change was committed by then)."""
        by_shard: dict[int, tuple[list[tuple[int, int]], list[float]]] = {}
        for ended, shard, last, _updates in passes:
            delivered, times = by_shard.setdefault(shard, ([], []))
            delivered.append(stream_id(last))
            times.append(ended)
        lags = []
        for when, change, shard in zip(returned, ids, shards, strict=True):
            delivered, times = by_shard[shard]
            at = bisect.bisect_left(delivered, stream_id(change))
            check(at < len(delivered), f"change {change} on shard {shard} never reported delivered")
            lags.append(times[at] - when)
        return lags

    @staticmethod
    def pass_writes(
        passes: list[list[Any]], ids: list[str], shards: list[int], rows: list[int]
    ) -> list[tuple[int, int]]:
        """For each drain pass that wrote: (rows PostgreSQL counted UPDATEd, distinct rows among the
        changes the pass took: those of its shard queued after the previous pass's newest id read, up
        to its own)."""
        queued: dict[int, list[tuple[tuple[int, int], int]]] = {}
        for change, shard, row in zip(ids, shards, rows, strict=True):
            queued.setdefault(shard, []).append((stream_id(change), row))
        for changes in queued.values():
            changes.sort()
        previous: dict[int, tuple[int, int]] = {}
        found = []
        for _ended, shard, last, updates in passes:
            changes = queued.get(shard, [])
            keys = [change for change, _ in changes]
            low = bisect.bisect_right(keys, previous.get(shard, (0, 0)))
            high = bisect.bisect_right(keys, stream_id(last))
            previous[shard] = stream_id(last)
            distinct = len({row for _, row in changes[low:high]})
            if updates or distinct:
                found.append((updates, distinct))
        return found

    def hot_rows(self, run: HotRun) -> None:
        cadence = "continuous drainer" if not run.interval else f"drainer every {run.interval:g} s"
        if run.batch_size:
            cadence += f", BEHIND_BATCH_SIZE {run.batch_size:,}"
        operation = f"{run.calls:,} save_behind at {run.rate:,}/s, {run.rows} hot rows, {cadence}"
        over = [(updates, distinct) for updates, distinct in run.pass_writes if updates > distinct]
        excess = max((updates - distinct for updates, distinct in over), default=0)
        self.rows.append(
            FigureRow(
                operation,
                f"rows UPDATEd per pass (n_tup_upd): {sum(u for u, _ in run.pass_writes):,} in "
                f"{len(run.pass_writes):,} passes that wrote",
                f"distinct rows changed per pass: {sum(d for _, d in run.pass_writes):,} summed",
                f"{len(over)} pass(es) over, by up to {excess} row(s)",
                "0 passes writing a row twice",
                "PASS" if not over and run.pass_writes else "MISS",
                "M3",
            )
        )
        exact = not run.mismatched and not run.cache_mismatched
        self.rows.append(
            FigureRow(
                operation,
                f"rows equal to their last write: {run.rows - len(run.mismatched)}/{run.rows} in the database, "
                f"{run.rows - len(run.cache_mismatched)}/{run.rows} via get_cached",
                "—",
                "—",
                "all rows (assert)",
                "PASS" if exact else "FAIL",
            )
        )
        lags = run.lags
        p99 = percentile(lags, 0.99)
        bound = run.interval + LAG_MARGIN
        achieved = run.calls / run.write_seconds
        self.rows.append(
            FigureRow(
                operation,
                f"lag to the database p50 {seconds_text(percentile(lags, 0.5))}, "
                f"p99 {seconds_text(p99)}, max {seconds_text(max(lags))}; writers kept "
                f"{achieved:,.0f} calls/s",
                f"behind_metrics lag_seconds sampled every {LAG_SAMPLE_EVERY:g} s: p50 "
                f"{seconds_text(percentile(run.metric_lags, 0.5))}, p99 {seconds_text(percentile(run.metric_lags, 0.99))}",
                f"p99 {seconds_text(p99)}",
                f"≤ {seconds_text(bound)} (interval + {LAG_MARGIN:g} s)",
                "PASS" if p99 <= bound and achieved >= 0.95 * run.rate else "MISS",
                "M3b",
            )
        )
        if achieved < 0.95 * run.rate:
            self.notes.append(
                f"M3 ({cadence}): the writers reached {achieved:,.0f} of {run.rate:,} calls/s, so the lag "
                "target is marked MISS (not measured at the asked rate)"
            )
        drainer = run.drainer
        self.rows.append(
            FigureRow(
                operation,
                f"rows written / calls: {run.updates / run.calls:.2%} (PostgreSQL n_tup_upd {run.updates:,})",
                f"drainer: {drainer['sweeps']:,} sweeps of {self.cache.core.settings.behind_shards} "
                f"shards, {drainer['report']['batches']:,} batches, "
                f"busy {drainer['busy_seconds']:.1f} s; most changes queued on one shard: "
                f"{run.max_shard_backlog:,}",
                f"{run.calls / max(1, run.updates):,.0f} changes per row write",
                "—",
                "info",
            )
        )

    def hot_log(self, run: HotRun) -> None:
        report = run.drainer["report"]
        harness.log(
            f"M3 ({'continuous' if not run.interval else f'every {run.interval:g} s'}): {run.calls:,} calls in "
            f"{run.write_seconds:.1f} s; queue empty {run.drained_after:.2f} s after the last call; "
            f"PostgreSQL n_tup_upd {run.updates:,}; drainer report {report}; behind_metrics delta "
            f"{run.metrics_delta}; mismatched rows: {run.mismatched[:5]} (cache {run.cache_mismatched[:5]})"
        )
        for note in run.notes:
            harness.log("note: " + note)
            self.notes.append(note)
        check(report["failed_rows"] == 0 and report["dead_lettered"] == 0, "the drainer had failed rows")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = harness.common_parser(
        __spec__.name if __spec__ else "bench.bench_models", __doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--hot-rate", type=int, default=HOT_RATE, help=f"save_behind calls/s in M3 ({HOT_RATE:,})"
    )
    parser.add_argument(
        "--hot-seconds",
        type=float,
        default=HOT_SECONDS,
        help=f"seconds of writing per M3 run ({HOT_SECONDS:g})",
    )
    parser.add_argument("--hot-rows", type=int, default=HOT_ROWS, help="rows the M3 calls go to (100)")
    parser.add_argument(
        "--drain-intervals",
        default="0,1,5",
        help="M3 runs, one per drain interval in seconds: 0 = drain continuously; 1 = once a second, the "
        "default of tasks.beat_schedule(); SECONDS:N also sets the drainer's BEHIND_BATCH_SIZE to N "
        "(default: 0,1,5)",
    )
    parser.add_argument("--parts", default="M1,M2,M3", help="which measurements to run (default: all)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="BEHIND_BATCH_SIZE (default: the library's, 500)"
    )
    parser.add_argument("--pg-host", default="127.0.0.1")
    parser.add_argument("--pg-port", type=int, default=5432)
    parser.add_argument("--pg-user", default="postgres")
    parser.add_argument("--pg-database", default=DATABASE, help="created if missing, then dropped")
    parser.add_argument(
        "--profile",
        type=int,
        metavar="CALLS",
        default=0,
        help="instead of the benchmark: round trips, timings and cProfile listings of CALLS get_cached hits "
        "and save_behind calls (to stderr)",
    )
    parser.add_argument("--drainer", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.runs = [
            (float(interval), int(batch) if batch else None)
            for interval, _, batch in (run.strip().partition(":") for run in args.drain_intervals.split(","))
            if interval
        ]
    except ValueError:
        parser.error("--drain-intervals: a comma-separated list of SECONDS or SECONDS:BATCH_SIZE")
    args.parts = {part.strip().upper() for part in args.parts.split(",")}
    if args.pg_host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("--pg-host must be a loopback address")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.drainer:
        return drainer_main()
    problem = postgres_problem(args.pg_host, args.pg_port, args.pg_user)
    if problem:
        harness.log(f"PostgreSQL is needed and not reachable at {args.pg_host}:{args.pg_port}: {problem}")
        return 1
    started = time.monotonic()
    try:
        with (
            harness.servers(args.base_port, args.keep_cluster, args.replicas) as environment,
            bench_database(args.pg_host, args.pg_port, args.pg_user, args.pg_database) as database,
        ):
            setup = Setup(
                cluster_urls=environment.cluster_urls,
                key_prefix="modelbench-" + os.urandom(3).hex(),
                secret_key="bench-" + os.urandom(16).hex(),
                database=database,
                batch_size=args.batch_size,
            )
            configure_django(setup)
            models_ = define_models()
            create_tables(models_)
            try:
                bench = Bench(setup, models_, args.reps, args.scale, environment.cluster.primary_ports)
                bench.populate()
                if args.profile:
                    bench.profile(args.profile)
                    logging.getLogger("django_distcache.backplane").setLevel(logging.ERROR)
                    return 0
                if "M1" in args.parts:
                    bench.bench_reads()
                if "M2" in args.parts:
                    bench.bench_saves()
                for interval, batch_size in args.runs if "M3" in args.parts else []:
                    run = bench.bench_hot(
                        args.hot_rate, args.hot_seconds, args.hot_rows, interval, batch_size
                    )
                    bench.hot_log(run)
                    bench.hot_rows(run)
                info = describe(environment, database)
                # The subscriber thread outlives the bench; stopping the servers is not a drop worth a warning.
                logging.getLogger("django_distcache.backplane").setLevel(logging.ERROR)
            finally:
                with harness.shielded():
                    drop_tables(models_)
    except KeyboardInterrupt:
        harness.log("interrupted; servers stopped")
        return 130
    harness.log(f"done in {time.monotonic() - started:.0f}s")
    settings = (
        f"M1/M2: medians of {args.reps} reps after a warm-up, {SLICES} interleaved slices per rep and "
        f"contender of {bench.read_ops} reads or {bench.save_ops} saves, over {ROWS:,} rows per table; "
        f"single thread; M3: save_behind at {args.hot_rate:,} calls/s for {args.hot_seconds:g} s on "
        f"{args.hot_rows} rows chosen at random, {HOT_WRITERS} paced writer threads (this process) and one "
        "drainer process (flush_behind per shard in a loop); "
        f"BEHIND_SHARDS 8 (default), BEHIND_BATCH_SIZE {args.batch_size or '500 (default)'}, "
        "BEHIND_TRIGGER_BACKLOG 0"
    )
    if bench.notes:
        settings += "; " + "; ".join(bench.notes)
    report = ModelReport(
        "Model caching on PostgreSQL: get_cached, save_behind, write-behind coalescing",
        bench.rows,
        {label: text for label, (text, _) in TARGETS.items()},
        info,
        settings,
    )
    report.emit(args.markdown)
    if any(row.result() == "FAIL" for row in report.rows):
        harness.log(
            "FAIL: after a drain, the database or the cache does not hold the last write of every row"
        )
        return 1
    return 1 if args.strict and report.misses() else 0


def describe(environment: Environment, database: dict[str, str]) -> dict[str, str]:
    info = dict(environment.info)
    info["machine"] += ", at end: " + " / ".join(f"{v:.2f}" for v in os.getloadavg())
    info["database"] = postgres_description(database)
    return info


if __name__ == "__main__":
    sys.exit(main())
