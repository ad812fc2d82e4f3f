from django.db import models


class Gadget(models.Model):
    """A model whose second migration adds a field: its cache keys must change with it."""

    name = models.CharField(max_length=50)
    color = models.CharField(max_length=20, default="black")

    class Meta:
        app_label = "versioned_app"
