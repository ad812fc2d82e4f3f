"""Where a cache's data lives in Redis: every key and the channel of one KEY_PREFIX start with `<KEY_PREFIX>:`.

So one ACL pattern pair, `~<KEY_PREFIX>:*` and `&<KEY_PREFIX>:*`, covers everything a cache touches (the
exact recipe is in docs/security.md), and nothing of another prefix is in reach.

- Entries: `<KEY_PREFIX>:<generation>:<VERSION>:<key>`. The generation (8 URL-safe base64 characters, see
  versioning.py) comes right after the prefix, so `clear()` retires every entry of the prefix at once and
  the purge finds them with one `SCAN MATCH`. With a custom KEY_FUNCTION the key it makes follows the
  generation whole: `<KEY_PREFIX>:<generation>:<made key>`.
- Keys of the backend's own: `<KEY_PREFIX>:~<kind>...` (`~` never starts a generation, so they never
  collide with entries, and `clear()` leaves them alone).

The backend adds no hash tag: a `{...}` in a user's key is the first one in the physical key (unless the
KEY_PREFIX has one, which `manage.py check` warns about), so keys spread over the cluster.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

GENERATION_LENGTH = 8  # characters of a namespace generation (48 random bits, URL-safe base64)
GENERATION = re.compile(rb"[A-Za-z0-9_-]{8}")
# What releases before 0.x used (64 random bits, 11 characters): never current, only ever purged.
LEGACY_GENERATION = re.compile(rb"[A-Za-z0-9_-]{11}")
# A generation a purge list may hold.
RETIRED_GENERATION = re.compile(rb"[A-Za-z0-9_-]{8}|[A-Za-z0-9_-]{11}")
_GLOB = re.compile(r"([*?\[\]\\])")

# Signed payloads that are not cache entries are bound to an identity no key can have: keys are UTF-8
# text, and 0xFE never occurs in UTF-8 (so a cached value can never pass for a queued database write).
BEHIND_CHANGE_IDENTITY = b"\xfebehind-change"


def glob_escape(text: str) -> str:
    """`text` as a literal in a Redis glob pattern (SCAN MATCH, ACL key and channel patterns)."""
    return _GLOB.sub(r"\\\1", text)


class KeyLayout:
    """The physical keys of one KEY_PREFIX. `strips_prefix`: the key function is Django's default, whose
    keys start with `<KEY_PREFIX>:`; that part is then not repeated after the generation."""

    def __init__(self, key_prefix: str, strips_prefix: bool) -> None:
        self.key_prefix = key_prefix
        self.start = key_prefix + ":"
        self._made_from = len(self.start) if strips_prefix else 0
        # Where an entry's physical key continues after `<KEY_PREFIX>:<generation>:`.
        self.identity_at = len(self.start.encode()) + GENERATION_LENGTH + 1
        # The hash tag gives every prefix's channel one slot: one subscription carries them all (backplane.py).
        self.channel = self.internal("{invalidations}")

    def head(self, generation: str) -> bytes:
        """What every entry key of `generation` starts with."""
        return f"{self.start}{generation}:".encode()

    def entry(self, head: bytes, made: str) -> bytes:
        """The physical key of Django's key `made` under the namespace `head`."""
        return head + made[self._made_from :].encode()

    def entries(self, head: bytes, made: Iterable[str]) -> list[bytes]:
        """`entry` of each of `made`, in order."""
        start = self._made_from
        return [head + key[start:].encode() for key in made]

    def identity(self, physical: bytes) -> bytes:
        """What a value's signature binds besides the KEY_PREFIX: the entry's key without the generation
        (version and key), so that `clear()` does not have to re-sign anything."""
        return physical[self.identity_at :]

    def internal(self, name: str) -> bytes:
        """A key (or the channel) of the backend's own for this prefix."""
        return f"{self.start}~{name}".encode()

    def beside(self, kind: str, made: str) -> bytes:
        """A key of the backend's own that belongs to one entry's key (its lock, its lease); outside the
        namespace, so `clear()` never frees them."""
        return f"{self.start}~{kind}:{made[self._made_from :]}".encode()

    def generation_pattern(self, generation: str) -> str:
        """SCAN MATCH pattern of every entry key of `generation` (glob characters of the prefix escaped)."""
        return glob_escape(f"{self.start}{generation}:") + "*"

    def acl_patterns(self) -> str:
        """The key and channel patterns a Redis ACL user of this cache needs."""
        escaped = glob_escape(self.start)
        return f"~{escaped}* &{escaped}*"
