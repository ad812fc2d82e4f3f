"""Write-behind dead letters: changes that failed BEHIND_MAX_ATTEMPTS times (or cannot be read) leave their
shard's stream for one dead-letter stream, where an operator lists, replays or purges them
(`manage.py flushbehind --dead-letters/--replay/--purge`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..core import Core, core_for
from ..topology import Call
from .streams import dead_letter_key, decode_change, shard_keys, shard_of, strict_batch, strict_call

logger = logging.getLogger("django_distcache.behind")


class Letter(NamedTuple):
    """A change on its way to the dead letters: its stream id and payload, why, after how many attempts."""

    id: bytes
    payload: bytes | None
    error: str
    attempts: int


def send_to_dead_letters(core: Core, shard: int, letters: list[Letter]) -> None:
    key = dead_letter_key(core)
    now = f"{time.time():.3f}"
    calls = []
    for letter in letters:
        fields = ("c", letter.payload or b"", "error", letter.error[:2000], "attempts", letter.attempts)
        where = ("shard", shard, "original_id", letter.id, "at", now)
        calls.append(Call(key, ("XADD", key, "*", *fields, *where), idempotent=False))
    strict_batch(core, calls)
    logger.error(
        "moved %d write-behind change(s) to the dead-letter stream: %s", len(letters), letters[0].error
    )


@dataclass
class DeadLetter:
    id: str
    model: str | None
    pk: Any
    fields: dict[str, Any] | None
    error: str
    attempts: int
    original_id: str


def _dead_letter(core: Core, entry_id: bytes, fields: list[bytes]) -> DeadLetter:
    pairs = dict(zip(fields[::2], fields[1::2], strict=True))
    try:
        change = decode_change(core, pairs.get(b"c") or None)
    except Exception:  # noqa: BLE001 - shown as undecodable
        change = {"model": None, "pk": None, "fields": None}
    return DeadLetter(
        id=entry_id.decode(),
        model=change["model"],
        pk=change["pk"],
        fields=change["fields"],
        error=pairs.get(b"error", b"").decode(errors="replace"),
        attempts=int(pairs.get(b"attempts", b"0")),
        original_id=pairs.get(b"original_id", b"").decode(),
    )


def dead_letters(using: str = "default", count: int = 1000) -> list[DeadLetter]:
    core = core_for(using)
    key = dead_letter_key(core)
    reply = strict_call(core, Call(key, ("XRANGE", key, "-", "+", "COUNT", count)))
    return [_dead_letter(core, entry_id, fields) for entry_id, fields in reply or []]


def replay_dead_letters(using: str = "default", ids: Iterable[str] | None = None) -> int:
    """Queue dead-lettered changes again (as new changes, in their original order); returns how many."""
    core = core_for(using)
    key = dead_letter_key(core)
    wanted = None if ids is None else set(ids)
    replayed = 0
    for letter in dead_letters(using):
        if (wanted is not None and letter.id not in wanted) or letter.model is None:
            continue
        raw = strict_call(core, Call(key, ("XRANGE", key, letter.id, letter.id)))
        payload = dict(zip(raw[0][1][::2], raw[0][1][1::2], strict=True))[b"c"]
        stream = shard_keys(core, shard_of(core, letter.model, letter.pk)).stream
        strict_call(core, Call(stream, ("XADD", stream, "*", "c", payload), idempotent=False))
        strict_call(core, Call(key, ("XDEL", key, letter.id)))
        replayed += 1
    return replayed


def purge_dead_letters(using: str = "default", ids: Iterable[str] | None = None) -> int:
    core = core_for(using)
    key = dead_letter_key(core)
    targets = [letter.id for letter in dead_letters(using)] if ids is None else list(ids)
    if not targets:
        return 0
    return int(strict_call(core, Call(key, ("XDEL", key, *targets))))
