"""@cached_view (views.py) against the real cluster: what is stored and for whom, Vary, the query string,
ETags, class-based, urls.py and async views, tags, staleness, and one render for 50 concurrent misses.

Each test gets the default cache on a key prefix of its own (`view_cache`). Tests that need Django's
middleware (sessions, CSRF, authentication) go through the test client and this module's `urlpatterns`.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.core.cache import caches
from django.http import HttpResponse, HttpResponseNotFound, StreamingHttpResponse
from django.middleware.csrf import get_token
from django.template.response import TemplateResponse
from django.test import AsyncRequestFactory, Client, RequestFactory, override_settings
from django.urls import path
from django.utils import translation
from django.utils.cache import patch_cache_control, patch_vary_headers
from django.utils.decorators import method_decorator
from django.views import View
from django.views.decorators.vary import vary_on_headers

import django_distcache
from django_distcache import views
from django_distcache.views import cached_view, content_etag

rf = RequestFactory()
ROOT = Path(__file__).resolve().parent.parent


def caches_on(prefix: str) -> dict:
    default = {
        "BACKEND": "django_distcache.cache.RedisClusterCache",
        "LOCATION": settings.CLUSTER_LOCATION,
        "KEY_PREFIX": prefix,
        "TIMEOUT": 300,
    }
    return {"default": default}


@pytest.fixture(autouse=True)
def view_cache():
    """The default cache, on a key prefix of this test's own (tags included)."""
    with override_settings(CACHES=caches_on(f"views-{uuid.uuid4().hex[:12]}")):
        yield caches["default"]


class Counter:
    """A view body that counts its runs and answers `text` (a callable of the request, or a string)."""

    def __init__(self, text="page", status=200, delay=0.0):
        self.calls = []
        self.text, self.status, self.delay = text, status, delay

    def body(self, request):
        self.calls.append(request.get_full_path())
        if self.delay:
            time.sleep(self.delay)
        text = self.text(request) if callable(self.text) else self.text
        return HttpResponse(text, status=self.status)

    def view(self, **options):
        options.setdefault("timeout", 60)
        return cached_view(**options)(self.body)


def get(view, url="/page/", **extra):
    return view(rf.get(url, **extra))


# -- what is stored -------------------------------------------------------------------------------------
def test_a_get_is_rendered_once_then_served_from_the_cache():
    page = Counter("hello")
    view = page.view()
    first, second = get(view), get(view)
    assert (first.status_code, first.content, first.cache_status) == (200, b"hello", "miss")
    assert (second.status_code, second.content, second.cache_status) == (200, b"hello", "hit")
    assert second["Content-Type"] == first["Content-Type"] == "text/html; charset=utf-8"
    assert len(page.calls) == 1


def test_other_methods_than_get_and_head_are_never_cached():
    page = Counter("hello")
    view = page.view()
    assert [view(rf.post("/page/")).cache_status for _ in range(2)] == ["bypass", "bypass"]
    assert [view(rf.delete("/page/")).cache_status for _ in range(2)] == ["bypass", "bypass"]
    assert len(page.calls) == 4


def test_the_stored_form_keeps_status_headers_and_content_but_not_content_length():
    def body(request):
        response = HttpResponse("café".encode(), content_type="text/plain; charset=utf-8")
        response["X-Shop"] = "tea"
        response["Content-Length"] = "5"
        return response

    view = cached_view(timeout=60)(body)
    get(view)
    hit = get(view)
    assert hit.cache_status == "hit"
    assert hit.content == "café".encode() and hit["X-Shop"] == "tea"
    assert hit["Content-Type"] == "text/plain; charset=utf-8"
    assert not hit.has_header("Content-Length")  # the server sets it for the body it sends


