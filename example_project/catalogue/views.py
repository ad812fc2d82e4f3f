"""Catalogue pages, each footed with how it was served: from the cache (a hit), built and cached (a miss), or
built without caching.

The product list and each product's page are whole responses cached by django_distcache's `cached_view`,
tagged (see keys.py): the tags' versions are read before the page renders, so an invalidation that lands
while a page is being built makes that entry miss at once instead of hiding it until its timeout. What
changes on every request stays out of the cached page: thin outer views fill in the footer's badge, and
on a product's page its view count, which `incr_behind` writes behind. The categories page caches its
parts with get_or_set instead, one entry per category.
"""

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from time import perf_counter
from typing import Any

from django.core.cache import cache
from django.db.models import Count, Prefetch, Q
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils.html import format_html

from django_distcache import cached_view, get_cached, incr_behind, invalidate_tags
from django_distcache.cache import CacheUnavailable
from django_distcache.warming import is_warming_request

from .keys import category_key, category_tags, list_tags, product_row_tag, product_tags
from .models import Category, Product, ProductViews

logger = logging.getLogger(__name__)

LIST_TIMEOUT = 60
PRODUCT_TIMEOUT = 300
CATEGORY_TIMEOUT = 300


def cached(key: str, build: Callable[[], Any], timeout: int, tags: list[str]) -> tuple[Any, bool]:
    """cache.get_or_set with tags; also returns whether build ran (a miss)."""
    built = False

    def tracked() -> Any:
        nonlocal built
        built = True
        return build()

    return cache.get_or_set(key, tracked, timeout=timeout, tags=tags), built


def footer(status: str, start: float, what: str) -> dict[str, Any]:
    return {"status": status, "ms": (perf_counter() - start) * 1000, "what": what}


# The cached pages hold these markers where a request's own part goes (see the templates).
BADGE_SLOT = b"<!--cache-badge-->"
VIEWS_SLOT = b"<!--views-->"
SERVED = {
    "hit": "served from the cache",
    "miss": "built from the database and cached",
    "pass": "built from the database, not cacheable",
    "bypass": "built for you (signed-in users get pages of their own)",
}


def fill(response: HttpResponse, slot: bytes, text: str) -> None:
    response.content = response.content.replace(slot, text.encode(), 1)


def with_badge(response: HttpResponse, start: float) -> HttpResponse:
    """Fill in how `response` was served: cached_view says it in `response.cache_status`.

    The page now differs from the cached one in its footer only, so its ETag (a hash of the cached
    content) becomes a weak one: "the same page", not "the same bytes". A 304 has no body to fill."""
    status = getattr(response, "cache_status", "miss")
    if response.status_code == 200 and not response.streaming:
        ms = (perf_counter() - start) * 1000
        badge = format_html(
            '<span class="badge {}">cache {}</span> {} in {} ms', status, status, SERVED[status], f"{ms:.2f}"
        )
        fill(response, BADGE_SLOT, badge)
    etag = response.get("ETag")
    if etag and not etag.startswith("W/"):
        response["ETag"] = "W/" + etag
    return response


def page_info(start: float, what: str) -> dict[str, Any]:
    """The footer's note, cached with the page: when and how fast it was built, and its cache entry."""
    built_at = datetime.now(UTC).strftime("%H:%M:%S UTC")
    return {"ms": (perf_counter() - start) * 1000, "built_at": built_at, "what": what}


def build_catalogue() -> list[dict[str, Any]]:
    """The whole front page in one query pair, as plain data so any serializer can store it."""
    listed = Product.objects.only("id", "name", "slug", "price", "category_id")
    products = Prefetch("products", queryset=listed)
    return [
        {
            "name": category.name,
            "slug": category.slug,
            "products": [
                {"id": p.id, "name": p.name, "slug": p.slug, "price": str(p.price)}
                for p in category.products.all()
            ],
        }
        for category in Category.objects.prefetch_related(products)
    ]


def find_product(slug: str) -> Product:
    """The product with this slug from the model cache (one read when cached), else Http404."""
    try:
        return get_cached(Product, slug=slug)
    except Product.DoesNotExist:
        raise Http404("No product has this slug.") from None


def build_product_page(slug: str) -> dict[str, Any]:
    """A product page's data as a plain dict, from the rows the model cache holds. After an admin edit the
    write-through has already stored the new row, so the rebuild reads no SQL for it. Raises Http404,
    which get_or_set lets through uncached."""
    product = find_product(slug)
    try:
        category = get_cached(Category, pk=product.category_id)
    except Category.DoesNotExist:  # deleted since the product was read: so is the product (cascade)
        raise Http404("No product has this slug.") from None
    return {
        "id": product.id,
        "name": product.name,
        "slug": product.slug,
        "description": product.description,
        "price": str(product.price),
        "stock": product.stock,
        "updated_at": product.updated_at.isoformat(timespec="seconds"),
        "category": {"id": category.id, "name": category.name, "slug": category.slug},
    }


# Products whose counter row this process knows to exist (bounded: cleared when full).
_COUNTED: set[int] = set()
_COUNTED_MAX = 10_000


