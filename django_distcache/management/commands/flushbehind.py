"""`manage.py flushbehind`: drain write-behind changes now, show metrics, inspect or replay dead letters."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from django_distcache.core import CacheUnavailable
from django_distcache.models import (
    behind_metrics,
    dead_letters,
    flush_behind,
    purge_dead_letters,
    replay_dead_letters,
)


class Command(BaseCommand):
    help = "Apply queued write-behind changes to the database now, or inspect the dead-letter stream."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--using", default="default", help="cache alias holding the queue (default: default)"
        )
        parser.add_argument("--shard", type=int, action="append", help="drain only this shard (repeatable)")
        parser.add_argument(
            "--stats", action="store_true", help="print backlog, lag and rates; drain nothing"
        )
        parser.add_argument("--dead-letter", action="store_true", help="list changes that kept failing")
        parser.add_argument(
            "--replay",
            nargs="*",
            metavar="ID",
            help="with --dead-letter: queue them again (all, or these ids)",
        )
        parser.add_argument(
            "--purge", nargs="*", metavar="ID", help="with --dead-letter: delete them (all, or these ids)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        using = options["using"]
        if options["replay"] is not None or options["purge"] is not None:
            if not options["dead_letter"]:
                raise CommandError("--replay and --purge act on dead letters: add --dead-letter")
            if options["replay"] is not None and options["purge"] is not None:
                raise CommandError("choose one of --replay and --purge")
        if options["dead_letter"]:
            if options["replay"] is not None:
                count = replay_dead_letters(using, options["replay"] or None)
                self.stdout.write(f"queued {count} dead-lettered change(s) again")
                return
            if options["purge"] is not None:
                count = purge_dead_letters(using, options["purge"] or None)
                self.stdout.write(f"deleted {count} dead-lettered change(s)")
                return
            letters = dead_letters(using)
            if not letters:
                self.stdout.write("no dead-lettered changes")
            for letter in letters:
                fields = json.dumps(letter.fields, default=str) if letter.fields is not None else "?"
                self.stdout.write(
                    f"{letter.id}  {letter.model} pk={letter.pk!r}  fields={fields}  "
                    f"attempts={letter.attempts}  error={letter.error}"
                )
            return
        if options["stats"]:
            metrics = behind_metrics(using)
            self.stdout.write(json.dumps(metrics, indent=2))
            return
        try:
            report = flush_behind(using, shards=options["shard"])
        except CacheUnavailable as error:
            raise CommandError(f"nothing drained, no shard's node could be reached: {error}") from error
        self.stdout.write(
            f"applied {report.changes_applied} change(s) as {report.rows_written} row write(s) in "
            f"{report.batches} batch(es), {report.seconds:.3f}s; dropped (row deleted) {report.dropped_deleted}; "
            f"dead-lettered {report.dead_lettered}; failing rows left for retry {report.failed_rows}"
            + (f"; shards busy with another drainer: {report.shards_busy}" if report.shards_busy else "")
            + (f"; shards unreachable: {report.shards_unreachable}" if report.shards_unreachable else "")
            + (
                f"; found applied by an earlier drain {report.changes_found_applied}"
                if report.changes_found_applied
                else ""
            )
        )
        if not report.complete:
            raise CommandError(
                "changes were left in the queue: " + "; ".join(report.problems) + " (run it again once fixed)"
            )
