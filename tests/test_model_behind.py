"""Write-behind against the real cluster, the real test database and real Celery worker processes."""

from __future__ import annotations

import dataclasses
import time

import pytest
from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, connections, models
from redis.crc import key_slot

import django_distcache
from django_distcache.cache import CacheUnavailable
from django_distcache.models import dead_letters, drain
from django_distcache.models import streams as behind_streams
from django_distcache.models.registry import config_for
from django_distcache.topology import Call
from tests.conftest import hung_primary
from tests.model_app.models import PageCounter, Product

pytestmark = pytest.mark.django_db(transaction=True)


def _reset_queues() -> None:
    cache = caches["default"]
    keys = [behind_streams.dead_letter_key(cache.core), behind_streams.stats_key(cache.core)]
    for shard in range(cache.core.settings.behind_shards):
        shard_keys = behind_streams.shard_keys(cache.core, shard)
        keys += [shard_keys.stream, shard_keys.lock, shard_keys.attempts, shard_keys.stats]

    def plan():
        yield [Call(key, ("DEL", key)) for key in keys]

    cache.core.run(plan(), "reset")


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
        cache.core.shared.topology.refresh(force=True)  # the slot map as it is now, with its replicas
        stream = behind_streams.shard_keys(
            cache.core, behind_streams.shard_of(cache.core, config.label, counter.pk)
        ).stream
        assert cache.core.replicas_listed(stream) == 1
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
    return cache.core.shared.state.slot_map.primaries[key_slot(physical)]


def test_a_drain_skips_the_streams_it_cannot_reach_and_drains_the_others(cluster):
    cache = caches["default"]
    config = config_for(PageCounter)
    rows = [PageCounter.objects.create(name=f"row {n}") for n in range(24)]
    for row in rows:
        row.views = 3
        django_distcache.save_behind(row, update_fields=["views"])
    streams = {
        shard: behind_streams.shard_keys(cache.core, shard).stream
        for shard in range(cache.core.settings.behind_shards)
    }
    victim = _node_of(cache, streams[0])
    unreachable = {shard for shard, stream in streams.items() if _node_of(cache, stream) == victim}
    behind_victim = {
        row.pk for row in rows if behind_streams.shard_of(cache.core, config.label, row.pk) in unreachable
    }
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
    victim = _node_of(cache, behind_streams.shard_keys(cache.core, 0).stream)
    for n in range(500):  # a row whose cache entry is on the victim and whose stream is not
        row = PageCounter.objects.create(name=f"row {n}")
        entry = cache.physical_key(config.entry_key("pk", row.pk))
        stream = behind_streams.shard_keys(
            cache.core, behind_streams.shard_of(cache.core, config.label, row.pk)
        ).stream
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
    wait_until(
        lambda: cache.core.tags.outbox is None or cache.core.tags.outbox.empty, message="the outbox to drain"
    )
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
    attempts = caches["default"].core.settings.behind_max_attempts
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
    assert dead_letters() == []


def test_fills_wait_for_queued_changes_and_the_drain_refreshes_the_entry():
    counter = PageCounter.objects.create(name="pending")
    counter.views = 11
    django_distcache.save_behind(counter, update_fields=["views"])
    # The entry is then lost (evicted, say) while the change is still queued:
    config = config_for(PageCounter)
    cache = caches[config.cache_alias]
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
    count = cache.core.settings.behind_shards
    slots = [key_slot(behind_streams.shard_keys(cache.core, shard).stream) for shard in range(count)]
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
    original = cache.core.settings
    cache.core.settings = dataclasses.replace(original, behind_trigger_backlog=20)
    try:
        for number in range(1, 21):
            counter.views = number
            django_distcache.save_behind(counter, update_fields=["views"])
    finally:
        cache.core.settings = original
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
            locks = [
                behind_streams.shard_keys(cache.core, shard).lock
                for shard in range(cache.core.settings.behind_shards)
            ]

            def plan():
                return (yield [Call(lock, ("EXISTS", lock)) for lock in locks])

            return any(cache.core.run(plan(), "test"))

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


