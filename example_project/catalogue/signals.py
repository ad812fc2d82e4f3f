"""Drop cached pages when the rows behind them change, after the transaction commits.

Readers that miss between the write and the commit would otherwise re-cache the old rows.
"""

from collections.abc import Callable
from typing import Any

from django.core.cache import cache
from django.db import models, transaction
from django.db.models.signals import post_delete, post_save, pre_save

from .keys import LIST_KEY, category_key, product_key
from .models import Category, Product


def product_keys(product: Product) -> set[str]:
    """A product shows up in the list, on its own page and in its category's count."""
    return {LIST_KEY, product_key(product.slug), category_key(product.category.slug)}


def category_keys(category: Category) -> set[str]:
    """A category's name is also on each of its products' pages."""
    slugs = category.products.values_list("slug", flat=True)
    return {LIST_KEY, category_key(category.slug), *map(product_key, slugs)}


KEYS_FOR: dict[type[models.Model], Callable[[Any], set[str]]] = {
    Product: product_keys,
    Category: category_keys,
}


def remember_old_keys(sender: type[models.Model], instance: models.Model, **kwargs: Any) -> None:
    """A changed slug or category leaves the old keys stale too, so note them before the row changes."""
    old = None if instance._state.adding else sender._default_manager.filter(pk=instance.pk).first()
    instance._stale_cache_keys = KEYS_FOR[sender](old) if old else set()


def invalidate(sender: type[models.Model], instance: models.Model, **kwargs: Any) -> None:
    """Delete the row's current and previous keys in one delete_many, once the write is committed."""
    keys = KEYS_FOR[sender](instance) | getattr(instance, "_stale_cache_keys", set())
    transaction.on_commit(lambda: cache.delete_many(sorted(keys)), using=kwargs.get("using"))


def connect() -> None:
    """Called from CatalogueConfig.ready; dispatch_uid keeps a second call from doubling the receivers."""
    for model in KEYS_FOR:
        pre_save.connect(remember_old_keys, sender=model, dispatch_uid=f"catalogue-old-keys-{model.__name__}")
        post_save.connect(invalidate, sender=model, dispatch_uid=f"catalogue-save-{model.__name__}")
        post_delete.connect(invalidate, sender=model, dispatch_uid=f"catalogue-delete-{model.__name__}")
