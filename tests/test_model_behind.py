"""Write-behind against the real cluster, the real test database and real Celery worker processes."""

from __future__ import annotations

import time

import pytest
from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import connection, connections, models
from redis.crc import key_slot
from redis.exceptions import ResponseError

import django_distcache
from django_distcache.cache import CacheUnavailable
from django_distcache.models import behind
from django_distcache.models.registry import config_for
from django_distcache.topology import Call
from tests.conftest import hung_primary
from tests.model_app.models import PageCounter, Product

pytestmark = pytest.mark.django_db(transaction=True)


def _reset_queues() -> None:
    cache = caches["default"]
    keys = [behind.dead_letter_key(cache), behind.stats_key(cache)]
    for shard in range(cache._settings.options["BEHIND_SHARDS"]):
        shard_keys = behind.shard_keys(cache, shard)
        keys += [shard_keys.stream, shard_keys.lock, shard_keys.attempts, shard_keys.stats]

    def plan():
        yield [Call(key, ("DEL", key)) for key in keys]

    cache._run(plan(), "reset")


@pytest.fixture(autouse=True)
def fresh_state():
    caches["default"].clear()
    _reset_queues()
    yield
    _reset_queues()


def stored_views(pk):
    return PageCounter.objects.values_list("views", flat=True).get(pk=pk)


