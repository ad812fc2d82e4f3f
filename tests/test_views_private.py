"""@cached_view never puts one visitor's cookies, session, credentials or user into a page served to
another: what a render for the cache sees (views.py, `_Shadow`), what is never stored, HEAD answered from
the GET's entry, and a Hypothesis run of random visitors through Django's real middleware stack.

Every test goes through Django's test client with the session, CSRF, authentication and messages
middleware, on a key prefix of its own; sessions live in a local-memory cache (server-side session keys).
"""

from __future__ import annotations

import re
import uuid

import pytest
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.models import User
from django.core.cache import caches
from django.http import HttpResponse, HttpResponseRedirect
from django.middleware.csrf import _unmask_cipher_token, get_token
from django.template import engines
from django.test import Client, RequestFactory, override_settings
from django.urls import path
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from django_distcache.views import cached_view

PAGE_TEMPLATE = (
    "cookies {{ request.COOKIES }} key {{ request.session.session_key }} user {{ user.username }} "
    "form {% csrf_token %} messages {% for message in messages %}{{ message }};{% endfor %}"
)
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "OPTIONS": {
            "loaders": [
                (
                    "django.template.loaders.locmem.Loader",
                    {"page.html": PAGE_TEMPLATE, "cookies.html": "cookies {{ request.COOKIES }}"},
                )
            ],
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    }
]


def caches_on(prefix: str) -> dict:
    return {
        "default": {
            "BACKEND": "django_distcache.cache.RedisClusterCache",
            "LOCATION": settings.CLUSTER_LOCATION,
            "KEY_PREFIX": prefix,
            "TIMEOUT": 300,
        },
        "sessions": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": prefix},
    }


@pytest.fixture(autouse=True)
def view_cache():
    with override_settings(CACHES=caches_on(f"private-{uuid.uuid4().hex[:12]}")):
        yield caches["default"]


# -- views: each puts something private in its page, the way a careless view would --------------------------
def text(body):
    return lambda request: HttpResponse(body(request))


def from_template(name):
    return lambda request: HttpResponse(engines["django"].get_template(name).render({}, request))


def raw_set_cookie(request):
    response = HttpResponse("welcome")
    response["Set-Cookie"] = "sessionid=fixated; Path=/"
    return response


def echo_cookie(request):
    response = HttpResponse("echo")
    response.set_cookie("echo", request.COOKIES.get("theme", "none"))
    return response


def count_visits(request):
    request.session["visits"] = request.session.get("visits", 0) + 1
    return HttpResponse(f"visits {request.session['visits']}")


def form(request):
    return HttpResponse(f"csrf={get_token(request)}")


def submit(request):  # protected by CsrfViewMiddleware
    return HttpResponse("submitted")


def greet(request):
    messages.info(request, f"hello {request.GET.get('name', '')}")
    return HttpResponseRedirect("/messages/")


def list_messages(request):
    return HttpResponse("messages " + ";".join(str(m) for m in messages.get_messages(request)))


def cookie_or_fail(request):
    return HttpResponse(f"cart {request.session['cart']}")  # KeyError in an empty session


PAGES = {
    "cookies-repr": text(lambda request: f"cookies {request.COOKIES}"),
    "cookie-get": text(lambda request: f"theme {request.COOKIES.get('theme', 'light')}"),
    "cookie-header": text(lambda request: f"header {request.headers.get('Cookie', '')}"),
    "cookie-meta": text(lambda request: f"meta {request.META.get('HTTP_COOKIE', '')}"),
    "session-key": text(lambda request: f"key {request.session.session_key}"),
    "session-data": text(lambda request: f"session {dict(request.session.items())}"),
    "user": text(lambda request: f"user {request.user.username}"),
    "template": from_template("page.html"),
    "cookies-template": from_template("cookies.html"),
    "raw-set-cookie": raw_set_cookie,
    "echo-cookie": echo_cookie,
    "visits": count_visits,
    "form": form,
    "messages": list_messages,
    "cart": cookie_or_fail,
    "plain": text(lambda request: "plain"),
}
urlpatterns = [path(f"{name}/", cached_view(timeout=60)(view)) for name, view in PAGES.items()]
urlpatterns += [
    path(f"per-user/{name}/", cached_view(timeout=60, vary_on=["user"])(view)) for name, view in PAGES.items()
]
urlpatterns += [path("submit/", submit), path("greet/", greet)]

