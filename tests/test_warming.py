"""Warming against the real cluster, the real test database and real Celery worker processes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import uuid
from datetime import timedelta

import pytest
import redis
from celery.schedules import crontab
from django.conf import settings
from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test.utils import CaptureQueriesContext, override_settings

import django_distcache
from django_distcache import warming
from django_distcache.models.registry import config_for
from django_distcache.tasks import beat_schedule, warmer_beat_schedule
from django_distcache.warming import Chunk, run_warmer, warm_queryset, warmer
from tests.conftest import ROOT, Worker
from tests.model_app import warmers as app_warmers
from tests.model_app.models import Label, PageCounter, Product

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def isolated_registry():
    """Each test sees the discovered warmers (tests/model_app/warmers.py) plus its own, nothing else."""
    warming.discover()
    saved = dict(warming._registry)
    warming._registry.clear()
    warming._registry.update(
        {name: entry for name, entry in saved.items() if entry.function.__module__ == app_warmers.__name__}
    )
    yield
    warming._registry.clear()
    warming._registry.update(saved)


@pytest.fixture
def cache():
    cache = caches["default"]
    cache.clear()  # a new namespace: nothing an earlier test wrote is visible
    return cache


def make_products(count: int) -> list[Product]:
    """Rows the cache has not seen: bulk_create sends no signal, so no write-through fills them."""
    products = [Product(name=f"P{i}", slug=f"p-{i}", price=i, stock=i) for i in range(count)]
    return Product.objects.bulk_create(products)


def primaries() -> list[redis.Redis]:
    nodes = []
    for offset in range(6):
        client = redis.Redis(
            host="127.0.0.1", port=settings.CLUSTER_BASE_PORT + offset, decode_responses=True
        )
        if client.info("replication")["role"] == "master":
            nodes.append(client)
    return nodes


def server_counts(nodes: list[redis.Redis]) -> dict[str, int]:
    """SET calls and read events (one per batch of bytes read from a client socket) on the primaries."""
    counts = {"set_calls": 0, "reads": 0}
    for node in nodes:
        counts["set_calls"] += node.info("commandstats").get("cmdstat_set", {}).get("calls", 0)
        counts["reads"] += node.info("stats")["total_reads_processed"]
    return counts


# -- registration ---------------------------------------------------------------------------------------
def test_registration_refuses_mistakes_with_clear_errors():
    def function():
        yield "k", 1

    with pytest.raises(ImproperlyConfigured, match="warmer name"):
        warmer("has space")(function)
    with pytest.raises(ImproperlyConfigured, match="warmer name"):
        warmer("")(function)
    with pytest.raises(ImproperlyConfigured, match="timeout must be a positive"):
        warmer("t", timeout=0)(function)
    with pytest.raises(ImproperlyConfigured, match="timeout must be a positive"):
        warmer("t", timeout="soon")(function)
    with pytest.raises(ImproperlyConfigured, match="tags must be a list"):
        warmer("t", tags="catalogue")(function)
    with pytest.raises(ImproperlyConfigured, match="tags must be a list of strings; every entry"):
        warmer("t", tags=lambda: ["x"])(function)
    with pytest.raises(ImproperlyConfigured, match="schedule must be None, seconds"):
        warmer("t", schedule="*/5 * * * *")(function)
    with pytest.raises(ImproperlyConfigured, match="positive interval"):
        warmer("t", schedule=timedelta(0))(function)
    with pytest.raises(ImproperlyConfigured, match="using must be a cache alias"):
        warmer("t", using="")(function)
    with pytest.raises(TypeError, match="decorates a function"):
        warmer("t")(42)

    async def asynchronous():
        return {}

    with pytest.raises(ImproperlyConfigured, match="is async"):
        warmer("t")(asynchronous)

    def two(a, b):
        return {}

    with pytest.raises(ImproperlyConfigured, match="takes 2 arguments"):
        warmer("t")(two)
    assert "t" not in warming._registry


def test_two_warmers_with_one_name_is_an_error_but_a_reimport_is_not():
    def first():
        yield "a", 1

    def second():
        yield "b", 2

    warmer("twice")(first)
    with pytest.raises(ImproperlyConfigured, match="two warmers are named 'twice'"):
        warmer("twice")(second)
    assert warming.get_warmer("twice").function is first

    def first_again():  # the same module and qualified name: its module was imported again
        yield "a", 1

    first_again.__qualname__ = first.__qualname__
    warmer("twice")(first_again)
    assert warming.get_warmer("twice").function is first_again


def test_warmer_is_exported_lazily_and_returns_the_function():
    assert django_distcache.warmer is warmer
    assert django_distcache.run_warmer is run_warmer

    def plain():
        return {"k": 1}

    assert warmer("exported")(plain) is plain
    with pytest.raises(LookupError, match="no warmer is named 'nope'"):
        warming.get_warmer("nope")


def test_warmers_are_discovered_from_installed_apps():
    names = {entry.name: entry for entry in warming.registered_warmers()}
    assert {"model-app-products", "model-app-label-names", "model-app-numbers"} <= set(names)
    assert names["model-app-products"].origin == "tests.model_app.warmers.products"
    assert names["model-app-squares"].takes_chunk and not names["model-app-numbers"].takes_chunk


# -- generator warmers ----------------------------------------------------------------------------------
def test_pairs_are_written_and_read_back_with_the_warmers_timeout(cache):
    prefix = uuid.uuid4().hex[:8]

    @warmer("pairs", timeout=120)
    def pairs():
        for number in range(2500):
            yield f"{prefix}:{number}", {"number": number}

    result = run_warmer("pairs", chunk_size=1000)
    assert result.ok and result.error is None
    assert (result.entries, result.batches) == (2500, 3)
    assert result.bytes > 2500 * 10
    assert cache.get_many([f"{prefix}:{n}" for n in range(2500)]) == {
        f"{prefix}:{n}": {"number": n} for n in range(2500)
    }
    assert 110 <= cache.ttl(f"{prefix}:7") <= 120


def test_a_mapping_is_a_warmer_too_and_bad_items_fail_the_warmer(cache):
    @warmer("mapping")
    def mapping():
        return {"mapped:a": 1, "mapped:b": 2}

    @warmer("not-pairs")
    def not_pairs():
        yield "just-a-key"

    @warmer("not-iterable")
    def not_iterable():
        return 42

    assert run_warmer("mapping").entries == 2
    assert cache.get("mapped:b") == 2
    bad = run_warmer("not-pairs")
    assert not bad.ok and "expected a (key, value) pair" in bad.error
    assert "returned int" in run_warmer("not-iterable").error


def test_writes_are_batched_per_node_never_one_round_trip_per_key(cache):
    """Observed on the servers: every entry is one SET, but the primaries read the SETs from their sockets
    in a few dozen read events (pipelined batches), where one round trip per key would need one each."""
    nodes = primaries()
    before = server_counts(nodes)
    result = run_warmer("model-app-numbers", chunk_size=1000)
    after = server_counts(nodes)
    entries = app_warmers.NUMBERS
    assert result.ok and result.entries == entries
    assert result.batches == entries // 1000  # one set_many batch per chunk
    assert after["set_calls"] - before["set_calls"] >= entries
    assert after["reads"] - before["reads"] < entries / 10
    assert cache.get("number:2999") == app_warmers.VALUE


def test_invalidating_a_tag_after_warming_makes_the_entries_miss(cache):
    assert run_warmer("model-app-numbers").ok
    assert cache.get("number:5") == app_warmers.VALUE
    cache.invalidate_tags("numbers")
    assert cache.get_many([f"number:{n}" for n in range(app_warmers.NUMBERS)]) == {}


def test_an_invalidation_during_warming_makes_the_later_entries_born_stale(cache):
    """The tag versions are read before the warmer computes anything: entries computed after an
    invalidation must not carry the new version (they could hold data from before it)."""
    prefix = uuid.uuid4().hex[:8]

    @warmer("racing", tags=["racing-tag"])
    def racing():
        for number in range(3000):
            if number == 1500:
                caches["default"].invalidate_tags("racing-tag")  # as another process would
            yield f"{prefix}:{number}", number

    @warmer("control", tags=["racing-tag"])
    def control():
        for number in range(3000):
            yield f"{prefix}-control:{number}", number

    result = run_warmer("racing", chunk_size=1000)
    assert result.ok and result.entries == 3000
    assert cache.get_many([f"{prefix}:{n}" for n in range(3000)]) == {}
    # The same warmer without the invalidation: every entry is there.
    assert run_warmer("control", chunk_size=1000).entries == 3000
    assert len(cache.get_many([f"{prefix}-control:{n}" for n in range(3000)])) == 3000


def test_a_warmer_that_raises_keeps_what_it_wrote_and_reports_the_error(cache):
    result = run_warmer("model-app-broken")
    assert not result.ok
    assert result.errors == 1 and result.error == "RuntimeError: this warmer is broken on purpose"
    assert result.entries == 1  # the chunk before the failure was written
    assert cache.get("broken:1") == 1


def test_chunks_split_the_items_into_blocks_dealt_round_robin():
    chunks = [Chunk(index, 3, 2) for index in range(3)]
    taken = [list(chunk.take(range(13))) for chunk in chunks]
    assert taken == [[0, 1, 6, 7, 12], [2, 3, 8, 9], [4, 5, 10, 11]]
    assert list(Chunk().take(range(5))) == [0, 1, 2, 3, 4]


def test_running_chunks_of_a_generator_writes_each_entry_exactly_once(cache):
    """What the Celery tasks do: each runs the generator and writes only the blocks its chunk owns."""
    results = [run_warmer("model-app-numbers", chunk=Chunk(index, 4, 250)) for index in range(4)]
    assert [r.entries for r in results] == [750, 750, 750, 750]
    assert len(cache.get_many([f"number:{n}" for n in range(app_warmers.NUMBERS)])) == app_warmers.NUMBERS
    # A warmer that takes its chunk filters its own input instead.
    squares = [run_warmer("model-app-squares", chunk=Chunk(index, 3, 100)) for index in range(3)]
    assert sum(r.entries for r in squares) == 1000 and cache.get("square:999") == 999 * 999


# -- QuerySet warmers ---------------------------------------------------------------------------------------
def test_a_queryset_warmer_fills_every_lookup_so_get_cached_runs_no_query(cache):
    products = make_products(30)
    result = run_warmer("model-app-products", chunk_size=7)
    assert result.ok, result.error
    assert result.entries == 60  # two lookups (pk, slug) per row
    assert result.batches == 5  # ceil(30 / 7) chunks, one compare-and-set batch each
    with CaptureQueriesContext(connection) as queries:
        for product in products:
            by_pk = django_distcache.get_cached(Product, pk=product.pk)
            by_slug = django_distcache.get_cached(Product, slug=product.slug)
            assert by_pk.name == by_slug.name == product.name and by_pk.price == product.price
    assert len(queries) == 0
    # The stored form is the one get_cached's fills store.
    config = config_for(Product)
    assert cache.get(config.entry_key("pk", products[3].pk)) == config.row_payload(products[3], cache.core)


def test_queryset_entries_carry_the_models_tags_and_the_warmers(cache):
    product = make_products(2)[0]
    assert run_warmer("model-app-products").ok
    for tag in ("warmed-products", "catalogue", f"model_app.product:{product.pk}"):
        assert run_warmer("model-app-products").ok
        cache.invalidate_tags(tag)
        with CaptureQueriesContext(connection) as queries:
            django_distcache.get_cached(Product, pk=product.pk)
        assert len(queries) == 1, tag


def test_a_write_during_warming_is_never_overwritten_by_the_row_read_before_it(cache, monkeypatch):
    """A save commits after the warmer read a chunk of rows and before it writes them: the save's
    write-through voids the warmer's lease, so the chunk is read again and the cache ends with the new
    row, never the one read before the save."""
    product = make_products(3)[1]
    fill_rows_plan = warming._fill_rows_plan
    stale_names = []

    def save_first(cache, config, lease, rows, *args):
        if not stale_names:
            stale_names.extend(row.name for row in rows if row.pk == product.pk)
            renamed = Product.objects.get(pk=product.pk)
            renamed.name = "renamed"
            renamed.save()  # autocommit: committed, and its write-through done, at once
        return fill_rows_plan(cache, config, lease, rows, *args)

    monkeypatch.setattr(warming, "_fill_rows_plan", save_first)
    result = run_warmer("model-app-products")
    assert stale_names == ["P1"] and result.ok, result.error
    assert result.entries == 6
    with CaptureQueriesContext(connection) as queries:
        assert django_distcache.get_cached(Product, pk=product.pk).name == "renamed"
        assert django_distcache.get_cached(Product, slug=product.slug).name == "renamed"
    assert len(queries) == 0


def test_warming_a_write_behind_model_keeps_a_change_still_queued(cache):
    counter = PageCounter.objects.create(name="home")
    other = PageCounter.objects.create(name="other", views=3)
    counter.views = 5
    django_distcache.save_behind(counter, update_fields=["views"])  # in the cache now, the database later
    result = run_warmer("model-app-counters")
    assert result.ok and (result.entries, result.skipped) == (1, 1)
    assert django_distcache.get_cached(PageCounter, pk=counter.pk).views == 5
    assert django_distcache.get_cached(PageCounter, pk=other.pk).views == 3
    django_distcache.flush_behind()


def test_warm_queryset_helper_takes_any_queryset_slice_and_tags(cache):
    products = make_products(10)
    result = warm_queryset(Product.objects.order_by("-stock")[:4], tags=["top-four"], chunk_size=3)
    assert result.entries == 8
    with CaptureQueriesContext(connection) as queries:
        for product in products[-4:]:
            django_distcache.get_cached(Product, slug=product.slug)
    assert len(queries) == 0
    cache.invalidate_tags("top-four")
    with CaptureQueriesContext(connection) as queries:
        django_distcache.get_cached(Product, slug=products[-1].slug)
    assert len(queries) == 1
    from django.contrib.auth.models import Group

    with pytest.raises(ImproperlyConfigured, match="not registered with django_distcache.cache_model"):
        warm_queryset(Group.objects.all())


def test_a_queryset_warmer_refuses_a_cache_its_model_is_not_read_from(cache):
    other = dict(settings.CACHES["default"], KEY_PREFIX="warm-other")
    with override_settings(CACHES={"default": settings.CACHES["default"], "other": other}):
        make_products(1)
        result = run_warmer("model-app-products", using="other")
        assert not result.ok and "would never be read" in result.error
        assert run_warmer("model-app-label-names", using="other").ok


# -- the command -----------------------------------------------------------------------------------------
def run_command(*args: str) -> tuple[str, str, CommandError | None]:
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        call_command("warmcache", *args, stdout=stdout, stderr=stderr)
    except CommandError as error:
        return stdout.getvalue(), stderr.getvalue(), error
    return stdout.getvalue(), stderr.getvalue(), None


def summary_rows(stdout: str) -> dict[str, list[str]]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("warmer "))
    return {line.split()[0]: line.split()[1:] for line in lines[start + 2 :] if line.strip()}


def test_the_command_runs_warmers_shows_progress_and_a_summary(cache):
    Label.objects.create(name="red")
    make_products(5)
    stdout, stderr, error = run_command("model-app-label-names", "model-app-products", "--chunk-size", "2")
    assert error is None
    rows = summary_rows(stdout)
    assert rows["model-app-label-names"][0] == "1" and rows["model-app-products"][0] == "10"
    assert rows["total"][0] == "11" and rows["total"][-1] == "0"
    assert "[1/2] model-app-label-names: done, 1 entries" in stderr
    assert "[2/2] model-app-products: done, 10 entries" in stderr
    assert cache.get(f"label-name:{Label.objects.get().pk}") == "red"


def test_a_failing_warmer_fails_the_command_after_the_others_ran(cache):
    Label.objects.create(name="blue")
    stdout, stderr, error = run_command("model-app-broken", "model-app-label-names")
    assert error is not None
    assert (
        "1 of 2 warmer(s) failed: model-app-broken (RuntimeError: this warmer is broken on purpose)"
        in str(error)
    )
    rows = summary_rows(stdout)
    assert rows["model-app-broken"][-1] == "1" and rows["model-app-label-names"][0] == "1"
    assert "model-app-broken: FAILED" in stderr
    assert cache.get(f"label-name:{Label.objects.get().pk}") == "blue"


def test_the_command_exits_with_status_1_when_a_warmer_fails():
    """The real command line, in a process of its own: status 1, the summary still printed."""
    Label.objects.create(name="green")
    environment = dict(os.environ, DJANGO_SETTINGS_MODULE="tests.settings")
    environment["DISTCACHE_TEST_DB_NAME"] = str(connection.settings_dict["NAME"])
    environment["DISTCACHE_TEST_CLUSTER_PORT"] = str(settings.CLUSTER_BASE_PORT)
    command = [sys.executable, "-m", "django", "warmcache", "--all"]
    finished = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 1, finished.stderr
    assert "model-app-broken (RuntimeError" in finished.stderr
    rows = summary_rows(finished.stdout)
    assert rows["model-app-label-names"][0] == "1" and rows["model-app-numbers"][0] == "3,000"
    ok = subprocess.run(
        [*command[:-1], "model-app-label-names"], cwd=ROOT, env=environment, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr


def test_dry_run_counts_and_writes_nothing(cache):
    products = make_products(4)
    nodes = primaries()
    before = server_counts(nodes)
    stdout, _, error = run_command("model-app-numbers", "model-app-products", "--dry-run")
    after = server_counts(nodes)
    assert error is None
    assert "Dry run: 2 warmer(s) would run: model-app-numbers, model-app-products" in stdout
    rows = summary_rows(stdout)
    assert rows["model-app-numbers"][0] == "3,000" and rows["model-app-products"][0] == "8"
    assert after["set_calls"] == before["set_calls"]
    assert cache.get("number:1") is None
    with CaptureQueriesContext(connection) as queries:
        django_distcache.get_cached(Product, pk=products[0].pk)
    assert len(queries) == 1  # a miss: the dry run filled nothing


def test_the_command_refuses_unclear_requests():
    assert "name the warmers to run, or use --all" in str(run_command()[2])
    assert "model-app-products" in str(run_command()[2])
    assert "unknown warmer(s): nope" in str(run_command("nope")[2])
    assert "not both" in str(run_command("--all", "model-app-numbers")[2])
    assert "--chunk-size must be at least 1" in str(run_command("--all", "--chunk-size", "0")[2])
    assert "leave out --async" in str(run_command("--all", "--async", "--dry-run")[2])


# -- Celery ------------------------------------------------------------------------------------------------
def test_task_arguments_split_querysets_by_pk_and_generators_into_chunks():
    products = make_products(5)
    pks = [product.pk for product in products]
    split = warming.task_arguments(
        warming.get_warmer("model-app-products"), chunk_size=2, tasks=None, run_id="r", using=None
    )
    assert [task["pks"] for task in split] == [pks[0:2], pks[2:4], pks[4:5]]
    assert {task["chunk_count"] for task in split} == {3}
    numbers = warming.get_warmer("model-app-numbers")
    assert len(warming.task_arguments(numbers, chunk_size=10, tasks=None, run_id=None, using=None)) == 1
    assert len(warming.task_arguments(numbers, chunk_size=10, tasks=3, run_id=None, using=None)) == 3
    squares = warming.get_warmer("model-app-squares")
    assert len(warming.task_arguments(squares, chunk_size=10, tasks=None, run_id=None, using=None)) == 4


def test_async_runs_the_warmers_on_a_real_worker_and_follows_them(cache, start_worker):
    start_worker("warm-a")
    start_worker("warm-b")
    products = make_products(25)
    stdout, stderr, error = run_command(
        "model-app-numbers", "model-app-products", "model-app-squares",
        "--async", "--chunk-size", "10", "--tasks", "3", "--timeout", "90",
    )  # fmt: skip
    assert error is None, (stdout, stderr)
    rows = summary_rows(stdout)
    assert rows["model-app-numbers"][0] == "3,000"
    assert rows["model-app-products"][0] == "50"
    assert rows["model-app-squares"][0] == "1,000"
    assert "sent 9 task(s) for 3 warmer(s)" in stderr  # 3 + ceil(25 / 10) + 3
    assert len(cache.get_many([f"number:{n}" for n in range(app_warmers.NUMBERS)])) == app_warmers.NUMBERS
    assert cache.get("square:999") == 999 * 999
    with CaptureQueriesContext(connection) as queries:
        for product in products:
            assert django_distcache.get_cached(Product, slug=product.slug).pk == product.pk
    assert len(queries) == 0


def test_async_reports_a_failing_warmer_and_exits_non_zero(cache, start_worker):
    start_worker("warm-fail")
    Label.objects.create(name="violet")
    stdout, stderr, error = run_command(
        "model-app-broken", "model-app-label-names", "--async", "--timeout", "60"
    )
    assert error is not None and "model-app-broken (RuntimeError: this warmer is broken on purpose)" in str(
        error
    )
    rows = summary_rows(stdout)
    assert rows["model-app-broken"][-1] == "1" and rows["model-app-label-names"][0] == "1"
    assert cache.get(f"label-name:{Label.objects.get().pk}") == "violet"

    # A warmer the worker does not have (it runs older code): the task says so, the command does not wait.
    @warmer("only-here")
    def only_here():
        yield "only-here", 1

    started = time.monotonic()
    _, _, error = run_command("only-here", "--async", "--timeout", "60")
    assert (
        error is not None and "no warmer is named 'only-here'" in str(error) and "in the worker" in str(error)
    )
    assert time.monotonic() - started < 30


def test_async_gives_up_when_no_worker_runs(cache, broker):
    import tests.celery_app  # noqa: F401  (the app the tasks are sent through)

    redis.Redis.from_url(broker.url).flushdb()
    stdout, _, error = run_command("model-app-label-names", "--async", "--timeout", "1")
    assert error is not None and "gave up after 1s" in str(error)
    redis.Redis.from_url(broker.url).flushdb()  # no worker of a later test runs the task left behind


def test_warmer_beat_schedule_lists_scheduled_warmers_and_beat_schedule_is_unchanged():
    @warmer("nightly", schedule=crontab(hour=3, minute=0))
    def nightly():
        return {}

    @warmer("every-minute", schedule=timedelta(minutes=1))
    def every_minute():
        return {}

    entries = warmer_beat_schedule()
    assert entries["django_distcache.warm[model-app-heartbeat]"] == {
        "task": "django_distcache.warm",
        "schedule": 1.0,
        "kwargs": {"name": "model-app-heartbeat"},
        "options": {"expires": 1.0},
    }
    assert entries["django_distcache.warm[nightly]"]["options"] == {}
    assert entries["django_distcache.warm[every-minute]"]["options"] == {"expires": 60.0}
    assert "django_distcache.warm[model-app-numbers]" not in entries
    assert list(beat_schedule()) == ["django_distcache.flush_behind[default]"]


class CustomWorker(Worker):
    """A worker on another Celery app module or with other options than the `start_worker` fixture's."""

    def __init__(self, name: str, app: str, *options: str) -> None:
        from django.db import connection as db

        self.log_path = ROOT / ".devcluster" / f"worker-{settings.CLUSTER_BASE_PORT}-{name}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ)
        env["DISTCACHE_TEST_DB_NAME"] = str(db.settings_dict["NAME"])
        env["DISTCACHE_TEST_CLUSTER_PORT"] = str(settings.CLUSTER_BASE_PORT)
        command = [sys.executable, "-m", "celery", "-A", app, "worker", "-P", "solo", "-n", f"{name}@%h",
                   "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "info", *options]  # fmt: skip
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)