def test_a_json_serializer_stores_pages_too():
    default = {
        "BACKEND": "django_distcache.cache.RedisClusterCache",
        "LOCATION": settings.CLUSTER_LOCATION,
        "KEY_PREFIX": f"views-json-{uuid.uuid4().hex[:12]}",
        "OPTIONS": {"SERIALIZER": "json"},
    }
    content = "naïve ☕".encode() + bytes(range(256))
    view = cached_view(timeout=60)(lambda request: HttpResponse(content))
    with override_settings(CACHES={"default": default}):
        assert [get(view).content for _ in range(2)] == [content, content]
        assert get(view).cache_status == "hit"


def test_a_template_response_is_rendered_before_it_is_stored():
    templates = [
        {
            "BACKEND": "django.template.backends.django.DjangoTemplates",
            "OPTIONS": {"loaders": [("django.template.loaders.locmem.Loader", {"p.html": "<p>{{ n }}</p>"})]},
        }
    ]
    calls = []

    @cached_view(timeout=60)
    def page(request):
        calls.append(1)
        return TemplateResponse(request, "p.html", {"n": 42})

    with override_settings(TEMPLATES=templates):
        first, second = get(page), get(page)
    assert first.content == second.content == b"<p>42</p>"
    assert second.cache_status == "hit" and len(calls) == 1


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: HttpResponseNotFound("gone"), id="404"),
        pytest.param(lambda: HttpResponse("moved", status=301), id="301"),
        pytest.param(lambda: StreamingHttpResponse(iter([b"a", b"b"])), id="streaming"),
    ],
)
def test_only_plain_200_responses_are_stored(make):
    calls = []

    @cached_view(timeout=60)
    def page(request):
        calls.append(1)
        return make()

    assert [get(page).cache_status for _ in range(3)] == ["pass", "pass", "pass"]
    assert len(calls) == 3


def test_a_raised_http404_is_not_stored():
    from django.http import Http404

    calls = []

    @cached_view(timeout=60)
    def page(request):
        calls.append(1)
        raise Http404("no such page")

    for _ in range(2):
        with pytest.raises(Http404):
            get(page)
    assert len(calls) == 2


def test_a_response_that_sets_a_cookie_is_never_stored():
    def body(request):
        response = HttpResponse(f"welcome {request.GET.get('name', '')}")
        response.set_cookie("visitor", "v-123")
        return response

    view = cached_view(timeout=60)(body)
    first, second = get(view), get(view)
    assert (first.cache_status, second.cache_status) == ("pass", "pass")
    assert second.cookies["visitor"].value == "v-123"  # rendered for this request: its own cookie


@pytest.mark.parametrize("directive", ["private", "no_store", "no_cache"])
def test_private_no_store_and_no_cache_responses_are_never_stored(directive):
    calls = []

    @cached_view(timeout=60)
    def page(request):
        calls.append(1)
        response = HttpResponse(f"account {len(calls)}")
        patch_cache_control(response, **{directive: True})
        return response

    assert [get(page).content for _ in range(2)] == [b"account 1", b"account 2"]


def test_a_response_varying_on_cookie_or_everything_is_never_stored():
    for vary in ("Cookie", "*", "Authorization"):
        calls = []

        def body(request, calls=calls, vary=vary):
            calls.append(1)
            response = HttpResponse("mine")
            patch_vary_headers(response, [vary])
            return response

        view = cached_view(timeout=60, key_prefix=f"vary-{vary}")(body)
        assert [get(view).cache_status for _ in range(2)] == ["pass", "pass"], vary
        # The render for the cache saw no cookies: the visitor's own render answers them. Then the page is
        # remembered as uncacheable, and its next request renders once.
        assert len(calls) == 3


def test_a_request_with_an_authorization_header_is_passed_through():
    page = Counter(lambda request: f"token {request.headers.get('Authorization')}")
    view = page.view()
    assert get(view).content == b"token None"  # anonymous: cached
    secret = get(view, HTTP_AUTHORIZATION="Token abc")
    assert (secret.content, secret.cache_status) == (b"token Token abc", "bypass")
    assert get(view).content == b"token None"
    assert len(page.calls) == 2


