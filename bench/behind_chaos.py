"""Write-behind chaos: drains killed at each step, a table locked past the shard lock, a stalled transaction.

    .venv/bin/python -m bench.behind_chaos [--base-port 7580] [--kills 3] [--database NAME]

(`make chaos` runs it after the node-failure scenarios of bench/chaos.py; tests/test_behind_chaos.py runs
the short form against the test suite's cluster and database.)

A 3+3 cluster of our own and the machine's PostgreSQL (127.0.0.1:5432, user postgres, trust): a database
of our own (`chaos_behind`, created and dropped by the run). The model is the test app's `PageCounter`
(write-behind; `views` is the counter). A trigger logs every committed UPDATE of its rows (row, new value,
transaction id, time, a sequence) in a table of the run's: since a row's updates are serialized by its row
lock, the sequence orders a row's committed values as they were committed.

Writers (threads of this process) call `save_behind` with a per-row strictly increasing `views` on value
rows and `incr_behind(PageCounter, pk, "views", 1)` on counter rows, and keep every acknowledged call.
Drainers are child processes (`python -m bench.behind_chaos drain ...`) running `flush_behind()` in a
loop; the kill harness replaces one step of the drain (a module attribute of
`django_distcache.models.drain`) with a wrapper that calls `os._exit(9)`:

- before-commit: at the start of `_apply_transaction` (old core: `_apply_rows`), nothing committed yet;
- after-commit:  at the start of `_delete_entries` (old core: the XACK/XDEL batch), committed, not removed;
- refresh:       at the start of `_refresh_cached_rows`, committed, the cache entries not rewritten.

and two cases where a drain outlives its shard lock: `LOCK TABLE ... IN ACCESS EXCLUSIVE MODE` from
another connection, held for longer than BEHIND_IDLE_TIMEOUT while two drainers run (on SQLite: a write
transaction held as long); and a stalled transaction (PostgreSQL only): the first drainer's UPDATE waits
in a statement-level trigger (`pg_sleep`, before any row is locked) past the idle timeout, so a second
drainer takes the shard over and commits newer values first.

After each case a normal drainer drains to empty, and the case reports: acknowledged calls, lost ones
(an acknowledged value above the row's final value), backward steps (a committed value below one
committed earlier for the same row, from the trigger's log), rows whose cache entry differs from the
database, and counter increments acknowledged vs in the database. Targets: 0 lost, 0 backward, 0 cache
mismatches, increments in the database = increments acknowledged. Exit status 1 if any is violated.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BASE_PORT = 7580
DATABASE = "chaos_behind"
RUN_ENV = "DISTCACHE_CHAOS_BEHIND"
LOG_TABLE = "distcache_chaos_update_log"
STALL_SETTING = "distcache_chaos.stall"  # a custom PostgreSQL setting: seconds the UPDATE trigger sleeps
STEPS = ("before-commit", "after-commit", "refresh")
WRITE_PAUSE = 0.002  # seconds between two calls of one writer thread: the drains need the CPU too


# --------------------------------------------------------------------------- the drainer process


def step_target(step: str) -> tuple[str, Callable[[tuple, dict], bool]]:
    """The module attribute of `django_distcache.models.drain` to wrap for `step`, and a predicate on a
    call's arguments saying whether this call is the step (the old core's XACK/XDEL is one `_batch` call
    among others)."""
    from django_distcache.models import drain as behind

    always = lambda args, kwargs: True  # noqa: E731
    if step == "before-commit":
        return ("_apply_transaction" if hasattr(behind, "_apply_transaction") else "_apply_rows"), always
    if step == "after-commit":
        if hasattr(behind, "_delete_entries"):
            return "_delete_entries", always

        def acknowledges(args: tuple, kwargs: dict) -> bool:
            calls = args[1] if len(args) > 1 else kwargs.get("calls", [])
            return any(str(call.args[0]).upper() == "XACK" for call in calls)

        return "_batch", acknowledges
    if step == "refresh":
        return "_refresh_cached_rows", always
    raise ValueError(f"unknown step {step!r}")


def install_kill(step: str) -> None:
    """The next time the drain reaches `step`, this process dies as with kill -9 (no cleanup, no finally)."""
    from django_distcache.models import drain as behind

    name, is_step = step_target(step)
    original = getattr(behind, name)

    def killer(*args: Any, **kwargs: Any) -> Any:
        if not is_step(args, kwargs):
            return original(*args, **kwargs)
        sys.stdout.write(f"killed {step}\n")
        sys.stdout.flush()
        os._exit(9)

    setattr(behind, name, killer)


def install_stall(seconds: float) -> None:
    """The first batch's UPDATE waits `seconds` inside its transaction, before it locks any row (the
    run's statement trigger sleeps while this session's STALL_SETTING is set)."""
    from django.db import connection

    from django_distcache.models import drain as behind

    name, _ = step_target("before-commit")
    original = getattr(behind, name)
    state = {"done": False}

    def stalled(*args: Any, **kwargs: Any) -> Any:
        if state["done"]:
            return original(*args, **kwargs)
        state["done"] = True
        with connection.cursor() as cursor:
            cursor.execute(f"SET {STALL_SETTING} = '{float(seconds)}'")
        sys.stdout.write("stalling\n")
        sys.stdout.flush()
        try:
            return original(*args, **kwargs)
        finally:
            with connection.cursor() as cursor:
                cursor.execute(f"RESET {STALL_SETTING}")
            sys.stdout.write("stalled\n")
            sys.stdout.flush()

    setattr(behind, name, stalled)


def drainer_main(argv: list[str]) -> int:
    """A drainer: `flush_behind()` in a loop until stdin closes, then one line of JSON. Django's settings come from DJANGO_SETTINGS_MODULE and the run's
    environment, as for the process that started it."""
    parser = argparse.ArgumentParser(prog="python -m bench.behind_chaos drain")
    parser.add_argument("--kill-at", choices=STEPS)
    parser.add_argument("--stall", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=0)
    parser.add_argument("--idle-timeout", type=float, default=0.0)
    parser.add_argument("--wait-go", action="store_true", help="start draining at a 'go' line on stdin")
    parser.add_argument("--interval", type=float, default=0.05)
    args = parser.parse_args(argv)
    import django

    django.setup()
    from django.core.cache import caches

    from django_distcache.models import flush_behind

    core = caches["default"].core  # this thread's, the one flush_behind() below uses
    if args.batch_size:
        core.settings = dataclasses.replace(core.settings, behind_batch_size=args.batch_size)
    if args.idle_timeout:
        core.settings = dataclasses.replace(core.settings, behind_idle_timeout=args.idle_timeout)
    if args.kill_at:
        install_kill(args.kill_at)
    if args.stall:
        install_stall(args.stall)
    print("ready", flush=True)
    stop = threading.Event()
    if args.wait_go and sys.stdin.readline().strip() != "go":
        return 0

    def wait_for_eof() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    drains = errors = 0
    while not stop.is_set():
        try:
            flush_behind()
            drains += 1
        except Exception as error:  # noqa: BLE001 - a drain that failed is retried, as Celery beat would
            errors += 1
            print(f"drain failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        stop.wait(args.interval)
    print(json.dumps({"drains": drains, "errors": errors}), flush=True)
    return 0


class Drainer:
    """A drainer process of the run; its stdout lines are collected by a thread."""

    def __init__(self, env: dict[str, str], *options: str, log: Path | None = None) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.log = open(log, "a") if log else subprocess.DEVNULL  # noqa: SIM115 - closed in wait()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.behind_chaos", "drain", *options],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        self.summary: dict[str, Any] = {}

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.strip())
        self.lines.put("<eof>")

    def expect(self, wanted: str, timeout: float) -> bool:
        """Wait for the line `wanted`; False on a timeout or if the process ended first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                return False
            if line == wanted or line.startswith(wanted):
                return True
            if line == "<eof>":
                return False
            if line.startswith("{"):
                self.summary = json.loads(line)

    def go(self) -> None:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def stop(self, timeout: float = 60.0) -> int:
        """Close stdin (the drainer finishes its drain and exits); its exit status."""
        with contextlib.suppress(BrokenPipeError, OSError):
            self.process.stdin.close()
        return self.wait(timeout)

    def wait(self, timeout: float) -> int:
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            status = self.process.wait()
        while True:  # the summary line, if it printed one
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                break
            if line.startswith("{"):
                self.summary = json.loads(line)
            if line == "<eof>":
                break
        if self.log is not subprocess.DEVNULL:
            self.log.close()
        return status


