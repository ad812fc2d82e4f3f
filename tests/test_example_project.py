"""End to end: the example shop on the test cluster, driven through Django's test client and its admin.

The shop has settings of its own, so it runs in subprocesses, the way a developer runs it: `manage.py
migrate` and `seed_catalogue` on a temporary SQLite file, then `manage.py shell -c` scripts that visit
pages as an anonymous shopper and edit products in the admin as a signed-in member of staff, reporting each
page's footer badge (cache hit, miss, partial, or bypass for a signed-in user) and the SQL it ran as JSON. The run's key prefix is its own, so it shares the cluster with nothing else.

Product a (category x) is edited, then moved to category z; product s, also in x, and product b, in
category y, are untouched. The view-count tests each take a product no other test has viewed.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from django.conf import settings

EXAMPLE = Path(__file__).resolve().parent.parent / "example_project"

# Runs inside the shop (`manage.py shell -c`); its last line of output is the JSON of `seen`.
SCRIPT = r"""
import json, re
from django.db import connection
from django.forms.models import model_to_dict
from django.test import Client
from django.test.utils import CaptureQueriesContext, setup_test_environment
from catalogue.models import Category, Product

setup_test_environment()  # lets the test client's host through ALLOWED_HOSTS
client = Client()  # a shopper: anonymous, so served cached pages
staff = Client()  # signs in to the admin: pages are built for them, never served from or stored in the cache
seen = {}


def visit(label, url, who=client):
    with CaptureQueriesContext(connection) as queries:
        response = who.get(url)
    body = response.content.decode()
    badge = re.search(r'class="badge (\w+)"', body)
    what = re.search(r'<span class="muted">\((.*?)\)</span>', body)
    seen[label] = {
        "code": response.status_code,
        "status": badge and badge.group(1),
        "what": what and what.group(1),
        "body": body,
        "sql": [query["sql"] for query in queries.captured_queries],
    }


def visit_all(when):
    for name, url in pages.items():
        visit(f"{name} {when}", url)


def admin_save(product, **changes):
    data = {**model_to_dict(product), **changes, "_save": "Save"}
    response = staff.post(f"/admin/catalogue/product/{product.pk}/change/", data)
    errors = response.context and str(response.context["adminform"].form.errors)
    return {"code": response.status_code, "location": response.get("Location"), "errors": errors}


a = Product.objects.select_related("category").order_by("pk").first()
s = Product.objects.filter(category=a.category).exclude(pk=a.pk).order_by("pk").first()
b = Product.objects.select_related("category").exclude(category=a.category).order_by("pk").first()
z = Category.objects.exclude(pk__in=[a.category_id, b.category_id]).order_by("pk").first()
pages = {
    "list": "/", "a": a.get_absolute_url(), "s": s.get_absolute_url(), "b": b.get_absolute_url(),
    "categories": "/categories/",
}
seen["names"] = {
    "new price": str(a.price + 1), "x": a.category.slug, "z": z.slug, "z name": z.name,
}

visit_all("first")
visit_all("second")

login = staff.post("/admin/login/", {"username": "admin", "password": "admin", "next": "/admin/"})
seen["login"] = {"code": login.status_code, "location": login.get("Location")}
seen["edit"] = admin_save(a, price=seen["names"]["new price"])
visit_all("after edit")
visit_all("after edit, again")

a.refresh_from_db()
seen["move"] = admin_save(a, category=z.pk)
visit_all("after move")

visit("list as staff", "/", staff)
visit("a as staff", pages["a"], staff)
listed = client.get("/")
seen["list etag"] = listed.get("ETag")
seen["list revalidated"] = client.get("/", HTTP_IF_NONE_MATCH=listed.get("ETag", "")).status_code
seen["a etag"] = client.get(pages["a"]).get("ETag")

print(json.dumps(seen))
"""


class Shop:
    """A migrated and seeded example shop: its environment, and `run` for scripts inside it."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.db_path = env["DISTCACHE_EXAMPLE_DB"]

    def manage(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=EXAMPLE,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"manage.py {args[0]} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def run(self, script: str) -> dict:
        """Run `script` with `manage.py shell -c`; its last line of output is JSON, returned decoded."""
        return json.loads(self.manage("shell", "-c", script).strip().splitlines()[-1])


@pytest.fixture(scope="module")
def shop(cluster, tmp_path_factory) -> Shop:
    """A fresh shop with 20 products, on a key prefix of its own."""
    env = {
        **{k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "DJANGO_SETTINGS_MODULE"}},
        "DJANGO_SETTINGS_MODULE": "shop.settings",
        "DISTCACHE_LOCATION": ",".join(settings.CLUSTER_LOCATION),
        "DISTCACHE_KEY_PREFIX": f"example-{uuid.uuid4().hex[:12]}",
        "DISTCACHE_EXAMPLE_DB": str(tmp_path_factory.mktemp("example") / "shop.sqlite3"),
        "DISTCACHE_DEMO_SUPERUSER": "1",
    }
    shop = Shop(env)
    shop.manage("migrate", "--noinput", "-v0")
    shop.manage("seed_catalogue", "--products", "20")
    return shop


