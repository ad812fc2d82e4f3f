"""`@cached_view`: whole responses of GET views in the cache, computed once in the fleet on a miss, tagged,
with an ETag, and never one visitor's page served to another.

    @cached_view(timeout=300, tags=lambda request, slug: [f"product:{slug}"], query_params=["page"])
    def product(request, slug): ...

*What a render for the cache sees.* Not the visitor's request: a copy of it with no cookies, no session,
no credentials (`_Shadow`). Its `COOKIES` is empty, its session an empty one that loads and saves nothing,
its user anonymous (the visitor's own with `vary_on=("user",)`), its messages none, and the headers and
META entries that carry credentials (Cookie, Authorization, the CSRF cookie and header, REMOTE_USER, TLS
client certificates) are gone. What a render cannot see, the page cannot leak, whatever path the view
takes to it. A render that *tried* to use the stand-ins (read a cookie, touched the session, asked for a
CSRF token, used messages) made a page that depends on the visitor: it is not stored, and the view is
called again with the visitor's real request, so that their session writes and CSRF cookie happen as
without the decorator.

*Who gets a cached page.* A request goes straight to the view, nothing read or stored, when it is not GET
or HEAD, carries an `Authorization` header, comes from an authenticated user and `vary_on` does not name
"user", or has query parameters the view does not keep (`query_params`; by default none but tracking
ones). A HEAD is answered from the GET's entry and validator; a HEAD that finds none goes to the view and
stores nothing. A response is stored only if nothing in it can belong to one visitor (`_why_not_shared`):
status 200, not streaming, no `Set-Cookie` in any form, no `Cache-Control` private/no-store/no-cache, no
`Vary` on `*` or on a credential header.

*The key* is the URL (scheme, host, path, the kept query parameters sorted), the view, the active language
and time zone, the values of the headers `vary_on` names, and the user with "user".

*Vary.* A response that varies on headers the key does not hold leaves, under the key, the list of those
headers instead of the page; the page is then stored under a second key that adds their values.

*Bounded.* Requests that cannot give a shared page leave no key: an uncacheable page is remembered as such
in a bounded in-process table (`_PassMemory`, hit-for-pass) rather than in Redis, and a view stores at most
`max_entries` distinct pages at a time (`scripts.ADMIT_PAGE`); past that, pages are rendered and not stored.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import io
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload
from urllib.parse import urlencode

from asgiref.sync import iscoroutinefunction, sync_to_async
from django.conf import settings
from django.contrib.sessions.backends.base import SessionBase
from django.core.cache.backends.base import DEFAULT_TIMEOUT
from django.http import HttpHeaders, HttpRequest, HttpResponse, HttpResponseBase, QueryDict
from django.utils import timezone, translation
from django.utils.cache import get_conditional_response
from django.utils.functional import cached_property
from django.utils.http import parse_http_date_safe

from . import scripts, stampede
from .conf import is_number, is_whole
from .core import Compute, Core, Guarded, PlanOf, core_for
from .forksafe import renew_locks_after_fork
from .tags import validate_tags
from .topology import Call

if TYPE_CHECKING:
    from _collections_abc import dict_items, dict_keys, dict_values

logger = logging.getLogger("django_distcache.views")

CACHED_METHODS = ("GET", "HEAD")
PASS_SECONDS = 30.0  # how long an uncacheable page is remembered as such (at most its timeout)
PASS_MEMORY = 10_000  # uncacheable pages remembered per process (the oldest are forgotten first)
MAX_ENTRIES = 10_000  # the default bound on the pages one view holds in the cache at a time
FOREVER_SECONDS = 86_400.0  # how long a page of a view without timeout counts towards its max_entries
# Query parameters that mark where a visitor came from: never shown to a render, never in a key.
TRACKING_PARAMS = frozenset(
    {"fbclid", "gclid", "dclid", "gbraid", "wbraid", "msclkid", "yclid", "mc_cid", "mc_eid", "_ga", "_gl"}
)
_UNKEPT_DIRECTIVES = frozenset({"private", "no-store", "no-cache"})
# Request headers that carry credentials: a render for the cache never sees them, and a response varying
# on them is one visitor's.
_PERSONAL_HEADERS = frozenset({"cookie", "authorization", "proxy-authorization"})
_CREDENTIAL_META = frozenset(
    {
        "HTTP_COOKIE",
        "HTTP_AUTHORIZATION",
        "HTTP_PROXY_AUTHORIZATION",
        "REMOTE_USER",
        "AUTH_TYPE",
        "CSRF_COOKIE",  # the visitor's CSRF secret, put there by CsrfViewMiddleware
        "CSRF_COOKIE_NEEDS_UPDATE",
    }
)
_CREDENTIAL_META_PREFIXES = ("SSL_CLIENT_",)  # a TLS client certificate (mod_ssl and the like)
_PRIVATE_SCOPE_KEYS = frozenset({"session", "user", "cookies"})  # what ASGI middleware (Channels) adds
_CONDITIONAL_HEADERS = (
    "HTTP_IF_NONE_MATCH",
    "HTTP_IF_MATCH",
    "HTTP_IF_MODIFIED_SINCE",
    "HTTP_IF_UNMODIFIED_SINCE",
)

# Commas (with any spaces) between the items of Cache-Control and Vary; ours, as Django 6.1 has none.
_HEADER_LIST = re.compile(r"\s*,\s*")
CACHE_STATUS = "cache_status"  # the attribute of a response that says how the cache answered it
R = TypeVar("R")


class _RequestUser(Protocol):
    """What a view's key needs of request.user (set by the auth middleware, unknown to HttpRequest)."""

    @property
    def pk(self) -> Any: ...

    @property
    def is_authenticated(self) -> bool: ...


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
class _Peek:
    """The entry under `key` if one is there to serve; never renders, never takes the lease (HEAD)."""

    key: str


