"""Versioned keys: a migration changes a model's fingerprint, so its old cache entries are never returned."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.forms.models import model_to_dict

from django_distcache.versioning import model_fingerprint, model_key
from tests.versioned_app.models import Gadget


def _model_at(migration: str):
    executor = MigrationExecutor(connection)
    return executor.loader.project_state(("versioned_app", migration)).apps.get_model(
        "versioned_app", "Gadget"
    )


@pytest.mark.django_db(transaction=True)
def test_a_migration_that_adds_a_field_makes_old_entries_miss_without_a_flush(cache):
    call_command("migrate", "versioned_app", "0001", verbosity=0)
    try:
        OldGadget = _model_at("0001_initial")
        gadget = OldGadget.objects.create(name="lamp")
        cache.set(model_key(OldGadget, gadget.pk), model_to_dict(gadget))
        assert cache.get(model_key(OldGadget, gadget.pk)) == {"id": gadget.pk, "name": "lamp"}

        call_command("migrate", "versioned_app", verbosity=0)  # adds Gadget.color
        assert model_fingerprint(Gadget) != model_fingerprint(OldGadget)
        # The code now runs with the new model: the entry cached under the old shape is never returned.
        assert cache.get(model_key(Gadget, gadget.pk)) is None
        fresh = Gadget.objects.get(pk=gadget.pk)
        cache.set(model_key(Gadget, fresh.pk), model_to_dict(fresh))
        assert cache.get(model_key(Gadget, fresh.pk)) == {"id": gadget.pk, "name": "lamp", "color": "black"}
    finally:
        call_command("migrate", "versioned_app", verbosity=0)


@pytest.mark.django_db
def test_fingerprint_depends_on_fields_types_and_columns_only():
    assert model_fingerprint(Gadget) == model_fingerprint(Gadget)
    assert model_fingerprint(_model_at("0002_gadget_color")) == model_fingerprint(Gadget)
    assert model_key(Gadget, 7).startswith(f"versioned_app.gadget:{model_fingerprint(Gadget)}:7")