def test_an_uncacheable_page_is_remembered_briefly_then_tried_again(monkeypatch):
    monkeypatch.setattr(views, "PASS_SECONDS", 0.3)
    calls = []

    @cached_view(timeout=60)
    def page(request):
        calls.append(1)
        response = HttpResponse("first visit" if len(calls) == 1 else "page")
        if len(calls) == 1:
            response.set_cookie("seen", "1")
        return response

    assert get(page).cache_status == "pass"  # leaves a pass marker
    assert get(page).cache_status == "pass"  # rendered at once, without taking the lease
    time.sleep(0.4)
    assert get(page).cache_status == "miss"  # the marker lapsed: rendered and stored
    assert get(page).cache_status == "hit"
    assert len(calls) == 3


# -- who gets a cached page: middleware, sessions, authentication ----------------------------------------------
def whoami(request):
    WHOAMI.append(request.user.username)
    return HttpResponse(f"hello {request.user.username or 'anonymous'}")


def cart(request):
    return HttpResponse(f"cart: {request.session.get('cart', [])}")


def theme(request):
    return HttpResponse(f"theme {request.COOKIES.get('theme', 'light')}")


def form(request):
    return HttpResponse(f'<input name="csrfmiddlewaretoken" value="{get_token(request)}">')


def plain(request):
    PLAIN.append(1)
    return HttpResponse("plain")


@method_decorator(cached_view(timeout=60), name="dispatch")
class ProductView(View):
    def get(self, request, slug):
        CBV.append(("get", slug))
        return HttpResponse(f"product {slug}")

    def post(self, request, slug):
        CBV.append(("post", slug))
        return HttpResponse(f"posted {slug}")


@method_decorator(cached_view(timeout=60), name="get")
class AsyncProductView(View):
    async def get(self, request, slug):
        CBV.append(("async get", slug))
        return HttpResponse(f"async product {slug}")


WHOAMI, PLAIN, CBV = [], [], []
urlpatterns = [
    path("whoami/", cached_view(timeout=60)(whoami)),
    path("whoami-per-user/", cached_view(timeout=60, vary_on=["user"])(whoami)),
    path("cart/", cached_view(timeout=60)(cart)),
    path("theme/", cached_view(timeout=60)(theme)),
    path("form/", cached_view(timeout=60)(form)),
    path("plain/", cached_view(timeout=60)(plain)),
    path("product/<slug:slug>/", ProductView.as_view()),
    path("async-product/<slug:slug>/", AsyncProductView.as_view()),
]

with_middleware = override_settings(
    ROOT_URLCONF=__name__,
    SESSION_ENGINE="django.contrib.sessions.backends.signed_cookies",
    MIDDLEWARE=[
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
    ],
)


@pytest.fixture
def users(db):
    WHOAMI.clear()
    return {name: User.objects.create_user(name, password="pw") for name in ("alice", "bob")}


def signed_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@with_middleware
def test_a_signed_in_users_page_is_never_served_to_anyone_else(users):
    alice = signed_in(users["alice"])
    first = alice.get("/whoami/")
    assert (first.content, first.cache_status) == (b"hello alice", "bypass")
    anonymous = Client().get("/whoami/")
    assert (anonymous.content, anonymous.cache_status) == (b"hello anonymous", "miss")
    # ...and the anonymous page is not served to a signed-in user either: they get their own.
    again = alice.get("/whoami/")
    assert (again.content, again.cache_status) == (b"hello alice", "bypass")
    assert Client().get("/whoami/").cache_status == "hit"
    assert WHOAMI == ["alice", "", "alice"]


@with_middleware
def test_vary_on_user_caches_a_page_per_user(users):
    alice, bob = signed_in(users["alice"]), signed_in(users["bob"])
    seen = [
        (client.get("/whoami-per-user/").content, client.get("/whoami-per-user/").cache_status)
        for client in (alice, Client(), bob, alice)
    ]
    assert seen == [
        (b"hello alice", "hit"),
        (b"hello anonymous", "hit"),
        (b"hello bob", "hit"),
        (b"hello alice", "hit"),
    ]
    assert WHOAMI == ["alice", "", "bob"]  # one render per user; anonymous visitors share one