def count_view(product_id: int) -> int | None:
    """Add one to the product's view count and return it; None if the cache cannot take the count.

    The counter is written behind: `incr_behind` adds one in the cache at once, atomically, queues the
    increment and returns the new count, in one round trip; a drain (the Celery beat task, see
    shop/celery.py) adds the queued increments to the database in batches. No view is lost, however many
    requests count the same product at once. Write-behind changes rows that exist, so the first view of
    a product (in this process) makes sure its counter row does."""
    try:
        if product_id not in _COUNTED:
            try:
                get_cached(ProductViews, pk=product_id)
            except ProductViews.DoesNotExist:
                ProductViews.objects.get_or_create(product_id=product_id)
            if len(_COUNTED) >= _COUNTED_MAX:
                _COUNTED.clear()
            _COUNTED.add(product_id)
        views = incr_behind(ProductViews, product_id, "views")
        if views is None:  # the row is not in the cache (it is read once, then it is)
            views = get_cached(ProductViews, pk=product_id).views
    except CacheUnavailable as error:
        logger.warning("view of product %s not counted: %s", product_id, error)
        return None
    return views


def summarise_category(pk: int) -> dict[str, Any] | None:
    """One category's name and counts in one aggregate query; None if it has just been deleted."""
    return (
        Category.objects.filter(pk=pk)
        .annotate(
            product_count=Count("products"),
            in_stock=Count("products", filter=Q(products__stock__gt=0)),
        )
        .values("name", "slug", "product_count", "in_stock")
        .first()
    )


@cached_view(timeout=LIST_TIMEOUT, tags=list_tags(), query_params=())
def product_list_page(request: HttpRequest) -> HttpResponse:
    """The front page. No query parameter changes it, so `query_params=()` keeps every variant of its URL
    (`/?utm_source=...`) on one cache entry."""
    start = perf_counter()
    categories = build_catalogue()
    what = f"whole page, TTL {LIST_TIMEOUT} s, tags {', '.join(list_tags())}"
    return render(
        request,
        "catalogue/product_list.html",
        {"categories": categories, "page_info": page_info(start, what)},
    )


def product_list(request: HttpRequest) -> HttpResponse:
    start = perf_counter()
    return with_badge(product_list_page(request), start)


def product_page_tags(request: HttpRequest, slug: str, product: Product) -> list[str]:
    return product_tags(product.pk, product.category_id)


@cached_view(timeout=PRODUCT_TIMEOUT, tags=product_page_tags, query_params=())
def product_page(request: HttpRequest, slug: str, product: Product) -> HttpResponse:
    """A product's page without its view count. `product` is the row product_detail read to name the page's
    tags (their primary keys are not in the URL); the page itself is built from rows read afresh, after
    cached_view read the tags' versions, from the model cache: after an admin edit the write-through has
    already stored the new row, so the rebuild reads no SQL for it."""
    start = perf_counter()
    page = build_product_page(slug)
    if (page["id"], page["category"]["id"]) != (product.pk, product.category_id):
        # The row moved (or its slug passed to another product) since product_detail read it: this page is
        # about to be stored under the wrong tags. Invalidating the product's row tag, whose version was
        # read before this render, makes the entry born stale; this response still shows the new row.
        invalidate_tags(product_row_tag(product.pk))
    tags = product_tags(product.pk, product.category_id)
    what = f"whole page, TTL {PRODUCT_TIMEOUT} s, tags {', '.join(tags)}"
    return render(
        request, "catalogue/product_detail.html", {"product": page, "page_info": page_info(start, what)}
    )


def product_detail(request: HttpRequest, slug: str) -> HttpResponse:
    """The cached page with this request's view count filled in. A hit costs one read of the product row
    (for the tags and the counter) and one of the page, plus the count.

    The count changes on every view, so the page has no validator: no ETag, and no 304."""
    product = find_product(slug)
    request.META.pop("HTTP_IF_NONE_MATCH", None)
    start = perf_counter()
    response = with_badge(product_page(request, slug, product), start)
    del response["ETag"]
    if response.status_code == 200:
        # A warming visit (manage.py warmcache) stores the page; it is nobody's view.
        views = None if is_warming_request(request) else count_view(product.pk)
        fill(response, VIEWS_SLOT, "–" if views is None else str(views))
    return response


def category_list(request: HttpRequest) -> HttpResponse:
    """One small query for the primary keys, then every summary in one cache round trip.

    Each summary has a tag of its own, so the ones that missed are built one by one through get_or_set
    (after a product edit, that is the one category it belongs to).
    """
    pks = list(Category.objects.values_list("pk", flat=True))
    start = perf_counter()
    found = cache.get_many([category_key(pk) for pk in pks])
    summaries, built = [], []
    for pk in pks:
        key = category_key(pk)
        if key in found:
            summary = found[key]
        else:
            build = partial(summarise_category, pk)
            summary, was_built = cached(key, build, CATEGORY_TIMEOUT, category_tags(pk))
            if was_built and summary is not None:
                built.append(summary["slug"])
        if summary is not None:
            summaries.append(summary)
    status = "miss" if built and len(built) == len(pks) else ("partial" if built else "hit")
    what = f"{len(pks)} category keys, {len(built)} built" + (f": {', '.join(built)}" if built else "")
    context = {"categories": summaries, "cache_info": footer(status, start, what)}
    return render(request, "catalogue/category_list.html", context)