class _PassThrough:
    """Call the view with the visitor's request, as if it were not decorated: nothing stored."""


_PASS_THROUGH = _PassThrough()


@dataclass(frozen=True, slots=True)
class _Options:
    timeout: Any
    tags: list[str] | Callable[..., Iterable[str]]
    vary_headers: tuple[str, ...]  # lower-case header names from vary_on
    by_user: bool
    stale: float | None
    beta: float | None
    query_params: frozenset[str] | None
    using: str
    key_prefix: str
    max_entries: int | None


class _Visit:
    """One request through one cached view: the key it maps to, the query its view sees, its tags, and
    (when this request rendered the entry) the response with whether it may be shared."""

    __slots__ = ("request", "args", "kwargs", "tags", "query_string", "user", "base_key", "rendered")

    def __init__(
        self,
        view: _CachedView,
        request: HttpRequest,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        user: _RequestUser | None,
        query_string: str,
    ) -> None:
        options = view.options
        self.request, self.args, self.kwargs, self.user = request, args, kwargs, user
        self.tags = view.tags_for(request, args, kwargs)
        self.query_string = query_string
        self.rendered: tuple[Any, bool] | None = None
        parts = [
            view.name,
            request.scheme,
            request.get_host(),
            request.path,
            query_string,
            translation.get_language() if settings.USE_I18N else "",
            timezone.get_current_timezone_name() if settings.USE_TZ else "",
        ]
        if options.by_user:
            parts.append("anonymous" if user is None else f"user:{user.pk}")
        parts += [f"{name}={request.headers.get(name)!r}" for name in options.vary_headers]
        self.base_key = f"{options.key_prefix}:{_digest(parts)}"

    def varied_key(self, headers: frozenset[str]) -> str:
        return f"{self.base_key}:{_digest([f'{h}={self.request.headers.get(h)!r}' for h in sorted(headers)])}"


def is_tracking_param(name: str) -> bool:
    return name.startswith("utm_") or name in TRACKING_PARAMS


def kept_query(query: QueryDict, allowed: frozenset[str] | None) -> str | None:
    """The query string a render for the cache sees and the key holds, or None when the request is not to
    be cached. With `allowed` (query_params), only those parameters, sorted; without, tracking parameters
    are dropped and any other parameter means None: a view that did not say which parameters it reads
    cannot be keyed on them without letting every random `?x=...` make a key of its own."""
    if allowed is None:
        return None if any(not is_tracking_param(name) for name in query) else ""
    return normalized_query(query, allowed)


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


def _digest(parts: Sequence[object]) -> str:
    return hashlib.blake2b(repr(parts).encode(), digest_size=20).hexdigest()


# -- the request a render for the cache sees ------------------------------------------------------------
class _NoCookies(dict[str, str]):
    """request.COOKIES of a render for the cache: empty. A look at it says the page may depend on the
    visitor's cookies (it is then rendered again with theirs, and not stored); the look is noted only to
    serve the visitor right: there is nothing in it to leak, whichever way the view looks."""

    __slots__ = ("read",)

    def __init__(self) -> None:
        super().__init__()
        self.read = False

    def _looked(self) -> None:
        self.read = True

    def __getitem__(self, key: str) -> str:
        self._looked()
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self._looked()
        return default

    def __contains__(self, key: object) -> bool:
        self._looked()
        return False

    def __iter__(self) -> Iterator[str]:
        self._looked()
        return super().__iter__()

    def __len__(self) -> int:
        self._looked()
        return 0

    def keys(self) -> dict_keys[str, str]:
        self._looked()
        return super().keys()

    def values(self) -> dict_values[str, str]:
        self._looked()
        return super().values()

    def items(self) -> dict_items[str, str]:
        self._looked()
        return super().items()

    def copy(self) -> dict[str, str]:
        self._looked()
        return {}

    def __repr__(self) -> str:
        self._looked()
        return "{}"


