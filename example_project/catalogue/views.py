"""Catalogue pages, each read through the cache and footed with whether it was a hit or a miss."""

from collections.abc import Callable
from time import perf_counter
from typing import Any

from django.core.cache import cache
from django.db.models import Count, Prefetch, Q
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render

from .keys import CATEGORY_PREFIX, LIST_KEY, category_key, product_key
from .models import Category, Product

LIST_TIMEOUT = 60
PRODUCT_TIMEOUT = 300


def cached(key: str, build: Callable[[], Any], timeout: int) -> tuple[Any, dict[str, Any]]:
    """cache.get_or_set, noting whether build ran so the footer can say hit or miss."""
    built = False

    def tracked() -> Any:
        nonlocal built
        built = True
        return build()

    start = perf_counter()
    value = cache.get_or_set(key, tracked, timeout=timeout)
    elapsed_ms = (perf_counter() - start) * 1000
    return value, {"status": "miss" if built else "hit", "ms": elapsed_ms, "what": f"{key}, TTL {timeout} s"}


def get_many_or_set(
    keys: list[str], factory: Callable[[list[str]], dict[str, Any]]
) -> tuple[dict[str, Any], list[str]]:
    """Use the backend's get_many_or_set, or get_many + set_many on caches without it (LocMem).

    Returns the values and the keys the factory had to build.
    """
    built: list[str] = []

    def tracked(missing: list[str]) -> dict[str, Any]:
        built.extend(missing)
        return factory(list(missing))

    native = getattr(cache, "get_many_or_set", None)
    if native is not None:
        return native(keys, tracked), built
    found = cache.get_many(keys)
    missing = [key for key in keys if key not in found]
    if missing:
        fresh = tracked(missing)
        cache.set_many(fresh)
        found.update(fresh)
    return found, built


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
        "category": {"name": product.category.name, "slug": product.category.slug},
    }


def build_category_summaries(keys: list[str]) -> dict[str, dict[str, Any]]:
    """Summaries for just the missing categories, in a single aggregate query."""
    by_slug = {key.removeprefix(CATEGORY_PREFIX): key for key in keys}
    rows = (
        Category.objects.filter(slug__in=by_slug)
        .annotate(
            product_count=Count("products"),
            in_stock=Count("products", filter=Q(products__stock__gt=0)),
        )
        .values("name", "slug", "product_count", "in_stock")
    )
    return {by_slug[row["slug"]]: row for row in rows}


def product_list(request: HttpRequest) -> HttpResponse:
    categories, cache_info = cached(LIST_KEY, build_catalogue, LIST_TIMEOUT)
    context = {"categories": categories, "cache_info": cache_info}
    return render(request, "catalogue/product_list.html", context)


def product_detail(request: HttpRequest, slug: str) -> HttpResponse:
    product, cache_info = cached(product_key(slug), lambda: load_product(slug), PRODUCT_TIMEOUT)
    return render(request, "catalogue/product_detail.html", {"product": product, "cache_info": cache_info})


def category_list(request: HttpRequest) -> HttpResponse:
    """One small query for the slugs, then every summary in one cache round trip."""
    keys = [category_key(slug) for slug in Category.objects.values_list("slug", flat=True)]
    start = perf_counter()
    summaries, built = get_many_or_set(keys, build_category_summaries)
    elapsed_ms = (perf_counter() - start) * 1000
    status = "miss" if len(built) == len(keys) and keys else ("partial" if built else "hit")
    what = f"{len(keys)} category keys, {len(built)} built"
    cache_info = {"status": status, "ms": elapsed_ms, "what": what}
    categories = [summaries[key] for key in keys if key in summaries]
    context = {"categories": categories, "cache_info": cache_info}
    return render(request, "catalogue/category_list.html", context)
