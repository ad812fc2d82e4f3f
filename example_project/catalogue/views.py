"""Catalogue pages, each read through the cache and footed with whether it was a hit or a miss.

Every page entry is stored with tags (see keys.py) through get_or_set, which reads the tags' versions
before it builds the page: an invalidation that lands while a page is being built makes that entry miss at
once, instead of hiding it until its timeout. The product page is built from rows of django_distcache's
model cache (`get_cached`) and counts its views with `save_behind`.
"""

import logging
from collections.abc import Callable
from functools import partial
from time import perf_counter
from typing import Any

from django.core.cache import cache
from django.db.models import Count, Prefetch, Q
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render

from django_distcache import get_cached, invalidate_tags, save_behind
from django_distcache.cache import CacheUnavailable

from .keys import (
    LIST_KEY,
    category_key,
    category_tags,
    list_tags,
    product_key,
    product_row_tag,
    product_tags,
)
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


def count_view(product_id: int) -> int | None:
    """Add one to the product's view count and return it; None if the cache cannot take the count.

    The counter is written behind: get_cached reads it from the cache, save_behind stores the new count
    there at once and queues it, and a drain (the Celery beat task, see shop/celery.py) writes the queued
    counts to the database in batches. Two requests counting the same product at the same instant may
    store the same number (the later write wins), a loss a view counter can afford."""
    try:
        counter = get_cached(ProductViews, pk=product_id)
    except ProductViews.DoesNotExist:
        # The first view: write-behind queues changes of rows that exist, so the row is created now.
        counter, _ = ProductViews.objects.get_or_create(product_id=product_id)
    counter.views += 1
    try:
        save_behind(counter, update_fields=["views"])
    except CacheUnavailable as error:
        logger.warning("view of product %s not counted: %s", product_id, error)
        return None
    return counter.views


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


def product_list(request: HttpRequest) -> HttpResponse:
    start = perf_counter()
    categories, built = cached(LIST_KEY, build_catalogue, LIST_TIMEOUT, list_tags())
    what = f"{LIST_KEY}, TTL {LIST_TIMEOUT} s, tags {', '.join(list_tags())}"
    context = {"categories": categories, "cache_info": footer("miss" if built else "hit", start, what)}
    return render(request, "catalogue/product_list.html", context)


def product_detail(request: HttpRequest, slug: str) -> HttpResponse:
    """A hit costs one cache read, plus the view count. The tags name the product's and its category's
    primary keys, which the URL does not carry, so a miss first reads the product by slug from the model
    cache, then builds the page."""
    key = product_key(slug)
    start = perf_counter()
    product, built, what = cache.get(key), False, f"{key}, TTL {PRODUCT_TIMEOUT} s"
    if product is None:
        found = find_product(slug)
        pk, category_pk = found.pk, found.category_id
        tags = product_tags(pk, category_pk)
        product, built = cached(key, lambda: build_product_page(slug), PRODUCT_TIMEOUT, tags)
        if (product["id"], product["category"]["id"]) != (pk, category_pk):
            # The row moved (or its slug passed to another product) between the lookup and the build: the
            # entry just stored carries the wrong tags. Invalidating the product's row tag, whose version
            # the entry was stamped with before the build, kills it; this response still shows the new row.
            invalidate_tags(product_row_tag(pk))
        what += f", tags {', '.join(tags)}"
    cache_info = footer("miss" if built else "hit", start, what)  # the page's read, not the count's
    context = {"product": product, "views": count_view(product["id"]), "cache_info": cache_info}
    return render(request, "catalogue/product_detail.html", context)


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