class _NoCookieMeta(dict[str, Any]):
    """request.META of a render for the cache (credentials already taken out): a look for the Cookie
    header is a look at the cookies."""

    __slots__ = ("cookies",)

    def __init__(self, meta: dict[str, Any], cookies: _NoCookies) -> None:
        super().__init__(meta)
        self.cookies = cookies

    def __getitem__(self, key: str) -> Any:
        if key == "HTTP_COOKIE":
            self.cookies._looked()
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        if key == "HTTP_COOKIE":
            self.cookies._looked()
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        if key == "HTTP_COOKIE":
            self.cookies._looked()
        return super().__contains__(key)


class _NoCookieHeaders(HttpHeaders):
    """request.headers of a render for the cache: as META, a look for Cookie is a look at the cookies."""

    def __init__(self, meta: dict[str, Any], cookies: _NoCookies) -> None:
        super().__init__(meta)
        self.cookies = cookies

    def __getitem__(self, key: str) -> Any:
        if key.lower() == "cookie":
            self.cookies._looked()
        return super().__getitem__(key)


class _NoSession(SessionBase):
    """request.session of a render for the cache: empty, loads nothing, saves nothing, has no key. Any use
    shows in `accessed` / `modified` (reading `session_key` included)."""

    def _get_session_key(self) -> None:
        self.accessed = True
        return None

    session_key = property(_get_session_key)
    _session_key = property(_get_session_key, lambda self, value: None)

    def exists(self, session_key: str) -> bool:
        return False

    def create(self) -> None:
        self.modified = True

    def save(self, must_create: bool = False) -> None:
        self.modified = True

    def delete(self, session_key: str | None = None) -> None:
        self.modified = True

    def load(self) -> dict[str, Any]:
        self.accessed = True
        return {}

    @classmethod
    def clear_expired(cls) -> None:
        pass


class _Touched(Protocol):
    """The stand-in messages storage: whether the render read or added a message."""

    touched: bool


@functools.cache
def _no_messages() -> Callable[[HttpRequest], _Touched]:
    """The class of request._messages of a render for the cache (django.contrib.messages, imported only
    when the visitor's request has messages): no messages; reading or adding one shows in `touched`."""
    from django.contrib.messages.storage.base import BaseStorage, Message

    class NoMessages(BaseStorage):
        touched = False

        def _get(self, *args: Any, **kwargs: Any) -> tuple[list[Message], bool]:
            self.touched = True
            return [], True

        def _store(
            self, messages: list[Message], response: HttpResponseBase, *args: Any, **kwargs: Any
        ) -> list[Message]:
            return []

        def add(self, level: int, message: str, extra_tags: str | None = "") -> None:
            self.touched = True
            super().add(level, message, extra_tags)

    return NoMessages


def _credential_header_names() -> tuple[frozenset[str], frozenset[bytes]]:
    """(META names, raw lower-case header names) of the headers a render for the cache never sees."""
    csrf = settings.CSRF_HEADER_NAME
    meta = _CREDENTIAL_META | {csrf}
    raw = set(_PERSONAL_HEADERS)
    if csrf.startswith("HTTP_"):
        raw.add(csrf[5:].lower().replace("_", "-"))
    return frozenset(meta), frozenset(name.encode() for name in raw)


_cached_property_names: dict[type[HttpRequest], tuple[str, ...]] = {}


def _cached_properties(cls: type[HttpRequest]) -> tuple[str, ...]:
    """Attribute names under which the request class caches values derived from META (GET, COOKIES,
    headers, ...): a copy with other META must compute them afresh. (A cached property caches under the
    one name it is assigned to in its class: both kinds refuse a second name.)"""
    names = _cached_property_names.get(cls)
    if names is None:
        names = _cached_property_names[cls] = tuple(
            name
            for klass in cls.__mro__
            for name, attribute in vars(klass).items()
            if isinstance(attribute, cached_property | functools.cached_property)
        )
    return names


