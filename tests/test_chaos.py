"""The chaos suite's short form (bench/chaos.py; `make chaos` runs the long one and prints the table).

These tests assert what callers see, never timings: no exception reaches a caller, no stale or invalidated
value is served, keys on healthy shards never degrade, and queued invalidations land after recovery.
Latencies and throughput ratios are printed by `make chaos` and recorded in docs/failure.md.
"""

from __future__ import annotations

import math

import pytest

from tests.settings import _port_answers


def _free_block(start: int = 7700) -> int:
    for base in range(start, 7900, 10):
        if not any(_port_answers(base + offset) for offset in range(6)):
            return base
    raise RuntimeError("no free block of 6 ports between 7700 and 7900 for the chaos cluster")


@pytest.fixture(scope="module")
def chaos_results():
    from bench.chaos import Chaos

    with Chaos(_free_block(), short=True) as chaos:
        yield chaos.run_all()


def test_no_exception_reaches_a_caller(chaos_results):
    for result in chaos_results:
        assert result["errors_seen_by_callers"] == 0, result
        if "view_calls" in result:
            assert result["view_calls"] > 0, result  # the Django view was really requested


def test_no_stale_value_is_served(chaos_results):
    for result in chaos_results:
        assert result["stale_served"] == 0, result


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