def wait_until(condition, timeout=30.0, message="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {message}"
        time.sleep(0.05)


def test_save_behind_updates_the_cache_now_and_the_database_at_the_drain():
    counter = PageCounter.objects.create(name="home", note="kept")
    counter.views = 7
    stream_id = django_distcache.save_behind(counter, update_fields=["views"])
    assert "-" in stream_id
    cached = django_distcache.get_cached(PageCounter, pk=counter.pk)
    assert (cached.views, cached.note) == (7, "kept")
    assert stored_views(counter.pk) == 0
    report = django_distcache.flush_behind()
    assert (report.changes_applied, report.rows_written) == (1, 1)
    assert stored_views(counter.pk) == 7
    assert PageCounter.objects.get(pk=counter.pk).note == "kept"  # only the listed field was written


def test_changes_coalesce_per_row_and_the_last_write_wins():
    first = PageCounter.objects.create(name="a")
    second = PageCounter.objects.create(name="b")
    for number in range(1, 101):
        first.views = number
        django_distcache.save_behind(first, update_fields=["views"])
    second.views, second.note = 3, "x"
    django_distcache.save_behind(second, update_fields=["views", "note"])
    second.note = "y"
    django_distcache.save_behind(second, update_fields=["note"])
    report = django_distcache.flush_behind()
    assert (report.changes_applied, report.rows_written) == (102, 2)
    assert stored_views(first.pk) == 100
    assert PageCounter.objects.values_list("views", "note").get(pk=second.pk) == (3, "y")
    metrics = django_distcache.behind_metrics()
    assert metrics["backlog"] == 0 and metrics["coalescing_ratio"] == pytest.approx(51.0)


def test_concurrent_writers_of_different_fields_are_merged_in_the_cache():
    counter = PageCounter.objects.create(name="merge")
    django_distcache.get_cached(PageCounter, pk=counter.pk)
    one = PageCounter.objects.get(pk=counter.pk)
    two = PageCounter.objects.get(pk=counter.pk)
    one.views = 5
    django_distcache.save_behind(one, update_fields=["views"])
    two.note = "hello"
    django_distcache.save_behind(two, update_fields=["note"])  # `two` still has views=0: not written
    cached = django_distcache.get_cached(PageCounter, pk=counter.pk)
    assert (cached.views, cached.note) == (5, "hello")
    django_distcache.flush_behind()
    assert PageCounter.objects.values_list("views", "note").get(pk=counter.pk) == (5, "hello")


def test_bad_input_is_refused_and_changes_nothing():
    counter = PageCounter.objects.create(name="bad")
    cache = caches["default"]
    before = django_distcache.behind_metrics()["backlog"]
    counter.views = 1
    with pytest.raises(ValueError, match="has no field 'nope'"):
        django_distcache.save_behind(counter, update_fields=["nope"])
    with pytest.raises(ValueError, match="primary key"):
        django_distcache.save_behind(counter, update_fields=["id"])
    with pytest.raises(ValueError, match="empty"):
        django_distcache.save_behind(counter, update_fields=[])
    counter.views = "many"
    with pytest.raises(ValueError, match="views='many'"):
        django_distcache.save_behind(counter, update_fields=["views"])
    counter.views = models.F("views") * 2
    with pytest.raises(ValueError, match="expression"):
        django_distcache.save_behind(counter, update_fields=["views"])
    counter.views = models.F("views") + 1.5
    with pytest.raises(ValueError, match="expression"):
        django_distcache.save_behind(counter, update_fields=["views"])
    counter.name = models.F("name") + 1
    with pytest.raises(ValueError, match="not an integer field"):
        django_distcache.save_behind(counter, update_fields=["name"])
    with pytest.raises(ValueError, match="pk is None"):
        django_distcache.save_behind(PageCounter(name="new"))
    with pytest.raises(ImproperlyConfigured, match="write='behind'"):
        django_distcache.save_behind(Product(pk=1, name="x", slug="x"))
    assert django_distcache.behind_metrics()["backlog"] == before
    assert django_distcache.get_cached(PageCounter, pk=counter.pk).views == 0
    assert stored_views(counter.pk) == 0
    assert cache.failure_counts.get("save_behind", 0) == 0


def test_save_behind_raises_when_the_change_cannot_be_queued():
    from tests.conftest import make_cache

    counter = PageCounter.objects.create(name="down")
    config = config_for(PageCounter)
    caches["distcache_dead_behind"] = make_cache(
        LOCATION=["redis://127.0.0.1:1"], OPTIONS={"SOCKET_CONNECT_TIMEOUT": 0.1}
    )
    original, config.cache_alias = config.cache_alias, "distcache_dead_behind"
    try:
        counter.views = 4
        with pytest.raises(CacheUnavailable):
            django_distcache.save_behind(counter, update_fields=["views"])
    finally:
        config.cache_alias = original
    assert stored_views(counter.pk) == 0


def _wait_sent(node, action) -> list[str]:
    """Run `action` while watching the commands `node` receives; the arguments of the WAIT it got."""
    import redis

    with redis.Redis(host=node.host, port=node.port, socket_timeout=5).monitor() as monitor:
        action()
        while True:
            command = monitor.next_command()["command"].split()
            if command[0].upper() == "WAIT":
                return command[1:]


@pytest.mark.parametrize("asked", [1, 2])
def test_save_behind_waits_the_whole_timeout_only_for_replicas_that_exist(cluster, asked):
    """WAIT for as many replicas as the slot map lists gets BEHIND_WAIT_TIMEOUT; WAIT for more than it
    lists (a promoted primary has none until one rejoins; here, 2 of the 1 there is) gets a millisecond,
    and the shortfall is counted."""
    from tests.conftest import make_cache, wait_replicas_listed

    wait_replicas_listed(cluster)
    counter = PageCounter.objects.create(name="replicated")
    config = config_for(PageCounter)
    alias = f"distcache_wait_{asked}"
    caches[alias] = cache = make_cache(OPTIONS={"BEHIND_WAIT_REPLICAS": asked, "BEHIND_WAIT_TIMEOUT": 0.1})
    original, config.cache_alias = config.cache_alias, alias
    try:
        cache.get("warm-up")
        cache._shared.topology.refresh(force=True)  # the slot map as it is now, with its replicas
        stream = behind.shard_keys(cache, behind.shard_of(cache, config.label, counter.pk)).stream
        assert cache._replicas_listed(stream) == 1
        unreplicated = cache.failure_counts.get("behind_unreplicated", 0)
        counter.views = 5

        def save():
            django_distcache.save_behind(counter, update_fields=["views"])

        arguments = _wait_sent(_node_of(cache, stream), save)
        assert arguments == (["1", "100"] if asked == 1 else ["2", "1"])
        assert cache.failure_counts.get("behind_unreplicated", 0) - unreplicated == asked - 1
        assert django_distcache.flush_behind(using=alias).changes_applied == 1
    finally:
        config.cache_alias = original
        del caches[alias]
    assert stored_views(counter.pk) == 5


def _node_of(cache, physical: bytes):
    return cache._shared.state.slot_map.primaries[key_slot(physical)]


def test_a_drain_skips_the_streams_it_cannot_reach_and_drains_the_others(cluster):
    cache = caches["default"]
    config = config_for(PageCounter)
    rows = [PageCounter.objects.create(name=f"row {n}") for n in range(24)]
    for row in rows:
        row.views = 3
        django_distcache.save_behind(row, update_fields=["views"])
    streams = {
        shard: behind.shard_keys(cache, shard).stream
        for shard in range(cache._settings.options["BEHIND_SHARDS"])
    }
    victim = _node_of(cache, streams[0])
    unreachable = {shard for shard, stream in streams.items() if _node_of(cache, stream) == victim}
    behind_victim = {row.pk for row in rows if behind.shard_of(cache, config.label, row.pk) in unreachable}
    assert behind_victim and len(behind_victim) < len(rows)  # both kinds of rows are in the test

    with hung_primary(cluster, victim.port):
        report = django_distcache.flush_behind()
        assert set(report.shards_unreachable) == unreachable
        assert report.changes_applied == len(rows) - len(behind_victim)
        for row in rows:
            assert stored_views(row.pk) == (0 if row.pk in behind_victim else 3)

    # The node is back: once its breaker lets a call through (a cooldown at most), the next drains apply
    # what waited in its streams.
    applied = []
    wait_until(
        lambda: (
            applied.append(django_distcache.flush_behind().changes_applied)
            or sum(applied) == len(behind_victim)
        ),
        timeout=10,
        message="the skipped streams to be drained",
    )
    assert all(stored_views(row.pk) == 3 for row in rows)


def test_save_behind_queues_when_only_the_cached_rows_node_is_down(cluster):
    cache = caches["default"]
    config = config_for(PageCounter)
    victim = _node_of(cache, behind.shard_keys(cache, 0).stream)
    for n in range(500):  # a row whose cache entry is on the victim and whose stream is not
        row = PageCounter.objects.create(name=f"row {n}")
        entry = cache.physical_key(config.entry_key("pk", row.pk))
        stream = behind.shard_keys(cache, behind.shard_of(cache, config.label, row.pk)).stream
        if _node_of(cache, entry) == victim and _node_of(cache, stream) != victim:
            break
    else:
        pytest.fail("no row with its entry on one node and its stream on another")
    row.views = 1
    django_distcache.save_behind(row, update_fields=["views"])
    assert django_distcache.get_cached(PageCounter, pk=row.pk).views == 1  # the entry holds views=1

    with hung_primary(cluster, victim.port):
        row.views = 9
        django_distcache.save_behind(row, update_fields=["views"])  # queued: the stream's node answers
        django_distcache.flush_behind()
        assert stored_views(row.pk) == 9

    # The entry the hung node kept still says views=1; its row tag was invalidated, so it is not served.
    wait_until(lambda: cache._tags.outbox is None or cache._tags.outbox.empty, message="the outbox to drain")
    assert django_distcache.get_cached(PageCounter, pk=row.pk).views == 9


def test_a_deleted_rows_changes_are_dropped_and_logged(caplog):
    counter = PageCounter.objects.create(name="gone")
    counter.views = 9
    django_distcache.save_behind(counter, update_fields=["views"])
    PageCounter.objects.filter(pk=counter.pk).delete()
    report = django_distcache.flush_behind()
    assert (report.dropped_deleted, report.changes_applied, report.dead_lettered) == (1, 0, 0)
    assert "does not exist" in caplog.text
    with pytest.raises(PageCounter.DoesNotExist):
        django_distcache.get_cached(PageCounter, pk=counter.pk)
    assert django_distcache.behind_metrics()["backlog"] == 0


def test_a_failing_row_goes_to_the_dead_letters_and_can_be_replayed(capsys):
    """Two rows given the same unique code: the second's change fails in the database every time."""
    one = PageCounter.objects.create(name="one", code="A")
    two = PageCounter.objects.create(name="two")
    healthy = PageCounter.objects.create(name="healthy")
    two.code = "A"
    django_distcache.save_behind(two, update_fields=["code"])
    healthy.views = 1
    django_distcache.save_behind(healthy, update_fields=["views"])
    attempts = caches["default"]._settings.options["BEHIND_MAX_ATTEMPTS"]
    for _ in range(attempts - 1):
        report = django_distcache.flush_behind()
        assert report.failed_rows == 1 and report.dead_lettered == 0
    assert stored_views(healthy.pk) == 1  # one bad row does not hold the others back
    report = django_distcache.flush_behind()
    assert report.dead_lettered == 1
    assert django_distcache.behind_metrics()["backlog"] == 0
    assert django_distcache.get_cached(PageCounter, pk=two.pk).code is None  # the cache forgot the lost value
    call_command("flushbehind", "--dead-letter")
    listing = capsys.readouterr().out
    assert "model_app.pagecounter" in listing and '"code": "A"' in listing and "attempts=3" in listing
    one.code = "B"
    one.save()
    call_command("flushbehind", "--dead-letter", "--replay")
    assert "queued 1" in capsys.readouterr().out
    django_distcache.flush_behind()
    assert PageCounter.objects.get(pk=two.pk).code == "A"
    assert behind.dead_letters() == []


def test_fills_wait_for_queued_changes_and_the_drain_refreshes_the_entry():
    counter = PageCounter.objects.create(name="pending")
    counter.views = 11
    django_distcache.save_behind(counter, update_fields=["views"])
    # The entry is then lost (evicted, say) while the change is still queued:
    config = config_for(PageCounter)
    cache = config.cache
    cache.delete(config.entry_key("pk", counter.pk))
    # The database's row with the queued change laid over it; the row is not cached meanwhile (an entry
    # holds the database's row only, and the drain writes it after its commit).
    assert django_distcache.get_cached(PageCounter, pk=counter.pk).views == 11
    assert stored_views(counter.pk) == 0
    assert cache.get(config.entry_key("pk", counter.pk)) is None
    django_distcache.flush_behind()
    assert cache.get(config.entry_key("pk", counter.pk)) is not None  # refreshed from the database
    assert django_distcache.get_cached(PageCounter, pk=counter.pk).views == 11


def test_metrics_report_backlog_and_lag():
    counter = PageCounter.objects.create(name="lag")
    for number in range(5):
        counter.views = number
        django_distcache.save_behind(counter, update_fields=["views"])
    time.sleep(0.2)
    metrics = django_distcache.behind_metrics()
    assert metrics["backlog"] == 5 and metrics["lag_seconds"] >= 0.2
    assert sum(1 for shard in metrics["shards"] if shard["backlog"]) == 1  # one row, one shard
    django_distcache.flush_behind()
    metrics = django_distcache.behind_metrics()
    assert (metrics["backlog"], metrics["lag_seconds"]) == (0, 0.0)
    assert metrics["changes_applied"] == 5 and metrics["rows_written"] == 1


def test_shards_spread_over_the_slot_space():
    from redis.crc import key_slot

    cache = caches["default"]
    count = cache._settings.options["BEHIND_SHARDS"]
    slots = [key_slot(behind.shard_keys(cache, shard).stream) for shard in range(count)]
    assert [slot * count // 16384 for slot in slots] == list(range(count))


def test_flushbehind_command_drains_and_reports(capsys):
    counter = PageCounter.objects.create(name="cmd")
    counter.views = 2
    django_distcache.save_behind(counter, update_fields=["views"])
    call_command("flushbehind", "--stats")
    assert '"backlog": 1' in capsys.readouterr().out
    call_command("flushbehind")
    assert "applied 1 change(s) as 1 row write(s)" in capsys.readouterr().out
    assert stored_views(counter.pk) == 2


# -- real Celery workers ----------------------------------------------------------------------------------
def test_the_celery_task_drains_in_a_worker_process(start_worker):
    from django_distcache.tasks import flush_behind_task

    start_worker("drain")
    counter = PageCounter.objects.create(name="celery")
    counter.views = 21
    django_distcache.save_behind(counter, update_fields=["views"])
    flush_behind_task.delay()
    wait_until(lambda: stored_views(counter.pk) == 21, message="the worker to apply the change")


def test_beat_schedule_drains_without_being_asked(start_worker):
    counter = PageCounter.objects.create(name="beat")
    start_worker("beat", beat=True)
    counter.views = 5
    django_distcache.save_behind(counter, update_fields=["views"])
    wait_until(lambda: stored_views(counter.pk) == 5, message="beat's drain")


def test_a_backlog_past_the_threshold_triggers_a_drain(start_worker, settings):
    start_worker("trigger")
    counter = PageCounter.objects.create(name="trigger")
    cache = caches["default"]
    options = cache._settings.options
    original, options["BEHIND_TRIGGER_BACKLOG"] = options["BEHIND_TRIGGER_BACKLOG"], 20
    try:
        for number in range(1, 21):
            counter.views = number
            django_distcache.save_behind(counter, update_fields=["views"])
    finally:
        options["BEHIND_TRIGGER_BACKLOG"] = original
    wait_until(lambda: stored_views(counter.pk) == 20, message="the triggered drain")


def test_kill_9_mid_batch_loses_nothing(start_worker):
    """A worker is killed while its batch's transaction waits on a row lock we hold; after the idle
    timeout a second worker takes the shard over and the database ends with every change."""
    from django_distcache.tasks import flush_behind_task

    rows = [PageCounter.objects.create(name=f"row{n}") for n in range(20)]
    for round_number in range(1, 6):
        for row in rows:
            row.views = round_number * 100 + row.pk % 100
            django_distcache.save_behind(row, update_fields=["views"])
    expected = {row.pk: row.views for row in rows}
    locker = connections.create_connection("default")
    try:
        locker.set_autocommit(False)
        with locker.cursor() as cursor:  # hold a write lock on a row every shard's batch may touch
            cursor.execute(
                f"UPDATE {PageCounter._meta.db_table} SET note = 'locked' WHERE id IN ({','.join(str(r.pk) for r in rows)})"
            )
        first = start_worker("victim")
        flush_behind_task.delay()
        cache = caches["default"]

        def draining() -> bool:
            locks = [behind.shard_keys(cache, shard).lock for shard in range(cache._settings.options["BEHIND_SHARDS"])]

            def plan():
                return (yield [Call(lock, ("EXISTS", lock)) for lock in locks])

            return any(cache._run(plan(), "test"))

        wait_until(draining, message="the worker to start a drain")
        time.sleep(0.3)  # inside its transaction, blocked on our lock
        assert "succeeded" not in first.log_path.read_text()  # the task is still inside its batch
        first.kill()
        assert django_distcache.behind_metrics()["backlog"] == 100  # nothing was cleaned up
        locker.rollback()
    finally:
        locker.close()
    assert all(stored_views(pk) == 0 for pk in expected)
    start_worker("rescuer")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        flush_behind_task.delay()  # before the idle timeout the dead worker's lock refuses the drain
        time.sleep(1.0)
        if all(stored_views(pk) == views for pk, views in expected.items()):
            break
    assert {pk: stored_views(pk) for pk in expected} == expected
    assert django_distcache.behind_metrics()["backlog"] == 0
    connection.close()