class _Shadow:
    """The request a render for the cache sees: a copy of the visitor's with no cookies, no session, no
    credentials, an anonymous user (or, with vary_on "user", the visitor's user), no messages, no body,
    and the query string of the key. The visitor's request is left as it was."""

    def __init__(self, visit: _Visit, by_user: bool) -> None:
        request = visit.request
        shadow = copy.copy(request)
        # The copy's own attributes, among them those Django's handlers and middleware set (environ, scope,
        # user, _messages), which HttpRequest does not declare.
        state = shadow.__dict__
        for name in (*_cached_properties(type(request)), *_PRIVATE_ATTRIBUTES):
            state.pop(name, None)
        hidden_meta, hidden_headers = _credential_header_names()
        self.cookies = shadow.COOKIES = _NoCookies()
        meta = _shadow_meta(request.META, hidden_meta, visit.query_string, self.cookies)
        shadow.META = meta
        shadow.headers = _NoCookieHeaders(meta, self.cookies)
        if "environ" in state:  # WSGIRequest: the environ is its META
            state["environ"] = meta
        if isinstance(state.get("scope"), dict):  # ASGIRequest: the raw headers are in the scope too
            state["scope"] = _shadow_scope(state["scope"], hidden_headers, visit.query_string)
        shadow.method = "GET"
        shadow.GET = QueryDict(visit.query_string, encoding="utf-8")
        state["_stream"], state["_read_started"] = io.BytesIO(), False
        self.session = None
        if "session" in state:
            self.session = shadow.session = _NoSession()
        if "user" in state or "auser" in state:
            state["user"], state["auser"] = _stand_in_user(visit.user if by_user else None)
        self.messages = None
        if "_messages" in state:
            self.messages = state["_messages"] = _no_messages()(shadow)
        self.request = shadow

    def private_input_used(self) -> str | None:
        """Why the render's page depends on the visitor's private state, or None."""
        if self.cookies.read:
            return "the view read request.COOKIES"
        if self.session is not None and (self.session.accessed or self.session.modified):
            return "the view used the session"
        if "CSRF_COOKIE" in self.request.META or getattr(self.request, "csrf_cookie_needs_reset", False):
            return "the view asked for a CSRF token"
        if self.messages is not None and self.messages.touched:
            return "the view used messages"
        return None


# What a copy of the request must not carry over: its body, and what was derived from the visitor's
# credentials (the user, the CSRF cookie to set).
_PRIVATE_ATTRIBUTES = ("_body", "_post", "_files", "_cached_user", "_acached_user", "csrf_cookie_needs_reset")


def _shadow_meta(
    meta: dict[str, Any], hidden: frozenset[str], query_string: str, cookies: _NoCookies
) -> _NoCookieMeta:
    """The visitor's META without credentials, as a body-less GET of `query_string`."""
    shown = _NoCookieMeta(
        {
            name: value
            for name, value in meta.items()
            if name not in hidden
            and not (isinstance(name, str) and name.startswith(_CREDENTIAL_META_PREFIXES))
        },
        cookies,
    )
    shown["REQUEST_METHOD"] = "GET"
    shown["QUERY_STRING"] = query_string
    shown.pop("CONTENT_LENGTH", None)
    if "wsgi.input" in shown:
        shown["wsgi.input"] = io.BytesIO()
    return shown


def _shadow_scope(scope: dict[str, Any], hidden: frozenset[bytes], query_string: str) -> dict[str, Any]:
    """The visitor's ASGI scope without what middleware added for them, credential headers or TLS
    details, as a GET of `query_string`."""
    shown = {key: value for key, value in scope.items() if key not in _PRIVATE_SCOPE_KEYS}
    shown["headers"] = [
        (name, value) for name, value in shown.get("headers", ()) if name.lower() not in hidden
    ]
    shown["query_string"] = query_string.encode()
    shown["method"] = "GET"
    if isinstance(shown.get("extensions"), dict):
        shown["extensions"] = {k: v for k, v in shown["extensions"].items() if k != "tls"}
    return shown


def _stand_in_user(user: _RequestUser | None) -> tuple[object, Callable[[], Awaitable[object]]]:
    """(request.user, request.auser) of a render for the cache: `user`, or an anonymous one."""
    from django.contrib.auth.models import AnonymousUser

    shown = user if user is not None else AnonymousUser()

    async def auser() -> object:
        return shown

    return shown, auser