@with_middleware
def test_a_view_that_uses_the_session_is_never_stored(users):
    client = Client()
    session = client.session
    session["cart"] = ["teapot"]
    session.save()
    client.cookies[settings.SESSION_COOKIE_NAME] = session.session_key
    mine = client.get("/cart/")
    assert (mine.content, mine.cache_status) == (b"cart: ['teapot']", "pass")
    assert "Cookie" in mine["Vary"]  # the session middleware still did its part
    other = Client().get("/cart/")
    assert (other.content, other.cache_status) == (b"cart: []", "pass")


@with_middleware
def test_a_view_that_reads_a_cookie_is_never_stored(users):
    dark = Client()
    dark.cookies["theme"] = "dark"
    assert dark.get("/theme/").content == b"theme dark"
    light = Client().get("/theme/")
    assert (light.content, light.cache_status) == (b"theme light", "pass")


@with_middleware
def test_a_page_with_a_csrf_token_is_never_stored(users):
    one, two = Client().get("/form/"), Client().get("/form/")
    assert (one.cache_status, two.cache_status) == ("pass", "pass")
    assert one.content != two.content  # each visitor's own token
    assert settings.CSRF_COOKIE_NAME in one.cookies  # the CSRF middleware still set the cookie


@with_middleware
def test_a_view_cached_in_urls_py(users):
    PLAIN.clear()
    client = Client()
    assert [client.get("/plain/").cache_status for _ in range(3)] == ["miss", "hit", "hit"]
    assert PLAIN == [1]


@with_middleware
def test_a_class_based_view_decorated_on_dispatch(users):
    CBV.clear()
    client = Client()
    assert [client.get("/product/tea/").content for _ in range(2)] == [b"product tea"] * 2
    assert client.get("/product/tea/").cache_status == "hit"
    assert client.get("/product/mug/").cache_status == "miss"
    assert client.post("/product/tea/").cache_status == "bypass"
    assert CBV == [("get", "tea"), ("get", "mug"), ("post", "tea")]


@with_middleware
def test_an_async_class_based_view_decorated_on_get(users):
    CBV.clear()
    client = Client()
    assert [client.get("/async-product/pot/").cache_status for _ in range(2)] == ["miss", "hit"]
    assert client.get("/async-product/pot/").content == b"async product pot"
    assert CBV == [("async get", "pot")]


# -- Vary --------------------------------------------------------------------------------------------------
def test_vary_headers_of_the_response_are_honoured():
    calls = []

    @cached_view(timeout=60)
    @vary_on_headers("Accept-Language")
    def greeting(request):
        language = request.headers.get("Accept-Language", "?")
        calls.append(language)
        return HttpResponse(f"hello in {language}")

    def ask(language):
        response = get(greeting, HTTP_ACCEPT_LANGUAGE=language)
        return response.content.decode(), response.cache_status

    assert ask("en") == ("hello in en", "miss")  # leaves the list of headers under the URL's key
    assert ask("de") == ("hello in de", "miss")
    assert ask("en") == ("hello in en", "miss")  # now stored under the key with the header's value
    assert ask("en") == ("hello in en", "hit")
    assert ask("de") == ("hello in de", "hit")
    assert get(greeting).content == b"hello in ?"
    assert calls == ["en", "de", "en", "?"]
    assert get(greeting, HTTP_ACCEPT_LANGUAGE="de")["Vary"] == "Accept-Language"


def test_headers_named_in_vary_on_are_in_the_key_from_the_first_request():
    calls = []

    @cached_view(timeout=60, vary_on=["Accept-Language"])
    @vary_on_headers("Accept-Language")
    def greeting(request):
        calls.append(1)
        return HttpResponse(f"hello in {request.headers.get('Accept-Language')}")

    for language in ("en", "de", "en", "de"):
        assert get(greeting, HTTP_ACCEPT_LANGUAGE=language).content == f"hello in {language}".encode()
    assert len(calls) == 2