def test_async_tasks_go_to_the_queue_given(cache, broker):
    """Only a worker of the named queue runs: the tasks went there, not to the default queue."""
    import tests.celery_app  # noqa: F401  (the app the tasks are sent through)

    redis.Redis.from_url(broker.url).flushdb()
    worker = CustomWorker("warm-queue", "tests.celery_app", "-Q", "warming-only")
    try:
        worker.wait_ready()
        stdout, stderr, error = run_command(
            "model-app-squares", "--async", "--queue", "warming-only", "--timeout", "60"
        )
        assert error is None, (stdout, stderr)
        assert summary_rows(stdout)["model-app-squares"][0] == "1,000"
    finally:
        worker.stop()


def test_a_scheduled_warmer_runs_on_celery_beat(cache, broker):
    redis.Redis.from_url(broker.url).flushdb()
    beat_file = ROOT / ".devcluster" / f"warm-beat-{settings.CLUSTER_BASE_PORT}"
    # tests/warming_beat_app.py: a Celery app wired as the docs say (scheduled warmers added to beat
    # from the import_modules signal), with an embedded beat.
    worker = CustomWorker("warm-beat", "tests.warming_beat_app", "-B", "-s", str(beat_file))
    try:
        worker.wait_ready()
        deadline = time.monotonic() + 30
        while cache.get("warm-heartbeat") is None:
            assert time.monotonic() < deadline, worker.log_path.read_text()[-3000:]
            time.sleep(0.1)
        first = cache.get("warm-heartbeat")
        while cache.get("warm-heartbeat") == first:  # and again, a second later
            assert time.monotonic() < deadline, worker.log_path.read_text()[-3000:]
            time.sleep(0.1)
    finally:
        worker.stop()


