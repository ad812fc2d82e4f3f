"""Cache keys and tags in one place, so the views that fill entries and the signals that invalidate them agree.

Every entry carries the tag `catalogue` (seed_catalogue invalidates it to drop the whole catalogue) and
the tags of the rows it shows, by primary key:

    list page                  catalogue, catalogue:list
    product page (by slug)     catalogue, product:<pk>, category:<category pk>
    category summary           catalogue, category:<pk>

A saved or deleted product invalidates product:<pk>, category:<pk> of its old and new category, and
catalogue:list; a saved or deleted category invalidates category:<pk> and catalogue:list.
"""

ALL_TAG = "catalogue"
LIST_TAG = "catalogue:list"

LIST_KEY = "catalogue:list"
PRODUCT_PREFIX = "catalogue:product:"
CATEGORY_PREFIX = "catalogue:category:"


def product_key(slug: str) -> str:
    return f"{PRODUCT_PREFIX}{slug}"


def category_key(pk: int) -> str:
    return f"{CATEGORY_PREFIX}{pk}"


def product_tag(pk: int) -> str:
    return f"product:{pk}"


def category_tag(pk: int) -> str:
    return f"category:{pk}"


def list_tags() -> list[str]:
    return [ALL_TAG, LIST_TAG]


def product_tags(pk: int, category_pk: int) -> list[str]:
    """A product page shows the product and its category's name."""
    return [ALL_TAG, product_tag(pk), category_tag(category_pk)]


def category_tags(pk: int) -> list[str]:
    return [ALL_TAG, category_tag(pk)]
