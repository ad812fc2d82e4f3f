"""Cache warming: fill the cache on purpose (after a deploy, a flush, on a schedule) instead of letting the
first requests after it pay for every miss.

A *warmer* is a function registered with `@warmer(name, ...)`. It either yields `(key, value)` pairs, which
are written with the cache's `set_many` plan in chunks (one pipelined batch per node per chunk), or returns
a QuerySet of a `cache_model` model, whose rows are written under every registered lookup exactly as
`get_cached` fills them (same stored form, tags and fill protocol, in batches). Warmers live in each
installed app's `warmers.py`, imported when warmers are listed or run.

`run_warmer` runs one warmer (or one chunk of it) in this process; `manage.py warmcache` runs many, here or
as Celery tasks (`django_distcache.warm`), and `tasks.warmer_beat_schedule()` puts scheduled ones in beat.
"""

from __future__ import annotations

import enum
import inspect
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from django.core.cache.backends.base import DEFAULT_TIMEOUT
from django.core.exceptions import ImproperlyConfigured
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseBase

from .conf import is_number, is_whole
from .core import Core, PlanOf, core_for
from .tags import validate_tags
from .topology import Call

if TYPE_CHECKING:
    from django.core.handlers.base import BaseHandler

    from .models.registry import ModelCacheConfig

logger = logging.getLogger("django_distcache.warming")

CHUNK_SIZE = 1000
FILL_ATTEMPTS = 3  # a chunk of rows is re-read this many times when writers keep voiding its lease
PROGRESS_TTL = 24 * 3600
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}")
T = TypeVar("T")


class _Failure(enum.Enum):
    FAILED = "failed"


_FAILED = _Failure.FAILED  # what a fill answers when the cache cannot be reached


class WarmingError(Exception):
    """A warmer (or one chunk of it) failed; raised by the Celery task so the failure shows as one."""