def test_a_header_named_in_vary_on_separates_entries_even_without_a_vary_header():
    page = Counter(lambda request: request.headers.get("X-Region", "none"))
    view = page.view(vary_on=["X-Region"])
    assert [get(view, HTTP_X_REGION=r).content for r in ("eu", "us", "eu")] == [b"eu", b"us", b"eu"]
    assert len(page.calls) == 2


def test_the_active_language_is_part_of_the_key():
    page = Counter(lambda request: translation.get_language())
    view = page.view()
    with translation.override("fr"):
        assert get(view).content == b"fr"
    with translation.override("de"):
        assert get(view).content == b"de"
    with translation.override("fr"):
        assert get(view).cache_status == "hit"


# -- the query string ----------------------------------------------------------------------------------
def test_the_query_string_is_normalized():
    page = Counter(lambda request: request.get_full_path())
    view = page.view(query_params=["a", "b"])
    assert get(view, "/page/?b=2&a=1").content == b"/page/?a=1&b=2"
    assert get(view, "/page/?a=1&b=2").cache_status == "hit"
    assert get(view, "/page/?b=2&a=1&").cache_status == "hit"
    # The values of one parameter keep their order (getlist order may matter to the view).
    assert get(view, "/page/?a=2&a=1").content == b"/page/?a=2&a=1"
    assert get(view, "/page/?a=1&b=3").cache_status == "miss"
    assert len(page.calls) == 3


def test_without_query_params_a_query_string_is_not_cached_but_tracking_parameters_are_dropped():
    page = Counter(lambda request: request.get_full_path())
    view = page.view()
    assert [get(view, "/page/?q=tea").cache_status for _ in range(2)] == ["bypass", "bypass"]
    assert get(view, "/page/?q=tea").content == b"/page/?q=tea"  # the view gets its own request
    assert get(view, "/page/?utm_source=mail&fbclid=x").content == b"/page/"
    assert get(view, "/page/?utm_campaign=spring").cache_status == "hit"
    assert get(view, "/page/").cache_status == "hit"
    assert get(view, "/page/?utm_source=mail&q=tea").cache_status == "bypass"
    assert len(page.calls) == 5


def test_an_allowlist_keeps_random_parameters_from_flooding_the_cache():
    page = Counter(lambda request: f"page {request.GET.get('page', '1')}, utm {request.GET.get('utm')}")
    view = page.view(query_params=["page"])
    assert get(view, "/list/?page=2&utm=spring").content == b"page 2, utm None"  # the view sees `page` only
    for n in range(20):
        assert get(view, f"/list/?utm={n}&page=2&x={n}").cache_status == "hit"
    assert get(view, "/list/?utm=x").content == b"page 1, utm None"
    assert len(page.calls) == 2


def test_the_request_gets_its_own_query_string_back_after_the_view():
    request = rf.get("/page/?b=2&utm=1")
    cached_view(timeout=60, query_params=["b"])(lambda request: HttpResponse("x"))(request)
    assert request.GET.dict() == {"b": "2", "utm": "1"}
    assert request.META["QUERY_STRING"] == "b=2&utm=1"


# -- ETag and 304 ----------------------------------------------------------------------------------------
def test_etags_and_if_none_match_on_fresh_renders_and_on_hits():
    page = Counter("tea")
    view = page.view()
    etag = content_etag(b"tea")
    fresh = get(view, HTTP_IF_NONE_MATCH=etag)
    assert (fresh.status_code, fresh.cache_status, fresh["ETag"]) == (304, "miss", etag)
    assert fresh.content == b""
    hit = get(view)
    assert (hit.status_code, hit["ETag"]) == (200, etag)
    not_modified = get(view, HTTP_IF_NONE_MATCH=etag)
    assert (not_modified.status_code, not_modified.cache_status) == (304, "hit")
    assert get(view, HTTP_IF_NONE_MATCH=f"W/{etag}").status_code == 304  # weak comparison
    assert get(view, HTTP_IF_NONE_MATCH='"something-else"').status_code == 200
    assert len(page.calls) == 1


