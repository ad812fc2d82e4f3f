"""`@cached_view`: whole responses of GET and HEAD views in the cache, computed once in the fleet on a miss,
tagged, with an ETag, and never one visitor's page served to another.

    @cached_view(timeout=300, tags=lambda request, slug: [f"product:{slug}"], query_params=["page"])
    def product(request, slug): ...

*Who gets a cached page.* A request is passed straight to the view, with nothing read or stored, when it is
not GET or HEAD, carries an `Authorization` header, or comes from an authenticated user (`request.user`,
when the auth middleware ran) and `vary_on` does not name "user" (with "user", each user has entries of
their own). A rendered response is stored only if nothing in it can belong to one visitor (`_why_not_kept`):
status 200, not streaming, no cookie set, no `Cache-Control` private/no-store/no-cache, no `Vary` on `*`,
Cookie or Authorization; and while it rendered, the view read no cookie, did not use the session and put
no CSRF token in the page (these make Django's middleware vary the response on Cookie *after* the view).

*The key* is the URL (scheme, host, path, the query string with its parameters sorted, only those of
`query_params` when it is given: the view then sees only those), the method, the view, the active
language and time zone, the values of the headers `vary_on` names, and the user with "user".

*Vary.* A response that varies on headers the key does not hold leaves, under the key, the list of those
headers instead of the page; the page is then stored under a second key that adds their values. So a view
that does not vary costs one read per hit, one that does costs two (name the headers in `vary_on` to save
the second).

*Uncacheable pages* leave a small "pass" marker for PASS_SECONDS (as Varnish's hit-for-pass), so that
their requests render at once instead of queueing one after the other behind the stampede lease.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import re
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from operator import itemgetter
from typing import Any
from urllib.parse import urlencode

from asgiref.sync import iscoroutinefunction, sync_to_async
from django.conf import settings
from django.core.cache.backends.base import DEFAULT_TIMEOUT
from django.http import HttpRequest, HttpResponse, HttpResponseBase, QueryDict
from django.utils import timezone, translation
from django.utils.cache import get_conditional_response
from django.utils.http import parse_http_date_safe

from . import stampede
from .tags import validate_tags

logger = logging.getLogger("django_distcache.views")

CACHED_METHODS = ("GET", "HEAD")
PASS_SECONDS = 30.0  # how long an uncacheable page is remembered as such (at most its timeout)
_UNKEPT_DIRECTIVES = frozenset({"private", "no-store", "no-cache"})
_PERSONAL_HEADERS = frozenset({"cookie", "authorization"})  # a response varying on these is one visitor's
_CSRF_FLAG = "CSRF_COOKIE_NEEDS_UPDATE"  # set by django.middleware.csrf.get_token()
_CONDITIONAL_HEADERS = (
    "HTTP_IF_NONE_MATCH",
    "HTTP_IF_MATCH",
    "HTTP_IF_MODIFIED_SINCE",
    "HTTP_IF_UNMODIFIED_SINCE",
)

# Commas (with any spaces) between the items of Cache-Control and Vary (Django 6.1 dropped its own).
_HEADER_LIST = re.compile(r"\s*,\s*")


# -- what the serving plan asks its driver for ---------------------------------------------------------
class _User:
    """The request's user, evaluated (None without the auth middleware)."""


_USER = _User()


@dataclass(slots=True)
class _Fetch:
    """The entry under `key` through the stampede machinery; on a miss the view renders for the cache."""

    visit: _Visit
    key: str
    vary_known: frozenset[str] | None  # the second level's headers; None on the first level


@dataclass(slots=True)
class _Forget:
    key: str


class _PassThrough:
    """Call the view as if it were not decorated: nothing watched, nothing stored."""


_PASS_THROUGH = _PassThrough()


@dataclass(frozen=True, slots=True)
class _Options:
    timeout: Any
    tags: Any
    vary_headers: tuple[str, ...]  # lower-case header names from vary_on
    by_user: bool
    stale: float | None
    beta: float | None
    query_params: frozenset[str] | None
    using: str
    key_prefix: str