# -- registration ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Chunk:
    """The share of a warmer's items one run writes. Items are cut into blocks of `size` (in the order
    the warmer yields them) and the blocks are dealt round-robin to `count` chunks: chunk `index` owns
    blocks index, index + count, ... A single in-process run is `Chunk(0, 1, size)`: it owns everything."""

    index: int = 0
    count: int = 1
    size: int = CHUNK_SIZE

    def owns(self, position: int) -> bool:
        return self.count == 1 or (position // self.size) % self.count == self.index

    def take(self, items: Iterable[T]) -> Iterator[T]:
        """The items of `items` this chunk owns: a warmer that takes a `chunk` argument filters its cheap
        inputs with it, so that each Celery task computes only its own values."""
        if self.count == 1:
            yield from items
            return
        for position, item in enumerate(items):
            if self.owns(position):
                yield item


@dataclass(frozen=True)
class Warmer:
    name: str
    function: Callable[..., Any]
    timeout: Any
    tags: tuple[str, ...]
    schedule: Any
    using: str
    takes_chunk: bool  # the function has a parameter: it is given its Chunk and yields only that share
    pages: PageRequests | None = None  # a page warmer: the function yields URLs, requested as a visitor would

    def source(self, chunk: Chunk) -> Any:
        return self.function(chunk) if self.takes_chunk else self.function()

    @property
    def origin(self) -> str:
        return f"{self.function.__module__}.{self.function.__qualname__}"


_registry: dict[str, Warmer] = {}


def _check_schedule(name: str, schedule: Any) -> None:
    if schedule is None or hasattr(schedule, "is_due"):  # a celery schedule (crontab, solar, schedule)
        return
    if isinstance(schedule, timedelta):
        seconds = schedule.total_seconds()
    elif is_number(schedule):
        seconds = schedule
    else:
        raise ImproperlyConfigured(
            f"warmer {name!r}: schedule must be None, seconds, a timedelta or a Celery schedule "
            f"(celery.schedules.crontab(...)), got {schedule!r}"
        )
    if seconds <= 0:
        raise ImproperlyConfigured(f"warmer {name!r}: schedule must be a positive interval, got {schedule!r}")


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ImproperlyConfigured(
            f"warmer name must be 1-100 characters of letters, digits and _ . : - (starting with a letter "
            f"or digit), got {name!r}"
        )


def warmer(
    name: str,
    *,
    timeout: Any = DEFAULT_TIMEOUT,
    tags: Iterable[str] = (),
    schedule: Any = None,
    using: str = "default",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as the warmer `name` and return it unchanged.

    The function yields `(key, value)` pairs (or returns a mapping), or returns a QuerySet of a
    `cache_model` model. `timeout` is the entries' timeout (a QuerySet warmer defaults to the model's);
    `tags` are stamped on every entry, their versions read before the function runs; `schedule` (seconds,
    a timedelta or a Celery schedule) puts the warmer in `tasks.warmer_beat_schedule()`; `using` is the
    cache alias written to."""
    _check_name(name)
    if timeout is not DEFAULT_TIMEOUT and timeout is not None and (not is_number(timeout) or timeout <= 0):
        raise ImproperlyConfigured(
            f"warmer {name!r}: timeout must be a positive number of seconds or None, got {timeout!r}"
        )
    if callable(tags):
        raise ImproperlyConfigured(
            f"warmer {name!r}: tags must be a list of strings; every entry of a warmer carries the same "
            "tags, whose versions are read before the warmer computes anything"
        )
    try:
        checked_tags = tuple(validate_tags(tags))
    except (TypeError, ValueError) as error:
        raise ImproperlyConfigured(f"warmer {name!r}: {error}") from None
    _check_schedule(name, schedule)
    if not isinstance(using, str) or not using:
        raise ImproperlyConfigured(f"warmer {name!r}: using must be a cache alias, got {using!r}")

    def build(function: Callable[..., Any], takes_chunk: bool) -> Warmer:
        return Warmer(name, function, timeout, checked_tags, schedule, using, takes_chunk)

    return _registration(name, build)


def _registration(
    name: str, build: Callable[[Callable[..., Any], bool], Warmer]
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The decorator that checks a warmer function's shape and registers `build(function, takes_chunk)`."""

    def register(function: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(function):
            raise TypeError(f"@warmer({name!r}) decorates a function, got {function!r}")
        if inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function):
            raise ImproperlyConfigured(
                f"warmer {name!r}: {function.__qualname__} is async; a warmer is a plain function or generator"
            )
        parameters = [
            p for p in inspect.signature(function).parameters.values() if p.default is inspect.Parameter.empty
        ]
        if len(parameters) > 1:
            raise ImproperlyConfigured(
                f"warmer {name!r}: {function.__qualname__} takes {len(parameters)} arguments; a warmer takes "
                "none, or one (its Chunk)"
            )
        entry = build(function, bool(parameters))
        existing = _registry.get(name)
        # The same function registered again is its module imported again (a reload): keep the new one.
        if existing is not None and existing.origin != entry.origin:
            raise ImproperlyConfigured(
                f"two warmers are named {name!r}: {existing.origin} and {entry.origin}; names must be unique"
            )
        _registry[name] = entry
        return function

    return register


@dataclass(frozen=True)
class PageRequests:
    """How a page warmer's URLs are requested: the Host header, the scheme and any extra headers."""

    host: str | None  # None: the first ALLOWED_HOSTS entry that names a host, looked up when it runs
    secure: bool
    headers: tuple[tuple[str, str], ...]

    def resolved_host(self) -> str:
        return self.host if self.host is not None else default_page_host()


def default_page_host() -> str:
    """The Host a page warmer sends when not told: the first ALLOWED_HOSTS entry that names one host
    ("*" is skipped; ".example.com" gives "example.com"), or "localhost" under DEBUG with none."""
    from django.conf import settings

    for allowed in settings.ALLOWED_HOSTS:
        host: str = allowed.lstrip(".")
        if host and "*" not in host:
            return host
    if settings.DEBUG and not settings.ALLOWED_HOSTS:
        return "localhost"
    raise ImproperlyConfigured(
        "a page warmer needs the host visitors use (the Host header is part of a cached page's key): "
        f"ALLOWED_HOSTS ({settings.ALLOWED_HOSTS!r}) names none, so give page_warmer(host=...)"
    )


def page_warmer(
    name: str,
    *,
    host: str | None = None,
    secure: bool = False,
    headers: Mapping[str, str] | None = None,
    schedule: Any = None,
    using: str = "default",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as the warmer `name` of pages: it yields (or returns) URLs, a path
    with any query string ("/", "/p/mug/?page=2"), and each is requested with an anonymous GET through
    Django's whole stack (URL resolution, middleware, the view), so that `@cached_view` stores the page
    under exactly the key a visitor's GET maps to. The key holds the scheme and the Host header: `host`
    (with the port visitors use, if any; default: the first ALLOWED_HOSTS entry that names a host) and
    `secure` (https) must be the ones visitors send; `headers` adds request headers (those a view's
    `vary_on` names). The pages' timeouts and tags are their views'. `using` is the cache the progress of
    `warmcache --async` is reported to; pages go where their views store them."""
    _check_name(name)
    if host is not None and (not isinstance(host, str) or not host or "/" in host or " " in host):
        raise ImproperlyConfigured(
            f"page warmer {name!r}: host must be a host name with an optional port, got {host!r}"
        )
    if not isinstance(secure, bool):
        raise ImproperlyConfigured(f"page warmer {name!r}: secure must be True or False, got {secure!r}")
    pairs = tuple((headers or {}).items())
    for header, value in pairs:
        if not isinstance(header, str) or not isinstance(value, str) or not header:
            raise ImproperlyConfigured(f"page warmer {name!r}: headers must map names to strings")
        if header.lower() in {"cookie", "authorization", "proxy-authorization", "host"}:
            raise ImproperlyConfigured(
                f"page warmer {name!r}: header {header!r} is not sent: warmed pages are anonymous visits "
                "(and the host is given with host=)"
            )
    _check_schedule(name, schedule)
    if not isinstance(using, str) or not using:
        raise ImproperlyConfigured(f"warmer {name!r}: using must be a cache alias, got {using!r}")
    pages = PageRequests(host, secure, pairs)

    def build(function: Callable[..., Any], takes_chunk: bool) -> Warmer:
        return Warmer(name, function, DEFAULT_TIMEOUT, (), schedule, using, takes_chunk, pages)

    return _registration(name, build)


def discover() -> None:
    """Import every installed app's `warmers` module (once; later calls cost a dictionary lookup each)."""
    from django.utils.module_loading import autodiscover_modules

    autodiscover_modules("warmers")


def registered_warmers() -> list[Warmer]:
    """Every warmer, discovered from the installed apps, sorted by name."""
    discover()
    return [_registry[name] for name in sorted(_registry)]


def get_warmer(name: str) -> Warmer:
    discover()
    try:
        return _registry[name]
    except KeyError:
        known = ", ".join(sorted(_registry)) or "none"
        raise LookupError(f"no warmer is named {name!r} (registered: {known})") from None


# -- results ----------------------------------------------------------------------------------------------
@dataclass
class WarmResult:
    """What one run of a warmer did. `entries` and `bytes` (stored value bytes, envelope included) count
    what was written, or what would be with `dry_run`; `batches` counts the write round trips (each one
    pipelined batch per node, all nodes at once); `skipped` counts rows a concurrent writer made stale
    while they were being written (the fill protocol leaves them to the next reader); `errors` counts
    entries that could not be written, plus one if the warmer itself raised (`error` says what)."""

    name: str
    entries: int = 0
    bytes: int = 0
    seconds: float = 0.0
    errors: int = 0
    skipped: int = 0
    batches: int = 0
    error: str | None = None
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return self.errors == 0

    def add(self, delta: Mapping[str, int]) -> None:
        """Add a progress report's counts (a report may also carry hints such as `rows_total`)."""
        for name in _COUNTS:
            if name in delta:
                setattr(self, name, getattr(self, name) + delta[name])


_COUNTS = ("entries", "bytes", "errors", "skipped", "batches")


Progress = Callable[[dict[str, int]], None]


# -- running ----------------------------------------------------------------------------------------------
def run_warmer(
    name: str | Warmer,
    *,
    chunk_size: int = CHUNK_SIZE,
    dry_run: bool = False,
    using: str | None = None,
    chunk: Chunk | None = None,
    pks: list[Any] | None = None,
    on_progress: Progress | None = None,
) -> WarmResult:
    """Run one warmer in this process and say what it did. Never raises for a failure of the warmer or of
    the cache: the result carries it (`ok`, `errors`, `error`), so one failing warmer stops no other.

    `using` overrides the warmer's cache alias. `chunk` (generators) or `pks` (QuerySets) restrict the
    run to one share of the items: that is how the Celery task runs a part of a warmer."""
    entry = name if isinstance(name, Warmer) else get_warmer(name)
    result = WarmResult(entry.name, dry_run=dry_run)
    started = time.perf_counter()

    def progress(delta: dict[str, int]) -> None:
        result.add(delta)
        if on_progress is not None:
            on_progress(delta)

    try:
        _check_chunk_size(chunk_size)
        result.error = _run_source(entry, chunk or Chunk(0, 1, chunk_size), using, pks, dry_run, progress)
    except Exception as error:  # noqa: BLE001 - a warmer's boundary: its failure is reported, others go on
        result.errors += 1
        result.error = f"{type(error).__name__}: {error}"
        logger.exception("warmer %r failed", entry.name)
    result.seconds = time.perf_counter() - started
    return result


def _run_source(
    entry: Warmer,
    chunk: Chunk,
    using: str | None,
    pks: list[Any] | None,
    dry_run: bool,
    progress: Progress,
) -> str | None:
    """Call the warmer and write what it gives (pairs, rows or pages) in `chunk`'s share; why some pages
    could not be warmed, if any."""
    alias = using or entry.using
    core = core_for(alias)
    # Tag versions first: an invalidation that lands while the values are computed makes the entries
    # written after it born stale, instead of leaving them current.
    stamps = _stamps_before_computing(core, entry.tags, entry.timeout, dry_run)
    source = entry.source(chunk)
    if entry.pages is not None:
        if using is not None and using != entry.using:
            raise ImproperlyConfigured(
                f"page warmer {entry.name!r}: pages are stored in the caches their views' @cached_view "
                f"names, not in CACHES[{using!r}]"
            )
        urls = _urls(entry.name, source)
        failures = _warm_pages(_share(entry, chunk, urls), entry.pages, chunk.size, dry_run, progress)
        return _unwarmed(failures)
    if isinstance(source, QuerySet):
        from .models.registry import config_for

        row_pks = queryset_pks(source) if pks is None else pks
        config = config_for(source.model)
        _warm_rows(
            config, source.db, row_pks, alias, entry.timeout, entry.tags, chunk.size, dry_run, progress
        )
    elif pks is not None:
        raise WarmingError(f"warmer {entry.name!r} no longer returns a QuerySet; it was split by pk")
    else:
        pairs = _share(entry, chunk, _pairs(entry.name, source))
        _write_pairs(pairs, core, entry.timeout, stamps, chunk.size, dry_run, progress)
    return None


def _share(entry: Warmer, chunk: Chunk, items: Iterator[T]) -> Iterator[T]:
    """The items `chunk` owns; a warmer that takes its chunk yields only those already."""
    return items if entry.takes_chunk else chunk.take(items)


def _unwarmed(failures: list[str]) -> str | None:
    if not failures:
        return None
    shown = "; ".join(failures[:5]) + ("; ..." if len(failures) > 5 else "")
    return f"{len(failures)} page(s) not warmed: {shown}"


def _check_chunk_size(chunk_size: Any) -> None:
    if not is_whole(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def _stamps_before_computing(
    core: Core, tags: tuple[str, ...], timeout: Any, dry_run: bool
) -> dict[str, int] | None:
    if not tags:
        return None
    if dry_run:
        return dict.fromkeys(tags, 0)  # the same envelope size, and no tag key is created
    stamps: dict[str, int] = core.run_strict(core.stamps(list(tags), core.expiry_ms(timeout)), "warm")
    return stamps


def _pairs(name: str, source: Any) -> Iterator[tuple[Any, Any]]:
    if isinstance(source, Mapping):
        source = source.items()
    if isinstance(source, str | bytes) or not isinstance(source, Iterable):
        raise TypeError(
            f"warmer {name!r} returned {type(source).__name__}; a warmer yields (key, value) pairs, "
            "returns a mapping, or returns a QuerySet of a cache_model model"
        )
    for item in source:
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise TypeError(f"warmer {name!r} yielded {item!r}; expected a (key, value) pair")
        yield item[0], item[1]


def _chunks(items: Iterable[tuple[Any, Any]], size: int) -> Iterator[dict[Any, Any]]:
    batch: dict[Any, Any] = {}
    try:
        for key, value in items:
            batch[key] = value
            if len(batch) >= size:
                yield batch
                batch = {}
    except Exception:
        if batch:
            yield batch  # the entries computed before the warmer failed are good: write them first
        raise
    if batch:
        yield batch


def _write_pairs(
    items: Iterable[tuple[Any, Any]],
    core: Core,
    timeout: Any,
    stamps: dict[str, int] | None,
    chunk_size: int,
    dry_run: bool,
    progress: Progress,
) -> None:
    """Each chunk is one `set_many` (one pipelined batch per node), stamped with the versions read before
    the warmer started."""
    for batch in _chunks(items, chunk_size):
        if dry_run:
            # (what a value is signed for does not change its size: no namespace read for a dry run)
            size = sum(len(core.encode(value, key, b"", stamps)) for key, value in batch.items())
            progress({"entries": len(batch), "bytes": size})
            continue
        meter = _Meter()
        plan = _metered(core.set_many_plan(batch, timeout, None, None, stamps), meter)
        failed = core.run(plan, "warm", list(batch))
        progress(
            {
                "entries": len(batch) - len(failed),
                "errors": len(failed),
                "bytes": meter.bytes,
                "batches": meter.batches,
            }
        )
        if len(failed) == len(batch):
            raise WarmingError(f"the cache could not be written (all {len(batch)} entries of a chunk failed)")


@dataclass
class _Meter:
    batches: int = 0
    bytes: int = 0


def _metered(plan: PlanOf[T], meter: _Meter) -> PlanOf[T]:
    """Pass a plan's requests and replies through unchanged, counting its batches (round trips) and the
    value bytes of the SETs that succeeded. It forwards what the driver throws in (command errors)."""
    reply: Any = None
    thrown: BaseException | None = None
    while True:
        try:
            request = plan.throw(thrown) if thrown is not None else plan.send(reply)
        except StopIteration as done:
            result: T = done.value
            return result
        thrown = None
        try:
            reply = yield request
        except GeneratorExit:
            plan.close()
            raise
        except BaseException as error:  # noqa: BLE001 - not handled here: handed on to the plan
            thrown = error
            continue
        if type(request) is list:
            meter.batches += 1
            for call, answer in zip(request, reply, strict=True):
                if call.args[0] == "SET" and not isinstance(answer, BaseException):
                    meter.bytes += len(call.args[2])


# -- pages -----------------------------------------------------------------------------------------------
# Set in the WSGI environ of a page warmer's requests: a view can tell a warming visit from a visitor's
# (to leave it out of a view count, say). No HTTP header can set it.
WARMING_ENVIRON_KEY = "django_distcache.warming"


def is_warming_request(request: HttpRequest) -> bool:
    """Whether `request` is a page warmer's visit rather than a visitor's."""
    return bool(request.META.get(WARMING_ENVIRON_KEY))


def _urls(name: str, source: Any) -> Iterator[str]:
    if isinstance(source, str | bytes) or not isinstance(source, Iterable):
        raise TypeError(f"page warmer {name!r} returned {type(source).__name__}; it yields URLs (paths)")
    for url in source:
        if not isinstance(url, str) or not url.startswith("/"):
            raise TypeError(f"page warmer {name!r} yielded {url!r}; expected a path such as '/p/mug/'")
        yield url


def _warm_pages(
    urls: Iterable[str], pages: PageRequests, chunk_size: int, dry_run: bool, progress: Progress
) -> list[str]:
    """GET each URL through Django's handler, `chunk_size` at a time between progress reports; return
    why each page that is not in the cache afterwards is not."""
    visits = _PageVisits(pages, dry_run)
    for batch in _batches(urls, chunk_size):
        counts: dict[str, int] = {}
        for url in batch:
            for name, value in visits.visit(url).items():
                counts[name] = counts.get(name, 0) + value
        progress(counts)
    return visits.failures


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class _PageVisits:
    """A page warmer's requests, and why the pages they did not leave in the cache are not there.

    The request is built as a visitor's anonymous GET (no cookie, no credentials) and goes through the
    middleware and the URL resolver, so the view's @cached_view computes the key a visitor's request
    maps to. The handler's get_response is called directly: the request_started/finished signals, which
    would close this process's database connections and caches after every page, are not sent."""

    def __init__(self, pages: PageRequests, dry_run: bool) -> None:
        from django.test.client import RequestFactory

        self.pages, self.dry_run = pages, dry_run
        self.host = pages.resolved_host()
        self.factory = RequestFactory()
        self.handler: BaseHandler | None = None  # loaded on the first request (a dry run needs none)
        self.failures: list[str] = []

    def visit(self, url: str) -> dict[str, int]:
        """The counts one URL adds to the progress report."""
        if self.dry_run:
            return self._resolved(url)
        return self._outcome(url, self._get(url))

    def _resolved(self, url: str) -> dict[str, int]:
        from django.urls import Resolver404, resolve

        try:
            resolve(url.split("?", 1)[0])
        except Resolver404:
            self.failures.append(f"{url} (no URL pattern matches it)")
            return {"errors": 1}
        return {"entries": 1}

    def _get(self, url: str) -> HttpResponseBase:
        from django.core.handlers.base import BaseHandler
        from django.utils import translation

        if self.handler is None:
            self.handler = BaseHandler()
            self.handler.load_middleware()
        pages = self.pages
        request = self.factory.get(url, secure=pages.secure, headers=dict(pages.headers), HTTP_HOST=self.host)
        request.META[WARMING_ENVIRON_KEY] = True
        # The language a visitor's request starts with: none activated (LocaleMiddleware activates its own).
        language = translation.get_language()
        translation.deactivate()
        try:
            return self.handler.get_response(request)
        finally:
            if language:
                translation.activate(language)

    def _outcome(self, url: str, response: HttpResponseBase) -> dict[str, int]:
        status = getattr(response, "cache_status", None)  # set by @cached_view
        if response.status_code != 200 or not isinstance(response, HttpResponse):
            streaming = ", streaming" if response.streaming else ""
            self.failures.append(f"{url} (answered {response.status_code}{streaming})")
            return {"errors": 1}
        if status == "miss":
            return {"entries": 1, "bytes": len(response.content)}
        if status == "hit":
            return {"skipped": 1}  # in the cache already: left as it is, its own timeout and tags apply
        if status is None:
            # Not a @cached_view page: it was rendered once, which fills what its view caches on the way.
            return {"entries": 1}
        self.failures.append(f"{url} (not stored by @cached_view: {status})")
        return {"errors": 1}


# -- QuerySets of cache_model models ----------------------------------------------------------------------
def warm_queryset(
    queryset: QuerySet[Any],
    *,
    timeout: Any = DEFAULT_TIMEOUT,
    tags: Iterable[str] = (),
    chunk_size: int = CHUNK_SIZE,
    dry_run: bool = False,
) -> WarmResult:
    """Cache every row of `queryset` (a `cache_model` model's) under each of its lookups, as `get_cached`
    would after a miss: same stored form, same tags (plus `tags`), same protection against overwriting a
    newer write; in batches of `chunk_size` rows. `timeout` defaults to the model's. Usable on its own,
    e.g. after `bulk_create` or `QuerySet.update()`. Errors raise."""
    from .models.registry import config_for

    _check_chunk_size(chunk_size)
    extra = tuple(validate_tags(tags))
    config = config_for(queryset.model)
    result = WarmResult(f"{config.label} rows", dry_run=dry_run)
    started = time.perf_counter()
    pks = queryset_pks(queryset)
    _warm_rows(config, queryset.db, pks, config.cache_alias, timeout, extra, chunk_size, dry_run, result.add)
    result.seconds = time.perf_counter() - started
    return result


def queryset_pks(queryset: QuerySet[Any]) -> list[Any]:
    """The primary keys of a warmer's QuerySet, in its order (its slice, ordering and filters apply)."""
    return list(queryset.values_list("pk", flat=True))


def _warm_rows(
    config: ModelCacheConfig,
    database: str,
    pks: list[Any],
    alias: str,
    timeout: Any,
    extra_tags: tuple[str, ...],
    chunk_size: int,
    dry_run: bool,
    progress: Progress,
) -> None:
    """Rows are read from `database` by pk, `chunk_size` at a time, each chunk after its lease is taken."""
    if alias != config.cache_alias:
        raise ImproperlyConfigured(
            f"{config.label} rows are cached in CACHES[{config.cache_alias!r}] (cache_model(cache=...)), "
            f"where get_cached reads them; warming them into CACHES[{alias!r}] would never be read"
        )
    core = config.core
    if timeout is DEFAULT_TIMEOUT:
        timeout = config.timeout
    manager = config.model._base_manager.using(database)
    pks = [config.normalize("pk", pk) for pk in pks]
    progress({"rows_total": len(pks)})
    for start in range(0, len(pks), chunk_size):
        chunk = pks[start : start + chunk_size]
        if dry_run:
            counts = _measure_rows(core, config, list(manager.filter(pk__in=chunk)), extra_tags)
        else:
            counts = _fill_chunk(core, config, manager, chunk, timeout, extra_tags)
        progress({**counts, "rows": len(chunk)})


def _measure_rows(
    core: Core, config: ModelCacheConfig, rows: list[Any], extra_tags: tuple[str, ...]
) -> dict[str, int]:
    """A dry run: the entries and bytes the rows would take, without a write (tags stamped as zeros)."""
    entries = size = 0
    for row in rows:
        payload = config.row_payload(row, core)
        stamps = dict.fromkeys([*config.static_tags(), *extra_tags, *config.row_tags(row)], 0)
        for key in config.keys_of(row).values():
            size += len(core.encode(payload, key, b"", stamps))
            entries += 1
    return {"entries": entries, "bytes": size}


def _fill_chunk(
    core: Core, config: Any, manager: Any, pks: list[Any], timeout: Any, extra_tags: tuple[str, ...]
) -> dict[str, int]:
    """Lease, read the rows, fill; from the lease again while writers of the model keep voiding it."""
    from .models.read import Lease, epoch_key

    def lease_plan() -> Any:
        key = epoch_key(core, config)
        epoch = yield Call(key, ("GET", key))
        stamps = yield from core.stamps([*config.static_tags(), *extra_tags], core.expiry_ms(timeout))
        return Lease(epoch, stamps)

    for _ in range(FILL_ATTEMPTS):
        lease = core.run(lease_plan(), "warm", _FAILED)
        if lease is _FAILED:
            raise WarmingError(f"the cache could not be reached while filling {config.label} rows")
        rows = list(manager.filter(pk__in=pks))  # read after the lease is taken, as get_cached does
        if not rows:
            return {}
        outcome = core.run(_fill_rows_plan(core, config, lease, rows, timeout, extra_tags), "warm", _FAILED)
        if outcome is _FAILED:
            raise WarmingError(f"the cache could not be reached while filling {config.label} rows")
        if outcome is not None:
            return outcome
    # Writers of the model kept coming: leave these rows to get_cached, which fills them on first read.
    return {"skipped": len(pks) * len(config.lookups)}


def _fill_rows_plan(
    core: Core, config: Any, lease: Any, rows: list[Any], timeout: Any, extra_tags: tuple[str, ...]
) -> PlanOf[dict[str, int] | None]:
    """`models.read.fill_plan` for many rows at once, through the same plan (`models.fill`): each step one
    batch for all the rows, every key written by compare-and-set (only over what it held when read, never
    over a queued write-behind change), nothing if a writer replaced the model's epoch since the lease
    (None is then returned)."""
    from .models.fill import RowEntries, UnchangedSinceLease, write_entries_plan
    from .models.read import epoch_key

    known = {tag: lease.stamps[tag] for tag in [*config.static_tags(), *extra_tags]}
    expiry_ms = core.expiry_ms(timeout)
    entries = [
        RowEntries(
            config,
            config.keys_of(row),
            config.row_payload(row, core),
            config.row_tags(row),
            known,
            expiry_ms,
            config.pending_key(row.pk) if config.write == "behind" else None,
        )
        for row in rows
    ]
    guard = UnchangedSinceLease(epoch_key(core, config), lease.epoch, repairable=True)
    written = yield from write_entries_plan(core, entries, guard)
    if written is None:
        return None
    counts = {"entries": 0, "bytes": 0, "batches": 1, "skipped": 0, "errors": 0}
    for target, reply in written:
        if isinstance(reply, BaseException):
            if not core.failures.check_item("warm", reply):
                counts["errors"] += 1
        elif reply == 1:
            counts["entries"] += 1
            counts["bytes"] += len(target.data or b"")
        else:
            counts["skipped"] += 1  # a writer, or a write-behind change still queued, came first
    return counts


# -- splitting into Celery tasks, and their progress --------------------------------------------------------
def task_arguments(
    entry: Warmer, *, chunk_size: int, tasks: int | None, run_id: str | None, using: str | None
) -> list[dict[str, Any]]:
    """The keyword arguments of each `django_distcache.warm` task one warmer is split into.

    A QuerySet warmer is split by primary key: its pks are read here (one query, pks only) and cut into
    chunks of `chunk_size`, one task each, so every row is read from the database once. A generator
    cannot be cut without running it, so each of its `tasks` tasks runs it and writes only the blocks its
    Chunk owns: when the warmer takes a `chunk` argument it computes only its own share; a plain one
    computes every value in every task, so it gets one task unless `tasks` says otherwise."""
    _check_chunk_size(chunk_size)
    common = {"name": entry.name, "chunk_size": chunk_size, "run_id": run_id, "using": using}
    source = None
    if entry.pages is None and not inspect.isgeneratorfunction(entry.function):
        source = entry.source(Chunk(0, 1, chunk_size))
    if isinstance(source, QuerySet):
        pks = [pk if isinstance(pk, int | str) else str(pk) for pk in queryset_pks(source)]
        chunks = [pks[start : start + chunk_size] for start in range(0, len(pks), chunk_size)] or [[]]
        return [
            {**common, "chunk_index": index, "chunk_count": len(chunks), "pks": chunk}
            for index, chunk in enumerate(chunks)
        ]
    count = tasks if tasks is not None else (4 if entry.takes_chunk else 1)
    if not is_whole(count) or count < 1:
        raise ValueError(f"tasks must be a positive integer, got {count!r}")
    return [{**common, "chunk_index": index, "chunk_count": count} for index in range(count)]


def new_run_id() -> str:
    return uuid.uuid4().hex


# A run's progress, one hash per warmer (`progress_key`), one set of fields per chunk, so that a chunk run
# again (its worker died) replaces its own figures instead of adding to a total:
#   started:<i>  how many times a task began chunk i (a chunk begun MAX_CHUNK_STARTS times is given up)
#   running:<i>  JSON of the attempt under way: its worker, a heartbeat counter bumped every
#                HEARTBEAT_SECONDS, and its counts so far
#   done:<i>     JSON of the chunk's final counts and error; a task finding it set skips the chunk
HEARTBEAT_SECONDS = 1.0
MAX_CHUNK_STARTS = 3


def progress_key(core: Core, run_id: str, name: str) -> bytes:
    return core.keys.internal(f"warm:{run_id}:{name}")


def _hash_plan(key: bytes, fields: Mapping[str, Any], delete: Iterable[str] = ()) -> PlanOf[None]:
    calls = [Call(key, ("HSET", key, *[part for pair in fields.items() for part in pair]))] if fields else []
    deleted = list(delete)
    if deleted:
        calls.append(Call(key, ("HDEL", key, *deleted)))
    calls.append(Call(key, ("EXPIRE", key, PROGRESS_TTL)))
    replies = yield calls
    for reply in replies:
        if isinstance(reply, BaseException):
            raise reply


def _begin_plan(key: bytes, index: int) -> PlanOf[tuple[bool, int]]:
    """Whether chunk `index` is done already, and how many times it has been begun (this time included)."""
    done, started, _ = yield [
        Call(key, ("HEXISTS", key, f"done:{index}")),
        Call(key, ("HINCRBY", key, f"started:{index}", 1), idempotent=False),
        Call(key, ("EXPIRE", key, PROGRESS_TTL)),
    ]
    for reply in (done, started):
        if isinstance(reply, BaseException):
            raise reply
    return bool(done), int(started)


def _read_progress_plan(key: bytes) -> PlanOf[dict[bytes, bytes]]:
    reply = yield Call(key, ("HGETALL", key))
    if isinstance(reply, dict):  # a RESP3 map
        return reply
    return dict(zip(reply[::2], reply[1::2], strict=True))  # RESP2: field, value, field, value, ...


def _record_done(
    core: Core, key: bytes, index: int, record: Mapping[str, Any], *, ends_attempt: bool = False
) -> None:
    """Write chunk `index`'s final figures (`done:<i>`); `ends_attempt`: and drop its `running:<i>`."""
    plan = _hash_plan(
        key, {f"done:{index}": json.dumps(record)}, [f"running:{index}"] if ends_attempt else ()
    )
    core.run(plan, "warm_progress")


def _counts_of(result: WarmResult) -> dict[str, int]:
    return {name: getattr(result, name) for name in _COUNTS}


@dataclass
class TaskProgress:
    """What the tasks of one warmer in one run reported so far (a hash in the warmer's cache): per chunk,
    whether it is done (with its final counts), the attempt under way, and how often it was begun."""

    done: dict[int, dict[str, Any]]
    running: dict[int, dict[str, Any]]
    started: dict[int, int]

    def counts(self) -> dict[str, int]:
        """The counts of the finished chunks plus those of the attempts under way."""
        totals = dict.fromkeys(_COUNTS, 0)
        for index in {*self.done, *self.running}:
            record = self.done.get(index) or self.running[index]  # a chunk done counts its final figures
            for name in _COUNTS:
                totals[name] += int(record.get(name, 0))
        return totals

    @property
    def error(self) -> str | None:
        errors = [
            (index, record["error"]) for index, record in sorted(self.done.items()) if record.get("error")
        ]
        return errors[0][1] if errors else None

    @property
    def chunks_done(self) -> int:
        return len(self.done)


def read_progress(core: Core, run_id: str, name: str) -> TaskProgress:
    raw = core.run(_read_progress_plan(progress_key(core, run_id, name)), "warm_progress", {}) or {}
    progress = TaskProgress({}, {}, {})
    for field_name, value in raw.items():
        text = field_name.decode() if isinstance(field_name, bytes) else field_name
        kind, _, index_text = text.partition(":")
        if not index_text.isdigit():
            continue
        index = int(index_text)
        try:
            if kind == "done":
                progress.done[index] = json.loads(value)
            elif kind == "running":
                progress.running[index] = json.loads(value)
            elif kind == "started":
                progress.started[index] = int(value)
        except ValueError:
            continue  # not written by this version: ignored rather than failing the run
    return progress


class _Heartbeat:
    """While a chunk runs, a thread writes its `running:<i>` field: at once when the chunk reports
    progress, and every HEARTBEAT_SECONDS otherwise, so that the command following the run can tell a
    slow chunk (the counter moves) from one whose worker died (it stops). The thread is the only writer
    of the field while the chunk runs, so the field never goes back to older counts."""

    def __init__(self, cache_alias: str, key: bytes, index: int, worker: str, attempt: int) -> None:
        self.alias, self.key, self.index = cache_alias, key, index
        self.state: dict[str, Any] = {
            "worker": worker,
            "attempt": attempt,
            "beat": 0,
            **dict.fromkeys(_COUNTS, 0),
        }
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(
            target=self._run, name=f"distcache-warm-heartbeat-{index}", daemon=True
        )

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(10)

    def add(self, delta: Mapping[str, int]) -> None:
        with self.lock:
            for name in _COUNTS:
                self.state[name] += delta.get(name, 0)
        self.wake.set()

    def _run(self) -> None:
        core = core_for(self.alias)  # this thread's instance (the connections are shared)
        while not self.stopping:
            with self.lock:
                self.state["beat"] += 1
                snapshot = json.dumps(self.state)
            core.run(_hash_plan(self.key, {f"running:{self.index}": snapshot}), "warm_progress")
            self.wake.wait(HEARTBEAT_SECONDS)
            self.wake.clear()


def run_task(
    name: str,
    chunk_index: int = 0,
    chunk_count: int = 1,
    chunk_size: int = CHUNK_SIZE,
    pks: list[Any] | None = None,
    run_id: str | None = None,
    using: str | None = None,
    worker: str = "",
) -> WarmResult:
    """The body of the `django_distcache.warm` Celery task: run one chunk; with `run_id`, skip it if it is
    done already (a redelivered task), report its progress and heartbeat while it runs, and its result
    when it ends; raise WarmingError if the chunk failed. Running a chunk again writes the same entries
    (computed afresh), so a chunk whose worker died mid-way is simply run again. The command passes
    `using`, so a worker that does not know the warmer can still say so in the run's hash."""
    core = core_for(using) if using else None
    try:
        entry = get_warmer(name)
    except LookupError as error:
        message = f"{error}, in the worker"
        if run_id and core is not None:
            record = {"errors": 1, "error": f"LookupError: {message}"}
            _record_done(core, progress_key(core, run_id, name), chunk_index, record)
        raise WarmingError(message) from None
    alias = using or entry.using
    core = core or core_for(alias)
    chunk = Chunk(chunk_index, chunk_count, chunk_size)
    if not run_id:
        result = run_warmer(entry, chunk_size=chunk_size, using=using, chunk=chunk, pks=pks)
        return _finish(name, chunk, result)
    key = progress_key(core, run_id, name)
    done, started = core.run(_begin_plan(key, chunk_index), "warm_progress", (False, 1))
    if done:
        logger.info("warmer %r chunk %d of run %s is done already: skipped", name, chunk_index, run_id)
        return WarmResult(name)
    if started > MAX_CHUNK_STARTS:
        message = (
            f"chunk {chunk_index} was begun {started - 1} times and never finished (its worker died each "
            "time): given up"
        )
        _record_done(core, key, chunk_index, {"errors": 1, "error": message})
        raise WarmingError(f"warmer {name!r} {message}")
    holder = f"{worker or 'worker'} (pid {os.getpid()})"
    with _Heartbeat(alias, key, chunk_index, holder, started) as heartbeat:
        result = run_warmer(
            entry, chunk_size=chunk_size, using=using, chunk=chunk, pks=pks, on_progress=heartbeat.add
        )
    record = {**_counts_of(result), "error": result.error}
    if result.errors and not result.error:
        record["error"] = f"{result.errors} entries could not be written"
    _record_done(core, key, chunk_index, record, ends_attempt=True)
    return _finish(name, chunk, result)


def _finish(name: str, chunk: Chunk, result: WarmResult) -> WarmResult:
    logger.info(
        "warmer %r chunk %d/%d: %d entries, %d bytes, %.3fs, %d errors",
        name,
        chunk.index + 1,
        chunk.count,
        result.entries,
        result.bytes,
        result.seconds,
        result.errors,
    )
    if not result.ok:
        raise WarmingError(
            f"warmer {name!r} chunk {chunk.index + 1}/{chunk.count} failed: "
            f"{result.error or f'{result.errors} entries could not be written'}"
        )
    return result