# --------------------------------------------------------------------------- the trigger's log


class UpdateLog:
    """A table logging every committed UPDATE of the model's rows (the trigger inserts in the updating
    transaction, so a rolled-back update leaves no line), plus, on PostgreSQL, the stall trigger."""

    def __init__(self, table: str) -> None:
        from django.db import connection

        self.table = table
        self.vendor = connection.vendor

    def create(self) -> None:
        from django.db import connection

        self.drop()
        with connection.cursor() as cursor:
            if self.vendor == "postgresql":
                for statement in (
                    f"CREATE TABLE {LOG_TABLE} (seq bigserial PRIMARY KEY, row_id integer NOT NULL, "
                    "views integer NOT NULL, txid bigint NOT NULL DEFAULT txid_current(), "
                    "at timestamptz NOT NULL DEFAULT clock_timestamp())",
                    f"CREATE FUNCTION {LOG_TABLE}_row() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                    f"INSERT INTO {LOG_TABLE} (row_id, views) VALUES (NEW.id, NEW.views); RETURN NULL; END $$",
                    f"CREATE TRIGGER {LOG_TABLE}_row AFTER UPDATE ON {self.table} FOR EACH ROW "
                    f"EXECUTE FUNCTION {LOG_TABLE}_row()",
                    f"CREATE FUNCTION {LOG_TABLE}_stall() RETURNS trigger LANGUAGE plpgsql AS $$ "
                    f"DECLARE pause text := nullif(current_setting('{STALL_SETTING}', true), ''); BEGIN "
                    "IF pause IS NOT NULL THEN PERFORM pg_sleep(pause::float); END IF; RETURN NULL; END $$",
                    f"CREATE TRIGGER {LOG_TABLE}_stall BEFORE UPDATE ON {self.table} FOR EACH STATEMENT "
                    f"EXECUTE FUNCTION {LOG_TABLE}_stall()",
                ):
                    cursor.execute(statement)
            elif self.vendor == "sqlite":
                cursor.execute(
                    f"CREATE TABLE {LOG_TABLE} (seq INTEGER PRIMARY KEY AUTOINCREMENT, row_id integer NOT "
                    "NULL, views integer NOT NULL, at text NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f')))"
                )
                cursor.execute(
                    f"CREATE TRIGGER {LOG_TABLE}_row AFTER UPDATE ON {self.table} FOR EACH ROW BEGIN "
                    f"INSERT INTO {LOG_TABLE} (row_id, views) VALUES (NEW.id, NEW.views); END"
                )
            else:
                raise RuntimeError(f"no update log for {self.vendor}")

    def drop(self) -> None:
        from django.db import connection

        with connection.cursor() as cursor:
            if self.vendor == "postgresql":
                cursor.execute(f"DROP TRIGGER IF EXISTS {LOG_TABLE}_row ON {self.table}")
                cursor.execute(f"DROP TRIGGER IF EXISTS {LOG_TABLE}_stall ON {self.table}")
                cursor.execute(f"DROP FUNCTION IF EXISTS {LOG_TABLE}_row()")
                cursor.execute(f"DROP FUNCTION IF EXISTS {LOG_TABLE}_stall()")
            else:
                cursor.execute(f"DROP TRIGGER IF EXISTS {LOG_TABLE}_row")
            cursor.execute(f"DROP TABLE IF EXISTS {LOG_TABLE}")

    def committed(self, pks: list[int]) -> dict[int, list[int]]:
        """Each row's committed values, in commit order."""
        from django.db import connection

        values: dict[int, list[int]] = defaultdict(list)
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT row_id, views FROM {LOG_TABLE} WHERE row_id IN ({','.join(map(str, pks))}) ORDER BY seq"
            )
            for row_id, views in cursor.fetchall():
                values[row_id].append(views)
        return values