def test_an_etag_set_by_the_view_is_kept():
    def body(request):
        response = HttpResponse("v7")
        response["ETag"] = '"version-7"'
        return response

    view = cached_view(timeout=60)(body)
    assert get(view)["ETag"] == '"version-7"'
    assert get(view, HTTP_IF_NONE_MATCH='"version-7"').status_code == 304


# -- tags and staleness ----------------------------------------------------------------------------------
def test_tags_invalidate_exactly_the_pages_that_carry_them():
    page = Counter(lambda request: request.path)
    view = cached_view(timeout=60, tags=lambda request, slug: [f"product:{slug}"])(
        lambda request, slug: page.body(request)
    )
    for slug in ("tea", "mug"):
        view(rf.get(f"/p/{slug}/"), slug=slug)
    django_distcache.invalidate_tags("product:tea")
    assert view(rf.get("/p/tea/"), slug="tea").cache_status == "miss"
    assert view(rf.get("/p/mug/"), slug="mug").cache_status == "hit"
    assert page.calls == ["/p/tea/", "/p/mug/", "/p/tea/"]


def test_tag_versions_are_read_before_the_view_renders():
    """An invalidation that lands while the page renders leaves the stored page born stale."""
    renders = []

    @cached_view(timeout=60, tags=["menu"])
    def menu(request):
        renders.append(1)
        if len(renders) == 1:
            django_distcache.invalidate_tags("menu")  # an admin edit, mid-render
        return HttpResponse(f"menu {len(renders)}")

    assert get(menu).content == b"menu 1"
    assert get(menu).content == b"menu 2"
    assert get(menu).cache_status == "hit"


def test_stale_serves_the_old_page_while_one_request_renders_the_new_one():
    versions = iter(["v1", "v2"])
    rendering, rendered = threading.Event(), threading.Event()

    def render(request):
        version = next(versions)
        if version == "v2":
            rendering.set()
            rendered.wait(30)  # held until the stale page was served beside it
        return version

    page = Counter(render)
    view = page.view(timeout=0.4, stale=30, beta=0)  # no early recomputation: staleness only
    assert get(view).content == b"v1"
    time.sleep(0.6)  # past its timeout, within the stale window
    refreshed = []
    refresher = threading.Thread(target=lambda: refreshed.append(get(view)))
    refresher.start()
    assert rendering.wait(30)  # the refresher holds the lease and renders
    stale = get(view)  # not waiting for the render: it cannot end before this request does
    assert (stale.content, stale.cache_status) == (b"v1", "hit")
    rendered.set()
    refresher.join()
    assert (refreshed[0].content, refreshed[0].cache_status) == (b"v2", "miss")
    assert get(view).content == b"v2"
    assert len(page.calls) == 2


def test_an_unreachable_cache_renders_every_page_and_stores_nothing():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    default = {"BACKEND": "django_distcache.cache.RedisClusterCache", "LOCATION": f"redis://127.0.0.1:{port}"}
    page = Counter("still here")
    view = page.view()
    with override_settings(CACHES={"default": default}):
        got = [get(view) for _ in range(2)] + [view(rf.head("/page/"))]
    assert [(r.status_code, r.content, r.cache_status) for r in got] == [(200, b"still here", "pass")] * 3
    assert page.calls == ["/page/"] * 3


# -- stampede --------------------------------------------------------------------------------------------
def test_fifty_threads_on_a_missing_page_run_the_view_once():
    page = Counter("expensive", delay=0.2)
    view = page.view()
    barrier = threading.Barrier(50)
    responses, errors = [], []

    def visit():
        request = rf.get("/report/")
        barrier.wait()
        try:
            responses.append(view(request))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=visit) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(page.calls) == 1
    assert {(r.status_code, r.content) for r in responses} == {(200, b"expensive")}
    assert sorted(r.cache_status for r in responses).count("miss") == 1