@pytest.fixture(scope="module")
def seen(shop) -> dict:
    """What each visit of SCRIPT saw, by label."""
    return shop.run(SCRIPT)


def statuses(seen: dict, when: str) -> dict[str, str]:
    return {page: seen[f"{page} {when}"]["status"] for page in ("list", "a", "b", "categories")}


def test_every_page_misses_first_then_hits(seen):
    assert all(seen[f"{page} first"]["code"] == 200 for page in ("list", "a", "b", "categories"))
    assert statuses(seen, "first") == {"list": "miss", "a": "miss", "b": "miss", "categories": "miss"}
    assert seen["categories first"]["what"].startswith("8 category keys, 8 built")
    assert statuses(seen, "second") == {"list": "hit", "a": "hit", "b": "hit", "categories": "hit"}
    assert seen["categories second"]["what"] == "8 category keys, 0 built"


def test_saving_a_product_in_the_admin_rebuilds_exactly_its_pages(seen):
    names = seen["names"]
    assert seen["login"] == {"code": 302, "location": "/admin/"}
    assert seen["edit"]["code"] == 302, seen["edit"]
    assert statuses(seen, "after edit") == {"list": "miss", "a": "miss", "b": "hit", "categories": "partial"}
    # Of the category summaries, only that of the product's category was rebuilt.
    assert seen["categories after edit"]["what"] == f"8 category keys, 1 built: {names['x']}"
    assert f"${names['new price']}" in seen["a after edit"]["body"]
    assert f"${names['new price']}" in seen["list after edit"]["body"]


def test_the_rebuilt_pages_are_cached_again(seen):
    assert statuses(seen, "after edit, again") == {"list": "hit", "a": "hit", "b": "hit", "categories": "hit"}
    assert f"${seen['names']['new price']}" in seen["a after edit, again"]["body"]


def test_moving_a_product_rebuilds_its_old_and_new_category(seen):
    names = seen["names"]
    assert seen["move"]["code"] == 302, seen["move"]
    assert statuses(seen, "after move") == {"list": "miss", "a": "miss", "b": "hit", "categories": "partial"}
    built = seen["categories after move"]["what"].split(": ", 1)[1].split(", ")
    assert sorted(built) == sorted([names["x"], names["z"]])
    assert names["z name"] in seen["a after move"]["body"]


def product_sql(seen: dict, label: str) -> list[str]:
    """The SQL of a visit that read the product table (ProductViews' table is catalogue_productviews)."""
    return [sql for sql in seen[label]["sql"] if '"catalogue_product"' in sql]


def test_a_product_page_hit_runs_no_sql_view_count_included(seen):
    assert product_sql(seen, "a first"), "the first visit loads the product from the database"
    for page in ("a", "s", "b"):
        assert seen[f"{page} second"]["status"] == "hit"
        assert seen[f"{page} second"]["sql"] == []


def test_an_edited_product_page_is_rebuilt_from_the_row_the_write_through_cached(seen):
    """The admin's save stored the new row in the model cache; the page rebuilt after it reads no product
    from the database, and shows the new price."""
    assert seen["a after edit"]["status"] == "miss"
    assert product_sql(seen, "a after edit") == []
    assert f"${seen['names']['new price']}" in seen["a after edit"]["body"]


def test_editing_a_product_leaves_the_pages_of_the_other_products_of_its_category_cached(seen):
    for when in ("after edit", "after move"):
        assert seen[f"s {when}"]["status"] == "hit", when


def test_a_signed_in_user_gets_pages_built_for_them(seen):
    assert seen["list as staff"]["status"] == "bypass"
    assert seen["a as staff"]["status"] == "bypass"
    assert f"${seen['names']['new price']}" in seen["a as staff"]["body"]


def test_the_list_page_answers_if_none_match_with_304(seen):
    # Weak: the badge in the footer is filled in per request, the rest of the page is the cached one.
    assert seen["list etag"].startswith('W/"')
    assert seen["list revalidated"] == 304
    # A product page shows a view count that changes on every request: it has no validator.
    assert seen["a etag"] is None


# Views a product nobody has viewed three times, then reads its count back from the cache and the database,
# before and after a drain.
VIEWS_SCRIPT = r"""
import json, re
from django.test import Client
from django.test.utils import setup_test_environment
import django_distcache
from catalogue.models import Product, ProductViews

setup_test_environment()
client = Client()
product = Product.objects.filter(page_views__isnull=True).order_by("-pk").first()
shown = []
for _ in range(3):
    body = client.get(product.get_absolute_url()).content.decode()
    shown.append(int(re.search(r'<th>Views</th><td class="num">(\d+)</td>', body).group(1)))
cached = django_distcache.get_cached(ProductViews, pk=product.pk).views
in_database_before = ProductViews.objects.get(pk=product.pk).views
report = django_distcache.flush_behind()
in_database_after = ProductViews.objects.get(pk=product.pk).views
print(json.dumps({
    "shown": shown, "cached": cached, "before": in_database_before, "after": in_database_after,
    "applied": report.changes_applied,
}))
"""


