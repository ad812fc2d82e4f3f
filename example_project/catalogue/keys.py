"""Cache keys and tags in one place, so the views that fill entries and the code that invalidates them agree.

Every cached page carries the tag `catalogue` (seed_catalogue invalidates it to drop the whole catalogue)
and the tags of what it shows:

    list page                  catalogue, catalogue:list
    product page (by slug)     catalogue, catalogue.product:<pk>, catalogue.category:<category pk>
    category summary           catalogue, catalogue.category:<pk>, category:<pk>

The list and product pages are whole responses cached by `cached_view`, under keys it makes from the URL;
the category summaries are entries of their own (`category_key`).

`catalogue.product:<pk>` and `catalogue.category:<pk>` are the row tags of django_distcache's model
caching: the write-through invalidates them itself when a product or category is saved or deleted. The
rest says what a row's own tag cannot, and signals.py invalidates it: `category:<pk>` stands for the set
of products in a category (a product saved or deleted invalidates that of its old and new category), and
`catalogue:list` for the list page (any product or category saved or deleted).

So an admin edit of a product rebuilds its page, its category's summary and the list, and no other product's
page; an edit of a category rebuilds its summary, the list and the pages of its products.
"""

ALL_TAG = "catalogue"
LIST_TAG = "catalogue:list"

CATEGORY_PREFIX = "catalogue:category:"


def category_key(pk: int) -> str:
    return f"{CATEGORY_PREFIX}{pk}"


def product_row_tag(pk: int) -> str:
    """The tag the model cache's write-through invalidates when product <pk> is saved or deleted."""
    return f"catalogue.product:{pk}"


def category_row_tag(pk: int) -> str:
    """The tag the model cache's write-through invalidates when category <pk> is saved or deleted."""
    return f"catalogue.category:{pk}"


def category_tag(pk: int) -> str:
    """The products of category <pk>: invalidated by signals.py when one of them is saved or deleted."""
    return f"category:{pk}"


def list_tags() -> list[str]:
    return [ALL_TAG, LIST_TAG]


def product_tags(pk: int, category_pk: int) -> list[str]:
    """A product page shows the product and its category's name."""
    return [ALL_TAG, product_row_tag(pk), category_row_tag(category_pk)]


def category_tags(pk: int) -> list[str]:
    """A category summary shows the category's name and counts of its products."""
    return [ALL_TAG, category_row_tag(pk), category_tag(pk)]
