"""Read-through (`get_cached`) and write-through, against the real cluster and the real test database."""

from __future__ import annotations

import threading
from decimal import Decimal

import pytest
from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, connections, models, transaction
from django.test.utils import CaptureQueriesContext

import django_distcache
from django_distcache.models import read
from django_distcache.models.registry import MISSING_ROW, config_for
from django_distcache.versioning import model_fingerprint
from tests.model_app.models import Label, Product, Uncached

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def fresh_cache():
    caches["default"].clear()  # O(1): a new namespace, so rows re-using pks of earlier tests start cold


def queries(function, *args, **kwargs):
    with CaptureQueriesContext(connection) as captured:
        result = function(*args, **kwargs)
    return result, len(captured)


def make_product(slug="red-shoe", **fields):
    return Product.objects.create(
        name=fields.pop("name", "Red shoe"), slug=slug, price=Decimal("9.50"), **fields
    )


def test_a_miss_loads_once_and_fills_every_lookup():
    product = make_product()
    caches["default"].clear()  # creating the row wrote it through; start from a cold cache
    found, count = queries(django_distcache.get_cached, Product, slug="red-shoe")
    assert (found.pk, found.name, found.price, count) == (product.pk, "Red shoe", Decimal("9.50"), 1)
    by_pk, count = queries(django_distcache.get_cached, Product, pk=product.pk)
    assert (by_pk.slug, count) == ("red-shoe", 0)
    by_id, count = queries(django_distcache.get_cached, Product, id=str(product.pk))  # the pk's name, as text
    assert (by_id.pk, count) == (product.pk, 0)
    assert found._state.adding is False and found._state.db == "default"


def test_a_missing_row_raises_does_not_exist_and_is_cached_briefly_until_created():
    with CaptureQueriesContext(connection) as captured, pytest.raises(Product.DoesNotExist):
        django_distcache.get_cached(Product, slug="nope")
    assert len(captured) == 1  # the database says the row is missing
    with CaptureQueriesContext(connection) as captured, pytest.raises(Product.DoesNotExist):
        django_distcache.get_cached(Product, slug="nope")
    assert len(captured) == 0  # the negative entry answered
    make_product(slug="nope", name="Now it exists")
    assert django_distcache.get_cached(Product, slug="nope").name == "Now it exists"


def test_bulk_create_does_not_clear_negative_entries_but_invalidate_model_does():
    with pytest.raises(Product.DoesNotExist):
        django_distcache.get_cached(Product, slug="bulk")
    Product.objects.bulk_create([Product(name="Bulk", slug="bulk")])
    with pytest.raises(Product.DoesNotExist):
        django_distcache.get_cached(Product, slug="bulk")  # no signal: documented
    pk = Product.objects.get(slug="bulk").pk
    django_distcache.invalidate_model(Product, pks=[pk])
    assert django_distcache.get_cached(Product, slug="bulk").pk == pk


def test_keys_carry_the_model_fingerprint_and_entries_the_model_tags():
    product = make_product()
    config = config_for(Product)
    assert model_fingerprint(Product) in config.entry_key("pk", product.pk)
    django_distcache.get_cached(Product, pk=product.pk)
    django_distcache.invalidate_tags(f"model_app.product:{product.pk}")
    _, count = queries(django_distcache.get_cached, Product, pk=product.pk)
    assert count == 1
    django_distcache.invalidate_tags("model_app.product")
    _, count = queries(django_distcache.get_cached, Product, slug="red-shoe")
    assert count == 1
    django_distcache.invalidate_tags("catalogue")  # the static tag given to cache_model
    _, count = queries(django_distcache.get_cached, Product, slug="red-shoe")
    assert count == 1


def test_bad_lookups_are_refused_clearly():
    make_product()
    with pytest.raises(TypeError, match="exactly one lookup"):
        django_distcache.get_cached(Product, pk=1, slug="red-shoe")
    with pytest.raises(TypeError, match="exactly one lookup"):
        django_distcache.get_cached(Product)
    with pytest.raises(TypeError, match="'name' is not one of them"):
        django_distcache.get_cached(Product, name="Red shoe")
    with pytest.raises(ValueError, match="not a valid model_app.product.pk"):
        django_distcache.get_cached(Product, pk="abc")
    with pytest.raises(ImproperlyConfigured, match="not registered"):
        django_distcache.get_cached(Uncached, pk=1)