# -- pages -------------------------------------------------------------------------------------------------
RENDERS: list[str] = []


def _catalogue_page(request, slug):
    from django.http import HttpResponse

    RENDERS.append(slug)
    return HttpResponse(f"<h1>{slug}</h1>")


def _page_setting_a_cookie(request):
    from django.http import HttpResponse

    response = HttpResponse("welcome")
    response.set_cookie("seen", "1")
    return response


def _urlpatterns():
    from django.urls import path

    from django_distcache import cached_view

    return [
        path("page/<slug:slug>/", cached_view(timeout=60)(_catalogue_page)),
        path("welcome/", cached_view(timeout=60)(_page_setting_a_cookie)),
    ]


urlpatterns = _urlpatterns()
with_pages = override_settings(
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["*", ".shop.example", "other.example"],
    MIDDLEWARE=[
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
    ],
)


@with_pages
def test_a_page_warmer_stores_pages_under_the_key_of_a_visitors_first_get(cache):
    from django.test import Client

    from django_distcache.warming import page_warmer

    @page_warmer("shop-pages")  # the host: the first ALLOWED_HOSTS entry naming one, "shop.example"
    def shop_pages():
        yield "/page/mug/"
        yield "/page/kettle/?utm_source=mail"  # a tracking parameter: the same page as /page/kettle/
        yield "/welcome/"
        yield "/nowhere/"

    RENDERS.clear()
    result = run_warmer("shop-pages")
    assert (result.entries, result.skipped, result.errors) == (2, 0, 2)
    assert "/welcome/ (not stored by @cached_view: pass)" in result.error
    assert "/nowhere/ (answered 404)" in result.error
    assert RENDERS == ["mug", "kettle"]
    visitor = Client(HTTP_HOST="shop.example")
    assert visitor.get("/page/mug/").cache_status == "hit"
    assert visitor.get("/page/kettle/").cache_status == "hit"
    assert RENDERS == ["mug", "kettle"]  # the visitors' first GETs rendered nothing
    assert Client(HTTP_HOST="other.example").get("/page/mug/").cache_status == "miss"  # the host is keyed
    again = run_warmer("shop-pages")
    assert (again.entries, again.skipped) == (0, 2)  # in the cache already: left as they are
    assert run_warmer("shop-pages", dry_run=True).entries == 3  # /nowhere/ resolves to no view

    @page_warmer("elsewhere-pages", host="www.elsewhere.example:8443", secure=True)
    def elsewhere_pages():
        return ["/page/teapot/"]

    with override_settings(ALLOWED_HOSTS=["www.elsewhere.example"]):
        assert run_warmer("elsewhere-pages").entries == 1
        secure_visitor = Client(HTTP_HOST="www.elsewhere.example:8443")
        assert secure_visitor.get("/page/teapot/", secure=True).cache_status == "hit"
        assert secure_visitor.get("/page/teapot/").cache_status == "miss"  # http is another page
    with override_settings(ALLOWED_HOSTS=["*"]):
        assert "give page_warmer(host=...)" in run_warmer("shop-pages").error


