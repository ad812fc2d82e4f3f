"""Warming: a warmer run in one process against a loop of `cache.set`, and `warmcache --async` on two
Celery workers against one.

    .venv/bin/python -m bench.bench_warming [--markdown] [--keep-cluster] [--reps 5] [--scale 1.0]
        [--base-port 7400] [--tasks 4]

Ours runs on a local 3-primary Redis Cluster (harness.servers). The Celery broker is a standalone Redis
(`django_distcache.devcluster.StandaloneServer`) on --base-port + 8; the workers are real
`celery worker -P solo` processes running this module as their Celery app (it configures Django from the
environment). Everything started here is stopped at the end, on error and on Ctrl-C/SIGTERM.

W1: 100,000 entries (× --scale) of 200 bytes, keys `warm:<n>`, timeout 300 s, no tags, written by
`run_warmer` (chunks of 1,000: one `set_many` batch each) against a Python loop of `cache.set` over the
same keys and value. Informational: a loop of `cache.set_many` over the same chunks without the warmer.
W2: the same warmer through `manage.py warmcache --async --tasks 4` (call_command, from this process):
4 `django_distcache.warm` tasks, each writing a quarter of the blocks, timed from the command's start
until it has seen every task finish (it polls the run's progress hash every 0.1 s), with the two workers
on the run's queue against one. Informational: one worker against the in-process run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from django_distcache.devcluster import StandaloneServer

from . import harness
from .harness import Contender, Row, Target

ENTRIES = 100_000
VALUE = random.Random(200).randbytes(200)
TTL = 300
CHUNK = 1000
TASKS = 4
WARMER = "bench-entries"
SETUP_ENV = "DISTCACHE_BENCH_WARMING"
# Worker "one" consumes both queues, worker "two" only the second: a run sent to QUEUE_ONE has one worker,
# a run sent to QUEUE_BOTH has two.
QUEUE_ONE, QUEUE_BOTH = "bench-warm-one", "bench-warm-both"

TARGETS = {
    "W1": ("warming 100,000 entries of 200 B from one process ≥ 10× faster than a loop of cache.set", 10.0),
    "W2": ("warmcache --async with 2 workers faster than with 1", 1.0),
}


@dataclass
class Setup:
    """What the worker processes need to see the same cluster, key prefix, signing key and broker."""

    cluster_urls: list[str]
    key_prefix: str
    secret_key: str
    broker_url: str
    entries: int


def configure_django(setup: Setup) -> None:
    import django
    from django.conf import settings

    settings.configure(
        SECRET_KEY=setup.secret_key,
        USE_TZ=True,
        INSTALLED_APPS=["django_distcache"],
        CACHES={
            "default": {
                "BACKEND": "django_distcache.cache.RedisClusterCache",
                "LOCATION": setup.cluster_urls,
                "KEY_PREFIX": setup.key_prefix,
                "TIMEOUT": TTL,
            }
        },
    )
    django.setup()


def register_warmer(entries: int) -> None:
    from django_distcache.warming import warmer

    @warmer(WARMER, timeout=TTL)
    def bench_entries(chunk: Any) -> Any:
        for number in chunk.take(range(entries)):  # each task computes only its own entries
            yield f"warm:{number}", VALUE


def celery_app(setup: Setup) -> Any:
    from celery import Celery

    app = Celery("bench_warming", broker=setup.broker_url)
    app.conf.task_ignore_result = True
    app.conf.broker_connection_retry_on_startup = True
    app.conf.imports = ["django_distcache.tasks"]
    import django_distcache.tasks  # noqa: F401  (registers django_distcache.warm with this app)

    return app


# `celery -A bench.bench_warming worker`: the worker imports this module with the setup in its environment.
if os.environ.get(SETUP_ENV):
    _setup = Setup(**json.loads(os.environ[SETUP_ENV]))
    configure_django(_setup)
    register_warmer(_setup.entries)
    app = celery_app(_setup)


# --------------------------------------------------------------------------- broker and workers


class Workers:
    """Two `celery worker -P solo` processes: "one" on both queues, "two" on QUEUE_BOTH only."""

    def __init__(self, setup: Setup, log_dir: Path) -> None:
        self.setup = setup
        self.log_dir = log_dir
        self.processes: list[tuple[subprocess.Popen, Path, Any]] = []

    def start(self, timeout: float = 60.0) -> None:
        environment = dict(os.environ, **{SETUP_ENV: json.dumps(asdict(self.setup))})
        environment.pop("DJANGO_SETTINGS_MODULE", None)
        for name, queues in (("one", f"{QUEUE_ONE},{QUEUE_BOTH}"), ("two", QUEUE_BOTH)):
            log_path = self.log_dir / f"bench-warm-worker-{name}.log"
            log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
            command = [sys.executable, "-m", "celery", "-A", "bench.bench_warming", "worker", "-P", "solo",
                       "-Q", queues, "-n", f"bench-warm-{name}@%h", "--without-gossip", "--without-mingle",
                       "--without-heartbeat", "-l", "info"]  # fmt: skip
            process = subprocess.Popen(
                command,
                cwd=harness.ROOT,
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=harness._die_with_parent,
            )
            self.processes.append((process, log_path, log))
        deadline = time.monotonic() + timeout
        for process, log_path, _ in self.processes:
            while "ready." not in log_path.read_text(errors="replace"):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"a Celery worker did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.1)
        harness.log(f"2 Celery workers ready (pids {', '.join(str(p.pid) for p, _, _ in self.processes)})")

    def stop(self) -> None:
        for process, _, _ in self.processes:
            if process.poll() is None:
                process.terminate()
        for process, _, log in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
            log.close()
        if self.processes:
            harness.log("Celery workers stopped")
        self.processes = []


# --------------------------------------------------------------------------- the comparisons


class Bench:
    def __init__(self, setup: Setup, reps: int, tasks: int) -> None:
        from django.core.cache import caches

        self.setup = setup
        self.reps = reps
        self.tasks = tasks
        self.cache = caches["default"]
        self.entries = setup.entries
        self.keys = [f"warm:{number}" for number in range(self.entries)]
        self.rows: list[Row] = []

    def check_written(self) -> None:
        sample = random.sample(self.keys, 200)
        found = self.cache.get_many(sample)
        assert len(found) == len(sample) and all(value == VALUE for value in found.values()), "not written"

    def warm_here(self) -> None:
        from django_distcache.warming import run_warmer

        result = run_warmer(WARMER, chunk_size=CHUNK)
        assert result.ok and result.entries == self.entries, result

    def set_loop(self) -> None:
        cache_set = self.cache.set
        for key in self.keys:
            cache_set(key, VALUE, TTL)

    def set_many_loop(self) -> None:
        for start in range(0, self.entries, CHUNK):
            failed = self.cache.set_many(dict.fromkeys(self.keys[start : start + CHUNK], VALUE), TTL)
            assert not failed

    def warm_async(self, queue: str) -> None:
        from django.core.management import call_command

        out = io.StringIO()
        call_command(
            "warmcache", WARMER, "--async", "--tasks", str(self.tasks), "--chunk-size", str(CHUNK),
            "--queue", queue, "--timeout", "600", stdout=out, stderr=io.StringIO(), verbosity=0,
        )  # fmt: skip
        assert f"{self.entries:,}" in out.getvalue(), out.getvalue()

    def row(
        self, samples: dict[str, list[float]], ours: str, base: str, label: str | None, name: str
    ) -> None:
        target = None
        if label is not None:
            target = Target(label, at_least=TARGETS[label][1])
        self.rows.append(Row(name, ours, samples[ours], base, samples[base], True, "speed", target))

    def bench_in_process(self) -> None:
        contenders = [
            Contender("run_warmer", self.warm_here, self.entries),
            Contender("loop of cache.set", self.set_loop, self.entries),
            Contender("loop of set_many(1000)", self.set_many_loop, self.entries),
        ]
        samples = harness.measure(contenders, self.reps, 1, f"W1: {self.entries:,} entries in one process")
        self.check_written()
        operation = f"warm {self.entries:,} × {len(VALUE)} B (entries/s)"
        self.row(samples, "run_warmer", "loop of cache.set", "W1", operation)
        self.row(samples, "run_warmer", "loop of set_many(1000)", None, operation + ", warmer overhead")

    def bench_async(self) -> None:
        contenders = [
            Contender("--async, 2 workers", lambda: self.warm_async(QUEUE_BOTH), self.entries),
            Contender("--async, 1 worker", lambda: self.warm_async(QUEUE_ONE), self.entries),
            Contender("run_warmer in-process", self.warm_here, self.entries),
        ]
        samples = harness.measure(contenders, self.reps, 1, f"W2: warmcache --async, {self.tasks} tasks")
        self.check_written()
        operation = f"warmcache --async --tasks {self.tasks}, {self.entries:,} entries (entries/s)"
        self.row(samples, "--async, 2 workers", "--async, 1 worker", "W2", operation)
        self.row(samples, "--async, 1 worker", "run_warmer in-process", None, operation + ", vs in-process")


def main(argv: list[str] | None = None) -> int:
    parser = harness.common_parser(__spec__.name, __doc__.split("\n\n")[0])
    parser.add_argument(
        "--tasks", type=int, default=TASKS, help=f"tasks of the --async runs (default {TASKS})"
    )
    args = parser.parse_args(argv)
    entries = max(CHUNK, int(ENTRIES * args.scale))
    try:
        with harness.servers(args.base_port, args.keep_cluster, args.replicas) as environment:
            broker_port = args.base_port + 8
            broker = StandaloneServer(
                broker_port, harness.ROOT / ".devcluster" / f"bench-broker-{broker_port}"
            )
            workers = None
            try:
                with harness.signals_interrupt():
                    harness.log(f"Celery broker on {broker.up()}")
                    setup = Setup(
                        environment.cluster_urls,
                        f"bench-warm-{os.urandom(4).hex()}",
                        "bench-" + os.urandom(16).hex(),
                        broker.url,
                        entries,
                    )
                    configure_django(setup)
                    register_warmer(entries)
                    celery_app(setup)  # the current app: warmcache --async sends through it
                    workers = Workers(setup, broker.data_dir)
                    workers.start()
                    bench = Bench(setup, args.reps, args.tasks)
                    bench.bench_in_process()
                    bench.bench_async()
            finally:
                with harness.shielded():
                    if workers is not None:
                        workers.stop()
                    with contextlib.suppress(OSError):
                        broker.down()
                        harness.log("Celery broker stopped")
            info = dict(environment.info)
            info["machine"] += ", at end: " + " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except KeyboardInterrupt:
        harness.log("interrupted; servers and workers stopped")
        return 130
    report = harness.Report(
        "Warming: run_warmer vs a loop of cache.set; warmcache --async on 2 workers vs 1",
        bench.rows,
        {label: text for label, (text, _) in TARGETS.items()},
        info,
        f"medians of {args.reps} timed reps after a warm-up, contenders interleaved; {entries:,} entries of "
        f"{len(VALUE)} bytes, timeout {TTL} s, no tags, chunks of {CHUNK}; --async: {args.tasks} tasks, "
        "workers `celery worker -P solo` (one process each), broker a standalone Redis on loopback",
    )
    report.emit(args.markdown)
    return 1 if args.strict and report.misses() else 0


if __name__ == "__main__":
    sys.exit(main())
