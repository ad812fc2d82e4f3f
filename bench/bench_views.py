"""cached_view: a hit on the example shop's product page against rendering that page from the database.

    .venv/bin/python -m bench.bench_views [--markdown] [--keep-cluster] [--reps 5] [--scale 1.0]
        [--products 200] [--database both|postgres|sqlite] [--pg-host 127.0.0.1] [--pg-port 5432]
        [--pg-user postgres]

The example shop (example_project/, its own settings `shop.settings`, DEBUG off) runs in-process on a
local 3-primary Redis Cluster (harness.servers), once on PostgreSQL and once on SQLite, each in a process
of its own (Django is set up once per process), one table each. PostgreSQL is the machine's, on loopback
(as bench/bench_models.py uses it): a database `distcache_bench_views` of our own, created if missing and
dropped at the end. SQLite is a fresh file, as `make demo` runs the shop. `seed_catalogue` fills either.

V1 times `catalogue.views.product_page` (the `@cached_view` page of a product, without its view count)
on a hit, against the same view function undecorated with its row reads (`get_cached`) sent to the ORM:
the page rendered from the database, two queries and the template. Both view the 20 first products in
turn, the popular pages a page cache is for: each is viewed several times a second, so its tags' versions
are held in-process (VERSION_CHECK_INTERVAL, 1 s). Every page is requested once beforehand and checked to be a
hit. Informational rows: the same over all the products in turn (each page about once a second, so a hit
often reads its tags' versions from Redis too); the whole product page (`product_detail`: the product
row from the model cache, the cached page, the view count through save_behind) against the database
render plus an UPDATE of the count; and Django's own `cache_page` on the same cache backend (it reads the
URL's header list, then the page: two round trips where cached_view makes one).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from . import harness
from .harness import Contender, Environment, Row, Target

EXAMPLE = harness.ROOT / "example_project"
PRODUCTS = 200
HOT = 20  # the popular pages: each is viewed several times a second
SLICES = 20
OPS = 100  # page views per slice at --scale 1

TARGETS = {
    "V1": (
        "a cached_view hit ≥ 5× faster than rendering the example detail view against the database",
        Target("V1", at_least=5.0),
    ),
}


def configure_django(environment: Environment, database_url: str | None, directory: Path) -> None:
    """The shop's own settings, pointed at the benchmark cluster and a database of the benchmark's."""
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "bench_shop_settings",
            "DJANGO_DEBUG": "0",  # DEBUG would record every query
            "DISTCACHE_LOCATION": ",".join(environment.cluster_urls),
            "DISTCACHE_KEY_PREFIX": f"bench-views-{uuid.uuid4().hex[:8]}",
        }
    )
    if database_url:
        os.environ["DATABASE_URL"] = database_url
    else:
        os.environ.pop("DATABASE_URL", None)
        os.environ["DISTCACHE_EXAMPLE_DB"] = str(directory / "shop.sqlite3")
    # No Celery broker runs here: the view counts' write-behind queue is not drained while timing, and no
    # drain is asked for (each attempt would wait for the broker's connection to fail).
    (directory / "bench_shop_settings.py").write_text(
        "from shop.settings import *  # noqa: F403\n"
        'CACHES["default"]["OPTIONS"] = {"BEHIND_TRIGGER_BACKLOG": 0}  # noqa: F405\n'
    )
    sys.path[:0] = [str(directory), str(EXAMPLE)]
    import django

    django.setup()
    import logging

    logging.getLogger("django_distcache").setLevel(logging.WARNING)


def database_get(model: Any, **lookup: Any) -> Any:
    """What `get_cached` does, from the database: the baseline's row reads."""
    return model._default_manager.get(**lookup)