# -- issue: never backwards, never a valid write lost ------------------------------------------------
class _Died(BaseException):
    """Stands for the process dying at a step of the drain (the kill tests do it with kill -9)."""


def test_a_drain_that_died_after_its_commit_is_not_applied_again_in_slices(monkeypatch, settings):
    """A drain commits many changes of a row and dies before its cleanup. The next drain reads the same
    entries in small slices: it finds every one applied, so the row never steps back to an older value
    (before, each slice applied again, walking the row back through its history)."""
    counter = PageCounter.objects.create(name="slices")
    for number in range(1, 31):
        counter.views = number
        django_distcache.save_behind(counter, update_fields=["views"])

    def die(*args, **kwargs):
        raise _Died

    with monkeypatch.context() as patched:
        patched.setattr(drain, "_refresh_cached_rows", die)
        with pytest.raises(_Died):
            django_distcache.flush_behind()
    assert stored_views(counter.pk) == 30
    assert django_distcache.behind_metrics()["backlog"] == 30  # nothing was cleaned up
    seen = []
    real = drain._apply_transaction

    def watch(config, rows, db):
        real(config, rows, db)
        seen.append(stored_views(counter.pk))

    cache = caches["default"]
    monkeypatch.setattr(cache.core, "settings", dataclasses.replace(cache.core.settings, behind_batch_size=1))
    monkeypatch.setattr(drain, "READ_FACTOR", 3)  # slices of 3 entries
    monkeypatch.setattr(drain, "_apply_transaction", watch)
    report = django_distcache.flush_behind()
    assert seen and set(seen) == {30}  # never an older value, at any slice
    assert (report.changes_applied, report.changes_found_applied, report.rows_written) == (0, 30, 0)
    metrics = django_distcache.behind_metrics()
    assert (metrics["backlog"], metrics["changes_applied"]) == (0, 30)  # counted once, when cleaned up
    assert django_distcache.get_cached(PageCounter, pk=counter.pk).views == 30


def test_a_stale_drain_cannot_write_an_older_value_over_a_newer_one():
    """Drain A read changes 1..3 and stalled; drain B applied 1..6. When A's transaction finally runs, the
    row's mark says they are applied: A writes nothing (before, it committed its older value)."""
    counter = PageCounter.objects.create(name="stale")
    config = config_for(PageCounter)
    cache = caches[config.cache_alias]
    ids = []
    for number in range(1, 4):
        counter.views = number
        ids.append(django_distcache.save_behind(counter, update_fields=["views"]))
    stream = behind_streams.shard_keys(
        cache.core, behind_streams.shard_of(cache.core, config.label, counter.pk)
    ).stream

    def read():
        return (yield Call(stream, ("XRANGE", stream, "-", "+")))

    # What drain A read before it stalled:
    stalled = behind_streams.stream_entries(cache.core.run(read(), "test"))
    for number in range(4, 7):
        counter.views = number
        django_distcache.save_behind(counter, update_fields=["views"])
    assert django_distcache.flush_behind().changes_applied == 6  # drain B
    assert stored_views(counter.pk) == 6
    report = drain.DrainReport()
    keys = behind_streams.shard_keys(
        cache.core, behind_streams.shard_of(cache.core, config.label, counter.pk)
    )
    drain._apply_batch(cache.core, 0, keys, stalled, set(), report)  # drain A wakes up
    assert stored_views(counter.pk) == 6
    assert (report.changes_applied, report.rows_written) == (0, 0)
    assert django_distcache.get_cached(PageCounter, pk=counter.pk).views == 6


def test_a_failure_count_belongs_to_one_change_and_ends_with_it():
    """4 failures of a change, then the clash is fixed and it is applied; a new failing change of the same
    row starts from 1 (before, it was dead-lettered at once with the old count)."""
    attempts = caches["default"].core.settings.behind_max_attempts
    blocker = PageCounter.objects.create(name="blocker", code="X")
    row = PageCounter.objects.create(name="row")
    row.code = "X"
    django_distcache.save_behind(row, update_fields=["code"])
    for _ in range(attempts - 1):
        assert django_distcache.flush_behind().failed_rows == 1
    blocker.code = None
    blocker.save()  # the clash is fixed
    report = django_distcache.flush_behind()
    assert (report.changes_applied, report.dead_lettered) == (1, 0)
    assert PageCounter.objects.get(pk=row.pk).code == "X"
    PageCounter.objects.filter(pk=blocker.pk).update(code="Y")
    row.code = "Y"
    django_distcache.save_behind(row, update_fields=["code"])
    report = django_distcache.flush_behind()
    assert (report.failed_rows, report.dead_lettered) == (1, 0)  # its first failure, not its fifth
    assert dead_letters() == []


