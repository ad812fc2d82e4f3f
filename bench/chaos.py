"""Chaos suite: node failures under load, against a real local cluster (`make chaos`; `--short` in tests).

    python -m bench.chaos [--short] [--base-port 7550]

A 3+3 cluster of our own with `cluster-node-timeout` lowered (so failovers take ~1-2 s, not 15 s) takes a
multi-threaded load through the Django cache API (get/set spread over every shard) plus a thread serving
a Django view through the test client. Scenarios:

- kill:      kill -9 a primary; measure until its replica is promoted and its keys are served again.
- restart:   start the killed node again (it rejoins as a replica); nothing may break.
- sigstop:   SIGSTOP a primary for 3 s (a hung node), then SIGCONT.
- reshard:   move 500 slots with `redis-cli --cluster reshard` while the load runs (ASK/MOVED).
- invalidate: invalidate tags while the node holding them is down; after recovery no entry of those tags
             may be served.

Each scenario reports: errors seen by callers, p50/p99/max latency of calls per shard (before and
during), throughput of the healthy shards during the fault vs before, stale values served, and for kill
the time from `cluster_state:ok` to the failed shard's keys being served again.
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


def setup_django(location: list[str]) -> None:
    import django
    from django.conf import settings

    if settings.configured:
        return
    settings.configure(
        SECRET_KEY="chaos",
        ROOT_URLCONF=__name__,
        ALLOWED_HOSTS=["testserver"],
        INSTALLED_APPS=["django_distcache"],
        CACHES={
            "default": {
                "BACKEND": "django_distcache.cache.RedisClusterCache",
                "LOCATION": location,
                "KEY_PREFIX": f"chaos-{uuid.uuid4().hex[:8]}",
                "TIMEOUT": 300,
            }
        },
        MIDDLEWARE=[],
        DATABASES={},
    )
    django.setup()


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


@dataclass
class Load:
    """Threads doing set-then-get on keys of every shard, recording every call."""

    cache: Any
    keys_by_shard: dict[int, list[str]]
    threads: int = 6
    samples: list[Sample] = field(default_factory=list)
    stale: int = 0
    view_errors: int = 0
    view_calls: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
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
        for worker in self._workers:
            worker.join(30)

    def _run(self, number: int, shards: list[int]) -> None:
        written: dict[str, int] = {}
        counter = 0
        local: list[Sample] = []
        while not self._stop.is_set():
            for shard in shards:
                keys = self.keys_by_shard[shard]
                key = keys[(number + counter) % len(keys)] + f":t{number}"
                counter += 1
                started = time.monotonic()
                failures = self.cache._failures.counted_in_this_thread()
                error = None
                try:
                    if counter % 2:
                        if self.cache.set(key, counter, 60) is not False:
                            written[key] = counter
                    else:
                        value = self.cache.get(key)
                        if value is not None and value < written.get(key, 0):
                            self.stale += 1  # older than this thread's last acknowledged write
                except Exception as exc:  # noqa: BLE001 - what a caller would see: the point of the suite
                    error = f"{type(exc).__name__}: {exc}"
                degraded = self.cache._failures.counted_in_this_thread() != failures
                local.append(Sample(started, shard, time.monotonic() - started, error, degraded))
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
        self.results: list[dict[str, Any]] = []

    # -- set-up ---------------------------------------------------------------------------------------------
    def __enter__(self) -> Chaos:
        import redis

        self.cluster.up()
        for port in self.cluster.ports:
            # Any replica may take over, however long its link was down in an earlier scenario (a
            # SIGSTOP leaves the stopped node's replica link idle): each scenario needs its failover.
            redis.Redis(port=port, socket_timeout=2).config_set("cluster-replica-validity-factor", 0)
        setup_django(self.cluster.startup_urls)
        return self

    def __exit__(self, *exc: object) -> None:
        for port in self.cluster.ports:  # a node left stopped by a failed scenario must not block down()
            pid = self.cluster.pid(port)
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        self.cluster.down()

    def fresh_cache(self) -> Any:
        from django_distcache.cache import RedisClusterCache

        return RedisClusterCache(self.cluster.startup_urls, {"KEY_PREFIX": f"chaos-{uuid.uuid4().hex[:8]}"})

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
        slot_map = cache._shared.state.slot_map
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
        while time.monotonic() - started < timeout:
            states = []
            for port in self.cluster.ports:
                if self.cluster.pid(port) is None:
                    continue
                try:
                    info = redis.Redis(port=port, socket_timeout=0.5).execute_command("CLUSTER", "INFO")
                except redis.RedisError:
                    states.append(False)
                    continue
                text = info.decode() if isinstance(info, bytes) else str(info)
                states.append("cluster_state:ok" in text and "cluster_slots_ok:16384" in text)
            if states and all(states):
                return time.monotonic() - started
            time.sleep(0.05)
        raise RuntimeError(f"cluster not ok after {timeout}s")

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
    def run_load(self, cache: Any, fault: Any, before: float, after_fault: float) -> tuple[Load, dict]:
        keys = self.keys_by_port(cache)
        load = Load(cache, keys)
        load.start()
        time.sleep(before)
        fault_started = time.monotonic()
        marks = fault(load) or {}
        marks.setdefault("fault_started", fault_started)
        time.sleep(after_fault)
        load.stop()
        marks["end"] = time.monotonic()
        marks["load_start"] = fault_started - before
        return load, marks

    def report(self, name: str, load: Load, marks: dict, failed_port: int | None, extra: dict) -> dict:
        before = window(load.samples, marks["load_start"], marks["fault_started"])
        fault_end = marks.get("fault_end", marks["end"])
        during = window(load.samples, marks["fault_started"], fault_end)
        shards = sorted(load.keys_by_shard)
        healthy = [p for p in shards if p != failed_port]
        before_seconds = marks["fault_started"] - marks["load_start"]
        during_seconds = max(1e-9, fault_end - marks["fault_started"])
        errors = [s for s in load.samples if s.error]
        result = {
            "scenario": name,
            "errors_seen_by_callers": len(errors) + load.view_errors,
            "view_calls": load.view_calls,
            "stale_served": load.stale,
            "degraded_calls_failed_shard": sum(1 for s in during if s.degraded and s.shard == failed_port),
            "degraded_calls_healthy_shards": sum(1 for s in during if s.degraded and s.shard != failed_port),
            "healthy_throughput_ratio": throughput(during, healthy, during_seconds)
            / max(1e-9, throughput(before, healthy, before_seconds)),
            "per_shard_before": {p: shard_stats(before, p) for p in shards},
            "per_shard_during": {p: shard_stats(during, p) for p in shards},
            "max_call_ms": max((s.seconds for s in load.samples), default=0) * 1000,
            "first_error": errors[0].error if errors else None,
            **extra,
        }
        self.results.append(result)
        return result

    def scenario_kill(self) -> int:
        cache = self.fresh_cache()
        victim = self.primaries()[0]
        marks: dict[str, float] = {}

        def fault(load: Load) -> dict:
            self.cluster.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
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

        load, run_marks = self.run_load(cache, fault, before=1.5 if self.short else 3.0, after_fault=1.0)
        run_marks.update(marks)
        self.report(
            "kill -9 primary",
            load,
            run_marks,
            victim,
            {
                "failover_seconds": run_marks["ok_at"] - run_marks["killed"],
                "served_after_ok_seconds": run_marks["served_at"] - run_marks["ok_at"],
            },
        )
        return victim

    def scenario_restart(self, port: int) -> None:
        cache = self.fresh_cache()

        def fault(load: Load) -> dict:
            self.cluster.start_node(port)
            self.wait_ok(60)
            return {"fault_end": time.monotonic()}

        load, marks = self.run_load(cache, fault, before=1.0, after_fault=1.0)
        self.report("restart killed node (rejoins as replica)", load, marks, None, {})

    def scenario_sigstop(self) -> None:
        cache = self.fresh_cache()
        victim = self.primaries()[-1]
        pause = 3.0

        def fault(load: Load) -> dict:
            self.cluster.kill(victim, signal.SIGSTOP)
            time.sleep(pause)
            self.cluster.kill(victim, signal.SIGCONT)
            resumed = time.monotonic()
            self.wait_ok(60)
            return {"fault_end": resumed}

        load, marks = self.run_load(cache, fault, before=1.0 if self.short else 3.0, after_fault=1.0)
        timeout_ms = cache._settings.connection.socket_timeout * 1000
        self.report("SIGSTOP primary 3 s", load, marks, victim, {"socket_timeout_ms": timeout_ms})

    def scenario_reshard(self) -> None:
        cache = self.fresh_cache()
        slots = 200 if self.short else 500

        def fault(load: Load) -> dict:
            ports = self.primaries()
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
        slot_map = cache._shared.state.slot_map
        victim = self.primaries()[1]
        tag = next(
            f"tag{n}"
            for n in range(10_000)
            if slot_map.primaries[key_slot(cache._tags.tag_key(f"tag{n}"))].port == victim
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
            cache._tags.outbox is not None and not cache._tags.outbox.empty and time.monotonic() - ok_at < 15
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
        self.cluster.start_node(victim)
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
                "outbox_pending_at_end": len(cache._tags.outbox.pending) if cache._tags.outbox else 0,
            }
        )

    def run_all(self) -> list[dict[str, Any]]:
        victim = self.scenario_kill()
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
            print(f"  {name:32} {value:.3f}" if isinstance(value, float) else f"  {name:32} {value}")
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
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with Chaos(args.base_port, args.short) as chaos:
        results = chaos.run_all()
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