with_middleware = override_settings(
    ROOT_URLCONF=__name__,
    TEMPLATES=TEMPLATES,
    SESSION_ENGINE="django.contrib.sessions.backends.cache",
    SESSION_CACHE_ALIAS="sessions",
    MESSAGE_STORAGE="django.contrib.messages.storage.session.SessionStorage",
    MIDDLEWARE=[
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "django.contrib.messages.middleware.MessageMiddleware",
    ],
)


def visitor(**cookies) -> Client:
    """A visitor with a session holding a secret of its own, and these cookies."""
    client = Client()
    session = client.session
    session["secret"] = f"session-secret-{uuid.uuid4().hex}"
    session.save()
    client.cookies[settings.SESSION_COOKIE_NAME] = session.session_key
    for name, value in cookies.items():
        client.cookies[name] = value
    return client


def served(response) -> str:
    """Everything a response hands its client: the body, and every header with the cookies it sets."""
    headers = "\n".join(f"{name}: {value}" for name, value in response.items())
    return f"{response.content.decode(errors='replace')}\n{headers}\n{response.cookies.output()}"


# -- the cases testers found ----------------------------------------------------------------------------
@with_middleware
def test_a_session_key_in_a_page_never_reaches_another_visitor():
    alice = visitor()
    key = alice.cookies[settings.SESSION_COOKIE_NAME].value
    mine = alice.get("/session-key/")
    assert (mine.content.decode(), mine.cache_status) == (f"key {key}", "pass")  # alice's own page
    other = Client().get("/session-key/")
    assert key not in served(other)
    assert other.content == b"key None"


@with_middleware
def test_a_raw_set_cookie_header_is_never_stored():
    first = Client().get("/raw-set-cookie/")
    second = Client().get("/raw-set-cookie/")
    assert (first.cache_status, second.cache_status) == ("pass", "pass")
    assert "sessionid=fixated" in second["Set-Cookie"]  # rendered for this request: its own header


@pytest.mark.parametrize(
    "page", ["cookies-repr", "cookie-get", "cookie-header", "cookie-meta", "cookies-template", "template"]
)
@with_middleware
def test_cookie_values_never_reach_another_visitor(page):
    alice = visitor(theme="dark-secret-of-alice")
    mine = alice.get(f"/{page}/")
    assert "dark-secret-of-alice" in mine.content.decode()  # she is shown her own cookie
    assert mine.cache_status == "pass"
    for other in (Client(), visitor(theme="light")):
        assert "dark-secret-of-alice" not in served(other.get(f"/{page}/"))


@with_middleware
def test_session_data_never_reaches_another_visitor():
    alice = visitor()
    secret = alice.session["secret"]
    assert secret in alice.get("/session-data/").content.decode()
    assert secret not in served(Client().get("/session-data/"))


@with_middleware
def test_a_page_that_needs_no_private_input_is_shared_between_visitors_with_cookies():
    alice, bob = visitor(theme="dark"), visitor(theme="light")
    assert alice.get("/plain/").cache_status == "miss"
    assert bob.get("/plain/").cache_status == "hit"
    assert Client().get("/plain/").cache_status == "hit"


# -- Django's middleware still does its part ---------------------------------------------------------------
@with_middleware
def test_session_writes_of_a_cached_view_reach_the_visitors_session():
    client = Client()
    assert [client.get("/visits/").content for _ in range(3)] == [b"visits 1", b"visits 2", b"visits 3"]
    assert Client().get("/visits/").content == b"visits 1"
    assert client.get("/visits/").cache_status == "pass"


@pytest.mark.parametrize("page", ["form", "template"])
@with_middleware
def test_a_form_from_a_cached_view_posts_with_its_csrf_token(page):
    client = Client(enforce_csrf_checks=True)
    response = client.get(f"/{page}/")
    assert response.cache_status == "pass"
    token = re.search(r'csrf=(\w+)|name="csrfmiddlewaretoken" value="(\w+)"', response.content.decode())
    token = token.group(1) or token.group(2)
    cookie = client.cookies[settings.CSRF_COOKIE_NAME].value
    assert _unmask_cipher_token(token) == cookie  # the page's token matches the cookie the visitor got
    assert client.post("/submit/", {"csrfmiddlewaretoken": token}).status_code == 200
    other = Client().get(f"/{page}/")
    assert cookie not in served(other) and token not in served(other)


