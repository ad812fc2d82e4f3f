"""End to end: the example shop on the test cluster, driven through Django's test client and its admin.

The shop has settings of its own, so it runs in subprocesses, the way a developer runs it: `manage.py
migrate` and `seed_catalogue` on a temporary SQLite file, then one `manage.py shell -c` script that visits
pages and edits products in the admin, reporting each page's footer badge (cache hit, miss or partial) as
JSON. The run's key prefix is its own, so it shares the cluster with nothing else.

Product a (category x) is edited, then moved to category z; product b sits in category y, untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from django.conf import settings

EXAMPLE = Path(__file__).resolve().parent.parent / "example_project"

# Runs inside the shop (`manage.py shell -c`); its last line of output is the JSON of `seen`.
SCRIPT = r"""
import json, re
from django.forms.models import model_to_dict
from django.test import Client
from django.test.utils import setup_test_environment
from catalogue.models import Category, Product

setup_test_environment()  # lets the test client's host through ALLOWED_HOSTS
client = Client()
seen = {}


def visit(label, url):
    response = client.get(url)
    body = response.content.decode()
    badge = re.search(r'class="badge (\w+)"', body)
    what = re.search(r'<span class="muted">\((.*?)\)</span>', body)
    seen[label] = {
        "code": response.status_code,
        "status": badge and badge.group(1),
        "what": what and what.group(1),
        "body": body,
    }


def visit_all(when):
    for name, url in pages.items():
        visit(f"{name} {when}", url)


def admin_save(product, **changes):
    data = {**model_to_dict(product), **changes, "_save": "Save"}
    response = client.post(f"/admin/catalogue/product/{product.pk}/change/", data)
    errors = response.context and str(response.context["adminform"].form.errors)
    return {"code": response.status_code, "location": response.get("Location"), "errors": errors}


a = Product.objects.select_related("category").order_by("pk").first()
b = Product.objects.select_related("category").exclude(category=a.category).order_by("pk").first()
z = Category.objects.exclude(pk__in=[a.category_id, b.category_id]).order_by("pk").first()
pages = {"list": "/", "a": a.get_absolute_url(), "b": b.get_absolute_url(), "categories": "/categories/"}
seen["names"] = {
    "new price": str(a.price + 1), "x": a.category.slug, "z": z.slug, "z name": z.name,
}

visit_all("first")
visit_all("second")

login = client.post("/admin/login/", {"username": "admin", "password": "admin", "next": "/admin/"})
seen["login"] = {"code": login.status_code, "location": login.get("Location")}
seen["edit"] = admin_save(a, price=seen["names"]["new price"])
visit_all("after edit")
visit_all("after edit, again")

a.refresh_from_db()
seen["move"] = admin_save(a, category=z.pk)
visit_all("after move")

print(json.dumps(seen))
"""


@pytest.fixture(scope="module")
def seen(cluster, tmp_path_factory) -> dict:
    """Seed a fresh shop with 20 products and run SCRIPT against it; what each visit saw, by label."""
    env = {
        **{k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "DJANGO_SETTINGS_MODULE"}},
        "DJANGO_SETTINGS_MODULE": "shop.settings",
        "DISTCACHE_LOCATION": ",".join(settings.CLUSTER_LOCATION),
        "DISTCACHE_KEY_PREFIX": f"example-{uuid.uuid4().hex[:12]}",
        "DISTCACHE_EXAMPLE_DB": str(tmp_path_factory.mktemp("example") / "shop.sqlite3"),
        "DISTCACHE_DEMO_SUPERUSER": "1",
    }

    def manage(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=EXAMPLE,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"manage.py {args[0]} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    manage("migrate", "--noinput", "-v0")
    manage("seed_catalogue", "--products", "20")
    output = manage("shell", "-c", SCRIPT)
    return json.loads(output.strip().splitlines()[-1])


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
