"""Invalidate what a changed row's own tag does not cover, once its transaction commits.

Product and Category are registered with django_distcache's model caching, whose write-through already
invalidates a saved or deleted row's tag (`catalogue.product:<pk>`, `catalogue.category:<pk>`) after the
commit: that refreshes the pages showing the row (see keys.py). What it cannot know is which pages show
*sets* of rows: the list page, and the summary of a category, which counts its products. Those are
invalidated here. A product that moves to another category changes both categories' summaries.

Invalidating before the commit would let a reader that misses in between re-cache the old rows. An
unreachable cache makes invalidate_tags raise rather than drop the invalidation silently.
"""

from typing import Any

from django.db import transaction
from django.db.models.signals import post_delete, post_save, pre_save

from django_distcache import invalidate_tags

from .keys import LIST_TAG, category_tag
from .models import Category, Product


def invalidate_on_commit(tags: set[str], using: str | None) -> None:
    transaction.on_commit(lambda: invalidate_tags(*sorted(tags)), using=using)


def remember_old_category(sender: type[Product], instance: Product, **kwargs: Any) -> None:
    """A product that moves leaves its old category's summary stale too: note that category first."""
    old = None
    if not instance._state.adding:
        old = sender._default_manager.filter(pk=instance.pk).values_list("category_id", flat=True).first()
    instance._old_category_id = old


def product_changed(sender: type[Product], instance: Product, **kwargs: Any) -> None:
    tags = {LIST_TAG, category_tag(instance.category_id)}
    old_category_id = getattr(instance, "_old_category_id", None)
    if old_category_id is not None:
        tags.add(category_tag(old_category_id))
    invalidate_on_commit(tags, kwargs.get("using"))


def category_changed(sender: type[Category], instance: Category, **kwargs: Any) -> None:
    """The list page shows every category's name; the write-through covers the category's own pages."""
    invalidate_on_commit({LIST_TAG}, kwargs.get("using"))


def connect() -> None:
    """Called from CatalogueConfig.ready; dispatch_uid keeps a second call from doubling the receivers."""
    pre_save.connect(remember_old_category, sender=Product, dispatch_uid="catalogue-old-category")
    for model, receiver in ((Product, product_changed), (Category, category_changed)):
        post_save.connect(receiver, sender=model, dispatch_uid=f"catalogue-save-{model.__name__}")
        post_delete.connect(receiver, sender=model, dispatch_uid=f"catalogue-delete-{model.__name__}")
