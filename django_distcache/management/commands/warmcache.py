"""`manage.py warmcache`: run cache warmers here, or as Celery tasks, and say what they wrote."""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, OutputWrapper

from django_distcache import warming
from django_distcache.warming import WarmResult

POLL_INTERVAL = 0.1  # seconds between two readings of the --async tasks' progress


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

    def add_arguments(self, parser: Any) -> None:
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

    def handle(self, *args: Any, **options: Any) -> None:
        if options["chunk_size"] < 1:
            raise CommandError("--chunk-size must be at least 1")
        if options["tasks"] is not None and options["tasks"] < 1:
            raise CommandError("--tasks must be at least 1")
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
        """Send one group of tasks per warmer, then poll each warmer's progress hash until every task of
        it reported done (or --timeout). A warmer that cannot be sent fails alone."""
        try:
            from celery import group

            from django_distcache.tasks import warm_task
        except ImportError as error:
            raise CommandError(
                f"--async needs Celery (pip install 'django-distcache[celery]'): {error}"
            ) from None
        run_id = warming.new_run_id()
        results = {entry.name: WarmResult(entry.name) for entry in selected}
        following: dict[str, tuple[Any, int, float]] = {}  # name -> (cache, tasks sent, started)
        for entry in selected:
            started = time.perf_counter()
            try:
                alias = options["using"] or entry.using
                cache = warming._cache_for(alias)
                arguments = warming.task_arguments(
                    entry,
                    chunk_size=options["chunk_size"],
                    tasks=options["tasks"],
                    run_id=run_id,
                    using=alias,
                )
                sending = {"queue": options["queue"]} if options["queue"] else {}
                group(warm_task.si(**kwargs) for kwargs in arguments).apply_async(**sending)
            except Exception as error:  # noqa: BLE001 - this warmer could not be sent; the others still are
                result = results[entry.name]
                result.errors, result.error = 1, f"{type(error).__name__}: {error}"
                result.seconds = time.perf_counter() - started
                display.done(_outcome(result))
                continue
            following[entry.name] = (cache, len(arguments), started)
        total_tasks = sum(sent for _, sent, _ in following.values())
        display.done(f"run {run_id}: sent {total_tasks} task(s) for {len(following)} warmer(s)")
        deadline = time.monotonic() + options["timeout"]
        finished_tasks = 0  # the tasks of the warmers already finished
        while following:
            tasks_done = finished_tasks
            for name, (cache, sent, started) in list(following.items()):
                progress = warming.read_progress(cache, run_id, name)
                result = results[name]
                result.entries, result.bytes, result.errors = (
                    progress.entries,
                    progress.bytes,
                    progress.errors,
                )
                result.skipped, result.batches, result.error = (
                    progress.skipped,
                    progress.batches,
                    progress.error,
                )
                result.seconds = time.perf_counter() - started
                tasks_done += min(progress.chunks_done, sent)
                if progress.chunks_done >= sent:
                    del following[name]
                    finished_tasks += sent
                    display.done(_outcome(result))
            if not following:
                break
            if time.monotonic() > deadline:
                for name in following:
                    result = results[name]
                    result.errors += 1
                    result.error = (
                        f"gave up after {options['timeout']:g}s waiting for its tasks (is a worker running?)"
                    )
                    display.done(_outcome(result))
                break
            entries = sum(result.entries for result in results.values())
            display.update(
                f"{_bar(tasks_done, total_tasks)}{tasks_done}/{total_tasks} tasks, {entries:,} entries, "
                f"{len(following)} warmer(s) running"
            )
            time.sleep(POLL_INTERVAL)
        return [results[entry.name] for entry in selected]