# -- the example shop ----------------------------------------------------------------------------------------
EXAMPLE = ROOT / "example_project"

SHOP_CHECK = r"""
import json
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django_distcache import get_cached
from catalogue.models import Category, Product

rows = list(Product.objects.all()) + list(Category.objects.all())
with CaptureQueriesContext(connection) as queries:
    for row in rows:
        assert get_cached(type(row), pk=row.pk).name == row.name
        assert get_cached(type(row), slug=row.slug).pk == row.pk
print(json.dumps({"rows": len(rows), "queries": len(queries)}))
"""


# The first anonymous visit of each page, as a visitor of http://127.0.0.1:8000/ (what `make demo` serves)
# makes it: the footer's badge says how the page was served, and the SQL it ran is counted.
PAGES_CHECK = r"""
import json, re
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from catalogue.models import Product

visitor = Client(HTTP_HOST="127.0.0.1:8000")
urls = ["/", "/categories/"] + [product.get_absolute_url() for product in Product.objects.order_by("pk")]
seen = {}
for url in urls:
    with CaptureQueriesContext(connection) as queries:
        response = visitor.get(url)
    badge = re.search(r'class="badge (\w+)"', response.content.decode())
    # The view counter is left out: its row (created on a product's first view, in a transaction of its
    # own) and its statements are not the page's.
    page_sql = [
        q["sql"] for q in queries.captured_queries
        if "productviews" not in q["sql"].lower()
        and not re.match(r"\s*(SAVEPOINT|RELEASE|ROLLBACK|BEGIN|COMMIT)", q["sql"], re.I)
    ]
    seen[url] = [response.status_code, badge and badge.group(1), len(page_sql)]
print(json.dumps(seen))
"""


