"""Write-behind chaos, short form (bench/behind_chaos.py; `make chaos` runs the long one on PostgreSQL).

Each case runs writers (save_behind with a per-row increasing value, incr_behind on counter rows) while
real drainer processes are killed with `os._exit(9)` at one step of the drain (before the commit, after
it and before the entries are removed, during the cache refresh), or outlive their shard lock (a table
locked past BEHIND_IDLE_TIMEOUT; on PostgreSQL also a transaction stalled inside a trigger). A normal
drain then empties the queue, and the tests assert what a user would: no acknowledged write is missing,
no row ever held an older committed value after a newer one (a trigger logs every committed update), the
cache ends equal to the database, and every acknowledged increment is in the database exactly once.
"""

from __future__ import annotations

import os

import pytest
from django.conf import settings
from django.core.cache import caches

from bench.behind_chaos import STEPS, BehindChaos, incr_behind_function
from django_distcache.models import streams as behind_streams
from django_distcache.topology import Call
from tests.conftest import ROOT

pytestmark = pytest.mark.django_db(transaction=True)

CASES = [f"kill -9 {step}" for step in STEPS] + [
    "table locked past the shard lock",
    "stalled transaction past the shard lock",
]


def _reset_queues() -> None:
    """An earlier test's leftovers (a failing row held in a stream) are not this run's to drain."""
    cache = caches["default"]
    keys = [behind_streams.dead_letter_key(cache.core), behind_streams.stats_key(cache.core)]
    for shard in range(cache.core.settings.behind_shards):
        shard_keys = behind_streams.shard_keys(cache.core, shard)
        keys += [shard_keys.stream, shard_keys.lock, shard_keys.attempts]

    def plan():
        yield [Call(key, ("DEL", key)) for key in keys]

    cache.core.run(plan(), "reset")


@pytest.fixture(scope="module")
def results(django_db_setup, django_db_blocker):
    """Every case once, on the suite's cluster and database; drainers are processes of the suite's
    settings (as the Celery worker of tests/conftest.py is)."""
    from django.db import connection

    env = dict(os.environ)
    env["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    env["DISTCACHE_TEST_DB_NAME"] = str(connection.settings_dict["NAME"])
    env["DISTCACHE_TEST_CLUSTER_PORT"] = str(settings.CLUSTER_BASE_PORT)
    with django_db_blocker.unblock():
        _reset_queues()
        found = {}
        with BehindChaos(
            env,
            value_rows=12,
            counter_rows=4,
            writer_threads=2,
            kills=1,
            idle_timeout=0.8,  # the faults scale with it: a table lock of 2 s, a stall of 2.4 s
            batch_size=20,  # a dead drain's entries are re-applied in several batches
            log_dir=ROOT / ".devcluster",
        ) as chaos:
            for name, fault in chaos.cases():
                found[name] = chaos.run_case(name, fault, warmup=0.3)
        _reset_queues()
    yield found


def case_result(results, case):
    if case not in results:
        pytest.skip(
            "needs PostgreSQL (DATABASE_URL): the stall is a statement trigger calling pg_sleep inside the "
            "drain's transaction before it locks any row; SQLite has no sleep to call"
        )
    return results[case]


@pytest.mark.parametrize("case", CASES)
def test_the_fault_happened(results, case):
    result = case_result(results, case)
    assert result.fault_ok, result.fault
    assert result.acknowledged > 0 and result.updates_logged > 0
    assert not result.writer_errors, result.writer_errors[:3]


@pytest.mark.parametrize("case", CASES)
def test_no_acknowledged_write_is_lost(results, case):
    result = case_result(results, case)
    assert result.lost == 0, result
    assert result.backlog_left == 0, result


@pytest.mark.parametrize("case", CASES)
def test_no_row_moves_to_an_older_value(results, case):
    result = case_result(results, case)
    assert result.backward == 0, result.backward_examples


@pytest.mark.parametrize("case", CASES)
def test_the_cache_ends_equal_to_the_database(results, case):
    result = case_result(results, case)
    assert result.cache_mismatched == 0, result


@pytest.mark.skipif(
    incr_behind_function() is None, reason="django_distcache.models has no incr_behind in this code"
)
@pytest.mark.parametrize("case", CASES)
def test_every_acknowledged_increment_is_applied_once(results, case):
    result = case_result(results, case)
    assert result.increments_acknowledged > 0
    assert result.increments_in_db == result.increments_acknowledged, result