def shared_report(request):
    caches["default"].incr("renders")
    time.sleep(0.3)
    return HttpResponse("shared report")


SHARED_REPORT = cached_view(timeout=60)(shared_report)

# A second process: 10 threads ask for the page at `start_at`; prints what they got, as JSON.
PEER = r"""
import json, sys, threading, time
import django
django.setup()
from django.test import RequestFactory, override_settings
from django.test.utils import setup_test_environment
from tests import test_views

setup_test_environment()  # lets RequestFactory's host through ALLOWED_HOSTS
prefix, start_at = sys.argv[1], float(sys.argv[2])
got = []
with override_settings(CACHES=test_views.caches_on(prefix)):
    def visit():
        request = RequestFactory().get("/shared/")
        time.sleep(max(0.0, start_at - time.time()))
        response = test_views.SHARED_REPORT(request)
        got.append([response.content.decode(), response.cache_status])
    threads = [threading.Thread(target=visit) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
print(json.dumps(got))
"""


def test_misses_in_two_processes_render_the_page_once(view_cache):
    view_cache.set("renders", 0)
    start_at = time.time() + 2.0
    peer = subprocess.Popen(
        [sys.executable, "-c", PEER, view_cache.key_prefix, str(start_at)],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"},
        stdout=subprocess.PIPE,
        text=True,
    )
    ours = []

    def visit():
        request = rf.get("/shared/")
        time.sleep(max(0.0, start_at - time.time()))
        ours.append(SHARED_REPORT(request).content)

    threads = [threading.Thread(target=visit) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    output, _ = peer.communicate(timeout=30)
    theirs = json.loads(output.strip().splitlines()[-1])
    assert ours == [b"shared report"] * 10
    assert [content for content, _ in theirs] == ["shared report"] * 10
    assert view_cache.get("renders") == 1


# -- async -------------------------------------------------------------------------------------------------
async def test_an_async_view_is_cached_and_computed_once():
    calls = []

    @cached_view(timeout=60)
    async def report(request):
        calls.append(1)
        await asyncio.sleep(0.1)
        return HttpResponse("async report")

    arf = AsyncRequestFactory()
    responses = await asyncio.gather(*(report(arf.get("/report/")) for _ in range(20)))
    assert {r.content for r in responses} == {b"async report"} and len(calls) == 1
    hit = await report(arf.get("/report/", headers={"If-None-Match": content_etag(b"async report")}))
    assert (hit.status_code, hit.cache_status) == (304, "hit")


async def test_an_async_view_passes_signed_in_users_through():
    calls = []

    @cached_view(timeout=60)
    async def page(request):
        calls.append(1)
        return HttpResponse("page")

    class SignedIn:
        is_authenticated, pk = True, 7

    async def auser():
        return SignedIn()

    request = AsyncRequestFactory().get("/page/")
    request.auser = auser
    assert (await page(request)).cache_status == "bypass"


# -- the decorator ---------------------------------------------------------------------------------------
def test_the_decorator_refuses_what_cannot_work():
    with pytest.raises(TypeError):
        cached_view(vary_on="user")  # a bare string would be letters
    with pytest.raises(ValueError, match="page per visitor"):
        cached_view(vary_on=["Cookie"])
    with pytest.raises(TypeError):
        cached_view(query_params="page")
    with pytest.raises(ValueError):
        cached_view(stale=-1)
    with pytest.raises(TypeError):
        cached_view(tags="menu")


def test_bare_decorator_and_the_package_level_name():
    assert django_distcache.cached_view is cached_view
    calls = []

    @cached_view
    def page(request):
        calls.append(1)
        return HttpResponse("bare")

    assert [get(page).cache_status for _ in range(2)] == ["miss", "hit"]
    assert page.__name__ == "page"


def test_a_view_that_returns_no_response_gets_djangos_own_error():
    view = cached_view(timeout=60)(lambda request: None)
    assert get(view) is None  # Django's handler then says the view returned None
