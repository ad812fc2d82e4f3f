"""The catalogue: categories of products, kept deliberately plain, and each product's view counter.

Categories and products are cached by django_distcache's model caching (`get_cached` by pk or slug);
saving or deleting one through the ORM replaces its cached row once the transaction commits
(write-through). The view counter changes on every page view, so it is written behind: the cache takes
each new count at once, and a drain (Celery beat, see shop/celery.py) writes the counts to the database in
batches.
"""

from django.db import models
from django.urls import reverse

import django_distcache


@django_distcache.cache_model(lookups=("pk", "slug"), timeout=3600)
class Category(models.Model):
    name = models.CharField(max_length=100)
    slug = models.SlugField(max_length=100, unique=True)

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "categories"

    def __str__(self) -> str:
        return self.name


@django_distcache.cache_model(lookups=("pk", "slug"), timeout=3600)
class Product(models.Model):
    category = models.ForeignKey(Category, on_delete=models.CASCADE, related_name="products")
    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=200, unique=True)
    description = models.TextField(blank=True)
    price = models.DecimalField(max_digits=10, decimal_places=2)
    stock = models.PositiveIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return reverse("catalogue:product_detail", args=[self.slug])


@django_distcache.cache_model(lookups=("pk",), write="behind", timeout=3600)
class ProductViews(models.Model):
    """How many times a product's page was viewed: one row per product, its primary key the product's.

    A row of its own rather than a field of Product: Product is written through, so every save of it
    rewrites its cached row and refreshes the pages that show it, too much for each page view."""

    product = models.OneToOneField(
        Product, on_delete=models.CASCADE, primary_key=True, related_name="page_views"
    )
    views = models.PositiveIntegerField(default=0)

    class Meta:
        verbose_name_plural = "product views"

    def __str__(self) -> str:
        return f"{self.views} views of product {self.product_id}"
