"""End to end: the example shop under gunicorn, a product page (cached page + a view counted behind) vs the
cached list page, 16 concurrent connections; and whether every counted view reaches the database.

    .venv/bin/python -m bench.bench_shop [--markdown] [--keep-cluster] [--reps 5] [--scale 1.0]
        [--connections 16] [--seconds 3] [--workers 2]

The shop (example_project/, its own settings `shop.settings`, DEBUG off) is served by gunicorn (default
sync workers, `--workers` 2) on the benchmark cluster (harness.servers) and the machine's PostgreSQL on
loopback (a database `distcache_bench_shop` of our own, created and dropped; `seed_catalogue` fills it).
A drainer process (this script with --drainer, the shop's settings) runs `flush_behind()` once a second,
as the shop's Celery beat would; the backlog trigger's Celery tasks go to the harness's standalone Redis
and are not consumed.

S1: bench/http_load.py (asyncio, HTTP/1.1, keep-alive when the server allows it) loads one product's page
(`/p/<slug>/`) and the list page (`/`) in turn, `--seconds` each, `--reps` times (plus one warm-up
round), the order alternating: req/s of 200 responses of each, and the ratio. Then the drainer stops
after a last drain to an empty queue, and the product's view count in the database must equal the number
of its pages served with a 200 (warm-up included): the "no lost increments under 16 concurrent
connections" check of issue 12.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

from . import harness
from .bench_models import FigureRow, ModelReport, admin_connection, bench_database, postgres_problem
from .harness import Row, Target
from .http_load import LoadResult, load

EXAMPLE = harness.ROOT / "example_project"
DATABASE = "distcache_bench_shop"
DRAIN_EVERY = 1.0  # seconds: the shop's beat schedule (tasks.beat_schedule())

TARGETS = {
    "S1": (
        "the example shop's product page (cached page + view counted behind) ≥ 0.8× the req/s of the cached "
        "list page, gunicorn 2 workers, 16 connections, same run",
        Target("S1", at_least=0.8),
    ),
    "S2": (
        "every product page served with a 200 is one view in the database after a final drain",
        None,
    ),
}


def drainer_main() -> int:
    """In the shop's settings: flush_behind() every DRAIN_EVERY s until stdin closes, then until empty."""
    import threading

    sys.path.insert(0, str(EXAMPLE))
    import django

    django.setup()
    from django_distcache.models import behind_metrics, flush_behind

    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print("ready", flush=True)
    failed = 0
    while not stop.wait(DRAIN_EVERY):
        try:
            flush_behind()
        except Exception as error:  # noqa: BLE001 - a failed drain is retried, as beat would
            failed += 1
            print(f"drain failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        report = flush_behind()
        if not report.shards_busy and behind_metrics()["backlog"] == 0:
            print(json.dumps({"empty": True, "failed": failed}), flush=True)
            return 0
        time.sleep(0.1)
    print(json.dumps({"empty": False, "failed": failed}), flush=True)
    return 1


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f} s")
        time.sleep(0.2)


@contextlib.contextmanager
def process(command: list[str], env: dict[str, str], cwd: Any, **kwargs: Any) -> Iterator[subprocess.Popen]:
    child = subprocess.Popen(command, env=env, cwd=cwd, preexec_fn=harness._die_with_parent, **kwargs)
    try:
        yield child
    finally:
        with harness.shielded():
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(15)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()