def test_a_poison_change_goes_to_the_dead_letters_alone():
    """A row gets valid changes, then one that always fails (a unique clash), then more valid ones. Only
    the failing change is dead-lettered; every valid one reaches the database, in order (before, the
    valid changes coalesced with it were dead-lettered with it)."""
    attempts = caches["default"].core.settings.behind_max_attempts
    PageCounter.objects.create(name="owner", code="TAKEN")
    row = PageCounter.objects.create(name="row")
    other = PageCounter.objects.create(name="other")
    row.views = 111
    django_distcache.save_behind(row, update_fields=["views"])
    row.code = "TAKEN"
    django_distcache.save_behind(row, update_fields=["code"])
    row.note = "after"
    django_distcache.save_behind(row, update_fields=["note"])
    django_distcache.incr_behind(PageCounter, row.pk, "views", 5)
    other.views = 7
    django_distcache.save_behind(other, update_fields=["views"])
    for _ in range(attempts - 1):
        report = django_distcache.flush_behind()
        assert report.dead_lettered == 0
        assert stored_views(row.pk) == 111  # what came before the failing change is in
        assert stored_views(other.pk) == 7  # other rows are not held back
    report = django_distcache.flush_behind()
    assert report.dead_lettered == 1
    stored = PageCounter.objects.values_list("views", "note", "code").get(pk=row.pk)
    assert stored == (116, "after", None)
    letters = dead_letters()
    assert [(letter.pk, letter.fields) for letter in letters] == [(row.pk, {"code": "TAKEN"})]
    assert "IntegrityError" in letters[0].error or "unique" in letters[0].error.lower()
    cached = django_distcache.get_cached(PageCounter, pk=row.pk)
    assert (cached.views, cached.note, cached.code) == (116, "after", None)  # the cache forgot it too
    assert django_distcache.behind_metrics()["backlog"] == 0


def test_save_behind_never_reads_the_database():
    """Not cached, not even loaded before: the change is queued and laid on the patch, no query is made
    (before, a row missing from the cache was SELECTed, waiting on a locked table)."""
    from django.db import connection as default_connection
    from django.test.utils import CaptureQueriesContext

    counter = PageCounter.objects.create(name="uncached")
    ghost = PageCounter(pk=counter.pk + 1000, name="ghost")
    with CaptureQueriesContext(default_connection) as queries:
        counter.views = 9
        django_distcache.save_behind(counter, update_fields=["views"])
        django_distcache.incr_behind(PageCounter, counter.pk, "views")
        ghost.views = 1
        django_distcache.save_behind(ghost, update_fields=["views"])  # no such row: the drain drops it
    assert len(queries) == 0
    assert django_distcache.get_cached(PageCounter, pk=counter.pk).views == 10
    report = django_distcache.flush_behind()
    assert (report.changes_applied, report.dropped_deleted) == (2, 1)
    assert stored_views(counter.pk) == 10


# -- counters -----------------------------------------------------------------------------------------
def test_incr_behind_loses_no_increment_under_concurrent_callers():
    """16 threads add to one counter while drains run: the cache shows every increment at once, and the
    database ends with their exact sum (read-then-save_behind lost most of them)."""
    import threading

    counter = PageCounter.objects.create(name="hot", views=1000)
    django_distcache.get_cached(PageCounter, pk=counter.pk)  # cached, as a hot row is
    per_thread, threads = 50, 16
    errors = []
    returned = []

    def work():
        try:
            for _ in range(per_thread):
                returned.append(django_distcache.incr_behind(PageCounter, counter.pk, "views"))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            connections.close_all()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for _ in range(3):
        django_distcache.flush_behind()  # drains while the increments arrive
    for worker in workers:
        worker.join()
    assert errors == []
    total = 1000 + per_thread * threads
    # Each call got the count its own increment made, drains or not: every number once.
    assert sorted(returned) == list(range(1001, total + 1))
    assert django_distcache.get_cached(PageCounter, pk=counter.pk).views == total
    django_distcache.flush_behind()
    assert stored_views(counter.pk) == total
    assert django_distcache.get_cached(PageCounter, pk=counter.pk).views == total
    assert django_distcache.behind_metrics()["backlog"] == 0


