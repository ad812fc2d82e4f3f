"""The chaos suite's short form (bench/chaos.py; `make chaos` runs the long one and prints the table).

These tests assert what callers see, never timings: no exception reaches a caller, no stale or invalidated
value is served, keys on healthy shards never degrade, queued invalidations land after recovery, and no
write-behind change that `save_behind` acknowledged is missing from the database once the queue is drained.
Latencies and throughput ratios are printed by `make chaos` and recorded in docs/failure.md.
"""

from __future__ import annotations

import math

import pytest

from tests.settings import _port_answers

# The chaos run writes through the test database (its write-behind rows): the mark makes pytest-django
# create that database even when this module runs alone. The run itself happens in the module fixture.
pytestmark = pytest.mark.django_db


def _free_block(start: int = 7700) -> int:
    for base in range(start, 7900, 10):
        if not any(_port_answers(base + offset) for offset in range(6)):
            return base
    raise RuntimeError("no free block of 6 ports between 7700 and 7900 for the chaos cluster")


@pytest.fixture(scope="module")
def chaos_results(django_db_setup, django_db_blocker):
    """The suite's test database serves the write-behind writer and its drains (threads of their own, so
    the database is opened for the whole run, not per test); the rows it creates are deleted by it."""
    from bench.chaos import Chaos

    with django_db_blocker.unblock(), Chaos(_free_block(), short=True) as chaos:
        yield chaos.run_all()


def test_no_exception_reaches_a_caller(chaos_results):
    for result in chaos_results:
        assert result["errors_seen_by_callers"] == 0, result
        if "view_calls" in result:
            assert result["view_calls"] > 0, result  # the Django view was really requested


def test_no_stale_value_is_served(chaos_results):
    for result in chaos_results:
        assert result["stale_served"] == 0, result
        if "reads_checked_for_staleness" in result:
            assert result["reads_checked_for_staleness"] > 0, result  # values really were read back


def test_replicas_serve_a_dead_primarys_keys_with_fallback_reads(chaos_results):
    plain = next(result for result in chaos_results if result["scenario"] == "kill -9 primary")
    fallback = next(
        result
        for result in chaos_results
        if result["scenario"] == "kill -9 primary, READ_FROM_REPLICAS fallback"
    )
    # Not compared: the fraction of all the failed shard's reads served during the outage. The load rewrites
    # its keys throughout, and a key whose write was dropped is never read from the replica, so that
    # fraction depends on when the failover lands (it came out 0.054 with the option and 0.069 without in
    # one CI run). The keys written before the kill are what the option is for:
    served, total = (
        int(part) for part in fallback["preloaded_keys_of_failed_shard_served_during"].split(" of ")
    )
    assert served == total > 0  # keys not written during the outage are all read from the replica
    assert plain["preloaded_keys_of_failed_shard_served_during"].startswith("0 of")
    assert fallback["stale_served"] == 0


def test_a_failed_node_costs_only_its_own_keys(chaos_results):
    for result in chaos_results:
        if "degraded_calls_healthy_shards" in result:
            assert result["degraded_calls_healthy_shards"] == 0, result


def test_the_failed_shard_degrades_and_is_served_again(chaos_results):
    kill = next(result for result in chaos_results if result["scenario"] == "kill -9 primary")
    assert kill["degraded_calls_failed_shard"] > 0  # the outage was real and reached the load
    assert math.isfinite(kill["served_after_ok_seconds"])  # NaN would mean: never served again


def test_invalidations_during_an_outage_land_after_it(chaos_results):
    outage = next(
        result for result in chaos_results if result["scenario"] == "invalidate tags during an outage"
    )
    assert outage["invalidate_tags"] == "invalidated"  # queued, not raised
    assert outage["outbox_pending_at_end"] == 0


def test_write_behind_loses_nothing_it_acknowledged(chaos_results):
    written = [result for result in chaos_results if "write_behind_lost" in result]
    assert {result["scenario"] for result in written} >= {"kill -9 primary", "SIGSTOP primary 3 s"}
    for result in written:
        assert result["write_behind_acknowledged"] > 0, result  # the writer really wrote
        assert result["write_behind_backlog_left"] == 0, result  # and everything queued was drained
        assert result["write_behind_lost"] == 0, result
        assert result["write_behind_dead_letters"] == 0, result
    kill = next(result for result in written if result["scenario"] == "kill -9 primary")
    assert kill["write_behind_refused"] > 0  # the outage reached the writer: it was told, not lied to
    assert kill["write_behind_refused_stream_elsewhere"] == 0  # only the stream's own node can refuse