def test_registration_errors_are_clear():
    class Meta:
        app_label = "model_app"

    attrs = {
        "__module__": __name__,
        "Meta": Meta,
        "code": models.CharField(max_length=5),
        "title": models.CharField(max_length=5, unique=True),
    }
    Loose = type("Loose", (models.Model,), attrs)
    with pytest.raises(ImproperlyConfigured, match="not unique"):
        django_distcache.cache_model(Loose, lookups=("pk", "code"))
    with pytest.raises(ImproperlyConfigured, match="no field 'nope'"):
        django_distcache.cache_model(Loose, lookups=("nope",))
    with pytest.raises(ImproperlyConfigured, match="cached by pk only"):
        django_distcache.cache_model(Loose, lookups=("pk", "title"), write="behind")
    with pytest.raises(ImproperlyConfigured, match="write must be one of"):
        django_distcache.cache_model(Loose, write="around")
    with pytest.raises(TypeError, match="tags must be a list"):
        django_distcache.cache_model(Loose, tags="one")
    with pytest.raises(TypeError, match="Django model class"):
        django_distcache.cache_model(object)


def test_registration_in_app_ready_without_the_decorator():
    label = Label.objects.create(name="sale")
    caches["default"].clear()
    _, count = queries(django_distcache.get_cached, Label, name="sale")
    assert count == 1
    found, count = queries(django_distcache.get_cached, Label, pk=label.pk)
    assert (found.name, count) == ("sale", 0)


# -- write-through ---------------------------------------------------------------------------------------
def test_save_replaces_the_entries_after_commit():
    product = make_product()
    django_distcache.get_cached(Product, pk=product.pk)
    product.name = "Blue shoe"
    product.save()
    found, count = queries(django_distcache.get_cached, Product, slug="red-shoe")
    assert (found.name, count) == ("Blue shoe", 0)


def test_save_with_an_expression_caches_the_database_value():
    product = make_product(stock=5)
    product.stock = models.F("stock") + 1
    product.save(update_fields=["stock"])
    assert django_distcache.get_cached(Product, pk=product.pk).stock == 6


def test_a_changed_lookup_value_removes_the_old_key():
    product = make_product()
    django_distcache.get_cached(Product, slug="red-shoe")
    product.slug = "crimson-shoe"
    product.save()
    with pytest.raises(Product.DoesNotExist):
        django_distcache.get_cached(Product, slug="red-shoe")
    assert django_distcache.get_cached(Product, slug="crimson-shoe").pk == product.pk


def test_delete_removes_the_entries():
    product = make_product()
    pk = product.pk
    django_distcache.get_cached(Product, pk=pk)
    product.delete()
    with pytest.raises(Product.DoesNotExist):
        django_distcache.get_cached(Product, pk=pk)
    with pytest.raises(Product.DoesNotExist):
        django_distcache.get_cached(Product, slug="red-shoe")


def test_queryset_delete_is_covered():
    make_product()
    django_distcache.get_cached(Product, slug="red-shoe")
    Product.objects.filter(slug="red-shoe").delete()
    with pytest.raises(Product.DoesNotExist):
        django_distcache.get_cached(Product, slug="red-shoe")


def test_a_rolled_back_transaction_changes_nothing_in_the_cache():
    product = make_product()
    django_distcache.get_cached(Product, pk=product.pk)
    with pytest.raises(RuntimeError), transaction.atomic():
        product.name = "Never"
        product.save()
        raise RuntimeError("roll back")
    found, count = queries(django_distcache.get_cached, Product, pk=product.pk)
    assert (found.name, count) == ("Red shoe", 0)


def test_inside_a_transaction_reads_see_its_own_writes_and_nothing_is_cached():
    product = make_product()
    other = make_product(slug="other", name="Other")
    caches["default"].clear()
    with transaction.atomic():
        _, count = queries(django_distcache.get_cached, Product, pk=other.pk)
        assert count == 1  # a miss reads the database...
        _, count = queries(django_distcache.get_cached, Product, pk=other.pk)
        assert count == 1  # ...and fills nothing from inside the transaction
        product.name = "Uncommitted"
        product.save()
        assert django_distcache.get_cached(Product, pk=product.pk).name == "Uncommitted"
    assert django_distcache.get_cached(Product, pk=product.pk).name == "Uncommitted"
    _, count = queries(django_distcache.get_cached, Product, pk=product.pk)
    assert count == 0


