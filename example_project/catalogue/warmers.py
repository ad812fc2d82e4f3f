"""The shop's cache warmers, found by `manage.py warmcache` (`make demo` runs them after seeding).

Every category and product row is cached under its pk and its slug, as `get_cached` would store it
after a miss, so the first visitors after a deploy or a flush find the catalogue in the cache. Run them
again any time: `python manage.py warmcache --all`, or `--async` to let the Celery worker do it.
"""

import django_distcache

from .models import Category, Product


@django_distcache.warmer("catalogue-categories")
def categories():
    return Category.objects.all()


@django_distcache.warmer("catalogue-products")
def products():
    return Product.objects.all()
