"""Catalogue pages, each read through the cache and footed with whether it was a hit or a miss.

Every entry is stored with tags (see keys.py) through get_or_set, which reads the tags' versions before
it loads from the database: an invalidation that lands while a page is being built makes that entry miss
at once, instead of hiding it until its timeout.
"""

from collections.abc import Callable
from functools import partial
from time import perf_counter
from typing import Any

from django.core.cache import cache
from django.db.models import Count, Prefetch, Q
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render

from django_distcache import invalidate_tags

from .keys import (
    LIST_KEY,
    category_key,
    category_tags,
    list_tags,
    product_key,
    product_tag,
    product_tags,
)
from .models import Category, Product

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


def load_product(slug: str) -> dict[str, Any]:
    """A product as a plain dict; raises Http404, which get_or_set lets through uncached."""
    product = get_object_or_404(Product.objects.select_related("category"), slug=slug)
    return {
        "id": product.id,
        "name": product.name,
        "slug": product.slug,
        "description": product.description,
        "price": str(product.price),
        "stock": product.stock,
        "views": product.views,
        "updated_at": product.updated_at.isoformat(timespec="seconds"),
        "category": {
            "id": product.category_id,
            "name": product.category.name,
            "slug": product.category.slug,
        },
    }


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
    """A hit costs one cache read. The tags name the product's and its category's primary keys, which
    the URL does not carry, so a miss looks them up first (one indexed query) and then builds the page."""
    key = product_key(slug)
    start = perf_counter()
    product, built, what = cache.get(key), False, f"{key}, TTL {PRODUCT_TIMEOUT} s"
    if product is None:
        ids = Product.objects.filter(slug=slug).values_list("pk", "category_id").first()
        if ids is None:
            raise Http404("No product has this slug.")
        pk, category_pk = ids
        tags = product_tags(pk, category_pk)
        product, built = cached(key, lambda: load_product(slug), PRODUCT_TIMEOUT, tags)
        if (product["id"], product["category"]["id"]) != (pk, category_pk):
            # The row moved (or its slug passed to another product) between the lookup and the load: the
            # entry just stored carries the wrong tags. Invalidating product:<pk>, whose version the entry
            # was stamped with before the load, kills it; this response still shows the fresh row.
            invalidate_tags(product_tag(pk))
        what += f", tags {', '.join(tags)}"
    context = {"product": product, "cache_info": footer("miss" if built else "hit", start, what)}
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
