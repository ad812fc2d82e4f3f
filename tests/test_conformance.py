"""Django's own cache backend tests (BaseCacheTests from the installed Django's sdist) against the cluster.

Tests a Redis Cluster legitimately cannot pass are listed in EXCLUDED with the reason, and in
docs/conformance.md. Nothing else is skipped.
"""

import pytest
from cache.tests import BaseCacheTests, caches_setting_for_tests  # Django's tests/cache, see settings.py
from django.conf import settings
from django.test import TestCase, override_settings

pytestmark = pytest.mark.conformance

BACKEND = "django_distcache.cache.RedisClusterCache"

# name -> why a cluster cannot pass it. These three test Django's in-process culling (MAX_ENTRIES /
# CULL_FREQUENCY), which Redis does with maxmemory and its eviction policy instead; Django's own
# RedisCache excludes the same caches ("cull", "zero_cull"), so the tests skip themselves with
# "Culling isn't implemented."
EXCLUDED = {
    "test_cull": "culling is Redis's maxmemory policy, not MAX_ENTRIES",
    "test_zero_cull": "culling is Redis's maxmemory policy, not CULL_FREQUENCY",
    "test_cull_delete_when_store_empty": "culling is Redis's maxmemory policy, not MAX_ENTRIES",
}


@override_settings(
    CACHES=caches_setting_for_tests(
        base={"BACKEND": BACKEND, "LOCATION": settings.CLUSTER_LOCATION},
        exclude={"cull", "zero_cull"},
    )
)
class RedisClusterCacheConformanceTests(BaseCacheTests, TestCase):
    """Every BaseCacheTests test, unchanged, against RedisClusterCache on the local cluster."""


def test_exclusions_are_exactly_the_culling_tests():
    """Guards the list: an excluded name must exist in BaseCacheTests, and nothing else may be skipped."""
    names = {name for name in dir(BaseCacheTests) if name.startswith("test_")}
    assert set(EXCLUDED) <= names
    assert {name for name in names if "cull" in name} == set(EXCLUDED)
