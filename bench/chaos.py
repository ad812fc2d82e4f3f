"""Chaos suite: node failures under load, against a real local cluster (`make chaos`; `--short` in tests).

    python -m bench.chaos [--short] [--base-port 7550] [--only nodes|behind]

A 3+3 cluster of our own with `cluster-node-timeout` lowered (so failovers take ~1-2 s, not 15 s) takes a
multi-threaded load through the Django cache API (get/set spread over every shard) plus a thread serving
a Django view through the test client. Scenarios:

- kill:      kill -9 a primary; measure until its replica is promoted and its keys are served again. Run
             twice: plain, and with READ_FROM_REPLICAS = "fallback" (keys of the dead primary written
             before the kill are read during the outage).
- restart:   start the killed node again (it rejoins as a replica); nothing may break.
- sigstop:   SIGSTOP a primary for 3 s (a hung node), then SIGCONT.
- reshard:   move 500 slots with `redis-cli --cluster reshard` while the load runs (ASK/MOVED).
- invalidate: invalidate tags while the node holding them is down; after recovery no entry of those tags
             may be served.
- write-behind drain faults (bench/behind_chaos.py, run afterwards in a process of its own, on
             PostgreSQL): drains killed before the commit, after it, during the cache refresh; a table
             locked and a transaction stalled past the shard lock. Exits 1 on a lost write, a backward
             step or a lost increment.

Each scenario reports: errors seen by callers, p50/p99/max latency of calls per shard (before and
during), throughput of the healthy shards during the fault vs before, stale values served (each thread
reads back the keys it wrote: a value older than its last acknowledged write), and for kill the time from
`cluster_state:ok` to the failed shard's keys being served again.

Write-behind (kill and sigstop): a writer thread calls `save_behind` on rows of `PageCounter` (the test
app's write-behind model) throughout the load (on half of the rows once the fault starts, see
BehindWriter), and a drainer thread calls `flush_behind()` every DRAIN_EVERY seconds, as Celery beat
would. Once the load stops, the queue is drained until empty and the database is compared with what
`save_behind` acknowledged: `write_behind_lost` must be 0. The model's cache alias points at this cluster
with BEHIND_OPTIONS (BEHIND_WAIT_REPLICAS 1, the documented durable configuration); the database is a
SQLite file of our own (`make chaos`) or the test suite's.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BASE_PORT = 7550
NODE_TIMEOUT_MS = 1000

# The write-behind cache of the chaos run. WAIT for one replica: the configuration docs/write-behind.md
# gives for durability across a failover. A drain cut off by the outage leaves its stream's lock behind:
# a short idle timeout lets the next drain take over within seconds, not the default 30. The drainer
# thread is the only drain (no Celery broker here), so the backlog trigger is off.
BEHIND_OPTIONS = {"BEHIND_WAIT_REPLICAS": 1, "BEHIND_IDLE_TIMEOUT": 3.0, "BEHIND_TRIGGER_BACKLOG": 0}
BEHIND_ROWS = 50
DRAIN_EVERY = 0.3  # seconds between two drains during the load
# At most one save_behind per WRITE_EVERY seconds: refusals are fast (the node's breaker is open), and an
# unpaced writer would spin on them during the fault, taking CPU from the load whose throughput is compared.
WRITE_EVERY = 0.002
SETTLE_TIMEOUT = 30.0  # after the load: at most this long to drain the queue empty


def setup_django(location: list[str], database: Path) -> bool:
    """Configure Django for a standalone run (a SQLite file of ours, the test app's models); returns
    False when Django is already configured (under the test suite, whose settings and database serve)."""
    import django
    from django.conf import settings
    from django.core.management import call_command

    if settings.configured:
        return False
    for leftover in database.parent.glob(f"{database.name}*"):  # an earlier run that was cut short
        leftover.unlink()
    settings.configure(
        SECRET_KEY="chaos",
        ROOT_URLCONF=__name__,
        ALLOWED_HOSTS=["testserver"],
        # The test app: PageCounter, a write-behind model (its tables are made by migrate's syncdb).
        INSTALLED_APPS=["django_distcache", "tests.model_app.apps.ModelAppConfig"],
        CACHES={
            "default": {
                "BACKEND": "django_distcache.cache.RedisClusterCache",
                "LOCATION": location,
                "KEY_PREFIX": f"chaos-{uuid.uuid4().hex[:8]}",
                "TIMEOUT": 300,
            }
        },
        MIDDLEWARE=[],
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": str(database),
                # The drainer writes while the writer reads rows: wait for the lock, do not fail.
                "OPTIONS": {"timeout": 30, "transaction_mode": "IMMEDIATE"},
            }
        },
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        USE_TZ=True,
    )
    django.setup()
    call_command("migrate", run_syncdb=True, verbosity=0)
    return True


def behind_alias() -> str:
    """The CACHES alias the write-behind model is registered with (`cache_model(..., cache=...)`)."""
    from django_distcache.models.registry import config_for
    from tests.model_app.models import PageCounter

    return config_for(PageCounter).cache_alias


_view_cache: list[Any] = []  # the cache the view uses: the chaos cluster's, whatever CACHES says


def chaos_view(request: Any) -> Any:
    from django.http import HttpResponse

    cache = _view_cache[0]
    key = f"page:{request.GET.get('n', '0')}"
    page = cache.get(key)
    if page is None:
        page = f"page {key}"
        cache.set(key, page, 60)
    return HttpResponse(page)


def _urlpatterns() -> list:
    from django.urls import path

    return [path("page/", chaos_view)]


class _LazyPatterns(list):
    def __iter__(self):  # the URLconf is read after settings are configured
        return iter(_urlpatterns())


urlpatterns = _LazyPatterns()


@dataclass
class Sample:
    at: float
    shard: int
    seconds: float
    error: str | None
    degraded: bool = False  # the call did not raise but fell back (a miss, a dropped write)
    hit: bool | None = None  # for a read: did it return a value


@dataclass
class Load:
    """Threads doing set-then-get on keys of every shard, recording every call."""

    cache: Any
    keys_by_shard: dict[int, list[str]]
    threads: int = 6
    samples: list[Sample] = field(default_factory=list)
    stale: int = 0
    reads_checked: int = 0  # reads that returned a value of a key with an acknowledged write
    older_than_dropped_write: int = 0  # values older than a write that was dropped (not acknowledged)
    view_errors: int = 0
    view_calls: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        # A call degraded if the failure policy counted a failure in its thread while it ran; a namespace
        # read served from the in-process copy is counted but the caller never notices it.
        self._seen = threading.local()

        def heard(what: str) -> None:
            if what != "namespace":
                self._seen.count = getattr(self._seen, "count", 0) + 1

        self._heard = heard
        self.cache.core.failures.listeners.append(heard)
        shards = sorted(self.keys_by_shard)
        for number in range(self.threads):
            worker = threading.Thread(target=self._run, args=(number, shards), daemon=True)
            worker.start()
            self._workers.append(worker)
        view = threading.Thread(target=self._views, daemon=True)
        view.start()
        self._workers.append(view)

    def stop(self) -> None:
        self._stop.set()
        self.cache.core.failures.listeners.remove(self._heard)
        for worker in self._workers:
            worker.join(30)

    def _run(self, number: int, shards: list[int]) -> None:
        """Each thread writes its own keys and reads each back on the next pass: a read returning a value
        older than the thread's last acknowledged (not degraded) write of that key is stale."""
        written: dict[str, int] = {}  # key -> last acknowledged value
        attempted: dict[str, int] = {}  # key -> last value a set was asked to write (dropped or not)
        counter = 0
        local: list[Sample] = []
        while not self._stop.is_set():
            counter += 1
            writing = counter % 2 == 1  # a pass of writes, then a pass reading the same keys back
            for shard in shards:
                keys = self.keys_by_shard[shard]
                key = keys[(number + counter // 2) % len(keys)] + f":t{number}"
                started = time.monotonic()
                failures = getattr(self._seen, "count", 0)
                error, hit = None, None
                try:
                    if writing:
                        self.cache.set(key, counter, 60)
                    else:
                        value = self.cache.get(key)
                        hit = value is not None
                        if value is not None:
                            if key in written:
                                self.reads_checked += 1
                            if value < written.get(key, 0):
                                self.stale += 1  # older than this thread's last acknowledged write
                            elif value < attempted.get(key, 0):
                                self.older_than_dropped_write += 1
                except Exception as exc:  # noqa: BLE001 - what a caller would see: the point of the suite
                    error = f"{type(exc).__name__}: {exc}"
                degraded = getattr(self._seen, "count", 0) != failures
                if writing:
                    attempted[key] = counter
                    if error is None and not degraded:
                        written[key] = counter
                local.append(Sample(started, shard, time.monotonic() - started, error, degraded, hit))
            if len(local) >= 500:
                self.samples.extend(local)
                local = []
        self.samples.extend(local)

    def _views(self) -> None:
        from django.test import Client, override_settings

        _view_cache[:] = [self.cache]
        client = Client(raise_request_exception=False)
        number = 0
        # Under the test suite Django is already configured: serve this module's URLconf all the same.
        with override_settings(ROOT_URLCONF=__name__, ALLOWED_HOSTS=["testserver"], MIDDLEWARE=[]):
            while not self._stop.is_set():
                number += 1
                self.view_calls += 1
                try:
                    response = client.get("/page/", {"n": number % 50})
                except Exception:  # noqa: BLE001 - a request that blew up is an error a user would see
                    self.view_errors += 1
                    continue
                if response.status_code != 200:
                    self.view_errors += 1
                time.sleep(0.005)


@dataclass
class BehindWriter:
    """Write-behind under the fault: one thread loops `save_behind(row, update_fields=["views"])` over the
    rows with `views` = the round number, another drains with `flush_behind()` every DRAIN_EVERY seconds.

    When the fault starts, every other row stops being written, so that its last value is one acknowledged
    before the fault: a loss in the failover leaves it missing for good. On the rows written on, a lost
    change is overwritten by a later one (the last write wins) and the loss hidden.

    A call that returned acknowledged its round for that row. CacheUnavailable is the documented refusal
    (nothing was queued: the caller is told and may save otherwise), counted as refused; any other
    exception is an error a caller would see, as is any exception of a drain but CacheUnavailable (a
    Celery run that failed so is retried by the next beat)."""

    alias: str
    rows: list[Any]
    acknowledged: dict[Any, list[int]] = field(default_factory=lambda: defaultdict(list))
    refused: dict[Any, int] = field(default_factory=lambda: defaultdict(int))  # per row
    errors: list[str] = field(default_factory=list)
    drains: int = 0
    drains_refused: int = 0
    full_drains: list[float] = field(default_factory=list)  # when a drain reached every stream
    stopped_at: float = float("nan")
    frozen: set[Any] = field(default_factory=set)  # rows no longer written since the fault started
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for target in (self._write, self._drain):
            worker = threading.Thread(target=target, daemon=True)
            worker.start()
            self._workers.append(worker)

    def fault_starts(self) -> None:
        self.frozen = {row.pk for row in self.rows[::2]}

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(30)
        self.stopped_at = time.monotonic()

    def _write(self) -> None:
        from django.db import connections

        from django_distcache import save_behind
        from django_distcache.cache import CacheUnavailable

        number = 0
        last_call = 0.0
        try:
            while not self._stop.is_set():
                number += 1
                for row in self.rows:
                    if row.pk in self.frozen:
                        continue
                    time.sleep(max(0.0, last_call + WRITE_EVERY - time.monotonic()))
                    last_call = time.monotonic()
                    row.views = number
                    try:
                        save_behind(row, update_fields=["views"])
                    except CacheUnavailable:
                        self.refused[row.pk] += 1
                        continue
                    except Exception as exc:  # noqa: BLE001 - what a caller would see: the point of the suite
                        self.errors.append(f"save_behind: {type(exc).__name__}: {exc}")
                        continue
                    self.acknowledged[row.pk].append(number)
        finally:
            connections.close_all()  # this thread's database connection (the test database is dropped later)

    def _drain(self) -> None:
        from django.db import connections

        try:
            while not self._stop.wait(DRAIN_EVERY):
                self.drain_once()
        finally:
            connections.close_all()

    def drain_once(self) -> bool:
        """One `flush_behind()`; False if it did not run through (the next one tries again)."""
        from django_distcache import flush_behind
        from django_distcache.cache import CacheUnavailable

        try:
            report = flush_behind(using=self.alias)
        except CacheUnavailable:
            self.drains_refused += 1
            return False
        except Exception as exc:  # noqa: BLE001 - a drain that blew up: reported, never hidden
            self.errors.append(f"flush_behind: {type(exc).__name__}: {exc}")
            return False
        self.drains += 1
        if not report.shards_busy:  # a stream's lock left by a drain the outage cut short skips it
            self.full_drains.append(time.monotonic())
        return True

    def settle(self) -> dict[str, Any]:
        """After stop(): drain until every stream is empty (at most SETTLE_TIMEOUT), then compare the
        database with what was acknowledged.

        `write_behind_lost` counts acknowledged calls whose value the database lacks: a row's changes are
        applied in order and the last value wins, so an acknowledged round above the row's stored `views`
        is missing (one at or below it was applied, or overwritten by a later one, as it should be).
        `write_behind_rows_behind` counts the rows with any such round; `write_behind_rows_ahead` the rows
        holding a round newer than their last acknowledged one: a refused call whose change was queued
        all the same (the ambiguous case docs/write-behind.md describes: the reply was lost).
        `write_behind_drained_seconds`: from the writer's stop until every stream was empty."""
        from django_distcache import behind_metrics
        from django_distcache.cache import CacheUnavailable
        from tests.model_app.models import PageCounter

        metrics: dict[str, Any] | None = None
        deadline = self.stopped_at + SETTLE_TIMEOUT
        while time.monotonic() < deadline:
            if self.drain_once():
                try:
                    metrics = behind_metrics(using=self.alias)
                except CacheUnavailable:
                    metrics = None
                if metrics is not None and metrics["backlog"] == 0:
                    break
            time.sleep(0.1)
        drained = time.monotonic() - self.stopped_at  # the drainer thread ran until stopped_at
        stored = dict(
            PageCounter.objects.filter(pk__in=[row.pk for row in self.rows]).values_list("pk", "views")
        )
        acknowledged = {row.pk: self.acknowledged.get(row.pk, []) for row in self.rows}
        return {
            "write_behind_acknowledged": sum(len(rounds) for rounds in acknowledged.values()),
            "write_behind_refused": sum(self.refused.values()),
            "write_behind_lost": sum(
                1 for pk, rounds in acknowledged.items() for number in rounds if number > stored[pk]
            ),
            "write_behind_rows_behind": sum(
                1 for pk, rounds in acknowledged.items() if rounds and stored[pk] < rounds[-1]
            ),
            "write_behind_rows_ahead": sum(
                1 for pk, rounds in acknowledged.items() if stored[pk] > (rounds[-1] if rounds else 0)
            ),
            "write_behind_drains": self.drains,
            "write_behind_drains_refused": self.drains_refused,
            "write_behind_backlog_left": "unknown" if metrics is None else metrics["backlog"],
            "write_behind_dead_letters": "unknown" if metrics is None else metrics["dead_letters"],
            "write_behind_drained_seconds": drained,
        }


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def window(samples: list[Sample], start: float, end: float) -> list[Sample]:
    return [s for s in samples if start <= s.at < end]


def shard_stats(samples: list[Sample], shard: int) -> dict[str, float]:
    mine = [s.seconds for s in samples if s.shard == shard]
    return {
        "calls": len(mine),
        "p50_ms": percentile(mine, 0.5) * 1000,
        "p99_ms": percentile(mine, 0.99) * 1000,
        "max_ms": max(mine) * 1000 if mine else float("nan"),
    }


def served_fraction(samples: list[Sample], shard: int | None) -> float:
    """Of the reads of `shard`'s keys, the fraction that returned a value."""
    reads = [s for s in samples if s.shard == shard and s.hit is not None]
    return sum(1 for s in reads if s.hit) / len(reads) if reads else float("nan")


def throughput(samples: list[Sample], shards: list[int], seconds: float) -> float:
    """Calls per second that did what they were asked (neither raised nor degraded)."""
    ok = sum(1 for s in samples if s.shard in shards and s.error is None and not s.degraded)
    return ok / seconds if seconds else 0.0


class Chaos:
    def __init__(self, base_port: int, short: bool) -> None:
        from django_distcache.devcluster import DevCluster

        self.short = short
        self.cluster = DevCluster(
            base_port=base_port,
            data_dir=ROOT / ".devcluster" / f"chaos-{base_port}",
            node_timeout=NODE_TIMEOUT_MS,
        )
        # Next to the cluster's data dir, not in it: DevCluster deletes only a data dir of its own making.
        self.database = ROOT / ".devcluster" / f"chaos-{base_port}.sqlite3"
        self.own_database = False
        self.behind_settings: Any = None
        self.results: list[dict[str, Any]] = []
        self.resharded: set[int] = set()  # the primaries the reshard scenario moved slots between

    # -- set-up ---------------------------------------------------------------------------------------------
    def __enter__(self) -> Chaos:

        self.cluster.up()
        for port in self.cluster.ports:
            self.configure(port)
        self.own_database = setup_django(self.cluster.startup_urls, self.database)
        self.point_write_behind_at_this_cluster()
        return self

    def point_write_behind_at_this_cluster(self) -> None:
        """The write-behind model's cache alias becomes this cluster, with BEHIND_OPTIONS and a key prefix
        of its own (under the test suite it names the suite's cluster until __exit__)."""
        from django.conf import settings
        from django.test import override_settings

        caches = dict(settings.CACHES)
        caches[behind_alias()] = {
            "BACKEND": "django_distcache.cache.RedisClusterCache",
            "LOCATION": self.cluster.startup_urls,
            "KEY_PREFIX": f"chaos-behind-{uuid.uuid4().hex[:8]}",
            "TIMEOUT": 300,
            "OPTIONS": dict(BEHIND_OPTIONS),
        }
        self.behind_settings = override_settings(CACHES=caches)
        self.behind_settings.enable()

    def __exit__(self, *exc: object) -> None:
        if self.behind_settings is not None:
            self.behind_settings.disable()
        if self.own_database:
            from django.db import connections

            connections.close_all()
            for path in self.database.parent.glob(f"{self.database.name}*"):
                path.unlink()
        for port in self.cluster.ports:  # a node left stopped by a failed scenario must not block down()
            pid = self.cluster.pid(port)
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        self.cluster.down()

    @staticmethod
    def configure(port: int) -> None:
        """Any replica may take over, however long its link was down in an earlier scenario (a SIGSTOP
        leaves the stopped node's replica link idle): each scenario needs its failover. CONFIG SET does not
        survive a restart, so a node started again is configured again."""
        import redis

        redis.Redis(port=port, socket_timeout=2).config_set("cluster-replica-validity-factor", 0)

    def start_node(self, port: int) -> None:
        self.cluster.start_node(port)
        self.configure(port)

    def fresh_cache(self, **options: Any) -> Any:
        from django_distcache.cache import RedisClusterCache

        return RedisClusterCache(
            self.cluster.startup_urls, {"KEY_PREFIX": f"chaos-{uuid.uuid4().hex[:8]}", "OPTIONS": options}
        )

    def primaries(self) -> list[int]:
        """Ports of the running nodes that are primaries with slots now (roles change on failover)."""
        return sorted(
            row["port"]
            for row in self.cluster.status()
            if row["role"] == "primary" and row["slots"] and row["pid"]
        )

    def keys_by_port(self, cache: Any, per_shard: int = 20) -> dict[int, list[str]]:
        """Keys whose physical key lands on each primary (by the current slot map)."""
        from redis.crc import key_slot

        cache.get("warm-up")
        slot_map = cache.core.shared.state.slot_map
        found: dict[int, list[str]] = defaultdict(list)
        number = 0
        while min((len(found[p]) for p in self.primaries()), default=0) < per_shard and number < 100_000:
            tag = f"s{number}"
            number += 1
            node = slot_map.primaries[key_slot(tag.encode())]
            if node is not None and len(found[node.port]) < per_shard:
                # A hash tag: every thread's variant of the key (":t<n>") stays in this slot.
                found[node.port].append(f"{{{tag}}}:k")
        return dict(found)

    def wait_ok(self, timeout: float = 30.0) -> float:
        """Seconds until every running node reports cluster_state:ok with all 16384 slots served."""
        import redis

        started = time.monotonic()
        not_ok: dict[int, str] = {}
        while time.monotonic() - started < timeout:
            states, not_ok = [], {}
            for port in self.cluster.ports:
                if self.cluster.pid(port) is None:
                    continue
                try:
                    info = redis.Redis(port=port, socket_timeout=0.5).execute_command("CLUSTER", "INFO")
                except redis.RedisError as error:
                    states.append(False)
                    not_ok[port] = str(error)
                    continue
                text = info.decode() if isinstance(info, bytes) else str(info)
                ok = "cluster_state:ok" in text and "cluster_slots_ok:16384" in text
                states.append(ok)
                if not ok:
                    not_ok[port] = " ".join(line for line in text.split() if line.startswith("cluster_s"))
            if states and all(states):
                return time.monotonic() - started
            time.sleep(0.05)
        nodes = {port: self.cluster.pid(port) for port in self.cluster.ports}
        raise RuntimeError(
            f"cluster not ok after {timeout}s: {not_ok}; pids {nodes}; unowned slots: {self.unowned_slots()}"
        )

    def unowned_slots(self) -> dict[int, str]:
        """Per running node, the slots it sees no owner for, with what the other nodes say of them."""
        import redis

        owners: dict[int, dict[int, str]] = {}
        nodes_text: dict[int, str] = {}
        for port in self.cluster.ports:
            if self.cluster.pid(port) is None:
                continue
            try:
                client = redis.Redis(port=port, socket_timeout=0.5, decode_responses=True)
                reply = client.execute_command("CLUSTER", "SLOTS")
                nodes_text[port] = client.execute_command("CLUSTER", "NODES")
            except redis.RedisError as error:
                owners[port] = {-1: str(error)}
                continue
            view = owners[port] = {}
            for entry in reply:
                for slot in range(entry[0], entry[1] + 1):
                    view[slot] = f"{entry[2][1]}"
        report = {}
        for port, view in owners.items():
            missing = [slot for slot in range(16384) if slot not in view]
            if missing:
                others = {other: owners[other].get(missing[0]) for other in owners if other != port}
                report[port] = (
                    f"{len(missing)} slot(s) from {missing[0]}; others say {missing[0]} is on {others}; "
                    f"its CLUSTER NODES: {nodes_text.get(port, '')!r}"
                )
        return report

    def wait_failed(self, port: int, timeout: float = 30.0) -> None:
        """Until a running node flags `port` as failed (not merely suspected): the failover starts."""
        import redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for other in self.cluster.ports:
                if other == port or self.cluster.pid(other) is None:
                    continue
                try:
                    nodes = redis.Redis(port=other, socket_timeout=0.5).execute_command("CLUSTER", "NODES")
                except redis.RedisError:
                    continue
                text = nodes.decode() if isinstance(nodes, bytes) else str(nodes)
                for line in text.splitlines():
                    fields = line.split()
                    if len(fields) > 2 and f":{port}@" in fields[1] and "fail" in fields[2].split(","):
                        return
            time.sleep(0.02)
        raise RuntimeError(f"node {port} never flagged as failed")

    def wait_healthy(self) -> None:
        self.cluster.wait_healthy(60)

    # -- scenarios ------------------------------------------------------------------------------------------
    def run_load(
        self, cache: Any, fault: Any, before: float, after_fault: float, writer: BehindWriter | None = None
    ) -> tuple[Load, dict]:
        keys = self.keys_by_port(cache)
        load = Load(cache, keys)
        load.start()
        if writer is not None:
            writer.start()
        time.sleep(before)
        fault_started = time.monotonic()
        if writer is not None:
            writer.fault_starts()
        marks = fault(load) or {}
        marks.setdefault("fault_started", fault_started)
        time.sleep(after_fault)
        load.stop()
        if writer is not None:
            writer.stop()
        marks["end"] = time.monotonic()
        marks["load_start"] = fault_started - before
        return load, marks

    # -- write-behind ---------------------------------------------------------------------------------------
    def behind_writer(self, failed_port: int) -> tuple[BehindWriter, dict[str, Any]]:
        """A writer on BEHIND_ROWS new rows, and which of its streams live on `failed_port` (the node the
        scenario fails): a row whose stream is there is refused while it is down."""
        from django.core.cache import caches
        from redis.crc import key_slot

        from django_distcache.models.registry import config_for
        from django_distcache.models.streams import shard_keys, shard_of
        from tests.model_app.models import PageCounter

        alias = behind_alias()
        cache = caches[alias]
        cache.get("warm-up")
        slot_map = cache.core.shared.state.slot_map
        shard_count = cache.core.settings.behind_shards
        on_failed = {
            shard
            for shard in range(shard_count)
            if slot_map.primaries[key_slot(shard_keys(cache.core, shard).stream)].port == failed_port
        }
        tag = uuid.uuid4().hex[:8]
        rows = [PageCounter.objects.create(name=f"chaos-{tag}-{n}") for n in range(BEHIND_ROWS)]
        label = config_for(PageCounter).label
        rows_on_failed = {row.pk for row in rows if shard_of(cache.core, label, row.pk) in on_failed}
        info = {
            "write_behind_options": ", ".join(f"{name}={value}" for name, value in BEHIND_OPTIONS.items()),
            "write_behind_streams_on_failed_node": f"{len(on_failed)} of {shard_count}",
            "write_behind_rows_on_failed_node": f"{len(rows_on_failed)} of {len(rows)}",
            "_rows_on_failed": rows_on_failed,
            "_unreplicated_before": cache.failure_counts.get("behind_unreplicated", 0),
        }
        return BehindWriter(alias, rows), info

    def behind_results(self, writer: BehindWriter, info: dict[str, Any], ok_at: float) -> dict[str, Any]:
        """Drain, compare, and delete the writer's rows. `ok_at`: when the cluster was ok again.

        Besides settle()'s figures: the refusals of rows whose stream was on a healthy node (0 expected:
        only the stream's node decides whether a change can be queued),
        the calls acknowledged with fewer replicas than BEHIND_WAIT_REPLICAS asked (WAIT timed out;
        save_behind returns all the same, as documented), and the seconds from `ok_at` to the first
        drain that reached every stream."""
        from django.core.cache import caches

        from tests.model_app.models import PageCounter

        results = writer.settle()
        rows_on_failed = info.pop("_rows_on_failed")
        results["write_behind_refused_stream_elsewhere"] = sum(
            count for pk, count in writer.refused.items() if pk not in rows_on_failed
        )
        unreplicated = caches[writer.alias].failure_counts.get("behind_unreplicated", 0)
        results["write_behind_unreplicated"] = unreplicated - info.pop("_unreplicated_before")
        first_full = next((at for at in writer.full_drains if at >= ok_at), float("nan"))
        results["write_behind_full_drain_after_ok_seconds"] = first_full - ok_at
        PageCounter.objects.filter(pk__in=[row.pk for row in writer.rows]).delete()
        return {**info, **results}

    def report(
        self,
        name: str,
        load: Load,
        marks: dict,
        failed_port: int | None,
        extra: dict,
        writer: BehindWriter | None = None,
    ) -> dict:
        before = window(load.samples, marks["load_start"], marks["fault_started"])
        fault_end = marks.get("fault_end", marks["end"])
        during = window(load.samples, marks["fault_started"], fault_end)
        shards = sorted(load.keys_by_shard)
        healthy = [p for p in shards if p != failed_port]
        before_seconds = marks["fault_started"] - marks["load_start"]
        during_seconds = max(1e-9, fault_end - marks["fault_started"])
        errors = [s.error for s in load.samples if s.error]
        if writer is not None:
            errors += writer.errors
        result = {
            "scenario": name,
            "errors_seen_by_callers": len(errors) + load.view_errors,
            "view_calls": load.view_calls,
            "stale_served": load.stale,
            "reads_checked_for_staleness": load.reads_checked,
            "older_than_a_dropped_write": load.older_than_dropped_write,
            "failed_shard_reads_served_during": served_fraction(during, failed_port),
            "degraded_calls_failed_shard": sum(1 for s in during if s.degraded and s.shard == failed_port),
            "degraded_calls_healthy_shards": sum(1 for s in during if s.degraded and s.shard != failed_port),
            "healthy_throughput_ratio": throughput(during, healthy, during_seconds)
            / max(1e-9, throughput(before, healthy, before_seconds)),
            "per_shard_before": {p: shard_stats(before, p) for p in shards},
            "per_shard_during": {p: shard_stats(during, p) for p in shards},
            "max_call_ms": max((s.seconds for s in load.samples), default=0) * 1000,
            "first_error": errors[0] if errors else None,
            **extra,
        }
        self.results.append(result)
        return result

    def scenario_kill(self, fallback: bool = False) -> int:
        """kill -9 a primary. With `fallback`, the load's cache reads from replicas while a primary is down
        (READ_FROM_REPLICAS = "fallback")."""
        cache = self.fresh_cache(READ_FROM_REPLICAS="fallback") if fallback else self.fresh_cache()
        victim = self.primaries()[0]
        writer, behind = self.behind_writer(victim)
        marks: dict[str, float] = {}

        # Keys written before the fault and only read during it (most of a cache's keys): how many of the
        # victim's does a read find while it is down?
        preloaded = {f"{key}:preloaded": n for n, key in enumerate(self.keys_by_port(cache)[victim])}
        cache.set_many(preloaded, 300)
        time.sleep(0.2)  # replicated (asynchronously; well within this on loopback)

        def fault(load: Load) -> dict:
            self.cluster.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            time.sleep(0.5)  # the load has opened the victim's breaker; the failover takes seconds
            found = cache.get_many(list(preloaded))
            marks["preloaded_served"] = sum(1 for key, value in found.items() if preloaded[key] == value)
            self.wait_failed(victim)
            self.wait_ok(60)
            ok_at = time.monotonic()
            # The victim's keys are served again when a get on them answers from the promoted replica.
            keys = load.keys_by_shard[victim]
            served_at = None
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                probe = f"{keys[0]}:probe"
                if cache.set(probe, 1, 60) is not False and cache.get(probe) == 1:
                    served_at = time.monotonic()
                    break
                time.sleep(0.02)
            marks.update(fault_end=ok_at, killed=killed, ok_at=ok_at, served_at=served_at or float("nan"))
            return {"fault_end": ok_at}

        load, run_marks = self.run_load(
            cache, fault, before=1.5 if self.short else 3.0, after_fault=1.0, writer=writer
        )
        run_marks.update(marks)
        self.report(
            "kill -9 primary, READ_FROM_REPLICAS fallback" if fallback else "kill -9 primary",
            load,
            run_marks,
            victim,
            {
                "preloaded_keys_of_failed_shard_served_during": f"{run_marks['preloaded_served']} of {len(preloaded)}",
                "failover_seconds": run_marks["ok_at"] - run_marks["killed"],
                "served_after_ok_seconds": run_marks["served_at"] - run_marks["ok_at"],
                **self.behind_results(writer, behind, run_marks["ok_at"]),
            },
            writer,
        )
        return victim

    def scenario_restart(self, port: int) -> None:
        cache = self.fresh_cache()

        def fault(load: Load) -> dict:
            self.start_node(port)
            self.wait_ok(60)
            return {"fault_end": time.monotonic()}

        load, marks = self.run_load(cache, fault, before=1.0, after_fault=1.0)
        self.report("restart killed node (rejoins as replica)", load, marks, None, {})

    def scenario_sigstop(self) -> None:
        cache = self.fresh_cache()
        victim = self.primaries()[-1]
        writer, behind = self.behind_writer(victim)
        pause = 3.0

        def fault(load: Load) -> dict:
            self.cluster.kill(victim, signal.SIGSTOP)
            time.sleep(pause)
            self.cluster.kill(victim, signal.SIGCONT)
            resumed = time.monotonic()
            self.wait_ok(60)
            return {"fault_end": resumed, "ok_at": time.monotonic()}

        load, marks = self.run_load(
            cache, fault, before=1.0 if self.short else 3.0, after_fault=1.0, writer=writer
        )
        timeout_ms = cache.core.settings.connection.socket_timeout * 1000
        extra = {"socket_timeout_ms": timeout_ms, **self.behind_results(writer, behind, marks["ok_at"])}
        self.report("SIGSTOP primary 3 s", load, marks, victim, extra, writer)

    def scenario_reshard(self) -> None:
        cache = self.fresh_cache()
        slots = 200 if self.short else 500

        def fault(load: Load) -> dict:
            ports = self.primaries()
            self.resharded = set(ports[:2])
            ids = {}
            for port in ports:
                out = subprocess.run(
                    ["redis-cli", "-p", str(port), "cluster", "myid"],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                ids[port] = out.stdout.strip()
            subprocess.run(
                [
                    "redis-cli", "--cluster", "reshard", f"127.0.0.1:{ports[0]}",
                    "--cluster-from", ids[ports[0]], "--cluster-to", ids[ports[1]],
                    "--cluster-slots", str(slots), "--cluster-yes", "--cluster-pipeline", "50",
                ],
                capture_output=True, text=True, check=True, timeout=300,
            )  # fmt: skip
            return {"fault_end": time.monotonic()}

        load, marks = self.run_load(cache, fault, before=1.0, after_fault=1.0)
        self.report(f"reshard {slots} slots under load", load, marks, None, {})

    def scenario_invalidate_during_outage(self) -> None:
        """Entries tagged with a tag whose key lives on a node that goes down; the tag is invalidated while
        it is down; after recovery, no entry of the tag may be served."""
        from redis.crc import key_slot

        cache = self.fresh_cache()
        cache.get("warm-up")
        slot_map = cache.core.shared.state.slot_map
        # Not a primary the reshard gave or took slots: a Redis 7.0 cluster killed that soon after a reshard
        # can be left with a slot no node serves (see docs/failure.md), which is not what this scenario is
        # about.
        victim = next(port for port in self.primaries() if port not in self.resharded)
        tag = next(
            f"tag{n}"
            for n in range(10_000)
            if slot_map.primaries[key_slot(cache.core.tags.tag_key(f"tag{n}"))].port == victim
        )
        keys = [f"tagged:{n}" for n in range(200)]
        cache.set_many(dict.fromkeys(keys, "old"), 300, tags=[tag])
        errors = 0
        self.cluster.kill(victim, signal.SIGKILL)
        outcome = "invalidated"
        try:
            cache.invalidate_tags(tag)
        except Exception as error:  # noqa: BLE001 - reported: the caller was told
            outcome = f"raised {type(error).__name__}"
            errors += 1
        served_during = sum(1 for value in cache.get_many(keys).values() if value == "old")
        self.wait_failed(victim)
        self.wait_ok(60)
        ok_at = time.monotonic()
        while (
            cache.core.tags.outbox is not None
            and not cache.core.tags.outbox.empty
            and time.monotonic() - ok_at < 15
        ):
            time.sleep(0.02)
        landed_after_ok = time.monotonic() - ok_at
        if outcome != "invalidated":
            # What a caller told of the failure does: try again until the tag's slots are served again.
            deadline = time.monotonic() + 15
            while True:
                try:
                    cache.invalidate_tags(tag)
                    break
                except Exception:  # noqa: BLE001 - still failing over on this client's side
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        time.sleep(0.5)
        served_after = sum(1 for value in cache.get_many(keys).values() if value == "old")
        self.start_node(victim)
        self.wait_ok(60)
        self.results.append(
            {
                "scenario": "invalidate tags during an outage",
                "errors_seen_by_callers": errors,
                "invalidate_tags": outcome,
                "stale_served": served_during + served_after,
                "stale_served_during": served_during,
                "stale_served_after_recovery": served_after,
                "outbox_landed_after_ok_seconds": landed_after_ok,
                "outbox_pending_at_end": len(cache.core.tags.outbox.pending) if cache.core.tags.outbox else 0,
            }
        )

    def run_all(self) -> list[dict[str, Any]]:
        victim = self.scenario_kill()
        self.scenario_restart(victim)
        self.wait_healthy()
        victim = self.scenario_kill(fallback=True)
        self.scenario_restart(victim)
        self.wait_healthy()
        self.scenario_sigstop()
        self.wait_healthy()
        self.scenario_reshard()
        self.wait_healthy()
        self.scenario_invalidate_during_outage()
        return self.results


def print_table(results: list[dict[str, Any]]) -> None:
    for result in results:
        print(f"\n== {result['scenario']}")
        for name, value in result.items():
            if name in ("scenario", "per_shard_before", "per_shard_during"):
                continue
            print(f"  {name:42} {value:.3f}" if isinstance(value, float) else f"  {name:42} {value}")
        if "per_shard_before" in result:
            print(
                f"  {'shard':>8} {'before p50/p99/max ms':>26} {'during p50/p99/max ms':>26} {'calls b/d':>12}"
            )
            for port, before in result["per_shard_before"].items():
                during = result["per_shard_during"][port]
                print(
                    f"  {port:>8} {before['p50_ms']:8.2f}/{before['p99_ms']:7.2f}/{before['max_ms']:7.1f}"
                    f"   {during['p50_ms']:8.2f}/{during['p99_ms']:7.2f}/{during['max_ms']:7.1f}"
                    f" {before['calls']:>6}/{during['calls']}"
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="shorter load phases (used by the test suite)")
    parser.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT)
    parser.add_argument(
        "--only",
        choices=("nodes", "behind"),
        help="run only the node failures (this module) or only the write-behind drain faults "
        "(bench/behind_chaos.py, on PostgreSQL); default: both",
    )
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.only != "behind":
        with Chaos(args.base_port, args.short) as chaos:
            results = chaos.run_all()
        print_table(results)
    if args.only == "nodes":
        return 0
    # Its own process: it configures Django for PostgreSQL and a cluster of its own; it prints its table
    # and exits 1 if a write was lost, a row went backwards or an increment went missing.
    behind = [sys.executable, "-m", "bench.behind_chaos"] + (["--kills", "1"] if args.short else [])
    return subprocess.run(behind, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
