"""The database's side of write-behind: per row, the newest queued change already applied to it."""

from __future__ import annotations

from django.db import models


class BehindApplied(models.Model):
    """One row per row ever written behind. A drain locks these rows inside its transaction and applies a
    change only if its stream id is newer than `stream_id`, so a change applied twice (a drain killed
    between its commit and the stream's cleanup, or two drains after a lost lock) changes nothing the
    second time, and a row never moves back to an older value."""

    model: models.CharField[str, str] = models.CharField(max_length=100)
    pk_value: models.CharField[str, str] = models.CharField(max_length=255)
    # "<milliseconds>-<sequence>", both zero-padded to 20 digits, so text order is stream order.
    stream_id: models.CharField[str, str] = models.CharField(max_length=41)

    class Meta:
        app_label = "django_distcache"
        db_table = "django_distcache_behindapplied"
        constraints = [models.UniqueConstraint(fields=["model", "pk_value"], name="distcache_behind_row")]

    def __str__(self) -> str:
        return f"{self.model} pk={self.pk_value} applied up to {self.stream_id}"
