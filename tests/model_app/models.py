"""Models for the model-caching tests (tables created without migrations)."""

from django.db import models

import django_distcache


class Label(models.Model):
    name = models.CharField(max_length=50, unique=True)


@django_distcache.cache_model(lookups=("pk", "slug"), timeout=600, tags=("catalogue",))
class Product(models.Model):
    name = models.CharField(max_length=100)
    slug = models.SlugField(unique=True)
    price = models.DecimalField(max_digits=8, decimal_places=2, default=0)
    stock = models.IntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)
    labels = models.ManyToManyField(Label, blank=True)


@django_distcache.cache_model(lookups=("pk",), write="behind", timeout=600)
class PageCounter(models.Model):
    name = models.CharField(max_length=50)
    views = models.IntegerField(default=0)
    note = models.CharField(max_length=20, default="")
    code = models.CharField(max_length=20, unique=True, null=True, blank=True)


class Uncached(models.Model):
    name = models.CharField(max_length=20)