@with_middleware
def test_messages_reach_their_visitor_only():
    alice = Client()
    assert alice.get("/greet/?name=alice").status_code == 302
    mine = alice.get("/messages/")
    assert (mine.content, mine.cache_status) == (b"messages hello alice", "pass")
    assert alice.get("/messages/").content == b"messages "  # shown once, as without the decorator
    assert Client().get("/messages/").content == b"messages "


@with_middleware
def test_a_view_that_fails_on_the_empty_session_is_answered_by_the_visitors_own_render():
    alice = visitor()
    session = alice.session
    session["cart"] = ["teapot"]
    session.save()
    assert alice.get("/cart/").content == b"cart ['teapot']"
    with pytest.raises(KeyError):
        Client().get("/cart/")  # no cart: the view's own error, as without the decorator


@with_middleware
def test_per_user_pages_keep_their_user_but_see_no_cookies(db):
    user = User.objects.create_user(f"user-{uuid.uuid4().hex[:8]}", password="pw")
    alice = visitor(theme="alice-theme")
    alice.force_login(user)
    assert alice.get("/per-user/user/").content.decode() == f"user {user.username}"
    assert alice.get("/per-user/user/").cache_status == "hit"
    mine = alice.get("/per-user/cookie-get/")
    assert (mine.content, mine.cache_status) == (b"theme alice-theme", "pass")
    assert Client().get("/per-user/user/").content == b"user "
    assert Client().get("/user/").cache_status == "miss"
    assert alice.get("/user/").cache_status == "bypass"  # signed in, not vary_on user


# -- what is never stored or replayed --------------------------------------------------------------------
def test_a_stored_entry_never_replays_a_set_cookie_header(view_cache, monkeypatch):
    from django_distcache import stampede

    keys = []
    get_or_compute = stampede.get_or_compute
    monkeypatch.setattr(
        stampede,
        "get_or_compute",
        lambda cache, key, *rest: keys.append(key) or get_or_compute(cache, key, *rest),
    )
    view = cached_view(timeout=60)(lambda request: HttpResponse("real"))
    assert view(RequestFactory().get("/planted/")).cache_status == "miss"
    planted = {
        "kind": "page",
        "status": 200,
        "headers": [["Content-Type", "text/html"], ["Set-Cookie", "sessionid=fixated; Path=/"]],
        "content": b"planted",
    }
    view_cache.set(keys[0], planted, 60)  # as if something else had written the entry
    hit = view(RequestFactory().get("/planted/"))
    assert (hit.content, hit.cache_status) == (b"planted", "hit")
    assert not hit.has_header("Set-Cookie") and not hit.cookies


# -- HEAD --------------------------------------------------------------------------------------------------
def test_a_head_is_answered_from_the_gets_entry_and_validator(view_cache):
    calls = []

    @cached_view(timeout=60)
    def page(request):
        calls.append(request.method)
        return HttpResponse("tea")

    rf = RequestFactory()
    got = page(rf.get("/tea/"))
    etag = got["ETag"]
    head = page(rf.head("/tea/"))
    assert (head.status_code, head.cache_status, head["ETag"]) == (200, "hit", etag)
    not_modified = page(rf.head("/tea/", headers={"If-None-Match": etag}))
    assert (not_modified.status_code, not_modified.cache_status) == (304, "hit")
    assert calls == ["GET"]


def test_a_head_that_misses_goes_to_the_view_and_stores_nothing(view_cache):
    calls = []

    @cached_view(timeout=60)
    def page(request):
        calls.append(request.method)
        return HttpResponse("mug")

    rf = RequestFactory()
    assert [page(rf.head("/mug/")).cache_status for _ in range(2)] == ["pass", "pass"]
    assert page(rf.get("/mug/")).cache_status == "miss"
    assert page(rf.head("/mug/")).cache_status == "hit"
    assert calls == ["HEAD", "HEAD", "GET"]


