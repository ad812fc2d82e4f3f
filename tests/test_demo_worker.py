"""`make demo`'s Celery worker, started with the command line the Makefile gives it, survives SIGHUP: Celery
restarts a worker on SIGHUP by executing its own command line again, which must still work from the
directory the worker moved to (--workdir)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import uuid

import pytest
from django.conf import settings

from tests.conftest import ROOT


def demo_worker_command() -> list[str]:
    """The worker command of `make demo` (what follows `nohup`, up to the redirection), as make expands it."""
    printed = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    recipe = printed.stdout.replace("\\\n", " ")
    found = re.search(r"\bnohup\s+(.+?)\s+>", recipe)
    assert found, f"no `nohup ... >` worker line in `make -n demo`:\n{printed.stdout}{printed.stderr}"
    return shlex.split(found.group(1))


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed: the Makefile cannot be read")
def test_the_demo_worker_restarts_on_sighup_and_still_runs_tasks(broker, tmp_path):
    from celery import Celery

    command = demo_worker_command()
    assert "-s" in command
    command[command.index("-s") + 1] = str(tmp_path / "beat-schedule")  # not the checkout's demo schedule
    broker_url = f"redis://{broker.host}:{broker.port}/2"
    env = {
        **{k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "DJANGO_SETTINGS_MODULE"}},
        "DISTCACHE_LOCATION": ",".join(settings.CLUSTER_LOCATION),
        "DISTCACHE_BROKER_URL": broker_url,
        "DISTCACHE_KEY_PREFIX": f"demo-hup-{uuid.uuid4().hex[:12]}",
        "DISTCACHE_EXAMPLE_DB": str(tmp_path / "shop.sqlite3"),
    }
    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log:
        worker = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_for(what: str, count: int = 1) -> None:
        deadline = time.monotonic() + 60
        while log_path.read_text(errors="replace").count(what) < count:
            text = log_path.read_text(errors="replace")[-3000:]
            assert worker.poll() is None, f"the worker exited (status {worker.returncode}):\n{text}"
            assert time.monotonic() < deadline, f"no {what!r} in the worker's log:\n{text}"
            time.sleep(0.1)

    try:
        wait_for("ready.")
        worker.send_signal(signal.SIGHUP)
        wait_for("Restarting celery worker")
        wait_for("ready.", count=2)  # the same process (exec keeps the pid), started again
        # Not made current: the tests after this one send through the suite's app.
        sender = Celery("demo-hup-test", broker=broker_url, set_as_current=False)
        task_id = f"after-sighup-{uuid.uuid4().hex}"
        sender.send_task("django_distcache.flush_behind", kwargs={"using": "default"}, task_id=task_id)
        wait_for(f"Task django_distcache.flush_behind[{task_id}] succeeded")
        assert worker.poll() is None
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)  # the worker and its embedded beat
            try:
                worker.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(5)