# -- what may be stored ---------------------------------------------------------------------------------
def _why_not_shared(response: Any) -> str | None:
    """Why this response must not be stored for other visitors (the visitor it was rendered for may have
    it), or None if it may be."""
    if not isinstance(response, HttpResponseBase):
        return f"not a response ({type(response).__name__})"  # Django will say so
    if response.streaming:
        return "a streaming response"
    if response.status_code != 200:
        return f"status {response.status_code}"
    if response.cookies or response.has_header("Set-Cookie"):
        return "it sets a cookie"
    directives = {
        d.split("=", 1)[0].strip().lower() for d in _HEADER_LIST.split(response.get("Cache-Control", ""))
    }
    if directives & _UNKEPT_DIRECTIVES:
        return f"Cache-Control: {response['Cache-Control']}"
    return None


def _personal_vary(response: Any) -> str | None:
    """A response that says it varies on credentials or on everything depends on what its render was not
    shown: the visitor's own render must answer them."""
    if not isinstance(response, HttpResponseBase):
        return None
    varies = vary_headers(response)
    return f"Vary: {response['Vary']}" if "*" in varies or varies & _PERSONAL_HEADERS else None


def vary_headers(response: HttpResponseBase) -> set[str]:
    """The lower-case header names of the response's Vary header."""
    if not response.has_header("Vary"):
        return set()
    return {name.strip().lower() for name in _HEADER_LIST.split(response["Vary"]) if name.strip()}


def content_etag(content: bytes) -> str:
    return '"' + hashlib.blake2b(content, digest_size=16).hexdigest() + '"'


def _deferred(response: Any) -> bool:
    return hasattr(response, "render") and callable(response.render) and not response.is_rendered


def _labelled(response: R, status: str) -> R:
    """`response`, saying how the cache answered it (`response.cache_status`: tests, page warmers)."""
    if isinstance(response, HttpResponseBase):
        setattr(response, CACHE_STATUS, status)
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


class _PassMemory:
    """Pages found uncacheable, until when (hit-for-pass, as in Varnish): their requests render at once
    instead of queueing behind the stampede lease. Held in the process, bounded by PASS_MEMORY entries, so
    that requests for random URLs (404s) cost no Redis key; each process learns it for itself."""

    def __init__(self) -> None:
        self._until: OrderedDict[Hashable, float] = OrderedDict()
        self._lock = threading.Lock()
        renew_locks_after_fork(self, "_lock")

    def remember(self, key: Hashable, seconds: float) -> None:
        if seconds <= 0:
            return
        with self._lock:
            self._until[key] = time.monotonic() + seconds
            self._until.move_to_end(key)
            while len(self._until) > PASS_MEMORY:
                self._until.popitem(last=False)

    def holds(self, key: Hashable) -> bool:
        until = self._until.get(key)
        if until is None:
            return False
        if until > time.monotonic():
            return True
        with self._lock:
            if self._until.get(key) == until:
                del self._until[key]
        return False

    def __len__(self) -> int:
        return len(self._until)


_passes = _PassMemory()


def _memory_key(core: Core, key: str) -> tuple[int, str, int, str]:
    """`key` in the pass memory: one view's URL in one cache (its cluster, KEY_PREFIX and VERSION)."""
    return (id(core.shared), core.key_prefix, core.version, key)


_refusals_logged: dict[str, float] = {}  # view name -> when "max_entries reached" was last logged


# -- the decorated view -----------------------------------------------------------------------------------
Respond = Callable[[HttpRequest, _Visit], Any]
"""Calls the view for a render and renders a deferred response: the response, or (async) an awaitable of it."""


