"""Cache keys in one place, so the views that fill them and the signals that clear them agree."""

LIST_KEY = "catalogue:list"
PRODUCT_PREFIX = "catalogue:product:"
CATEGORY_PREFIX = "catalogue:category:"


def product_key(slug: str) -> str:
    return f"{PRODUCT_PREFIX}{slug}"


def category_key(slug: str) -> str:
    return f"{CATEGORY_PREFIX}{slug}"