def backward_steps(committed: dict[int, list[int]]) -> tuple[int, list[str]]:
    """Committed values below one committed earlier for the same row; and a few examples."""
    count, examples = 0, []
    for pk, values in committed.items():
        highest = None
        for value in values:
            if highest is not None and value < highest:
                count += 1
                if len(examples) < 3:
                    examples.append(f"row {pk}: {highest} then {value}")
            highest = value if highest is None else max(highest, value)
    return count, examples


# --------------------------------------------------------------------------- the writers


def incr_behind_function() -> Callable[..., Any] | None:
    from django_distcache import models

    return getattr(models, "incr_behind", None)


@dataclass
class Writers:
    """Threads calling save_behind (value rows, strictly increasing per row) and incr_behind (counter
    rows), keeping what was acknowledged (returned without raising)."""

    value_rows: list[Any]
    counter_rows: list[Any]
    threads: int = 4
    acknowledged: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    increments: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for number in range(self.threads):
            worker = threading.Thread(target=self._write, args=(number,), daemon=True)
            worker.start()
            self._workers.append(worker)

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(60)

    @property
    def calls(self) -> int:
        return sum(len(values) for values in self.acknowledged.values()) + sum(self.increments.values())

    def _write(self, number: int) -> None:
        from django.db import connections

        from django_distcache.models import save_behind
        from tests.model_app.models import PageCounter

        incr_behind = incr_behind_function()
        mine = self.value_rows[number :: self.threads]
        counters = self.counter_rows[number :: self.threads] if incr_behind else []
        try:
            while not self._stop.is_set():
                for row in mine:
                    row.views += 1
                    try:
                        save_behind(row, update_fields=["views"])
                    except Exception as error:  # noqa: BLE001 - what a caller would see: reported
                        self.errors.append(f"save_behind: {type(error).__name__}: {error}")
                    else:
                        self.acknowledged[row.pk].append(row.views)
                    time.sleep(WRITE_PAUSE)
                for row in counters:
                    try:
                        incr_behind(PageCounter, row.pk, "views", 1)
                    except Exception as error:  # noqa: BLE001 - what a caller would see: reported
                        self.errors.append(f"incr_behind: {type(error).__name__}: {error}")
                    else:
                        self.increments[row.pk] += 1
                    time.sleep(WRITE_PAUSE)
        finally:
            connections.close_all()