class _Visit:
    """One request through one cached view: the key it maps to, the query its view sees, its tags, and
    (when this request rendered the entry) the response with whether it may be shared."""

    __slots__ = ("request", "args", "kwargs", "tags", "query_string", "base_key", "rendered")

    def __init__(self, view: _CachedView, request: HttpRequest, args: tuple, kwargs: dict, user: Any) -> None:
        options = view.options
        self.request, self.args, self.kwargs = request, args, kwargs
        self.tags = view.tags_for(request, args, kwargs)
        self.query_string = normalized_query(request.GET, options.query_params)
        self.rendered: tuple[HttpResponseBase, bool] | None = None
        parts = [
            view.name,
            request.method,
            request.scheme,
            request.get_host(),
            request.path,
            self.query_string,
            translation.get_language() if settings.USE_I18N else "",
            timezone.get_current_timezone_name() if settings.USE_TZ else "",
        ]
        if options.by_user:
            parts.append("anonymous" if user is None else f"user:{user.pk}")
        parts += [f"{name}={request.headers.get(name)!r}" for name in options.vary_headers]
        self.base_key = f"{options.key_prefix}:{_digest(parts)}"

    def varied_key(self, headers: frozenset[str]) -> str:
        return f"{self.base_key}:{_digest([f'{h}={self.request.headers.get(h)!r}' for h in sorted(headers)])}"


def normalized_query(query: QueryDict, allowed: frozenset[str] | None) -> str:
    """The query string with its parameters sorted by name (the values of one name keep their order),
    only those in `allowed` when it is given."""
    pairs = [
        (name, value)
        for name, values in query.lists()
        if allowed is None or name in allowed
        for value in values
    ]
    pairs.sort(key=itemgetter(0))
    return urlencode(pairs)


def _digest(parts: list[str]) -> str:
    return hashlib.blake2b(repr(parts).encode(), digest_size=20).hexdigest()


# -- watching a render ----------------------------------------------------------------------------------
class _WatchedCookies(dict):
    """request.COOKIES while a view renders for the cache: any read means the page may be the visitor's."""

    __slots__ = ("read",)

    def __init__(self, cookies: dict) -> None:
        super().__init__(cookies)
        self.read = False

    def __getitem__(self, key: Any) -> Any:
        self.read = True
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self.read = True
        return super().get(key, default)

    def __contains__(self, key: Any) -> bool:
        self.read = True
        return super().__contains__(key)

    def __iter__(self) -> Any:
        self.read = True
        return super().__iter__()

    def __len__(self) -> int:
        self.read = True
        return super().__len__()

    def keys(self) -> Any:
        self.read = True
        return super().keys()

    def values(self) -> Any:
        self.read = True
        return super().values()

    def items(self) -> Any:
        self.read = True
        return super().items()

    def copy(self) -> dict:
        self.read = True
        return dict(super().items())


class _Watch:
    """Around a render for the cache: the view sees the key's query string, and its reads of cookies, of
    the session and of the CSRF token are noted; afterwards the request is put back as it was (with the
    session and CSRF flags it gained, so that Django's middleware still does its part)."""

    def __init__(self, visit: _Visit) -> None:
        self.request = visit.request
        self.visit = visit
        self.cookies_read = self.session_used = self.csrf_used = False

    def __enter__(self) -> _Watch:
        request = self.request
        self.saved_get, self.saved_query = request.GET, request.META.get("QUERY_STRING")
        request.GET = QueryDict(self.visit.query_string, encoding="utf-8")
        request.META["QUERY_STRING"] = self.visit.query_string
        self.saved_cookies = request.COOKIES
        self.cookies = request.COOKIES = _WatchedCookies(self.saved_cookies)
        self.session = getattr(request, "session", None)
        if self.session is not None:
            self.session_flags = (self.session.accessed, self.session.modified)
            self.session.accessed = self.session.modified = False
        self.csrf_flag = request.META.pop(_CSRF_FLAG, None)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        request = self.request
        self.cookies_read = self.cookies.read
        request.COOKIES = self.saved_cookies
        request.GET = self.saved_get
        if self.saved_query is None:
            request.META.pop("QUERY_STRING", None)
        else:
            request.META["QUERY_STRING"] = self.saved_query
        if self.session is not None:
            accessed, modified = self.session_flags
            self.session_used = bool(self.session.accessed or self.session.modified)
            self.session.accessed = accessed or self.session.accessed
            self.session.modified = modified or self.session.modified
        self.csrf_used = bool(request.META.get(_CSRF_FLAG))
        if self.csrf_flag is not None and not self.csrf_used:
            request.META[_CSRF_FLAG] = self.csrf_flag