class _CachedView:
    """A view and its options; made for every call under method_decorator, so it stays cheap to build."""

    __slots__ = ("options", "view", "name")

    def __init__(self, options: _Options, view: Callable[..., Any]) -> None:
        self.options = options
        self.view = view
        name = getattr(view, "__qualname__", None) or getattr(view, "__name__", type(view).__name__)
        self.name = f"{getattr(view, '__module__', '')}.{name}"

    @property
    def core(self) -> Core:
        return core_for(self.options.using)

    def tags_for(self, request: HttpRequest, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
        tags = self.options.tags  # a list validated by cached_view(), or a callable
        return validate_tags(tags(request, *args, **kwargs)) if callable(tags) else tags

    # -- the plan: every decision, shared by the sync and the async driver ---------------------------------
    def plan(self, request: HttpRequest, args: tuple[Any, ...], kwargs: dict[str, Any]) -> PlanOf[Any]:
        if request.method not in CACHED_METHODS or request.META.get("HTTP_AUTHORIZATION"):
            return _labelled((yield _PASS_THROUGH), "bypass")
        query_string = kept_query(request.GET, self.options.query_params)
        if query_string is None:
            return _labelled((yield _PASS_THROUGH), "bypass")
        user = yield _USER
        authenticated = user is not None and user.is_authenticated
        if authenticated and not self.options.by_user:
            return _labelled((yield _PASS_THROUGH), "bypass")
        visit = _Visit(self, request, args, kwargs, user if authenticated else None, query_string)
        head = request.method == "HEAD"
        key, vary_known = visit.base_key, None
        core = self.core
        while not _passes.holds(_memory_key(core, key)):
            reply = yield (_Peek(key) if head else _Fetch(visit, key, vary_known))
            stored = not isinstance(reply, stampede.Unstored)
            entry = reply if stored else reply.value
            if visit.rendered is not None:  # this request rendered the entry: a miss, or an inline refresh
                response, shared = visit.rendered
                if shared:
                    return self.answer(request, response, "miss" if stored else "pass")
                if not entry.get("private"):
                    return _labelled(response, "pass")  # the visitor's own answer (a 404, a cookie set)
                break  # rendered without what the page needs from the visitor: render it with theirs
            kind = entry.get("kind") if isinstance(entry, dict) else None
            if kind == "page":
                return self.answer(request, self.response_from(entry), "hit" if stored else "pass")
            if kind != "vary" or vary_known is not None:
                break
            vary_known = frozenset(entry["headers"])
            key = visit.varied_key(vary_known)
        return _labelled((yield _PASS_THROUGH), "pass")

    def answer(self, request: HttpRequest, response: HttpResponse, status: str) -> HttpResponse:
        """A shareable response, or 304 Not Modified (or 412) when the request's conditions say so."""
        if not any(header in request.META for header in _CONDITIONAL_HEADERS):
            return _labelled(response, status)
        last_modified = response.get("Last-Modified")
        conditional = get_conditional_response(
            request,
            etag=response.get("ETag"),
            last_modified=parse_http_date_safe(last_modified) if last_modified else None,
            response=response,
        )
        return _labelled(response if conditional is None else conditional, status)

    def keep(
        self, visit: _Visit, key: str, response: Any, shadow: _Shadow, vary_known: frozenset[str] | None
    ) -> tuple[dict[str, Any], bool]:
        """What a render leaves under its key, and whether it may be stored: the page, the Vary headers it
        needs, or (never stored) a pass, "private" when the visitor's own render must answer."""
        private = shadow.private_input_used() or _personal_vary(response)
        reason = private or _why_not_shared(response)
        unkeyed = set() if reason else vary_headers(response).difference(self.options.vary_headers)
        if reason is None and vary_known is not None and not unkeyed <= vary_known:
            reason = f"Vary: {response['Vary']} differs from the Vary of the first render"
        if reason is not None:
            logger.debug("not caching %s %s: %s", visit.request.method, visit.request.path, reason)
            visit.rendered = (response, False)
            _passes.remember(_memory_key(self.core, key), self.pass_seconds())
            return {"kind": "pass", "private": private is not None}, False
        if not response.has_header("ETag"):
            response["ETag"] = content_etag(response.content)
        visit.rendered = (response, True)
        if unkeyed and vary_known is None:
            return {"kind": "vary", "headers": sorted(unkeyed)}, True
        content = response.content
        if getattr(self.core.codec.serializer, "name", "pickle") == "json":
            content = content.decode("latin-1")  # JSON holds no bytes; latin-1 maps each byte to a char
        headers = [[name, value] for name, value in response.items() if name.lower() != "content-length"]
        return {"kind": "page", "status": response.status_code, "headers": headers, "content": content}, True

    def render_plan(
        self, visit: _Visit, key: str, vary_known: frozenset[str] | None, respond: Respond
    ) -> PlanOf[Any]:
        """Render the page for the cache from the request's shadow (`respond` calls the view: sync or
        async) and say what to store: the entry, or `Unstored` when it must not be shared or kept."""
        shadow = _Shadow(visit, self.options.by_user)
        try:
            response = yield Compute(respond, (shadow.request, visit))
        except Exception:  # noqa: BLE001 - re-raised unless the visitor's own render is to answer
            if shadow.private_input_used() is None:
                raise
            response = None  # it failed on a stand-in (an empty session, say): the visitor's render decides
        entry, storable = self.keep(visit, key, response, shadow, vary_known)
        if not storable:
            return stampede.Unstored(entry)
        admitted = yield Guarded(self.admit_plan(key), "cached_view", None)
        return self.admitted(key, entry, admitted)

    def admitted(self, key: str, entry: dict[str, Any], admitted: bool | None) -> Any:
        """The render's result for the stampede machinery: stored only when within max_entries (None: the
        cache could not say, and cannot store it either). A page refused is remembered like an uncacheable
        one for a while, so that its requests render at once rather than one after another."""
        if admitted:
            return entry
        if admitted is None:
            return stampede.Unstored(entry)
        _passes.remember(_memory_key(self.core, key), self.pass_seconds())
        now = time.monotonic()
        if now - _refusals_logged.get(self.name, -math.inf) >= 60:
            _refusals_logged[self.name] = now
            logger.warning(
                "%s holds max_entries=%s pages: new pages are served without being stored",
                self.name,
                self.options.max_entries,
            )
        return stampede.Unstored(entry)

    def admit_plan(self, key: str) -> PlanOf[bool]:
        """Whether the page under `key` may be stored: at most max_entries distinct pages of this view are
        alive at a time (each counts for its timeout plus its stale window)."""
        limit = self.options.max_entries
        core = self.core
        lifetime_ms = core.expiry_ms(self.options.timeout)
        if limit is None or lifetime_ms == 0:
            return True  # unbounded, or nothing is kept anyway
        if lifetime_ms is None:
            lifetime_ms = int(FOREVER_SECONDS * 1000)
        lifetime_ms += int((self.options.stale or 0) * 1000)
        pages = yield from core.physical_key(f"{self.options.key_prefix}:pages:{_digest([self.name])}", None)
        now_ms = int(time.time() * 1000)
        admit = ("EVAL", scripts.ADMIT_PAGE, 1, pages, key, now_ms, now_ms + lifetime_ms, limit)
        return bool((yield Call(pages, admit)))

    def peek_plan(self, key: str) -> PlanOf[Any]:
        core = self.core
        physical = yield from core.physical_key(key, None)
        found = yield from stampede.read_plan(core, physical, 0.0)
        if found.state == "fresh" or (found.state == "stale" and self.options.stale):
            return found.value
        return None

    @staticmethod
    def response_from(entry: dict[str, Any]) -> HttpResponse:
        content = entry["content"]
        if isinstance(content, str):
            content = content.encode("latin-1")
        # A stored page never had a Set-Cookie; dropped here too, whatever wrote the entry.
        headers = {name: value for name, value in entry["headers"] if name.lower() != "set-cookie"}
        return HttpResponse(content, status=entry["status"], headers=headers)

    def pass_seconds(self) -> float:
        timeout = self.options.timeout
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.core.default_timeout
        return PASS_SECONDS if timeout is None else max(0.0, min(PASS_SECONDS, float(timeout)))

    def fetch(self, get_or_compute: Callable[..., R], step: _Fetch, compute: Callable[[], Any]) -> R:
        """The entry of a `_Fetch` step through stampede's sync or async `get_or_compute`."""
        core = self.core
        # Refreshes run inline: a view needs its request, and a render after the response has gone
        # would run outside the request's thread, middleware and database connection.
        policy = stampede.policy_for(core, self.options.stale, self.options.beta, "inline")
        return get_or_compute(
            core, step.key, None, compute, self.options.timeout, step.visit.tags, policy, "cached_view"
        )

    # -- the sync driver ----------------------------------------------------------------------------------
    def serve(self, request: HttpRequest, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
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
                reply = self.fetch(stampede.get_or_compute, step, functools.partial(self.render, step))
            elif type(step) is _Peek:
                reply = self.core.run(self.peek_plan(step.key), "cached_view", None)
            else:
                reply = _not_awaitable(self.view(request, *args, **kwargs))

    def render(self, step: _Fetch) -> Any:
        plan = self.render_plan(step.visit, step.key, step.vary_known, self.respond)
        return self.core.run_strict(plan, "cached_view")

    def respond(self, request: HttpRequest, visit: _Visit) -> Any:
        response = _not_awaitable(self.view(request, *visit.args, **visit.kwargs))
        return response.render() if _deferred(response) else response

    # -- the async driver ---------------------------------------------------------------------------------
    async def aserve(self, request: HttpRequest, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
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
                reply = await self.fetch(
                    stampede.aget_or_compute, step, functools.partial(self.arender, step)
                )
            elif type(step) is _Peek:
                reply = await self.core.arun(self.peek_plan(step.key), "cached_view", None)
            else:
                reply = await self.view(request, *args, **kwargs)

    async def arender(self, step: _Fetch) -> Any:
        plan = self.render_plan(step.visit, step.key, step.vary_known, self.arespond)
        return await self.core.arun_strict(plan, "cached_view")

    async def arespond(self, request: HttpRequest, visit: _Visit) -> Any:
        response = await self.view(request, *visit.args, **visit.kwargs)
        if _deferred(response):
            return await sync_to_async(response.render, thread_sensitive=True)()
        return response


def _user(request: HttpRequest) -> _RequestUser | None:
    user: _RequestUser | None = getattr(request, "user", None)
    if user is not None:
        user.is_authenticated  # noqa: B018 - evaluates a lazy user now, before the view runs
    return user


async def _auser(request: HttpRequest) -> _RequestUser | None:
    auser = getattr(request, "auser", None)
    if auser is not None:
        user: _RequestUser | None = await auser()
        return user
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


def _vary_on(vary_on: Iterable[str]) -> tuple[tuple[str, ...], bool]:
    """(the lower-case header names, whether pages are per user) of `vary_on`."""
    headers, by_user = set(), False
    for name in _names(vary_on, "vary_on"):
        if name.lower() == "user":
            by_user = True
        elif name.lower() in _PERSONAL_HEADERS:
            raise ValueError(
                f"vary_on cannot name {name!r}: a page per {name} value is a page per visitor; "
                "use vary_on=('user',) for pages per user"
            )
        else:
            headers.add(name.lower())
    return tuple(sorted(headers)), by_user


def _checked_options(
    stale: float | None,
    beta: float | None,
    query_params: Iterable[str] | None,
    key_prefix: str,
    max_entries: int | None,
) -> frozenset[str] | None:
    """Refuse what cached_view() cannot use; the query parameters kept (None: none but tracking ones)."""
    for name, number in (("stale", stale), ("beta", beta)):
        if number is not None and (not is_number(number) or number < 0):
            raise ValueError(f"{name} must be a number >= 0, got {number!r}")
    allowed = None if query_params is None else frozenset(_names(query_params, "query_params"))
    if not isinstance(key_prefix, str) or not key_prefix:
        raise TypeError(f"key_prefix must be a non-empty str, got {key_prefix!r}")
    if max_entries is not None and (not is_whole(max_entries) or max_entries < 1):
        raise ValueError(f"max_entries must be an int >= 1 or None, got {max_entries!r}")
    return allowed


@overload
def cached_view(timeout: Callable[..., Any], /) -> Callable[..., Any]: ...
@overload
def cached_view(
    timeout: float | None = ...,
    *,
    tags: Iterable[str] | Callable[..., Iterable[str]] | None = None,
    vary_on: Iterable[str] = (),
    stale: float | None = None,
    beta: float | None = None,
    query_params: Iterable[str] | None = None,
    using: str = "default",
    key_prefix: str = "view",
    max_entries: int | None = MAX_ENTRIES,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]: ...
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
    max_entries: int | None = MAX_ENTRIES,
) -> Callable[..., Any]:
    """Cache a view's GET 200 responses in the cache `using`, and answer HEADs from them (docs/views.md).

    `tags`: a list, or a callable of (request, *args, **kwargs) giving one; `vary_on`: request header names
    whose values are part of the key, and "user" for entries per user (authenticated users are otherwise
    never served from or stored in the cache); `stale`: seconds an expired page may still be served while
    one request renders it again; `beta`: XFetch eagerness; `query_params`: the only query parameters kept
    (in the key and in the request the view sees); None keeps none, and a request with any but tracking
    parameters is then not cached; `max_entries`: the most pages of this view stored at a time (None: no
    bound)."""
    checked_tags = tags if callable(tags) else validate_tags(tags)
    vary_headers, by_user = _vary_on(vary_on)
    allowed = _checked_options(stale, beta, query_params, key_prefix, max_entries)
    view = None
    if callable(timeout) and not isinstance(timeout, int | float):
        view, timeout = timeout, DEFAULT_TIMEOUT  # used bare: @cached_view
    options = _Options(
        timeout=timeout,
        tags=checked_tags,
        vary_headers=vary_headers,
        by_user=by_user,
        stale=stale,
        beta=beta,
        query_params=allowed,
        using=using,
        key_prefix=key_prefix,
        max_entries=max_entries,
    )

    def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
        return _decorate(options, view)

    return decorate(view) if view is not None else decorate


def _decorate(options: _Options, view: Callable[..., Any]) -> Callable[..., Any]:
    """`view` served through the cache: a coroutine function for an async view, a function otherwise."""
    if not callable(view):
        raise TypeError("@cached_view decorates a view")
    cached = _CachedView(options, view)
    if iscoroutinefunction(view):

        async def async_wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
            return await cached.aserve(request, args, kwargs)

        return functools.update_wrapper(async_wrapper, view)

    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
        return cached.serve(request, args, kwargs)

    return functools.update_wrapper(wrapper, view)