# -- random visitors -------------------------------------------------------------------------------------
REQUEST = st.tuples(
    st.integers(0, 1),  # which of the example's two pages
    st.booleans(),  # the page's vary_on=["user"] twin
    st.sampled_from(["GET", "GET", "HEAD"]),
)
TOKEN = re.compile(r"csrf=(\w{64})|value=\"(\w{64})\"")


@pytest.fixture
def accounts(db):
    return [User.objects.create_user(f"account-{uuid.uuid4().hex}", password="pw") for _ in range(3)]


@with_middleware
@hypothesis_settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    signed_in=st.lists(st.sampled_from([False, False, False, True]), min_size=3, max_size=3),
    pages=st.lists(st.sampled_from(sorted(PAGES)), min_size=2, max_size=2),
    requests=st.lists(REQUEST, min_size=2, max_size=10),
)
def test_no_visitor_is_ever_served_anothers_cookies_session_or_user(accounts, signed_in, pages, requests):
    """Three visitors, each with a cookie and a session of its own to leak (some signed in), ask in turn for
    two pages at random (GET or HEAD, the page or its per-user twin); no response one of them gets holds any
    cookie value, session key or data, CSRF secret or user name of another."""
    with override_settings(CACHES=caches_on(f"private-h-{uuid.uuid4().hex[:12]}")):
        clients, secrets = [], []
        for number, signed in enumerate(signed_in):
            client = visitor(theme=f"theme-{number}-{uuid.uuid4().hex}")
            mine = {client.cookies["theme"].value, client.session["secret"]}
            if signed:
                client.force_login(accounts[number])
                mine.add(accounts[number].username)
            clients.append(client)
            secrets.append(mine)
        responses = []
        for position, (page, per_user, method) in enumerate(requests):
            number = position % 3  # the visitors take turns: every page someone asks for twice is shared
            url = f"/per-user/{pages[page]}/" if per_user else f"/{pages[page]}/"
            client = clients[number]
            try:
                response = client.generic(method, url)
            except KeyError:  # the cart page of a visitor without a cart
                continue
            for morsel in client.cookies.values():  # the client's cookies, as they are now
                if len(morsel.value) >= 16:  # session keys, CSRF secrets, themes: not "none"
                    secrets[number].add(morsel.value)
            responses.append((number, served(response)))
        for number, text in responses:
            unmasked = " ".join(_unmask_cipher_token(a or b) for a, b in TOKEN.findall(text))
            for other, theirs in enumerate(secrets):
                if other != number:
                    leaked = [
                        secret for secret in theirs if secret and (secret in text or secret in unmasked)
                    ]
                    assert not leaked, f"visitor {number} was served visitor {other}'s {leaked}: {text[:300]}"


# -- async views: the ASGI scope carries the raw headers too --------------------------------------------
async def test_an_async_render_for_the_cache_sees_no_cookie_in_the_asgi_scope(view_cache):
    from django.test import AsyncRequestFactory

    @cached_view(timeout=60)
    async def raw_headers(request):
        user = await request.auser() if hasattr(request, "auser") else None
        return HttpResponse(f"{request.scope['headers']} {request.META} {user}")

    arf = AsyncRequestFactory()
    alice = arf.get("/raw/", headers={"Cookie": "theme=secret-of-alice", "X-CSRFToken": "token-of-alice"})
    first = await raw_headers(alice)
    assert first.cache_status == "miss"  # nothing in it was alice's: stored, and served to everyone
    assert b"secret-of-alice" not in first.content and b"token-of-alice" not in first.content
    second = await raw_headers(arf.get("/raw/"))
    assert (second.cache_status, second.content) == ("hit", first.content)


async def test_an_async_view_reading_cookies_answers_its_visitor_with_theirs(view_cache):
    from django.test import AsyncRequestFactory

    @cached_view(timeout=60)
    async def theme(request):
        return HttpResponse(f"theme {request.COOKIES.get('theme', 'light')}")

    dark = AsyncRequestFactory()
    dark.cookies["theme"] = "dark"
    mine = await theme(dark.get("/theme/"))
    assert (mine.content, mine.cache_status) == (b"theme dark", "pass")
    other = await theme(AsyncRequestFactory().get("/theme/"))
    assert (other.content, other.cache_status) == (b"theme light", "pass")