def _why_not_kept(response: HttpResponseBase, watch: _Watch) -> str | None:
    """Why this response must not be shared with other visitors, or None if it may be."""
    if not isinstance(response, HttpResponseBase):
        return f"not a response ({type(response).__name__})"  # Django will say so
    if response.streaming:
        return "a streaming response"
    if response.status_code != 200:
        return f"status {response.status_code}"
    if response.cookies:
        return "it sets a cookie"
    directives = {
        d.split("=", 1)[0].strip().lower() for d in _HEADER_LIST.split(response.get("Cache-Control", ""))
    }
    if directives & _UNKEPT_DIRECTIVES:
        return f"Cache-Control: {response['Cache-Control']}"
    varies = vary_headers(response)
    if "*" in varies or varies & _PERSONAL_HEADERS:
        return f"Vary: {response['Vary']}"
    if watch.cookies_read:
        return "the view read request.COOKIES"
    if watch.session_used:
        return "the view used the session"
    if watch.csrf_used:
        return "the page holds a CSRF token"
    return None


def vary_headers(response: HttpResponseBase) -> set[str]:
    """The lower-case header names of the response's Vary header."""
    if not response.has_header("Vary"):
        return set()
    return {name.strip().lower() for name in _HEADER_LIST.split(response["Vary"]) if name.strip()}


def content_etag(content: bytes) -> str:
    return '"' + hashlib.blake2b(content, digest_size=16).hexdigest() + '"'


def _deferred(response: Any) -> bool:
    return hasattr(response, "render") and callable(response.render) and not response.is_rendered


def _labelled(response: Any, status: str) -> Any:
    if isinstance(response, HttpResponseBase):
        response.cache_status = status
    return response


def _not_awaitable(response: Any) -> Any:
    if inspect.isawaitable(response):
        if inspect.iscoroutine(response):
            response.close()
        raise TypeError(
            "cached_view wraps a sync view that returned a coroutine (an async class-based view decorated "
            "on dispatch?): decorate its async get() instead: method_decorator(cached_view(...), name='get')"
        )
    return response