def test_views_are_counted_in_the_cache_at_once_and_in_the_database_after_a_drain(shop):
    counted = shop.run(VIEWS_SCRIPT)
    assert counted["shown"] == [1, 2, 3]
    assert counted["cached"] == 3
    # The first view created the row (with 0) so that changes can be queued for it; the counts wait.
    assert counted["before"] == 0
    assert counted["after"] == 3
    assert counted["applied"] >= 3


# Views a product nobody has viewed; prints its primary key.
VISIT_SCRIPT = r"""
import json
from django.test import Client
from django.test.utils import setup_test_environment
from catalogue.models import Product

setup_test_environment()
client = Client()
product = Product.objects.filter(page_views__isnull=True).order_by("pk").first()
codes = [client.get(product.get_absolute_url()).status_code for _ in range({count})]
print(json.dumps({{"pk": product.pk, "codes": codes}}))
"""


@pytest.fixture
def shop_worker(shop, broker, tmp_path) -> Iterator[tuple[dict[str, str], Path]]:
    """The shop's own Celery worker with beat (`celery -A shop worker -B`), as `make demo` starts it, on
    a database of its own on the session's broker. Yields the shop's environment with that broker, and the
    worker's log."""
    env = {**shop.env, "DISTCACHE_BROKER_URL": f"redis://{broker.host}:{broker.port}/1"}
    log_path = tmp_path / "worker.log"
    command = [sys.executable, "-m", "celery", "-A", "shop", "worker", "-B", "-P", "solo", "-l", "info",
               "-s", str(tmp_path / "beat-schedule"), "-n", "shop-test@%h", "--without-gossip",
               "--without-mingle", "--without-heartbeat"]  # fmt: skip
    with open(log_path, "w") as log:
        worker = subprocess.Popen(command, cwd=EXAMPLE, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "ready." not in log_path.read_text(errors="replace"):
            assert worker.poll() is None, f"the worker exited:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the worker is not ready:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.1)
        yield env, log_path
    finally:
        worker.send_signal(signal.SIGTERM)  # a warm shutdown, which stops the embedded beat too
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(5)


def test_the_shops_celery_worker_drains_the_view_counts_into_the_database(shop, shop_worker):
    env, log_path = shop_worker
    visited = Shop(env).run(VISIT_SCRIPT.format(count=4))
    assert visited["codes"] == [200] * 4

    def views_in_database() -> int | None:
        with closing(sqlite3.connect(shop.db_path, timeout=10)) as database:
            row = database.execute(
                "SELECT views FROM catalogue_productviews WHERE product_id = ?", (visited["pk"],)
            ).fetchone()
        return row and row[0]

    deadline = time.monotonic() + 20  # beat sends a drain every second
    while views_in_database() != 4:
        assert time.monotonic() < deadline, (
            f"the database has {views_in_database()} views, not 4, 20 s on; worker log:\n"
            f"{log_path.read_text(errors='replace')[-3000:]}"
        )
        time.sleep(0.2)


# Views a product nobody has viewed from 16 threads at once (one client each), after a first view that
# creates its counter row; prints how many answered 200 and the count in the cache and the database.
CONCURRENT_VIEWS_SCRIPT = r"""
import json, threading
from django.db import connections
from django.test import Client
from django.test.utils import setup_test_environment
import django_distcache
from catalogue.models import Product, ProductViews

setup_test_environment()
product = Product.objects.filter(page_views__isnull=True).order_by("pk")[1]
url = product.get_absolute_url()
codes = [Client().get(url).status_code]
lock = threading.Lock()

def visit():
    client = Client()
    try:
        for _ in range(8):
            code = client.get(url).status_code
            with lock:
                codes.append(code)
    finally:
        connections.close_all()

threads = [threading.Thread(target=visit) for _ in range(16)]
for thread in threads:
    thread.start()
django_distcache.flush_behind()  # a drain in the middle of it, as beat would run one
for thread in threads:
    thread.join()
cached = django_distcache.get_cached(ProductViews, pk=product.pk).views
django_distcache.flush_behind()
print(json.dumps({
    "ok": codes.count(200), "requests": len(codes), "cached": cached,
    "stored": ProductViews.objects.get(pk=product.pk).views,
}))
"""


def test_no_view_is_lost_when_16_visitors_count_one_product_at_once(shop):
    """Before, the count was read, raised and saved behind (last write wins): most concurrent views were
    lost. Now each view is an increment: the cache and the database both end with every one."""
    counted = shop.run(CONCURRENT_VIEWS_SCRIPT)
    assert counted["requests"] == 1 + 16 * 8
    assert counted["ok"] == counted["requests"]
    assert counted["cached"] == counted["stored"] == counted["ok"]