def test_sets_and_increments_of_one_field_apply_in_order():
    counter = PageCounter.objects.create(name="mixed", views=5)
    assert django_distcache.incr_behind(PageCounter, counter.pk, "views", 2) == 7
    config = config_for(PageCounter)
    caches[config.cache_alias].delete(config.entry_key("pk", counter.pk))  # evicted, say
    assert (
        django_distcache.incr_behind(PageCounter, counter.pk, "views", 0) is None
    )  # only the database knows
    assert django_distcache.get_cached(PageCounter, pk=counter.pk).views == 7  # the database and the patch
    counter.views = 100
    django_distcache.save_behind(counter, update_fields=["views"])  # 100
    assert django_distcache.incr_behind(PageCounter, counter.pk, "views", 3) == 103  # from the value set
    counter.views = models.F("views") - 1
    django_distcache.save_behind(counter, update_fields=["views"])  # 102, F() - n is an increment
    assert django_distcache.get_cached(PageCounter, pk=counter.pk).views == 102
    django_distcache.flush_behind()
    assert stored_views(counter.pk) == 102
    assert django_distcache.incr_behind(PageCounter, counter.pk, "views", -2) == 100  # the drain cached it
    assert django_distcache.get_cached(PageCounter, pk=counter.pk).views == 100
    django_distcache.flush_behind()
    assert stored_views(counter.pk) == 100


def test_incr_behind_refuses_bad_input_and_changes_nothing():
    counter = PageCounter.objects.create(name="bad-incr")
    for field, delta, error in [
        ("views", 1.5, TypeError),
        ("views", True, TypeError),
        ("views", "1", TypeError),
        ("views", 2**63, ValueError),
        ("name", 1, ValueError),
        ("nope", 1, ValueError),
        ("id", 1, ValueError),
    ]:
        with pytest.raises(error):
            django_distcache.incr_behind(PageCounter, counter.pk, field, delta)
    with pytest.raises(ValueError):
        django_distcache.incr_behind(PageCounter, "not-a-pk", "views")
    with pytest.raises(ImproperlyConfigured):
        django_distcache.incr_behind(Product, 1, "stock")
    assert django_distcache.behind_metrics()["backlog"] == 0


def test_a_forged_patch_value_is_not_shown():
    counter = PageCounter.objects.create(name="forged", note="real")
    config = config_for(PageCounter)
    cache = caches[config.cache_alias]
    counter.note = "queued"
    django_distcache.save_behind(counter, update_fields=["note"])

    def forge():
        head = yield from cache.core.namespace.current()
        patch = cache.core.physical_of(head, config.pending_key(counter.pk))
        yield Call(patch, ("HSET", patch, "v:note", cache.core.codec.encode("evil", b"elsewhere")))

    cache.core.run(forge(), "test")
    assert django_distcache.get_cached(PageCounter, pk=counter.pk).note == "real"


# -- drains that stop early or lie ----------------------------------------------------------------------
def _database_refusing():
    """Point the default connection at a database that cannot be reached (a closed port, or a file in a
    missing directory); the real settings come back when the context ends."""
    import contextlib

    @contextlib.contextmanager
    def refusing():
        connection.close()
        saved = dict(connection.settings_dict)
        if connection.vendor == "sqlite":
            connection.settings_dict["NAME"] = "/nonexistent-dir/refused.sqlite3"
        else:
            connection.settings_dict["PORT"] = "1"
        try:
            yield
        finally:
            connection.close()
            connection.settings_dict.clear()
            connection.settings_dict.update(saved)

    return refusing()