# -- the decorated view -----------------------------------------------------------------------------------
class _CachedView:
    """A view and its options; made for every call under method_decorator, so it stays cheap to build."""

    __slots__ = ("options", "view", "name")

    def __init__(self, options: _Options, view: Callable[..., Any]) -> None:
        self.options = options
        self.view = view
        name = getattr(view, "__qualname__", None) or getattr(view, "__name__", type(view).__name__)
        self.name = f"{getattr(view, '__module__', '')}.{name}"

    @property
    def cache(self) -> Any:
        from django.core.cache import caches

        return caches[self.options.using]

    def tags_for(self, request: HttpRequest, args: tuple, kwargs: dict) -> list[str]:
        tags = self.options.tags  # a list validated by cached_view(), or a callable
        return validate_tags(tags(request, *args, **kwargs)) if callable(tags) else tags

    # -- the plan: every decision, shared by the sync and the async driver ---------------------------------
    def plan(self, request: HttpRequest, args: tuple, kwargs: dict) -> Generator[Any, Any, Any]:
        if request.method not in CACHED_METHODS or request.META.get("HTTP_AUTHORIZATION"):
            return _labelled((yield _PASS_THROUGH), "bypass")
        user = yield _USER
        authenticated = user is not None and user.is_authenticated
        if authenticated and not self.options.by_user:
            return _labelled((yield _PASS_THROUGH), "bypass")
        visit = _Visit(self, request, args, kwargs, user if authenticated else None)
        key, vary_known = visit.base_key, None
        for _ in range(3):  # the key; the varied key; one more look after a pass marker lapsed
            entry = yield _Fetch(visit, key, vary_known)
            if visit.rendered is not None:  # this request rendered the entry: a miss, or an inline refresh
                response, shared = visit.rendered
                return self.answer(request, response, "miss") if shared else _labelled(response, "pass")
            kind = entry.get("kind") if isinstance(entry, dict) else None
            if kind == "page":
                return self.answer(request, self.response_from(entry), "hit")
            if kind == "vary" and vary_known is None:
                vary_known = frozenset(entry["headers"])
                key = visit.varied_key(vary_known)
            elif kind == "pass" and entry["until"] <= time.time():
                yield _Forget(key)
            else:
                break
        return _labelled((yield _PASS_THROUGH), "pass")

    def answer(self, request: HttpRequest, response: HttpResponseBase, status: str) -> HttpResponseBase:
        """A shareable response, or 304 Not Modified (or 412) when the request's conditions say so."""
        if not any(header in request.META for header in _CONDITIONAL_HEADERS):
            return _labelled(response, status)
        last_modified = response.get("Last-Modified")
        conditional = get_conditional_response(
            request,
            etag=response.get("ETag"),
            last_modified=last_modified and parse_http_date_safe(last_modified),
            response=response,
        )
        return _labelled(conditional, status)

    def keep(
        self, visit: _Visit, response: HttpResponseBase, watch: _Watch, vary_known: frozenset[str] | None
    ) -> dict[str, Any]:
        """What a render leaves under its key: the page, the Vary headers it needs, or a pass marker."""
        reason = _why_not_kept(response, watch)
        unkeyed = set() if reason else vary_headers(response).difference(self.options.vary_headers)
        if reason is None and vary_known is not None and not unkeyed <= vary_known:
            reason = f"Vary: {response['Vary']} differs from the Vary of the first render"
        if reason is not None:
            logger.debug("not caching %s %s: %s", visit.request.method, visit.request.path, reason)
            visit.rendered = (response, False)
            return {"kind": "pass", "until": time.time() + self.pass_seconds()}
        if not response.has_header("ETag"):
            response["ETag"] = content_etag(response.content)
        visit.rendered = (response, True)
        if unkeyed and vary_known is None:
            return {"kind": "vary", "headers": sorted(unkeyed)}
        content = response.content
        if getattr(self.cache._codec.serializer, "name", "pickle") == "json":
            content = content.decode("latin-1")  # JSON holds no bytes; latin-1 maps each byte to a char
        headers = [[name, value] for name, value in response.items() if name.lower() != "content-length"]
        return {"kind": "page", "status": response.status_code, "headers": headers, "content": content}

    @staticmethod
    def response_from(entry: dict[str, Any]) -> HttpResponse:
        content = entry["content"]
        if isinstance(content, str):
            content = content.encode("latin-1")
        return HttpResponse(content, status=entry["status"], headers=dict(entry["headers"]))

    def pass_seconds(self) -> float:
        timeout = self.options.timeout
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.cache.default_timeout
        return PASS_SECONDS if timeout is None else max(0.0, min(PASS_SECONDS, float(timeout)))

    def policy(self, cache: Any) -> stampede.Policy:
        # Refreshes run inline: a view needs its request, and a render after the response has gone
        # would run outside the request's thread, middleware and database connection.
        return stampede.policy_for(cache, self.options.stale, self.options.beta, "inline")

    # -- the sync driver ----------------------------------------------------------------------------------
    def serve(self, request: HttpRequest, args: tuple, kwargs: dict) -> Any:
        plan = self.plan(request, args, kwargs)
        reply = None
        while True:
            try:
                step = plan.send(reply)
            except StopIteration as done:
                return done.value
            if step is _USER:
                reply = _user(request)
            elif type(step) is _Fetch:
                cache = self.cache
                reply = stampede.get_or_compute(
                    cache,
                    step.key,
                    None,
                    functools.partial(self.render, step.visit, step.vary_known),
                    self.options.timeout,
                    step.visit.tags,
                    self.policy(cache),
                    "cached_view",
                )
            elif type(step) is _Forget:
                reply = self.cache.delete(step.key)
            else:
                reply = _not_awaitable(self.view(request, *args, **kwargs))

    def render(self, visit: _Visit, vary_known: frozenset[str] | None) -> dict[str, Any]:
        with _Watch(visit) as watch:
            response = _not_awaitable(self.view(visit.request, *visit.args, **visit.kwargs))
            if _deferred(response):
                response = response.render()
        return self.keep(visit, response, watch, vary_known)

    # -- the async driver ---------------------------------------------------------------------------------
    async def aserve(self, request: HttpRequest, args: tuple, kwargs: dict) -> Any:
        plan = self.plan(request, args, kwargs)
        reply = None
        while True:
            try:
                step = plan.send(reply)
            except StopIteration as done:
                return done.value
            if step is _USER:
                reply = await _auser(request)
            elif type(step) is _Fetch:
                cache = self.cache
                reply = await stampede.aget_or_compute(
                    cache,
                    step.key,
                    None,
                    functools.partial(self.arender, step.visit, step.vary_known),
                    self.options.timeout,
                    step.visit.tags,
                    self.policy(cache),
                    "cached_view",
                )
            elif type(step) is _Forget:
                reply = await self.cache.adelete(step.key)
            else:
                reply = await self.view(request, *args, **kwargs)

    async def arender(self, visit: _Visit, vary_known: frozenset[str] | None) -> dict[str, Any]:
        with _Watch(visit) as watch:
            response = await self.view(visit.request, *visit.args, **visit.kwargs)
            if _deferred(response):
                response = await sync_to_async(response.render, thread_sensitive=True)()
        return self.keep(visit, response, watch, vary_known)


