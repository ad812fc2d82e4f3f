"""Invalidate the tags of a changed row once its transaction commits.

Invalidating before the commit would let a reader that misses in between re-cache the old row. Each tag
costs one SET whatever it covers, so a product edit refreshes its page, its category's summary (old and
new, if it moved) and the list page, however many keys those are. An unreachable cache makes
invalidate_tags raise rather than drop the invalidation silently.
"""

from typing import Any

from django.db import transaction
from django.db.models.signals import post_delete, post_save, pre_save

from django_distcache import invalidate_tags

from .keys import LIST_TAG, category_tag, product_tag
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
    tags = {LIST_TAG, product_tag(instance.pk), category_tag(instance.category_id)}
    old_category_id = getattr(instance, "_old_category_id", None)
    if old_category_id is not None:
        tags.add(category_tag(old_category_id))
    invalidate_on_commit(tags, kwargs.get("using"))


def category_changed(sender: type[Category], instance: Category, **kwargs: Any) -> None:
    """A category's pages carry its tag: its summary and its products' pages (which show its name)."""
    invalidate_on_commit({LIST_TAG, category_tag(instance.pk)}, kwargs.get("using"))


def connect() -> None:
    """Called from CatalogueConfig.ready; dispatch_uid keeps a second call from doubling the receivers."""
    pre_save.connect(remember_old_category, sender=Product, dispatch_uid="catalogue-old-category")
    for model, receiver in ((Product, product_changed), (Category, category_changed)):
        post_save.connect(receiver, sender=model, dispatch_uid=f"catalogue-save-{model.__name__}")
        post_delete.connect(receiver, sender=model, dispatch_uid=f"catalogue-delete-{model.__name__}")