def test_many_to_many_changes_invalidate_the_row_tag():
    product = make_product()
    label = Label.objects.create(name="new")
    cache = caches["default"]
    cache.set("fragment", "<li>Red shoe</li>", tags=[f"model_app.product:{product.pk}"])
    product.labels.add(label)
    assert cache.get("fragment") is None
    cache.set("fragment", "<li>Red shoe</li>", tags=[f"model_app.product:{product.pk}"])
    label.product_set.remove(product)  # the reverse side names the product in pk_set
    assert cache.get("fragment") is None


def test_queryset_update_is_not_covered_until_invalidate_model():
    product = make_product()
    django_distcache.get_cached(Product, pk=product.pk)
    Product.objects.filter(pk=product.pk).update(name="Updated in bulk")
    assert django_distcache.get_cached(Product, pk=product.pk).name == "Red shoe"  # documented
    django_distcache.invalidate_model(Product, pks=[product.pk])
    assert django_distcache.get_cached(Product, slug="red-shoe").name == "Updated in bulk"
    Product.objects.update(name="Everything")
    django_distcache.invalidate_model(Product)
    assert django_distcache.get_cached(Product, pk=product.pk).name == "Everything"


def test_invalidate_model_inside_a_transaction_waits_for_the_commit():
    product = make_product()
    django_distcache.get_cached(Product, pk=product.pk)
    with pytest.raises(RuntimeError), transaction.atomic():
        Product.objects.filter(pk=product.pk).update(name="Rolled back")
        django_distcache.invalidate_model(Product, pks=[product.pk])
        raise RuntimeError
    _, count = queries(django_distcache.get_cached, Product, pk=product.pk)
    assert count == 0  # the rolled-back invalidation never ran


def test_ainvalidate_model_waits_for_the_commit_of_a_transaction_around_it():
    """The async twin runs the same plan and waits for the same commit: called from async code inside a
    transaction opened by sync code, it runs when that commits and never if it rolls back."""
    from asgiref.sync import async_to_sync

    product = make_product()
    django_distcache.get_cached(Product, pk=product.pk)
    with pytest.raises(RuntimeError), transaction.atomic():
        Product.objects.filter(pk=product.pk).update(name="Rolled back")
        async_to_sync(django_distcache.ainvalidate_model)(Product, pks=[product.pk], using="default")
        raise RuntimeError
    found, count = queries(django_distcache.get_cached, Product, pk=product.pk)
    assert (found.name, count) == ("Red shoe", 0)  # the rolled-back invalidation never ran
    seen = []

    def look_from_outside():  # another thread: its own connection, outside the transaction
        try:
            seen.append(queries(django_distcache.get_cached, Product, pk=product.pk))
        finally:
            connections.close_all()

    with transaction.atomic():
        Product.objects.filter(pk=product.pk).update(name="Committed")
        async_to_sync(django_distcache.ainvalidate_model)(Product, pks=[product.pk])
        outside = threading.Thread(target=look_from_outside)
        outside.start()
        outside.join()
    assert [(found.name, count) for found, count in seen] == [("Red shoe", 0)]  # not before the commit
    assert django_distcache.get_cached(Product, pk=product.pk).name == "Committed"


# -- leases: a fill never overwrites a newer write ------------------------------------------------------
def _slow_fill_steps(lookup, value):
    """The steps of get_cached's miss path, so a test can put a write between the read and the fill."""
    config = config_for(Product)
    cache = caches[config.cache_alias]
    miss = cache.core.run(read.lookup_plan(cache.core, config, lookup, value, "default"), "get_cached")
    assert isinstance(miss, read.Miss)
    lease = cache.core.run(read.lease_plan(cache.core, config), "get_cached")
    found = read._load(config, "default", lookup, value)

    def fill():
        return cache.core.run(
            read.fill_plan(cache.core, config, lease, found, {lookup: miss}, lookup, value), "fill"
        )

    return found, fill


def test_a_slow_fill_racing_a_save_never_leaves_the_old_row():
    product = make_product()
    caches["default"].clear()
    old, fill = _slow_fill_steps("slug", "red-shoe")
    assert old.name == "Red shoe"
    product.name = "Newer"
    product.save()  # write-through runs at commit, while the fill is "slow"
    assert fill() is False
    for lookup, value in (("pk", product.pk), ("slug", "red-shoe")):
        assert django_distcache.get_cached(Product, **{lookup: value}).name == "Newer"