def _user(request: HttpRequest) -> Any:
    user = getattr(request, "user", None)
    if user is not None:
        user.is_authenticated  # noqa: B018 - evaluates a lazy user now, before the view runs
    return user


async def _auser(request: HttpRequest) -> Any:
    auser = getattr(request, "auser", None)
    if auser is not None:
        return await auser()
    user = getattr(request, "user", None)
    if user is not None:
        await sync_to_async(_user)(request)
    return user


# -- the decorator -------------------------------------------------------------------------------------
def _names(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise TypeError(f"{what} must be a list of strings, got {type(value).__name__}: {value!r}")
    names = tuple(value)
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"each of {what} must be a non-empty str, got {name!r}")
    return names


def cached_view(
    timeout: Any = DEFAULT_TIMEOUT,
    *,
    tags: Iterable[str] | Callable[..., Iterable[str]] | None = None,
    vary_on: Iterable[str] = (),
    stale: float | None = None,
    beta: float | None = None,
    query_params: Iterable[str] | None = None,
    using: str = "default",
    key_prefix: str = "view",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Cache a view's GET and HEAD 200 responses in the cache `using` (docs/views.md).

    `tags`: a list, or a callable of (request, *args, **kwargs) giving one; `vary_on`: request header names
    whose values are part of the key, and "user" for entries per user (authenticated users are otherwise
    never served from or stored in the cache); `stale`: seconds an expired page may still be served while
    one request renders it again; `beta`: XFetch eagerness; `query_params`: the only query parameters kept
    (in the key and in the request the view sees), None for all of them."""
    if not callable(tags):
        tags = validate_tags(tags)
    headers, by_user = [], False
    for name in _names(vary_on, "vary_on"):
        if name.lower() == "user":
            by_user = True
        elif name.lower() in _PERSONAL_HEADERS:
            raise ValueError(
                f"vary_on cannot name {name!r}: a page per {name} value is a page per visitor; "
                "use vary_on=('user',) for pages per user"
            )
        else:
            headers.append(name.lower())
    for name, number in (("stale", stale), ("beta", beta)):
        if number is not None and (
            isinstance(number, bool) or not isinstance(number, int | float) or number < 0
        ):
            raise ValueError(f"{name} must be a number >= 0, got {number!r}")
    allowed = None if query_params is None else frozenset(_names(query_params, "query_params"))
    if not isinstance(key_prefix, str) or not key_prefix:
        raise TypeError(f"key_prefix must be a non-empty str, got {key_prefix!r}")
    if callable(timeout) and not isinstance(timeout, int | float):
        view, timeout = timeout, DEFAULT_TIMEOUT  # used bare: @cached_view
    else:
        view = None
    options = _Options(
        timeout, tags, tuple(sorted(set(headers))), by_user, stale, beta, allowed, using, key_prefix
    )

    def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(view):
            raise TypeError("@cached_view decorates a view")
        cached = _CachedView(options, view)
        if iscoroutinefunction(view):

            async def async_wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
                return await cached.aserve(request, args, kwargs)

            wrapper: Callable[..., Any] = async_wrapper
        else:

            def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
                return cached.serve(request, args, kwargs)

        return functools.update_wrapper(wrapper, view)

    return decorate(view) if view is not None else decorate