def main(argv: list[str] | None = None) -> int:
    parser = harness.common_parser(
        __spec__.name if __spec__ else "bench.bench_shop", __doc__.split("\n\n")[0]
    )
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0, help="per load phase, at --scale 1 (3)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (2)")
    parser.add_argument("--pg-host", default="127.0.0.1")
    parser.add_argument("--pg-port", type=int, default=5432)
    parser.add_argument("--pg-user", default="postgres")
    parser.add_argument("--drainer", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.drainer:
        return drainer_main()
    problem = postgres_problem(args.pg_host, args.pg_port, args.pg_user)
    if problem:
        harness.log(f"PostgreSQL is needed and not reachable at {args.pg_host}:{args.pg_port}: {problem}")
        return 1
    try:
        import gunicorn  # noqa: F401
    except ImportError:
        harness.log("gunicorn is not installed: pip install -e '.[bench]'")
        return 1
    seconds = args.seconds * args.scale
    started = time.monotonic()
    try:
        with (
            harness.servers(args.base_port, args.keep_cluster, args.replicas) as environment,
            bench_database(args.pg_host, args.pg_port, args.pg_user, DATABASE) as database,
        ):
            env = {
                **os.environ,
                "DJANGO_SETTINGS_MODULE": "shop.settings",
                "DJANGO_DEBUG": "0",
                "DATABASE_URL": f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{DATABASE}",
                "DISTCACHE_LOCATION": ",".join(environment.cluster_urls),
                "DISTCACHE_KEY_PREFIX": "shopbench-" + uuid.uuid4().hex[:8],
                "DISTCACHE_BROKER_URL": environment.standalone.url,
            }
            manage = [sys.executable, "manage.py"]
            quiet = {"stdout": subprocess.DEVNULL}
            subprocess.run([*manage, "migrate", "--noinput"], env=env, cwd=EXAMPLE, check=True, **quiet)
            subprocess.run([*manage, "seed_catalogue"], env=env, cwd=EXAMPLE, check=True, **quiet)
            with admin_connection(database, DATABASE) as conn:
                product_id, slug = conn.execute(
                    "SELECT id, slug FROM catalogue_product ORDER BY id LIMIT 1"
                ).fetchone()
            port = harness.free_port()
            gunicorn_command = [sys.executable, "-m", "gunicorn", "shop.wsgi:application", "--workers",
                                str(args.workers), "--bind", f"{harness.HOST}:{port}", "--log-level", "warning"]  # fmt: skip
            drainer_command = [sys.executable, "-m", "bench.bench_shop", "--drainer"]
            with (
                process(gunicorn_command, env, EXAMPLE) as server,
                process(drainer_command, env, harness.ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        text=True) as drainer,
            ):  # fmt: skip
                if drainer.stdout.readline().strip() != "ready":
                    raise RuntimeError("the drainer process did not start")
                base = f"http://{harness.HOST}:{port}"
                wait_http(base + "/")
                harness.log(f"gunicorn ({args.workers} workers, pid {server.pid}) serving the shop on {base}")
                pages = {"product": f"/p/{slug}/", "list": "/"}
                product_ok = 0
                samples: dict[str, list[float]] = {name: [] for name in pages}
                results: list[tuple[str, LoadResult]] = []
                harness.log(
                    f"S1: {args.connections} connections, {seconds:g} s per phase, 1 warm-up + {args.reps} "
                    "rounds, product page and list page in turn"
                )
                for rep in range(args.reps + 1):
                    order = list(pages) if rep % 2 == 0 else list(reversed(pages))
                    for name in order:
                        result = load(harness.HOST, port, pages[name], args.connections, seconds)
                        results.append((name, result))
                        if name == "product":
                            product_ok += result.ok
                        if rep > 0:  # round 0 warms both pages (and the workers) up
                            samples[name].append(1 / max(result.per_second(), 1e-9))
                drainer.stdin.close()
                summary = json.loads(drainer.stdout.readline() or "{}")
                drainer.wait(90)
            with admin_connection(database, DATABASE) as conn:
                row = conn.execute(
                    "SELECT views FROM catalogue_productviews WHERE product_id = %s", [product_id]
                ).fetchone()
            views = int(row[0]) if row else 0
            info = dict(environment.info)
            info["machine"] += ", at end: " + " / ".join(f"{v:.2f}" for v in os.getloadavg())
            info["database"] = f"PostgreSQL on {database['HOST']}:{database['PORT']}, database {DATABASE}"
            info["server"] = (
                f"gunicorn {harness._version('gunicorn')}, {args.workers} sync workers, DEBUG off"
            )
    except KeyboardInterrupt:
        harness.log("interrupted; servers stopped")
        return 130
    other = sum(sum(c for s, c in r.statuses.items() if s != 200) for _, r in results)
    errors = [e for _, r in results for e in r.errors]
    harness.log(
        f"done in {time.monotonic() - started:.0f}s; product 200s {product_ok:,}, views in the database "
        f"{views:,}; non-200 responses {other}, connection errors {len(errors)}"
        + (f" (first: {errors[0]})" if errors else "")
        + f"; drainer: {summary}"
    )
    lost = product_ok - views
    rows: list[Row] = [
        Row(
            f"page served, {args.connections} connections",
            "product page (cached page + view counted behind)",
            samples["product"],
            "cached list page",
            samples["list"],
            True,
            "speed",
            TARGETS["S1"][1],
        ),
        FigureRow(
            f"views counted, {args.connections} connections",
            f"product views in the database after a final drain: {views:,}",
            f"product pages served with a 200: {product_ok:,}",
            f"{lost:,} lost" if lost >= 0 else f"{-lost:,} counted twice",
            "0 lost (assert)",
            "PASS" if lost == 0 and summary.get("empty") else "FAIL",
            "S2",
        ),
    ]
    medians = {name: 1 / statistics.median(values) for name, values in samples.items()}
    settings = (
        f"{args.connections} concurrent connections (bench/http_load.py, keep-alive where the server allows; "
        f"gunicorn's sync worker closes each connection), {seconds:g} s per phase, medians of {args.reps} "
        f"rounds after a warm-up round, pages in alternating order; product page req/s {medians['product']:,.0f}, "
        f"list page {medians['list']:,.0f}; non-200 responses {other}; drain once a second by a drainer "
        "process"
    )
    report = ModelReport(
        "End to end: the example shop under gunicorn",
        rows,
        {label: text for label, (text, _) in TARGETS.items()},
        info,
        settings,
    )
    report.emit(args.markdown)
    if any(row.result() == "FAIL" for row in rows):
        harness.log("FAIL: product views were lost (or counted twice) between the page and the database")
        return 1
    return 1 if args.strict and report.misses() else 0


if __name__ == "__main__":
    sys.exit(main())