class Bench:
    def __init__(self, reps: int, scale: float, products: int) -> None:
        from catalogue.models import Product
        from django.core.management import call_command
        from django.test import RequestFactory

        self.reps = reps
        self.ops = max(10, int(OPS * scale))
        harness.log("migrating and seeding the example shop")
        call_command("migrate", verbosity=0, interactive=False)
        call_command("seed_catalogue", products=products, reset=True, verbosity=0)
        factory = RequestFactory(HTTP_HOST="127.0.0.1")
        self.products = list(Product.objects.order_by("pk"))
        self.requests = {p.slug: factory.get(p.get_absolute_url()) for p in self.products}
        self.rows: list[Row] = []

    def request(self, product: Any) -> Any:
        return self.requests[product.slug]

    def runner(self, function: Any, products: list[Any]) -> Any:
        """A runner viewing the next `ops` of `products` in turn, each page checked to be a 200."""
        window = iter(range(1 << 62))

        def run() -> None:
            for _ in range(self.ops):
                product = products[next(window) % len(products)]
                response = function(product)
                if response.status_code != 200:
                    raise RuntimeError(f"{product.slug}: status {response.status_code}")

        return run

    def bench_product_page(self) -> None:
        from catalogue import views
        from catalogue.models import ProductViews
        from django.db.models import F
        from django.views.decorators.cache import cache_page

        render_page = views.product_page.__wrapped__  # the view function, undecorated

        def from_database(product: Any) -> Any:
            original = views.get_cached
            views.get_cached = database_get
            try:
                return render_page(self.request(product), product.slug, product)
            finally:
                views.get_cached = original

        def cached(product: Any) -> Any:
            return views.product_page(self.request(product), product.slug, product)

        def whole_page(product: Any) -> Any:
            return views.product_detail(self.request(product), product.slug)

        def from_database_counted(product: Any) -> Any:
            response = from_database(product)
            ProductViews.objects.filter(pk=product.pk).update(views=F("views") + 1)
            return response

        by_slug = {product.slug: product for product in self.products}
        django_cache_page = cache_page(300, key_prefix="bench-cache-page")(
            lambda request, slug: render_page(request, slug, by_slug[slug])
        )

        def djangos_cache_page(product: Any) -> Any:
            return django_cache_page(self.request(product), product.slug)

        harness.log(f"filling the cache: every one of {len(self.products)} pages, once per contender")
        for product in self.products:
            ProductViews.objects.get_or_create(product_id=product.pk)  # as the first view creates it
            for fill in (cached, whole_page, djangos_cache_page):
                fill(product)
        for product in self.products:  # a checked pass: every page is a hit, and is the product's page
            response = cached(product)
            if response.cache_status != "hit" or product.name.encode() not in response.content:
                raise RuntimeError(f"{product.slug}: not a hit of its page ({response.cache_status})")
        hot, every = self.products[:HOT], self.products
        contenders = [
            ("cached_view hit", cached, hot),
            ("rendered from the database", from_database, hot),
            ("cached_view hit, every page in turn", cached, every),
            ("rendered from the database, every page in turn", from_database, every),
            ("product_detail: hit + view count", whole_page, hot),
            ("database render + UPDATE of the count", from_database_counted, hot),
            ("Django's cache_page hit, same backend", djangos_cache_page, hot),
        ]
        samples = harness.measure(
            [Contender(name, self.runner(view, products), self.ops) for name, view, products in contenders],
            self.reps,
            SLICES,
            "product page",
        )

        def row(operation: str, ours: str, base: str, target: str | None = None) -> Row:
            goal = TARGETS[target][1] if target else None
            return Row(operation, ours, samples[ours], base, samples[base], False, "speed", goal)

        self.rows += [
            row(f"product page, {HOT} hot pages", "cached_view hit", "rendered from the database", "V1"),
            row(
                f"product page, {len(self.products)} pages in turn",
                "cached_view hit, every page in turn",
                "rendered from the database, every page in turn",
            ),
            row(
                f"product page with its view count, {HOT} hot pages",
                "product_detail: hit + view count",
                "database render + UPDATE of the count",
            ),
            row(
                f"product page hit, {HOT} hot pages",
                "cached_view hit",
                "Django's cache_page hit, same backend",
            ),
        ]


def main(argv: list[str] | None = None) -> int:
    parser = harness.common_parser(__spec__.name, __doc__.split("\n\n")[0])
    parser.add_argument(
        "--products", type=int, default=PRODUCTS, help=f"products seeded (default {PRODUCTS})"
    )
    parser.add_argument(
        "--database",
        choices=("both", "postgres", "sqlite"),
        default="both",
        help="the shop's database: PostgreSQL, SQLite, or each in turn (default)",
    )
    parser.add_argument("--pg-host", default="127.0.0.1")
    parser.add_argument("--pg-port", type=int, default=5432)
    parser.add_argument("--pg-user", default="postgres")
    args: argparse.Namespace = parser.parse_args(argv)
    if args.pg_host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("--pg-host must be a loopback address")
    if args.database == "both":
        return run_each_database(args)
    try:
        return run(args)
    except KeyboardInterrupt:
        harness.log("interrupted; servers stopped")
        return 130


def run_each_database(args: argparse.Namespace) -> int:
    """This script once per database, each in a process of its own; PostgreSQL is skipped (and said so)
    when it cannot be reached."""
    from .bench_models import postgres_problem

    databases = ["postgres", "sqlite"]
    problem = postgres_problem(args.pg_host, args.pg_port, args.pg_user)
    if problem is not None:
        harness.log(f"PostgreSQL at {args.pg_host}:{args.pg_port} is not reachable ({problem}): SQLite only")
        databases.remove("postgres")
    argv = [*harness.forwarded_arguments(args), "--products", str(args.products)]
    argv += ["--pg-host", args.pg_host, "--pg-port", str(args.pg_port), "--pg-user", args.pg_user]
    status = 0
    for database in databases:
        child = subprocess.Popen([sys.executable, "-m", __spec__.name, *argv, "--database", database])
        try:
            status = max(status, child.wait())
        except KeyboardInterrupt:
            with harness.shielded():  # the child got the signal too: let it stop its servers
                child.wait()
            return 130
    return status


def run(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        environment = stack.enter_context(harness.servers(args.base_port, args.keep_cluster, args.replicas))
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="distcache-bench-views-")))
        if args.database == "postgres":
            from .bench_models import bench_database, postgres_description

            database = stack.enter_context(
                bench_database(args.pg_host, args.pg_port, args.pg_user, "distcache_bench_views")
            )
            url = f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}"
            described = postgres_description(database)
        else:
            url, described = None, f"SQLite {sqlite3.sqlite_version}, a file in a temporary directory"
        configure_django(environment, url, directory)
        bench = Bench(args.reps, args.scale, args.products)
        bench.bench_product_page()
        from django.db import connections

        connections.close_all()
        info = dict(environment.info)
        info["database"] = described
        info["machine"] += ", at end: " + " / ".join(f"{v:.2f}" for v in os.getloadavg())
    report = harness.Report(
        f"Views: cached_view vs rendering the example shop's product page ({args.database})",
        bench.rows,
        {label: text for label, (text, _) in TARGETS.items()},
        info,
        f"medians of {args.reps} timed reps after a warm-up; single thread; the example shop with "
        f"{args.products} products, DEBUG off; views called with RequestFactory requests (no middleware); "
        f"per rep and contender {SLICES} interleaved slices of {bench.ops} page views, each of the next "
        "product in turn, every page cached beforehand",
    )
    report.emit(args.markdown)
    return 1 if args.strict and report.misses() else 0


if __name__ == "__main__":
    sys.exit(main())
