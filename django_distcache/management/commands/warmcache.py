"""`manage.py warmcache`: run cache warmers here, or as Celery tasks, and say what they wrote."""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser, OutputWrapper

from django_distcache import warming
from django_distcache.core import Core, core_for
from django_distcache.warming import WarmResult

POLL_INTERVAL = 0.1  # seconds between two readings of the --async tasks' progress
STALL_TIMEOUT = 60.0  # --stall-timeout's default: seconds without any progress or heartbeat of a run
PING_SECONDS = 1.0  # how long the workers are given to answer a ping
MIN_LOST_AFTER = 3 * warming.HEARTBEAT_SECONDS  # a heartbeat missed this long is not a scheduling hiccup


def _size(count: int) -> str:
    value, unit = float(count), "B"
    for bigger in ("kB", "MB", "GB", "TB"):
        if value < 1000:
            break
        value, unit = value / 1000, bigger
    return f"{count} B" if unit == "B" else f"{value:,.1f} {unit}"


def summary_table(results: list[WarmResult], seconds: float) -> str:
    """One row per warmer, and a total whose seconds are the whole run's (warmers may run at once):
    entries, stored bytes, seconds, skipped rows, errors."""
    header = ["warmer", "entries", "bytes", "seconds", "skipped", "errors"]

    def cells(name: str, rows: list[WarmResult], seconds: float) -> list[str]:
        return [
            name,
            f"{sum(r.entries for r in rows):,}",
            _size(sum(r.bytes for r in rows)),
            f"{seconds:.2f}",
            f"{sum(r.skipped for r in rows):,}",
            f"{sum(r.errors for r in rows):,}",
        ]

    table = [cells(result.name, [result], result.seconds) for result in results]
    if len(results) > 1:
        table.append(cells("total", results, seconds))
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]

    def line(row: list[str]) -> str:  # the name left-aligned, the numbers right-aligned
        return "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )

    return "\n".join([line(header), "  ".join("-" * width for width in widths), *map(line, table)])