# --------------------------------------------------------------------------- the cases

# A fault runs while the writers write: (what happened, whether it really happened, the drainers it left
# running, which the case stops once the writers have stopped).
Fault = Callable[["Writers"], tuple[str, bool, list["Drainer"]]]


@dataclass
class CaseResult:
    case: str
    fault: str  # what happened: kills reached, lock held, ...
    fault_ok: bool  # the fault really happened (a kill at the step, a drain that outlived its lock)
    acknowledged: int
    lost: int
    backward: int
    backward_examples: list[str]
    rows_not_last: int  # rows whose final value is not their last acknowledged one
    cache_mismatched: int
    increments_acknowledged: int | None  # None: no incr_behind in this code
    increments_in_db: int | None
    updates_logged: int
    writer_errors: list[str]
    drain_errors: int
    backlog_left: int
    seconds: float = 0.0  # the case's wall time, final drain included

    @property
    def lost_increments(self) -> int:
        if self.increments_acknowledged is None:
            return 0
        return self.increments_acknowledged - (self.increments_in_db or 0)

    def violations(self) -> list[str]:
        problems = []
        if not self.fault_ok:
            problems.append(f"the fault did not happen ({self.fault})")
        if self.lost:
            problems.append(f"{self.lost} acknowledged write(s) lost")
        if self.backward:
            problems.append(f"{self.backward} backward step(s): {'; '.join(self.backward_examples)}")
        if self.cache_mismatched:
            problems.append(f"{self.cache_mismatched} cache entries differ from the database")
        if self.increments_acknowledged is not None and self.lost_increments:
            problems.append(
                f"increments: {self.increments_acknowledged} acknowledged, {self.increments_in_db} in the "
                "database"
            )
        if self.writer_errors:
            problems.append(f"{len(self.writer_errors)} writer error(s), first: {self.writer_errors[0]}")
        if self.backlog_left:
            problems.append(f"{self.backlog_left} change(s) left in the queue")
        return problems


