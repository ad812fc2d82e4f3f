"""@cached_view keeps the key space an outsider can make bounded: requests that cannot give a shared page
create no Redis key, and a view holds at most `max_entries` pages at a time (views.py).

Keys are counted with a SCAN over the cluster's primaries for this test's KEY_PREFIX, which every key
the package makes for it contains (pages, the per-view page set, tags, leases).
"""

from __future__ import annotations

import time
import uuid

import pytest
from django.conf import settings
from django.core.cache import caches
from django.http import Http404, HttpResponse
from django.test import RequestFactory, override_settings
from redis.cluster import RedisCluster

from django_distcache import views
from django_distcache.views import cached_view

rf = RequestFactory()
ROUNDS = 200


@pytest.fixture(autouse=True)
def view_cache():
    prefix = f"keyspace-{uuid.uuid4().hex[:12]}"
    default = {
        "BACKEND": "django_distcache.cache.RedisClusterCache",
        "LOCATION": settings.CLUSTER_LOCATION,
        "KEY_PREFIX": prefix,
        "TIMEOUT": 300,
    }
    with override_settings(CACHES={"default": default}):
        cache = caches["default"]
        cache.get("warm-up")  # what the prefix has before any view runs (its namespace generation)
        BEFORE[prefix] = set(_all_keys(cache))
        yield cache


BEFORE: dict[str, set[bytes]] = {}


def _all_keys(cache):
    client = RedisCluster(host="127.0.0.1", port=settings.CLUSTER_BASE_PORT)
    try:
        match = f"*{cache.key_prefix}*"
        return list(client.scan_iter(match=match, count=1000, target_nodes=RedisCluster.PRIMARIES))
    finally:
        client.close()


def keys(cache) -> list[bytes]:
    """The keys of this test's prefix that views made (SCAN over the primaries)."""
    return sorted(set(_all_keys(cache)) - BEFORE[cache.key_prefix])


def test_random_unknown_parameters_create_no_key(view_cache):
    view = cached_view(timeout=60)(lambda request: HttpResponse("page"))
    assert view(rf.get("/page/")).cache_status == "miss"
    before = keys(view_cache)
    for n in range(ROUNDS):
        assert view(rf.get(f"/page/?x={uuid.uuid4().hex}&n={n}")).cache_status == "bypass"
    assert keys(view_cache) == before


def test_random_values_of_a_kept_parameter_are_bounded_by_max_entries(view_cache):
    view = cached_view(timeout=60, query_params=["q"], max_entries=20)(lambda request: HttpResponse("found"))
    statuses = [view(rf.get(f"/search/?q={uuid.uuid4().hex}")).cache_status for _ in range(ROUNDS)]
    assert statuses.count("miss") == 20 and statuses.count("pass") == ROUNDS - 20
    assert len(keys(view_cache)) == 20 + 1  # the pages, and the view's set of them


def test_404s_for_random_slugs_create_no_key(view_cache):
    @cached_view(timeout=60)
    def product(request, slug):
        raise Http404("no such product")

    @cached_view(timeout=60)
    def returned(request, slug):
        return HttpResponse("no such product", status=404)

    for _ in range(ROUNDS // 2):
        slug = uuid.uuid4().hex
        with pytest.raises(Http404):
            product(rf.get(f"/p/{slug}/"), slug=slug)
        assert returned(rf.get(f"/r/{slug}/"), slug=slug).status_code == 404
    assert keys(view_cache) == []


def test_an_uncacheable_page_with_random_parameters_creates_no_key(view_cache):
    def welcome(request):
        response = HttpResponse(f"welcome {request.GET.get('ref')}")
        response.set_cookie("seen", "1")
        return response

    view = cached_view(timeout=60, query_params=["ref"])(welcome)
    for _ in range(ROUNDS):
        assert view(rf.get(f"/welcome/?ref={uuid.uuid4().hex}")).cache_status == "pass"
    assert keys(view_cache) == []


def test_tracking_parameters_and_languages_make_one_entry(view_cache):
    view = cached_view(timeout=60)(lambda request: HttpResponse("home"))
    for _ in range(ROUNDS // 2):
        tag = uuid.uuid4().hex
        view(rf.get(f"/?utm_source={tag}&utm_{tag[:6]}=1&gclid={tag}", headers={"Accept-Language": tag[:8]}))
    assert len(keys(view_cache)) == 1 + 1  # the page, and the view's set of pages


def test_an_uncacheable_page_is_remembered_in_the_process_not_in_redis(view_cache, monkeypatch):
    monkeypatch.setattr(views, "PASS_MEMORY", 5)
    calls = []

    @cached_view(timeout=60)
    def page(request, slug):
        calls.append(slug)
        return HttpResponse("private", headers={"Cache-Control": "private"})

    for slug in ("a", "a", "b", "c", "d", "e", "f", "g"):
        page(rf.get(f"/{slug}/"), slug=slug)
    assert keys(view_cache) == []
    assert len(views._passes) <= 5  # the oldest are forgotten first
    assert calls == ["a", "a", "b", "c", "d", "e", "f", "g"]


def test_a_stored_page_keeps_its_place_and_expired_ones_make_room(view_cache):
    view = cached_view(timeout=0.5, query_params=["q"], max_entries=2)(lambda request: HttpResponse("x"))
    ask = lambda q: view(rf.get(f"/s/?q={q}")).cache_status  # noqa: E731
    assert [ask("a"), ask("b"), ask("c")] == ["miss", "miss", "pass"]
    assert [ask("a"), ask("b")] == ["hit", "hit"]
    time.sleep(0.7)  # a and b expired
    assert [ask("c"), ask("d"), ask("a")] == ["miss", "miss", "pass"]


def test_max_entries_is_checked():
    assert views.MAX_ENTRIES == 10_000
    for wrong in (0, -1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="max_entries"):
            cached_view(max_entries=wrong)
    cached_view(max_entries=None)  # no bound


def test_leases_are_gone_once_the_pages_are_rendered(view_cache):
    @cached_view(timeout=60, query_params=["n"], max_entries=None)
    def page(request):
        return HttpResponse("page")

    for n in range(20):
        page(rf.get(f"/l/?n={n}"))
    assert len(keys(view_cache)) == 20
    assert not [key for key in keys(view_cache) if b"lease" in key]