def test_flushbehind_fails_and_says_why_when_the_database_refuses(capsys):
    counter = PageCounter.objects.create(name="refused")
    for shard_row in range(3):
        counter.views = shard_row
        django_distcache.save_behind(counter, update_fields=["views"])
    with _database_refusing():
        report = django_distcache.flush_behind()
        assert not report.complete and report.database_errors >= 1
        with pytest.raises(CommandError, match="database failed"):
            call_command("flushbehind")
    assert django_distcache.behind_metrics()["backlog"] == 3  # kept for the next drain
    call_command("flushbehind")
    assert "applied 3 change(s)" in capsys.readouterr().out
    assert stored_views(counter.pk) == 2


def test_a_database_lost_right_after_each_commit_does_not_stop_the_drain(monkeypatch):
    """The database connection goes away right after every batch's commit (a terminated backend): the
    drain does not need it again before its next transaction, so every batch is cleaned up and every
    shard drained (before, the re-read of the rows after the commit raised and the rest of the drain,
    other shards included, was skipped)."""
    rows = [PageCounter.objects.create(name=f"r{n}") for n in range(12)]
    for row in rows:
        row.views = 5
        django_distcache.save_behind(row, update_fields=["views"])
    real = drain._apply_transaction
    lost = []

    def commit_then_lose_the_database(config, batch, db):
        while lost:
            lost.pop().__exit__(None, None, None)  # the next transaction connects again
        real(config, batch, db)
        refusing = _database_refusing()
        refusing.__enter__()  # from here on, a query would fail
        lost.append(refusing)

    monkeypatch.setattr(drain, "_apply_transaction", commit_then_lose_the_database)
    try:
        report = django_distcache.flush_behind()
    finally:
        while lost:
            lost.pop().__exit__(None, None, None)
    assert report.complete, report.problems
    assert report.changes_applied == 12
    assert django_distcache.behind_metrics()["backlog"] == 0
    assert all(stored_views(row.pk) == 5 for row in rows)
    assert all(django_distcache.get_cached(PageCounter, pk=row.pk).views == 5 for row in rows)


def test_a_terminated_database_backend_costs_one_shard_not_the_drain():
    """PostgreSQL terminates the drain's backend: the shard whose transaction it was waits for the next
    drain, and the other shards are drained on a new connection (before, the broken connection failed
    every shard after it)."""
    if connection.vendor != "postgresql":
        pytest.skip("terminating a backend (pg_terminate_backend) needs PostgreSQL; CI runs on it")
    rows = [PageCounter.objects.create(name=f"t{n}") for n in range(40)]
    for row in rows:
        row.views = 3
        django_distcache.save_behind(row, update_fields=["views"])
    connection.ensure_connection()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    killer = connections.create_connection("default")
    try:
        with killer.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    finally:
        killer.close()
    report = django_distcache.flush_behind()
    assert report.database_errors == 1 and not report.complete
    assert 0 < report.changes_applied < 40  # the other shards were drained
    report = django_distcache.flush_behind()
    assert report.complete
    assert all(stored_views(row.pk) == 3 for row in rows)


async def test_aget_cached_lays_the_queued_changes_over_the_row():
    """The async reader reads the entry and the patch in one round trip too, cached row or not."""
    from asgiref.sync import sync_to_async

    counter = await sync_to_async(PageCounter.objects.create)(name="async", views=1)
    await sync_to_async(django_distcache.incr_behind)(PageCounter, counter.pk, "views", 4)
    counter.note = "queued"
    await sync_to_async(django_distcache.save_behind)(counter, update_fields=["note"])
    found = await django_distcache.aget_cached(PageCounter, pk=counter.pk)
    assert (found.views, found.note) == (5, "queued")
    config = config_for(PageCounter)
    # Not cached: the database, patched.
    await caches[config.cache_alias].adelete(config.entry_key("pk", counter.pk))
    found = await django_distcache.aget_cached(PageCounter, pk=counter.pk)
    assert (found.views, found.note) == (5, "queued")
    await sync_to_async(django_distcache.flush_behind)()
    assert await sync_to_async(stored_views)(counter.pk) == 5
    await sync_to_async(connections.close_all)()