def test_the_example_shops_warmers_fill_its_catalogue(tmp_path):
    """`make demo` runs `warmcache --all` in the shop: afterwards every category and product page's rows
    are read from the cache, and the first anonymous visit of each page is a cache hit."""
    env = {
        **{k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "DJANGO_SETTINGS_MODULE"}},
        "DJANGO_SETTINGS_MODULE": "shop.settings",
        "DISTCACHE_LOCATION": ",".join(settings.CLUSTER_LOCATION),
        "DISTCACHE_KEY_PREFIX": f"example-warm-{uuid.uuid4().hex[:12]}",
        "DISTCACHE_EXAMPLE_DB": str(tmp_path / "shop.sqlite3"),
    }

    def manage(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=EXAMPLE,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"manage.py {args[0]} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    manage("migrate", "--noinput", "-v0")
    manage("seed_catalogue", "--products", "30")
    manage("shell", "-c", "from django.core.cache import cache; cache.clear()")  # what seeding cached
    rows = summary_rows(manage("warmcache", "--all"))
    assert rows["catalogue-products"][0] == "60" and rows["catalogue-products"][-1] == "0"
    assert int(rows["catalogue-categories"][0].replace(",", "")) > 0
    assert rows["catalogue-pages"][0] == "32" and rows["catalogue-pages"][-1] == "0"  # 2 + 30 products
    checked = json.loads(manage("shell", "-c", SHOP_CHECK).strip().splitlines()[-1])
    assert checked["rows"] > 30 and checked["queries"] == 0  # every get_cached, by pk and by slug, hits
    pages = json.loads(manage("shell", "-c", PAGES_CHECK).strip().splitlines()[-1])
    assert len(pages) == 32
    # Each first visit: 200, a hit, no SQL but the category page's list of primary keys (the view counter
    # of a product page, written behind, is left out).
    expected = {url: [200, "hit", 1 if url == "/categories/" else 0] for url in pages}
    assert pages == expected
