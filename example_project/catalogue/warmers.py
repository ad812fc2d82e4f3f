"""The shop's cache warmers, found by `manage.py warmcache` (`make demo` runs them after seeding).

Every category and product row is cached under its pk and its slug, as `get_cached` would store it
after a miss, and the shop's pages are requested once, so that the first visitors after a deploy or a
flush find the catalogue and its pages in the cache. Run them again any time: `python manage.py
warmcache --all`, or `--async` to let the Celery worker do it.
"""

import os

from django.urls import reverse

import django_distcache

from .models import Category, Product


@django_distcache.warmer("catalogue-categories")
def categories():
    return Category.objects.all()


@django_distcache.warmer("catalogue-products")
def products():
    return Product.objects.all()


# The Host header is part of a cached page's key: warm pages for the host (and port) visitors use. `make
# demo` serves http://127.0.0.1:8000/; set DISTCACHE_SHOP_HOST to where the shop really answers.
SHOP_HOST = os.environ.get("DISTCACHE_SHOP_HOST", "127.0.0.1:8000")


@django_distcache.page_warmer("catalogue-pages", host=SHOP_HOST)
def pages():
    """The pages visitors land on first: the product list, the categories and every product's page, each
    requested as an anonymous visitor's GET, so that the first real visit of each is a cache hit."""
    yield reverse("catalogue:product_list")
    yield reverse("catalogue:category_list")
    for slug in Product.objects.order_by("pk").values_list("slug", flat=True):
        yield reverse("catalogue:product_detail", args=[slug])