class BehindChaos:
    """The cases, run in a process whose Django is configured (the chaos settings, or the test suite's).

    `drainer_env`: the environment of the drainer processes (DJANGO_SETTINGS_MODULE and what it reads).
    Times scale with `idle_timeout`, the BEHIND_IDLE_TIMEOUT the drainers run with."""

    def __init__(
        self,
        drainer_env: dict[str, str],
        *,
        value_rows: int = 40,
        counter_rows: int = 8,
        writer_threads: int = 4,
        kills: int = 3,
        idle_timeout: float = 1.0,
        batch_size: int = 10,
        log_dir: Path | None = None,
    ) -> None:
        from tests.model_app.models import PageCounter

        self.env = drainer_env
        self.value_rows, self.counter_rows, self.writer_threads = value_rows, counter_rows, writer_threads
        self.kills = kills
        self.idle_timeout = idle_timeout
        self.batch_size = batch_size
        self.log_dir = log_dir
        self.model = PageCounter
        self.log = UpdateLog(PageCounter._meta.db_table)
        self.results: list[CaseResult] = []

    def __enter__(self) -> BehindChaos:
        self.log.create()
        return self

    def __exit__(self, *exc: object) -> None:
        from django.db import connection

        self.log.drop()
        connection.close()

    # -- processes -------------------------------------------------------------------------------------
    def drainers(self, *option_lists: list[str]) -> list[Drainer]:
        """Drainer processes started together (their start-up overlaps), each ready when returned;
        every one waits for `go()` unless its options say otherwise."""
        log = self.log_dir / "behind-chaos-drainers.log" if self.log_dir else None
        started = []
        for options in option_lists:
            argv = ["--batch-size", str(self.batch_size), "--idle-timeout", str(self.idle_timeout)]
            started.append(Drainer(self.env, *argv, *options, log=log))
        for drainer in started:
            if not drainer.expect("ready", 60):
                for other in started:
                    other.process.kill()
                    other.wait(10)
                raise RuntimeError(f"a drainer did not start; see its log {log}")
        return started

    def drain_to_empty(self, timeout: float = 60.0) -> tuple[bool, int]:
        """A normal drain, in this process, until the queue is empty (a dead drainer's shard locks expire
        on the way): (whether it emptied the queue, drains that failed)."""
        from django_distcache.models import behind_metrics, flush_behind

        deadline = time.monotonic() + timeout
        errors = 0
        while time.monotonic() < deadline:
            try:
                report = flush_behind()
                if not report.shards_busy and behind_metrics()["backlog"] == 0:
                    return True, errors
            except Exception as error:  # noqa: BLE001 - a drain that failed is retried, as Celery beat would
                errors += 1
                print(f"[behind-chaos] drain failed: {type(error).__name__}: {error}", file=sys.stderr)
            time.sleep(0.05)
        return False, errors

    # -- one case --------------------------------------------------------------------------------------
    def run_case(self, case: str, fault: Fault, warmup: float) -> CaseResult:
        from django_distcache.models import behind_metrics, get_cached

        model = self.model
        case_started = time.monotonic()
        tag = uuid.uuid4().hex[:6]
        rows = [model.objects.create(name=f"chaos-{tag}-v{n}") for n in range(self.value_rows)]
        counters = [model.objects.create(name=f"chaos-{tag}-c{n}") for n in range(self.counter_rows)]
        for row in rows + counters:
            get_cached(model, pk=row.pk)  # cached, as rows written behind are
        writers = Writers(rows, counters, self.writer_threads)
        writers.start()
        running: list[Drainer] = []
        try:
            time.sleep(warmup)  # a queue longer than a batch before the first drain
            fault_text, fault_ok, running = fault(writers)
        finally:
            writers.stop()
            # Stopped after the writers: a drain finishes its pass only once it has caught up.
            errors = sum(int(drainer.stop() != 0) for drainer in running)
            errors += sum(int(drainer.summary.get("errors", 0)) for drainer in running)
        if errors:
            fault_text += f", {errors} drain(s) failed during it"
        fault_ended = time.monotonic()
        emptied, drain_errors = self.drain_to_empty()
        print(
            f"[behind-chaos] {case}: {fault_ended - case_started:.1f} s of fault, final drain "
            f"{time.monotonic() - fault_ended:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        if not emptied:
            fault_text += "; the final drain did not empty the queue"
        pks = [row.pk for row in rows + counters]
        in_db = dict(model.objects.filter(pk__in=pks).values_list("pk", "views"))
        committed = self.log.committed(pks)
        backward, examples = backward_steps(committed)
        lost = sum(1 for row in rows for value in writers.acknowledged[row.pk] if value > in_db[row.pk])
        not_last = sum(
            1
            for row in rows
            if writers.acknowledged[row.pk] and in_db[row.pk] != writers.acknowledged[row.pk][-1]
        )
        cache_mismatched = sum(1 for pk in pks if get_cached(model, pk=pk).views != in_db[pk])
        counting = incr_behind_function() is not None
        result = CaseResult(
            case=case,
            fault=fault_text,
            fault_ok=fault_ok and emptied,
            acknowledged=writers.calls,
            lost=lost,
            backward=backward,
            backward_examples=examples,
            rows_not_last=not_last,
            cache_mismatched=cache_mismatched,
            increments_acknowledged=sum(writers.increments.values()) if counting else None,
            increments_in_db=sum(in_db[row.pk] for row in counters) if counting else None,
            updates_logged=sum(len(values) for values in committed.values()),
            writer_errors=writers.errors,
            drain_errors=drain_errors,
            backlog_left=behind_metrics()["backlog"],
            seconds=time.monotonic() - case_started,
        )
        self.results.append(result)
        return result

    # -- the faults ------------------------------------------------------------------------------------
    def kill_fault(self, step: str, kills: int) -> Fault:
        """`kills` drainers in turn, each killed at `step`; then a normal drainer, with the writers still
        writing, takes the dead drainers' shards over (after their locks expire) and re-applies."""

        def fault(writers: Writers) -> tuple[str, bool]:
            reached = 0
            for number in range(kills):
                if number < kills - 1:
                    [victim] = self.drainers(["--kill-at", step, "--interval", "0.02"])
                else:
                    victim, survivor = self.drainers(["--kill-at", step, "--interval", "0.02"], ["--wait-go"])
                if victim.expect(f"killed {step}", 30):
                    reached += 1
                    victim.wait(30)
                else:  # never reached the step: stop it, the case reports the fault did not happen
                    victim.stop(30)
            survivor.go()
            # The dead drainers' locks expire after the idle timeout; then the survivor re-applies their
            # entries in batches while the writers go on.
            time.sleep(self.idle_timeout + 0.8)
            return f"{reached}/{kills} drainers killed at {step}", reached == kills, [survivor]

        return fault

    def lock_fault(self, hold: float) -> Fault:
        """Two drainers run; another connection locks the table for `hold` seconds (> the idle timeout),
        so the first drainer's shard locks expire and the second takes its shards over."""

        def fault(writers: Writers) -> tuple[str, bool]:
            first, second = self.drainers(["--wait-go"], ["--wait-go"])
            with self.table_locked(hold):
                first.go()
                time.sleep(0.2)
                second.go()
            time.sleep(self.idle_timeout + 0.3)
            return f"table locked {hold:.1f} s (idle timeout {self.idle_timeout:g} s)", True, [first, second]

        return fault

    @contextlib.contextmanager
    def table_locked(self, hold: float) -> Iterator[None]:
        """LOCK TABLE ... IN ACCESS EXCLUSIVE MODE (SQLite: BEGIN IMMEDIATE, which stops every other
        writer) on a connection of our own, taken before the block runs and held `hold` seconds."""
        from django.db import connection

        settings_dict = connection.settings_dict
        if connection.vendor == "postgresql":
            import psycopg

            locker = psycopg.connect(
                host=settings_dict.get("HOST") or None,
                port=settings_dict.get("PORT") or None,
                user=settings_dict.get("USER") or None,
                password=settings_dict.get("PASSWORD") or None,
                dbname=settings_dict["NAME"],
            )
            locker.execute(f'LOCK TABLE "{self.model._meta.db_table}" IN ACCESS EXCLUSIVE MODE')
        else:
            import sqlite3

            locker = sqlite3.connect(settings_dict["NAME"], timeout=30, isolation_level=None)
            locker.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        try:
            yield
            time.sleep(max(0.0, hold - (time.monotonic() - started)))
        finally:
            locker.rollback()
            locker.close()

    def stall_fault(self, stall: float) -> Fault:
        """The first drainer's UPDATE stalls `stall` seconds inside its transaction (PostgreSQL); a second
        drainer takes its shard over when the lock expires, and commits newer values first."""

        def fault(writers: Writers) -> tuple[str, bool]:
            second, first = self.drainers(["--wait-go"], ["--stall", str(stall)])
            stalled = first.expect("stalling", 30)
            time.sleep(self.idle_timeout * 1.2)  # the first drainer's shard lock expires
            second.go()
            finished = first.expect("stalled", stall + 30)
            time.sleep(0.5)
            return (
                f"first drainer's UPDATE stalled {stall:.1f} s (idle timeout {self.idle_timeout:g} s)",
                stalled and finished,
                [first, second],
            )

        return fault

    # -- all of them -----------------------------------------------------------------------------------
    def cases(self, kills: int | None = None) -> list[tuple[str, Fault]]:
        from django.db import connection

        kills = self.kills if kills is None else kills
        cases = [(f"kill -9 {step}", self.kill_fault(step, kills)) for step in STEPS]
        cases.append(("table locked past the shard lock", self.lock_fault(self.idle_timeout * 2.5)))
        if connection.vendor == "postgresql":
            cases.append(("stalled transaction past the shard lock", self.stall_fault(self.idle_timeout * 3)))
        return cases

    def run_all(self, warmup: float = 0.5) -> list[CaseResult]:
        for name, fault in self.cases():
            print(f"[behind-chaos] {name} ...", file=sys.stderr, flush=True)
            self.run_case(name, fault, warmup)
        return self.results


# --------------------------------------------------------------------------- the table


HEADER = [
    "case",
    "fault",
    "acknowledged",
    "lost",
    "backward",
    "cache≠db",
    "increments ack/db",
    "result",
]


def table(results: list[CaseResult]) -> str:
    rows = []
    for result in results:
        if result.increments_acknowledged is None:
            increments = "n/a (no incr_behind)"
        else:
            increments = f"{result.increments_acknowledged}/{result.increments_in_db}"
        rows.append(
            [
                result.case,
                result.fault,
                f"{result.acknowledged:,}",
                str(result.lost),
                str(result.backward),
                str(result.cache_mismatched),
                increments,
                "PASS" if not result.violations() else "FAIL",
            ]
        )
    widths = [max(len(row[i]) for row in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(HEADER, widths, strict=True))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    for result in results:
        for problem in result.violations():
            lines.append(f"  {result.case}: {problem}")
        lines.append(
            f"  {result.case}: {result.updates_logged:,} committed updates logged, "
            f"{result.rows_not_last} row(s) not at their last acknowledged value, "
            f"{result.drain_errors} failed drain(s) in the final drain; {result.seconds:.1f} s"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- standalone run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["drain"]:
        return drainer_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench.behind_chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT)
    parser.add_argument("--kills", type=int, default=3, help="drainers killed per step (default 3)")
    parser.add_argument("--database", default=DATABASE, help="PostgreSQL database (created, then dropped)")
    parser.add_argument("--idle-timeout", type=float, default=1.5, help="BEHIND_IDLE_TIMEOUT of the run")
    parser.add_argument("--pg-host", default="127.0.0.1")
    parser.add_argument("--pg-port", type=int, default=5432)
    parser.add_argument("--pg-user", default="postgres")
    args = parser.parse_args(argv)

    from django_distcache.devcluster import DevCluster

    from .bench_models import bench_database, postgres_problem

    problem = postgres_problem(args.pg_host, args.pg_port, args.pg_user)
    if problem:
        print(
            f"write-behind chaos needs PostgreSQL at {args.pg_host}:{args.pg_port}: {problem}",
            file=sys.stderr,
        )
        return 1
    cluster = DevCluster(
        base_port=args.base_port,
        data_dir=ROOT / ".devcluster" / f"chaos-behind-{args.base_port}",
        node_timeout=1000,
    )
    urls = cluster.up()
    try:
        with bench_database(args.pg_host, args.pg_port, args.pg_user, args.database) as database:
            run = {
                "secret_key": "chaos-behind-" + uuid.uuid4().hex,
                "location": urls,
                "key_prefix": f"chaos-behind-{uuid.uuid4().hex[:8]}",
                "database": {"ENGINE": "django.db.backends.postgresql", **database},
                "options": {
                    "BEHIND_IDLE_TIMEOUT": args.idle_timeout,
                    "BEHIND_SHARDS": 4,
                    "BEHIND_TRIGGER_BACKLOG": 0,  # the drainers are ours; there is no Celery broker
                },
            }
            os.environ[RUN_ENV] = json.dumps(run)
            os.environ["DJANGO_SETTINGS_MODULE"] = "bench.behind_chaos_settings"
            import django
            from django.core.management import call_command

            django.setup()
            call_command("migrate", run_syncdb=True, verbosity=0)
            with BehindChaos(
                dict(os.environ),
                kills=args.kills,
                idle_timeout=args.idle_timeout,
                value_rows=60,
                counter_rows=12,
                log_dir=ROOT / ".devcluster",
            ) as chaos:
                results = chaos.run_all(warmup=1.5)
    finally:
        cluster.down()
    print("\nWrite-behind under drain kills and stalls (PostgreSQL, 3+3 cluster)")
    print(table(results))
    return 1 if any(result.violations() for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