class ProgressDisplay:
    """Progress on stderr: one line redrawn in place on a terminal; elsewhere (a log, CI) a plain line at
    most every `every` seconds, and always one when a warmer finishes."""

    def __init__(self, stream: OutputWrapper, enabled: bool = True, every: float = 1.0) -> None:
        self.stream = stream
        self.enabled = enabled
        self.tty = enabled and stream.isatty()
        self.every = every if not self.tty else 0.1
        self._last = 0.0
        self._width = 0

    def update(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < self.every):
            return
        self._last = now
        if self.tty:
            self.stream.write("\r" + text.ljust(self._width), ending="")
            self._width = len(text)
        else:
            self.stream.write(text)
        self.stream.flush()

    def done(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\r" + text.ljust(self._width)) if self.tty else text)
            self._width = 0
            self.stream.flush()


def _bar(done: int, total: int, width: int = 24) -> str:
    if total <= 0:
        return ""
    filled = min(width, width * done // total)
    return f"[{'#' * filled}{'.' * (width - filled)}] {100 * done // total:3d}%  "


def _outcome(result: WarmResult) -> str:
    status = "FAILED" if not result.ok else ("counted" if result.dry_run else "done")
    text = (
        f"{result.name}: {status}, {result.entries:,} entries, {_size(result.bytes)}, {result.seconds:.2f}s"
    )
    if result.skipped:
        text += f", {result.skipped:,} skipped"
    if result.errors:
        text += f", {result.errors:,} errors" + (f" ({result.error})" if result.error else "")
    return text


class _Following:
    """The progress of one warmer running in this process, for the display."""

    def __init__(self, display: ProgressDisplay, label: str) -> None:
        self.display, self.label = display, label
        self.started = time.perf_counter()
        self.entries = self.bytes = self.rows = 0
        self.rows_total: int | None = None

    def __call__(self, delta: dict[str, int]) -> None:
        self.entries += delta.get("entries", 0)
        self.bytes += delta.get("bytes", 0)
        self.rows += delta.get("rows", 0)
        self.rows_total = delta.get("rows_total", self.rows_total)
        bar = _bar(self.rows, self.rows_total) if self.rows_total else ""
        elapsed = time.perf_counter() - self.started
        self.display.update(
            f"{self.label}: {bar}{self.entries:,} entries, {_size(self.bytes)}, {elapsed:.1f}s"
        )


class Command(BaseCommand):
    help = (
        "Run cache warmers (found in each installed app's warmers.py) in this process, or with --async as "
        "Celery tasks in chunks; print a summary; exit with status 1 if any warmer failed."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("names", nargs="*", metavar="NAME", help="the warmers to run")
        parser.add_argument("--all", action="store_true", help="run every registered warmer")
        parser.add_argument(
            "--async",
            action="store_true",
            dest="run_async",
            help="run the warmers as django_distcache.warm Celery tasks, one group per warmer, and follow them",
        )
        parser.add_argument(
            "--chunk-size",
            type=int,
            default=warming.CHUNK_SIZE,
            metavar="N",
            help=f"entries (or rows) per write batch; with --async, rows per task (default {warming.CHUNK_SIZE})",
        )
        parser.add_argument(
            "--tasks",
            type=int,
            default=None,
            metavar="K",
            help="with --async: tasks per generator warmer (default 1, or 4 for warmers that take a chunk)",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="count the entries and bytes; write nothing"
        )
        parser.add_argument(
            "--using",
            default=None,
            metavar="ALIAS",
            help="write to this cache alias instead of the warmers' own",
        )
        parser.add_argument(
            "--queue", default=None, metavar="NAME", help="with --async: send the tasks to this Celery queue"
        )
        parser.add_argument(
            "--timeout",
            type=float,
            default=3600.0,
            metavar="SECONDS",
            help="with --async: how long to follow the tasks before giving up (default 3600)",
        )
        parser.add_argument(
            "--stall-timeout",
            type=float,
            default=STALL_TIMEOUT,
            metavar="SECONDS",
            help=(
                "with --async: fail when no chunk finished and no worker heartbeat was seen for this long, "
                f"naming the chunks not completed (default {STALL_TIMEOUT:g})"
            ),
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["chunk_size"] < 1:
            raise CommandError("--chunk-size must be at least 1")
        if options["tasks"] is not None and options["tasks"] < 1:
            raise CommandError("--tasks must be at least 1")
        if options["stall_timeout"] <= 0 or options["timeout"] <= 0:
            raise CommandError("--timeout and --stall-timeout must be positive")
        if options["run_async"] and options["dry_run"]:
            raise CommandError("--dry-run counts in this process: leave out --async")
        selected = self._select(options["names"], options["all"])
        display = ProgressDisplay(self.stderr, enabled=options["verbosity"] > 0)
        if options["dry_run"]:
            self.stdout.write(
                f"Dry run: {len(selected)} warmer(s) would run: {', '.join(w.name for w in selected)}. "
                "Nothing is written."
            )
        started = time.perf_counter()
        if options["run_async"]:
            results = self._run_async(selected, options, display)
        else:
            results = self._run_here(selected, options, display)
        self.stdout.write(summary_table(results, time.perf_counter() - started))
        failed = [result for result in results if not result.ok]
        if failed:
            raise CommandError(
                f"{len(failed)} of {len(results)} warmer(s) failed: "
                + "; ".join(f"{r.name} ({r.error or f'{r.errors} entries not written'})" for r in failed)
            )

    def _select(self, names: list[str], run_all: bool) -> list[warming.Warmer]:
        available = warming.registered_warmers()
        if run_all and names:
            raise CommandError("give warmer names or --all, not both")
        if run_all:
            if not available:
                raise CommandError("no warmers are registered (add a warmers.py to an installed app)")
            return available
        if not names:
            listing = "\n".join(f"  {w.name}" for w in available) or "  (none)"
            raise CommandError(f"name the warmers to run, or use --all. Registered warmers:\n{listing}")
        known = {w.name: w for w in available}
        unknown = [name for name in names if name not in known]
        if unknown:
            raise CommandError(
                f"unknown warmer(s): {', '.join(unknown)}; registered: {', '.join(known) or 'none'}"
            )
        return [known[name] for name in dict.fromkeys(names)]

    def _run_here(
        self, selected: list[warming.Warmer], options: dict[str, Any], display: ProgressDisplay
    ) -> list[WarmResult]:
        results = []
        for position, entry in enumerate(selected, 1):
            following = _Following(display, f"[{position}/{len(selected)}] {entry.name}")
            display.update(f"{following.label}: starting", force=True)
            result = warming.run_warmer(
                entry,
                chunk_size=options["chunk_size"],
                dry_run=options["dry_run"],
                using=options["using"],
                on_progress=following,
            )
            display.done(f"[{position}/{len(selected)}] {_outcome(result)}")
            results.append(result)
        return results

    def _run_async(
        self, selected: list[warming.Warmer], options: dict[str, Any], display: ProgressDisplay
    ) -> list[WarmResult]:
        try:
            from celery import group

            from django_distcache.tasks import warm_task
        except ImportError as error:
            raise CommandError(
                f"--async needs Celery (pip install 'django-distcache[celery]'): {error}"
            ) from None
        run = _AsyncRun(warm_task, selected, options, display)
        run.send(group)
        return run.follow()


class _AsyncRun:
    """One `--async` run: each warmer's chunks sent as tasks, then every chunk followed in the run's
    progress hashes until all are done. A chunk whose worker stops beating, and the chunks nobody takes
    while the run is quiet and a worker answers a ping, are sent again (a killed worker's running and
    prefetched chunks come back only after the broker's visibility timeout); a run with no progress and
    no heartbeat for --stall-timeout fails, naming the chunks not completed. A warmer that cannot be sent
    fails alone."""

    def __init__(
        self,
        warm_task: Any,
        selected: list[warming.Warmer],
        options: dict[str, Any],
        display: ProgressDisplay,
    ) -> None:
        self.warm_task, self.selected, self.options, self.display = warm_task, selected, options, display
        self.run_id = warming.new_run_id()
        self.results = {entry.name: WarmResult(entry.name) for entry in selected}
        self.sending = {"queue": options["queue"]} if options["queue"] else {}
        self.following: dict[str, _FollowedWarmer] = {}
        self.stall = options["stall_timeout"]
        self.lost_after = max(MIN_LOST_AFTER, self.stall / 4)
        self.total_tasks = 0
        self.finished_tasks = 0  # the tasks of the warmers already finished

    # -- sending ------------------------------------------------------------------------------------------
    def send(self, group: Any) -> None:
        """Send every warmer's chunks as one Celery group each."""
        for entry in self.selected:
            started = time.perf_counter()
            try:
                alias = self.options["using"] or entry.using
                core = core_for(alias)
                arguments = warming.task_arguments(
                    entry,
                    chunk_size=self.options["chunk_size"],
                    tasks=self.options["tasks"],
                    run_id=self.run_id,
                    using=alias,
                )
                group(self.warm_task.si(**kwargs) for kwargs in arguments).apply_async(**self.sending)
            except Exception as error:  # noqa: BLE001 - this warmer could not be sent; the others still are
                result = self.results[entry.name]
                result.errors, result.error = 1, f"{type(error).__name__}: {error}"
                result.seconds = time.perf_counter() - started
                self.display.done(_outcome(result))
                continue
            self.following[entry.name] = _FollowedWarmer(core, arguments, started)
        self.total_tasks = sum(len(followed.arguments) for followed in self.following.values())
        self.display.done(
            f"run {self.run_id}: sent {self.total_tasks} task(s) for {len(self.following)} warmer(s)"
        )

    def _send_again(self, name: str, indexes: list[int], why: str) -> None:
        followed = self.following[name]
        for index in indexes:
            self.warm_task.apply_async(kwargs=followed.arguments[index], **self.sending)
            followed.sent_at[index] = time.monotonic()
        self.display.done(f"{name}: chunk(s) {_indexes(indexes)} sent again ({why})")

    # -- following ----------------------------------------------------------------------------------------
    def follow(self) -> list[WarmResult]:
        """Poll the progress until every warmer is done, or the run stalls or times out."""
        deadline = time.monotonic() + self.options["timeout"]
        last_change = last_quiet_check = time.monotonic()
        while self.following:
            now = time.monotonic()
            moved, tasks_done = self._read_progress(now)
            if moved:
                last_change = now
            if not self.following:
                break
            if now - last_change >= self.stall or now > deadline:
                self._give_up(now, past_deadline=now > deadline)
                break
            self._send_lost_again(now)
            if now - max(last_change, last_quiet_check) >= self.lost_after:
                last_quiet_check = now
                self._send_waiting_again()
            entries = sum(result.entries for result in self.results.values())
            self.display.update(
                f"{_bar(tasks_done, self.total_tasks)}{tasks_done}/{self.total_tasks} tasks, {entries:,} "
                f"entries, {len(self.following)} warmer(s) running"
            )
            time.sleep(POLL_INTERVAL)
        return [self.results[entry.name] for entry in self.selected]

    def _read_progress(self, now: float) -> tuple[bool, int]:
        """Read each followed warmer's hash into its result, and finish the warmers whose chunks are all
        done; (whether anything moved, how many tasks are done)."""
        moved, tasks_done = False, self.finished_tasks
        for name, followed in list(self.following.items()):
            progress = warming.read_progress(followed.core, self.run_id, name)
            moved = followed.observe(progress, now) or moved
            result = self.results[name]
            counts = progress.counts()
            result.entries, result.bytes, result.errors = counts["entries"], counts["bytes"], counts["errors"]
            result.skipped, result.batches = counts["skipped"], counts["batches"]
            result.error = progress.error
            result.seconds = time.perf_counter() - followed.started
            tasks_done += len(followed.done)
            if len(followed.done) >= len(followed.arguments):
                del self.following[name]
                self.finished_tasks += len(followed.arguments)
                self.display.done(_outcome(result))
        return moved, tasks_done

    def _give_up(self, now: float, past_deadline: bool) -> None:
        """Fail every warmer still followed, saying which chunks are missing and what the workers said."""
        app = self.warm_task.app
        answered, ping_error = _ping(app)
        queue = self.options["queue"] or app.conf.task_default_queue
        if past_deadline:
            why = f"gave up after {self.options['timeout']:g}s (--timeout)"
        else:
            why = f"no chunk finished and no heartbeat was seen for {self.stall:g}s (--stall-timeout)"
        for name, followed in self.following.items():
            result = self.results[name]
            result.errors += 1
            result.error = f"{why}: {followed.describe_missing(now)}; " + _workers_seen(
                answered, ping_error, queue
            )
            self.display.done(_outcome(result))

    def _send_lost_again(self, now: float) -> None:
        for name, followed in self.following.items():
            lost = followed.lost(now, self.lost_after)
            if lost:
                self._send_again(name, lost, f"its worker's heartbeat stopped {self.lost_after:g}s ago")

    def _send_waiting_again(self) -> None:
        """Nothing moved for a while: chunks no worker runs may sit unacknowledged with a worker that
        died, prefetched. If a worker is there to run them, send them again."""
        answered, _ = _ping(self.warm_task.app)
        if not answered:
            return
        for name, followed in self.following.items():
            waiting = followed.waiting(time.monotonic(), self.lost_after)
            if waiting:
                self._send_again(name, waiting, f"no progress for {self.lost_after:g}s, a worker is up")


def _ping(app: Any) -> tuple[list[str], str | None]:
    """The names of the workers that answered a ping within PING_SECONDS, and why none could be asked
    (a broker without broadcast, remote control turned off)."""
    try:
        replies = app.control.ping(timeout=PING_SECONDS) or []
    except Exception as error:  # noqa: BLE001 - a diagnosis only: the run's outcome does not depend on it
        return [], f"{type(error).__name__}: {error}"
    return sorted(name for reply in replies for name in reply), None


def _indexes(indexes: list[int]) -> str:
    return ", ".join(str(index) for index in sorted(indexes))


def _workers_seen(answered: list[str], ping_error: str | None, queue: str) -> str:
    if ping_error:
        return f"the workers could not be pinged ({ping_error})"
    if not answered:
        return f"no worker answered a ping within {PING_SECONDS:g}s"
    return (
        f"worker(s) {', '.join(answered)} answered a ping but did not complete them (are they consuming "
        f"queue {queue!r}? busy with other tasks?)"
    )


class _FollowedWarmer:
    """What the command knows of one warmer's chunks in a run: the arguments each was sent with, which
    are done, and for each attempt under way its heartbeat and when that last moved (on this machine's
    clock: the workers' clocks are never compared with it)."""

    def __init__(self, core: Core, arguments: list[dict[str, Any]], started: float) -> None:
        self.core, self.arguments, self.started = core, arguments, started
        now = time.monotonic()
        self.sent_at = dict.fromkeys(range(len(arguments)), now)
        self.done: set[int] = set()
        self.running: dict[int, dict[str, Any]] = {}
        self.beat_moved: dict[int, tuple[Any, float]] = {}  # index -> ((attempt, beat), when it last changed)

    def observe(self, progress: warming.TaskProgress, now: float) -> bool:
        """Take in a reading of the run's hash; whether anything moved since the last one."""
        moved = set(progress.done) != self.done
        self.done = set(progress.done)
        self.running = {index: record for index, record in progress.running.items() if index not in self.done}
        for index, record in self.running.items():
            beat = (record.get("attempt"), record.get("beat"))
            if index not in self.beat_moved or self.beat_moved[index][0] != beat:
                self.beat_moved[index] = (beat, now)
                moved = True
        return moved

    def lost(self, now: float, lost_after: float) -> list[int]:
        """Chunks whose attempt stopped beating `lost_after` ago and that were not sent since."""
        return [
            index
            for index in self.running
            if now - self.beat_moved[index][1] >= lost_after
            and self.sent_at[index] < self.beat_moved[index][1]
        ]

    def waiting(self, now: float, lost_after: float) -> list[int]:
        """Chunks not done, with no attempt beating, not sent in the last `lost_after`."""
        return [
            index
            for index in range(len(self.arguments))
            if index not in self.done
            and (index not in self.running or now - self.beat_moved[index][1] >= lost_after)
            and now - self.sent_at[index] >= lost_after
        ]

    def describe_missing(self, now: float) -> str:
        missing = [index for index in range(len(self.arguments)) if index not in self.done]
        text = f"chunk(s) {_indexes(missing)} of {len(self.arguments)} not completed"
        begun = [
            f"{index} on {self.running[index].get('worker', '?')}, last heartbeat "
            f"{now - self.beat_moved[index][1]:.0f}s ago"
            for index in missing
            if index in self.running
        ]
        if begun:
            text += f" (begun: {'; '.join(begun)})"
        else:
            text += " (none of them begun)"
        return text