def test_a_slow_fill_racing_invalidate_model_never_fills_the_old_row():
    product = make_product()
    caches["default"].clear()
    old, fill = _slow_fill_steps("slug", "red-shoe")
    Product.objects.filter(pk=product.pk).update(name="Bulk-updated")
    django_distcache.invalidate_model(Product, pks=[product.pk])
    assert fill() is False
    assert django_distcache.get_cached(Product, pk=product.pk).name == "Bulk-updated"
    assert django_distcache.get_cached(Product, slug="red-shoe").name == "Bulk-updated"


def test_a_slow_fill_racing_a_delete_never_resurrects_the_row():
    product = make_product()
    pk = product.pk
    caches["default"].clear()
    _, fill = _slow_fill_steps("pk", pk)
    product.delete()
    assert fill() is False
    with pytest.raises(Product.DoesNotExist):
        django_distcache.get_cached(Product, pk=pk)


def test_a_slow_negative_fill_racing_a_create_never_hides_the_row():
    found, fill = _slow_fill_steps("slug", "late")
    assert found is MISSING_ROW
    make_product(slug="late", name="Late")
    assert fill() is False
    assert django_distcache.get_cached(Product, slug="late").name == "Late"


def test_readers_and_writers_in_threads_end_with_the_last_write():
    product = make_product()
    stop = threading.Event()
    errors = []

    def reader():
        try:
            while not stop.is_set():
                for lookup in ({"pk": product.pk}, {"slug": "red-shoe"}):
                    django_distcache.get_cached(Product, **lookup)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for number in range(60):
            product.stock = number
            product.save(update_fields=["stock"])
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors
    assert django_distcache.get_cached(Product, pk=product.pk).stock == 59
    assert django_distcache.get_cached(Product, slug="red-shoe").stock == 59


# -- async ----------------------------------------------------------------------------------------------
async def test_aget_cached_reads_natively_and_fills():
    from asgiref.sync import sync_to_async

    product = await sync_to_async(make_product)()
    await sync_to_async(caches["default"].clear)()
    found = await django_distcache.aget_cached(Product, slug="red-shoe")
    assert found.pk == product.pk
    again = await django_distcache.aget_cached(Product, pk=product.pk)
    assert again.name == "Red shoe"
    with pytest.raises(Product.DoesNotExist):
        await django_distcache.aget_cached(Product, pk=10**9)
    await django_distcache.ainvalidate_model(Product, pks=[product.pk])
    assert await django_distcache.aget_cached(Product, slug="red-shoe") is not None
    await sync_to_async(connections.close_all)()  # the executor thread's connection, before teardown


def test_get_cached_survives_a_cache_outage_by_reading_the_database():
    from tests.conftest import make_cache

    config = config_for(Product)
    product = make_product()
    caches["distcache_dead"] = make_cache(
        LOCATION=["redis://127.0.0.1:1"], OPTIONS={"SOCKET_CONNECT_TIMEOUT": 0.1}
    )
    original, config.cache_alias = config.cache_alias, "distcache_dead"
    try:
        found, count = queries(django_distcache.get_cached, Product, slug="red-shoe")
        assert (found.pk, count) == (product.pk, 1)
        with pytest.raises(Product.DoesNotExist):
            django_distcache.get_cached(Product, slug="none")
    finally:
        config.cache_alias = original


@pytest.mark.parametrize("serializer", ["json", "msgpack"])
def test_rows_round_trip_through_the_non_pickle_serializers(serializer):
    from tests.conftest import make_cache

    config = config_for(Product)
    product = make_product()
    caches[f"distcache_{serializer}"] = make_cache(OPTIONS={"SERIALIZER": serializer})
    original, config.cache_alias = config.cache_alias, f"distcache_{serializer}"
    try:
        django_distcache.get_cached(Product, pk=product.pk)
        found, count = queries(django_distcache.get_cached, Product, slug="red-shoe")
        assert count == 0
        assert (found.price, found.updated_at, found.name) == (
            Decimal("9.50"),
            product.updated_at,
            "Red shoe",
        )
    finally:
        config.cache_alias = original
