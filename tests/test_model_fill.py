"""The one plan that writes model entries (models/fill.py), against the real cluster and test database.

get_cached's fills, write-through, warming and the write-behind refresh all go through it; their own
tests cover each of them. These cover what the plan itself promises: every row's keys in one batch, each
key guarded on its own, and tag keys that outlive every entry of the batch carrying them.
"""

from __future__ import annotations

import pytest
from django.core.cache import caches
from django.db import connection
from django.test.utils import CaptureQueriesContext

import django_distcache
from django_distcache.models import read
from django_distcache.models.fill import RowEntries, UnchangedSinceLease, write_entries_plan
from django_distcache.models.registry import config_for
from django_distcache.topology import Call
from tests.model_app.models import Product

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def fresh_cache():
    caches["default"].clear()


def _rows(core, config, lease, products):
    static = {tag: lease.stamps[tag] for tag in config.static_tags()}
    expiry_ms = core.expiry_ms(config.timeout)
    return [
        RowEntries(
            config,
            config.keys_of(product),
            config.row_payload(product, core),
            config.row_tags(product),
            static,
            expiry_ms,
            None,
        )
        for product in products
    ]


def test_each_key_is_guarded_on_its_own_and_the_others_are_written():
    """A key that no longer holds what its reader saw is left alone; the batch's other keys are written."""
    first, second = Product.objects.bulk_create(
        [Product(name="First", slug="first", price=1), Product(name="Second", slug="second", price=2)]
    )  # bulk_create sends no signal: nothing cached yet
    assert django_distcache.get_cached(Product, pk=first.pk).name == "First"  # fills both of its keys
    Product.objects.filter(pk=first.pk).update(name="Renamed")  # no signal: the cache still says "First"
    first.refresh_from_db()
    config = config_for(Product)
    core = caches[config.cache_alias].core
    lease = core.run(read.lease_plan(core, config), "test")
    head = core.run(core.namespace.current(), "test")
    first_by_pk = core.physical_of(head, config.entry_key("pk", first.pk))
    # The reader of `first` by pk saw something else there: a writer came in between. Its other keys are
    # read by the plan.
    guard = UnchangedSinceLease(read.epoch_key(core, config), lease.epoch, {first_by_pk: b"what it saw"})
    written = core.run(write_entries_plan(core, _rows(core, config, lease, [first, second]), guard), "test")
    replies = {target.physical: reply for target, reply in written}
    assert replies.pop(first_by_pk) == 0
    assert list(replies.values()) == [1, 1, 1]
    with CaptureQueriesContext(connection) as captured:
        assert django_distcache.get_cached(Product, pk=first.pk).name == "First"  # left alone
        assert django_distcache.get_cached(Product, slug="first").name == "Renamed"
        assert django_distcache.get_cached(Product, pk=second.pk).name == "Second"
        assert django_distcache.get_cached(Product, slug="second").name == "Second"
    assert len(captured) == 0


def test_a_writer_after_the_lease_voids_the_whole_batch():
    (product,) = Product.objects.bulk_create([Product(name="Old", slug="old", price=1)])
    config = config_for(Product)
    core = caches[config.cache_alias].core
    lease = core.run(read.lease_plan(core, config), "test")
    core.run(read.bump_epoch_plan(core, config), "test")  # what a writer does first
    guard = UnchangedSinceLease(read.epoch_key(core, config), lease.epoch)
    assert core.run(write_entries_plan(core, _rows(core, config, lease, [product]), guard), "test") is None
    with CaptureQueriesContext(connection) as captured:
        django_distcache.get_cached(Product, pk=product.pk)
    assert len(captured) == 1


class _WritesNothing:
    def admits(self, core, head, targets):
        yield from ()
        return False

    def call(self, core, head, target):  # pragma: no cover - never asked: nothing is admitted
        raise AssertionError


def test_a_tag_shared_by_entries_of_different_lifetimes_outlives_the_longest():
    config = config_for(Product)
    core = caches[config.cache_alias].core
    short, long = 2_000, 3_600_000
    rows = [
        RowEntries(config, {}, None, ["fill-test-shared", "fill-test-short"], {}, short, None),
        RowEntries(config, {}, None, ["fill-test-shared"], {}, long, None),
    ]
    assert core.run(write_entries_plan(core, rows, _WritesNothing()), "test") is None

    def ttls():
        keys = [core.tags.tag_key(tag) for tag in ("fill-test-shared", "fill-test-short")]
        return (yield [Call(key, ("PTTL", key)) for key in keys])

    shared, only_short = core.run(ttls(), "test")
    assert shared > long and short < only_short < long
