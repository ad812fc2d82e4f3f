"""`warmcache --async` against real Celery worker processes that die: kill -9 of a whole prefork worker
(its pool child included) or of its pool child alone, mid-chunk, with the other chunks prefetched.

The warmer (tests/worker_warmers.py) writes the first block of each chunk, then waits for a gate the test
opens: a worker killed once a first block is in the cache is killed in the middle of a chunk, whatever the
machine's speed. No assertion is on elapsed time; the waits have generous deadlines.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest
import redis
from django.conf import settings
from django.core.cache import caches
from django.core.management import call_command
from django.core.management.base import CommandError

from django_distcache import warming
from tests import worker_warmers
from tests.conftest import ROOT

pytestmark = pytest.mark.django_db(transaction=True)

NAME = "worker-test-gated"
SPLIT = ("--tasks", "3", "--chunk-size", "2")  # three chunks of two blocks of two items


class GroupWorker:
    """A prefork worker (one pool child) in a process group of its own, so that one kill -9 reaches the
    main process and its pool child at once. It imports the gated warmer (`-I`)."""

    def __init__(self, name: str) -> None:
        from django.db import connection

        self.log_path = ROOT / ".devcluster" / f"worker-{settings.CLUSTER_BASE_PORT}-{name}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ)
        env["DISTCACHE_TEST_DB_NAME"] = str(connection.settings_dict["NAME"])
        env["DISTCACHE_TEST_CLUSTER_PORT"] = str(settings.CLUSTER_BASE_PORT)
        command = [sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker", "-P", "prefork",
                   "-c", "1", "-n", f"{name}@%h", "--without-gossip", "--without-mingle",
                   "--without-heartbeat", "-l", "info", "-I", "tests.worker_warmers"]  # fmt: skip
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout: float = 60.0) -> GroupWorker:
        wait_until(lambda: "ready." in self.log_path.read_text(errors="replace"), timeout, self.tail)
        return self

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def pool_child(self) -> int:
        found = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True)
        children = [int(pid) for pid in found.stdout.split()]
        assert len(children) == 1, f"expected one pool child, found {children}"
        return children[0]

    def kill_all(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self.log.close()


def wait_until(condition: Callable[[], bool], timeout: float, explain: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, explain()
        time.sleep(0.05)


@pytest.fixture
def cache():
    cache = caches["default"]
    cache.clear()  # a new namespace: no gate, no item of an earlier test
    return cache


@pytest.fixture
def workers(broker):
    """start(name) -> a ready GroupWorker; the broker is emptied before and after, the workers stopped."""
    import tests.celery_app  # noqa: F401  (this process sends tasks through the same app and broker)

    redis.Redis.from_url(broker.url).flushdb()
    started: list[GroupWorker] = []

    def start(name: str) -> GroupWorker:
        worker = GroupWorker(name)
        started.append(worker)
        return worker.wait_ready()

    yield start
    for worker in started:
        worker.stop()
    redis.Redis.from_url(broker.url).flushdb()  # chunks sent again to no worker are not left for later tests


class CommandThread(threading.Thread):
    """`manage.py warmcache` running while the test kills and starts workers."""

    def __init__(self, *args: str) -> None:
        super().__init__(daemon=True)
        self.args = args
        self.stdout, self.stderr = io.StringIO(), io.StringIO()
        self.error: CommandError | None = None

    def run(self) -> None:
        try:
            call_command("warmcache", *self.args, stdout=self.stdout, stderr=self.stderr)
        except CommandError as error:
            self.error = error

    def report(self) -> str:
        """What the command said so far (for a wait that timed out)."""
        return (
            f"warmcache {'runs' if self.is_alive() else 'ended'}; error: {self.error}\n"
            f"stdout:\n{self.stdout.getvalue()}\nstderr:\n{self.stderr.getvalue()}"
        )

    def finish(self, timeout: float = 120) -> CommandThread:
        self.join(timeout)
        assert not self.is_alive(), f"warmcache still runs:\n{self.stderr.getvalue()}"
        return self


def first_block_written(cache) -> bool:
    return cache.get(worker_warmers.item_key(0)) is not None


def summary_entries(stdout: str) -> str:
    line = next(line for line in stdout.splitlines() if line.startswith(NAME))
    return line.split()[1]


def test_with_no_worker_the_run_fails_within_the_stall_timeout_naming_its_chunks(cache, workers):
    command = CommandThread(NAME, "--async", *SPLIT, "--stall-timeout", "3", "--timeout", "600")
    command.start()
    command.finish()
    message = str(command.error)
    assert command.error is not None
    assert f"{NAME} (no chunk finished and no heartbeat was seen for 3s (--stall-timeout)" in message
    assert "chunk(s) 0, 1, 2 of 3 not completed (none of them begun)" in message
    assert "no worker answered a ping within 1s" in message
    assert "gave up" not in message  # the stall bound ended it, not --timeout


def test_a_killed_worker_s_running_and_prefetched_chunks_run_again_on_a_restarted_worker(cache, workers):
    first = workers("warm-killed")
    command = CommandThread(NAME, "--async", *SPLIT, "--stall-timeout", "12", "--timeout", "600")
    command.start()
    # Chunk 0 wrote its first block and waits at the gate; chunks 1 and 2 are prefetched by the worker.
    wait_until(lambda: first_block_written(cache), 60, lambda: f"{command.report()}\n{first.tail()}")
    first.kill_all()
    cache.set(worker_warmers.GATE_KEY, True)
    workers("warm-restarted")
    command.finish()
    assert command.error is None, command.stderr.getvalue()
    assert "sent again" in command.stderr.getvalue()
    found = cache.get_many([worker_warmers.item_key(n) for n in range(worker_warmers.ITEMS)])
    assert sorted(found.values()) == list(range(worker_warmers.ITEMS))
    # Counted per chunk: chunk 0's first, killed attempt does not add its block twice.
    assert summary_entries(command.stdout.getvalue()) == str(worker_warmers.ITEMS)


def test_a_killed_worker_not_restarted_fails_the_run_naming_the_chunks_not_completed(cache, workers):
    worker = workers("warm-dead")
    command = CommandThread(NAME, "--async", *SPLIT, "--stall-timeout", "4", "--timeout", "600")
    command.start()
    wait_until(lambda: first_block_written(cache), 60, lambda: f"{command.report()}\n{worker.tail()}")
    worker.kill_all()
    command.finish()
    message = str(command.error)
    assert command.error is not None
    assert "no chunk finished and no heartbeat was seen for 4s (--stall-timeout)" in message
    assert "chunk(s) 0, 1, 2 of 3 not completed (begun: 0 on warm-dead@" in message
    assert "no worker answered a ping within 1s" in message


def test_a_pool_child_killed_mid_chunk_has_its_chunk_put_back_and_run_again(cache, workers):
    """reject_on_worker_lost with late acknowledgement: the worker itself delivers the chunk again."""
    from django_distcache.tasks import warm_task

    worker = workers("warm-child")
    run_id = warming.new_run_id()
    arguments = {"name": NAME, "chunk_index": 0, "chunk_count": 3, "chunk_size": 2}
    warm_task.apply_async(kwargs={**arguments, "run_id": run_id, "using": "default"})
    wait_until(lambda: first_block_written(cache), 60, worker.tail)
    os.kill(worker.pool_child(), signal.SIGKILL)
    cache.set(worker_warmers.GATE_KEY, True)

    def progress() -> warming.TaskProgress:
        return warming.read_progress(cache.core, run_id, NAME)

    wait_until(lambda: 0 in progress().done, 60, lambda: f"chunk 0 never ran again\n{worker.tail()}")
    assert progress().started[0] == 2
    assert progress().done[0]["entries"] == 4 and progress().done[0]["error"] is None
    assert cache.get_many([worker_warmers.item_key(n) for n in (0, 1, 6, 7)]) == {
        worker_warmers.item_key(n): n for n in (0, 1, 6, 7)
    }
