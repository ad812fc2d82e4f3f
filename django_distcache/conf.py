"""Settings: the CACHES entry's LOCATION and OPTIONS, validated once, with errors that say what to fix.

Every option is declared once, as a field of `CacheSettings`: its name, default, check, docs section and
doc line. Validation, the typed attributes and the options table of docs/configuration.md all come from
those declarations (`python -m django_distcache.conf docs/configuration.md` rewrites the table).
"""

from __future__ import annotations

import decimal
import functools
import hashlib
import math
import numbers
import os
import pickle
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypedDict, TypeGuard, cast
from urllib.parse import SplitResult, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from .codec import COMPRESSORS, SERIALIZERS, Codec, Compressor, Serializer

FAILURE_POLICIES = ("miss", "raise")

# Internal bounds, not options (their old OPTIONS names are still accepted, and ignored, for one release).
# Least number of seconds between two reloads of the slot map.
TOPOLOGY_REFRESH_INTERVAL = 0.25
# Pending tag invalidations the outbox keeps per key prefix; beyond it the namespace is bumped instead.
OUTBOX_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class NodeAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ConnectionSettings:
    """What the topology layer needs to open connections; no Django in here."""

    startup_nodes: tuple[NodeAddress, ...]
    username: str | None = None
    password: str | None = None
    ssl: bool = False
    ssl_options: dict[str, Any] = field(default_factory=dict)
    socket_timeout: float | None = 0.25
    socket_connect_timeout: float | None = 0.2
    retries: int = 1
    read_from_replicas: bool = False
    # Reads of a primary whose circuit is open go to its replicas (READ_FROM_REPLICAS = "fallback").
    replica_fallback: bool = False
    topology_refresh_interval: float = TOPOLOGY_REFRESH_INTERVAL
    breaker_threshold: int = 3
    breaker_cooldown: float = 1.0
    # Seconds of acknowledged writes per primary a process keeps in mind: after that primary fails, the
    # keys it wrote in that window may be older on the replica that takes over (docs/failure.md).
    repair_window: float = 1.0


def _fail(message: str) -> ImproperlyConfigured:
    return ImproperlyConfigured(f"django_distcache: {message}")


# -- checks: what an option accepts, said the way an error message ends ("must be <must_be>") ------------
@dataclass(frozen=True)
class Check:
    """`accepts(value)` decides; `must_be` completes "OPTIONS['X'] must be ..."; `convert` turns an accepted
    value into the typed attribute's value."""

    must_be: str
    accepts: Callable[[Any], bool]
    convert: Callable[[Any], Any] = lambda value: value


def is_number(value: object) -> TypeGuard[int | float]:
    """An int or a float, and not a bool (True is an int to Python, never a number to a user)."""
    return not isinstance(value, bool) and isinstance(value, int | float)


def is_whole(value: object) -> TypeGuard[int]:
    """An int, and not a bool."""
    return not isinstance(value, bool) and isinstance(value, int)


def non_negative() -> Check:
    """Seconds, sizes, factors: 0 or more (NaN is refused, infinity accepted)."""
    return Check("a non-negative number", lambda v: is_number(v) and v >= 0, float)


def positive() -> Check:
    return Check("a number more than 0", lambda v: is_number(v) and v > 0, float)


def whole(minimum: int | None = None, maximum: int | None = None) -> Check:
    """An int (not a bool), within the bounds given."""
    if minimum is not None and maximum is not None:
        must_be = f"a whole number from {minimum} to {maximum}"
    elif minimum == 0:
        must_be = "a non-negative whole number"
    elif minimum is not None:
        must_be = f"a whole number of at least {minimum}"
    else:
        must_be = "a whole number"

    def accepts(value: Any) -> bool:
        if not is_whole(value):
            return False
        return (minimum is None or value >= minimum) and (maximum is None or value <= maximum)

    return Check(must_be, accepts, int)


def one_of(*choices: Any) -> Check:
    # Compared with their types, so that 1 is not taken for True, nor 0 for False.
    return Check(
        f"one of {', '.join(map(repr, choices))}",
        lambda v: any(v == choice and type(v) is type(choice) for choice in choices),
    )


def optional(check: Check) -> Check:
    """`check`, or None."""
    return Check(
        f"{check.must_be} or None",
        lambda v: v is None or check.accepts(v),
        lambda v: None if v is None else check.convert(v),
    )


def text() -> Check:
    return Check("a string", lambda v: isinstance(v, str))


def mapping(of_what: str) -> Check:
    return Check(f"a dict of {of_what}", lambda v: isinstance(v, dict), dict)


def plugin(kind: str, registry: Mapping[str, object]) -> Check:
    """A registered name, a dotted path or the class itself; build_codec loads it and says what is wrong."""
    return Check(
        f"one of {sorted(registry)}, a dotted path to a {kind} class, or the class itself",
        lambda v: isinstance(v, str) or callable(v),
    )


def default_outbox_dir() -> Path:
    """Where the outbox records pending invalidations when OUTBOX_DIR is None."""
    return Path(tempfile.gettempdir()) / "django-distcache-outbox"


def directory_or_none_or_false() -> Check:
    """A directory path; None, the default place; False, none. Converted to the directory (None: none)."""

    def convert(value: Any) -> Path | None:
        if value is False:
            return None
        return default_outbox_dir() if value is None else Path(value)

    return Check(
        "a directory path, None (the default place) or False (none)",
        lambda v: v is None or v is False or isinstance(v, str | os.PathLike),
        convert,
    )


# -- the table of options -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    """One entry of OPTIONS: `name` is the typed attribute's name in capitals."""

    name: str
    default: Any
    check: Check
    section: str
    doc: str

    @property
    def attribute(self) -> str:
        return self.name.lower()

    def parse(self, value: Any, given_as: str | None = None) -> Any:
        if not self.check.accepts(value):
            raise _fail(f"OPTIONS[{given_as or self.name!r}] must be {self.check.must_be}, got {value!r}")
        return self.check.convert(value)


def option(default: Any, check: Check, section: str, doc: str) -> Any:
    """Declares a field of CacheSettings as an option: its OPTIONS name is the field's in capitals, and the
    field's default is `default` converted as `check` converts a given value."""
    return field(
        default_factory=functools.partial(check.convert, default),
        metadata={"option": (default, check, section, doc)},
    )


SERIALIZATION = "Serialization and signing"
CONNECTIONS = "Connections"
FAILURES = "Failures"
INVALIDATION = "Invalidation and clear()"
STAMPEDE = "Stampede protection"
WRITE_BEHIND = "Write-behind"

PluginSpec = str | Callable[..., Any]


@dataclass(frozen=True, kw_only=True)
class CacheSettings:
    """One CACHES entry's settings, validated (parse_settings): the connection settings, and one typed
    attribute per option. The fields declared with `option(...)` are the table of options."""

    connection: ConnectionSettings

    serializer: PluginSpec = option(
        "pickle",
        plugin("serializer", SERIALIZERS),
        SERIALIZATION,
        '`"pickle"`, `"json"`, `"msgpack"` (needs the `msgpack` extra), a dotted path to a serializer '
        "class, or the class itself. See [serialization](serialization.md).",
    )
    pickle_protocol: int | None = option(
        None,
        optional(whole(0, pickle.HIGHEST_PROTOCOL)),
        SERIALIZATION,
        'Pickle protocol for the `"pickle"` serializer; `None` means `pickle.HIGHEST_PROTOCOL`.',
    )
    compressor: PluginSpec = option(
        "none",
        plugin("compressor", COMPRESSORS),
        SERIALIZATION,
        '`"none"`, `"zlib"`, `"zstd"` (needs the `zstd` extra), a dotted path to a compressor class, or '
        "the class itself.",
    )
    compress_min_size: int = option(
        1024,
        whole(minimum=0),
        SERIALIZATION,
        "Serialized values of at least this many bytes are compressed; the compressed form is kept "
        "only if it is smaller.",
    )
    compress_level: int | None = option(
        None,
        optional(whole()),
        SERIALIZATION,
        'Level for `"zlib"` or `"zstd"`; `None` means the compressor\'s default (zlib 6, zstd 3).',
    )
    max_value_size: int | None = option(
        16 * 1024 * 1024,
        optional(whole(minimum=0)),
        SERIALIZATION,
        "Largest value in bytes (16 MiB): both the stored bytes (after serialization and compression) "
        "and the serialized value before compression. A larger value raises `ValueTooLargeError` (a "
        "`ValueError`) and nothing is written. Reads never decompress past it: a stored value that "
        "would decode to more is a miss ([decompression bounds](security.md#decompression-bounds)). "
        "`None`: no cap on writes; reads stop at 512 MiB.",
    )
    signing_key: str | None = option(
        None,
        optional(text()),
        SERIALIZATION,
        "Secret that signs pickled values (each signature also binds the value's key and "
        "`KEY_PREFIX`). `None`: `SECRET_KEY`, with `SECRET_KEY_FALLBACKS` also accepted when reading. "
        "See [signing](serialization.md#signing) and [security](security.md).",
    )
    socket_timeout: float | None = option(
        0.25,
        optional(non_negative()),
        CONNECTIONS,
        "Seconds to wait for a reply before the node counts as unreachable (a hung node costs a call "
        "at most this long, and only until its [circuit breaker](failure-policy.md#circuit-breakers) "
        "opens). `None`: wait forever.",
    )
    socket_connect_timeout: float | None = option(
        0.2,
        optional(non_negative()),
        CONNECTIONS,
        "Seconds to wait for a new connection. `None`: wait forever.",
    )
    retries: int = option(
        1,
        whole(minimum=0),
        CONNECTIONS,
        "How many times a single command is sent again after its connection dropped (a reload of the "
        f"slot map is asked for too; reloads are at least {TOPOLOGY_REFRESH_INTERVAL} seconds apart); "
        "never after a timeout, so a hung node does not make the caller wait twice. Only commands that "
        "may safely run twice are sent again: the `incr`/`decr` script and the `RPUSH` of `clear()`'s purge list "
        "never are, since a lost reply does not say whether they ran. Batches (`get_many`, "
        "`set_many`, `delete_many`) are not retried.",
    )
    read_from_replicas: bool | Literal["fallback"] = option(
        False,
        one_of(False, True, "fallback"),
        CONNECTIONS,
        "Where reads (`get`, `get_many`, `has_key`, `ttl`) go. `False`: the slot's primary. `True`: the "
        'slot\'s replicas in turn (the primary when none of them is reachable). `"fallback"`: the '
        "primary, and its replicas while its [circuit breaker](failure-policy.md#circuit-breakers) is "
        "open, so a dead or hung primary's keys are still served, slightly stale, until a replica "
        "takes over ([reads from replicas](failure.md#reads-from-replicas-while-a-primary-is-down)). "
        "Replication is asynchronous: a replica may not yet have a write or a delete that just "
        "happened.",
    )
    username: str | None = option(
        None,
        optional(text()),
        CONNECTIONS,
        "ACL user name; overrides the one in the URLs. The commands, key pattern and channel pattern "
        "the user needs are in [Redis ACLs](security.md#redis-acls).",
    )
    password: str | None = option(
        None, optional(text()), CONNECTIONS, "Password; overrides the one in the URLs."
    )
    ssl: dict[str, Any] | None = option(
        None,
        optional(mapping("redis-py ssl_* connection arguments")),
        CONNECTIONS,
        'A dict of redis-py `ssl_*` connection arguments, e.g. `{"ssl_ca_certs": "/path/ca.pem"}`. A '
        "non-empty dict turns TLS on even with `redis://` URLs; `rediss://` turns it on by itself.",
    )
    failure_policy: Literal["miss", "raise"] = option(
        "miss",
        one_of(*FAILURE_POLICIES),
        FAILURES,
        'What an outage does: `"miss"` degrades (reads miss, writes are dropped, both logged and '
        'counted); `"raise"` raises `CacheUnavailable`. See [failure policy](failure-policy.md).',
    )
    breaker_threshold: int = option(
        3,
        whole(minimum=1),
        FAILURES,
        "Consecutive connection errors or timeouts after which a node's [circuit "
        "breaker](failure-policy.md#circuit-breakers) opens: its keys then follow the failure policy "
        "at once, without a network call.",
    )
    breaker_cooldown: float = option(
        1.0,
        non_negative(),
        FAILURES,
        "Seconds an open breaker waits before it lets one call probe the node; success closes it, "
        "failure keeps it open another cooldown.",
    )
    failover_repair_window: float = option(
        1.0,
        non_negative(),
        FAILURES,
        "Seconds of acknowledged writes per primary a process keeps in mind: when that primary fails, "
        "the keys it wrote in this window before the failure are deleted rather than served at an "
        "older value by the replica that takes over (replication is asynchronous), and so are keys "
        "whose write was dropped ([failover repair](failure.md#failover-repair)). `0`: acknowledged "
        "writes are not kept (dropped writes are still repaired).",
    )
    version_check_interval: float = option(
        1.0,
        non_negative(),
        INVALIDATION,
        "Seconds a process may use a version it read from Redis without asking again: the "
        "[namespace](keys-and-clear.md#clear) generation that `clear()` bumps, and [tag](tags.md) "
        "versions. A `clear()` or an invalidation is pushed to every process over the invalidation "
        "channel and seen at once; this bounds how long a delayed or lost push can leave a cleared or "
        "invalidated entry readable in another process ([what is "
        "guaranteed](tags.md#what-is-guaranteed)). While the channel is down, nothing is held. `0` "
        "holds nothing: every command reads the generation, and every tagged read and write its "
        "tags' versions (one extra round trip each).",
    )
    # The typed attribute is where to record (None: nowhere), the default place already resolved.
    outbox_dir: Path | None = option(
        None,
        directory_or_none_or_false(),
        INVALIDATION,
        "Where each process records the tag invalidations its [outbox](failure.md#invalidations-are-"
        "never-lost) holds while their nodes are unreachable, so that a process restarted before they "
        "landed bumps the namespace: `None` is a `django-distcache-outbox` directory in the system's "
        "temporary directory; `False` records nothing (a restart then forgets them). The outbox keeps "
        f"{OUTBOX_SIZE:,} tags per key prefix; beyond that, the namespace is bumped once the cluster "
        "answers (as `clear()` does), and until then every tagged entry is a miss.",
    )
    stampede_lease_timeout: float = option(
        10.0,
        positive(),
        STAMPEDE,
        "Seconds one caller may hold the lease to recompute a missing or expiring entry ([stampede "
        "protection](stampede.md)). Others wait for its value meanwhile; if it crashes, the lease "
        "expires after this long and another caller computes. Make it longer than your slowest "
        "computation.",
    )
    xfetch_beta: float = option(
        1.0,
        non_negative(),
        STAMPEDE,
        "Eagerness of probabilistic early recomputation ([XFetch](stampede.md#early-recomputation)) "
        "for entries written by `get_or_set`, `@cached` and `@cached_view`: above 1 recomputes "
        "earlier, `0` turns it off. A call can override it with `beta=`.",
    )
    behind_shards: int = option(
        8,
        whole(minimum=1),
        WRITE_BEHIND,
        "Number of Redis Streams that carry [write-behind](write-behind.md) changes. Each stream key "
        "has a slot of its own, so the appends spread over the primaries; a row always goes to the "
        "same stream, which keeps its changes in order. Changing it moves rows to other streams: "
        "drain first (`manage.py flushbehind`).",
    )
    behind_batch_size: int = option(
        500,
        whole(minimum=1),
        WRITE_BEHIND,
        "Stream entries a drain reads at a time. A drain reads until it has caught up or has read ten "
        "times this many, coalesces all of it per row, and applies it in one database transaction: "
        "larger passes turn more changes of a hot row into one write.",
    )
    behind_idle_timeout: float = option(
        30.0,
        non_negative(),
        WRITE_BEHIND,
        "Seconds after which a stream whose drainer stopped (killed worker) is taken over by another "
        "drainer, which then re-applies the entries the dead one had read but not acknowledged. A "
        "drain must finish a batch within this time.",
    )
    behind_max_attempts: int = option(
        5,
        whole(minimum=1),
        WRITE_BEHIND,
        "How many drains may fail to apply a row's changes before they move to the dead-letter stream "
        "(`manage.py flushbehind --dead-letter`).",
    )
    behind_trigger_backlog: int = option(
        1000,
        whole(minimum=0),
        WRITE_BEHIND,
        "When a stream holds at least this many unapplied changes, `save_behind` also queues a Celery "
        "drain of that stream (at most once a second per process), besides the beat schedule. `0` "
        "turns the trigger off.",
    )
    behind_wait_replicas: int = option(
        0,
        whole(minimum=0),
        WRITE_BEHIND,
        "With `N > 0`, `save_behind` waits (Redis `WAIT`) until `N` replicas hold the change, or "
        "`BEHIND_WAIT_TIMEOUT` passes; a shortfall is logged and counted, the change is still queued. "
        "See [durability](write-behind.md#durability).",
    )
    behind_wait_timeout: float = option(
        0.1,
        non_negative(),
        WRITE_BEHIND,
        "Seconds `save_behind` waits for `BEHIND_WAIT_REPLICAS`.",
    )

    @property
    def namespace_check_interval(self) -> float:
        """How long the namespace generation is trusted in-process: VERSION_CHECK_INTERVAL."""
        return self.version_check_interval


def _option_of(declared: Field[Any]) -> Option:
    default, check, section, doc = declared.metadata["option"]
    return Option(declared.name.upper(), default, check, section, doc)


OPTIONS: tuple[Option, ...] = tuple(
    _option_of(declared) for declared in fields(CacheSettings) if "option" in declared.metadata
)
OPTIONS_BY_NAME = {entry.name: entry for entry in OPTIONS}
DEFAULTS: dict[str, Any] = {entry.name: entry.default for entry in OPTIONS}

# Names accepted for one more release, with a DeprecationWarning. Renamed: old name -> the option that took
# its place. Retired: old name -> why its value is ignored.
RENAMED = {
    "NAMESPACE_CHECK_INTERVAL": "VERSION_CHECK_INTERVAL",
    "TAG_VERSION_TTL": "VERSION_CHECK_INTERVAL",
}
RETIRED = {
    "TOPOLOGY_REFRESH_INTERVAL": (
        f"the least time between two slot map reloads is an internal bound ({TOPOLOGY_REFRESH_INTERVAL} s)"
    ),
    "OUTBOX_SIZE": f"the outbox's size is an internal bound ({OUTBOX_SIZE:,} tags per key prefix)",
}


# -- LOCATION --------------------------------------------------------------------------------------------
class Credentials(TypedDict, total=False):
    """What LOCATION's URLs say besides the nodes: the ACL user and password, and whether TLS is on."""

    username: str
    password: str
    ssl: bool


def _location_urls(location: object) -> list[str]:
    if isinstance(location, str):
        urls: list[object] = [part.strip() for part in location.split(",") if part.strip()]
    elif isinstance(location, list | tuple):
        urls = list(location)
    else:
        raise _fail(f"LOCATION must be a URL or a list of URLs, got {type(location).__name__}")
    if not urls:
        raise _fail("LOCATION is empty: give at least one startup node, e.g. 'redis://127.0.0.1:7000'")
    for url in urls:
        if not isinstance(url, str):
            raise _fail(f"LOCATION entries must be strings, got {url!r}")
    return cast("list[str]", urls)


def _node_url(url: str) -> tuple[SplitResult, NodeAddress]:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise _fail(f"LOCATION entry {url!r} must start with redis:// or rediss://")
    try:
        port = parts.port or 6379
    except ValueError:
        raise _fail(f"LOCATION entry {url!r} has an invalid port") from None
    if not parts.hostname:
        raise _fail(f"LOCATION entry {url!r} has no host")
    if parts.path not in ("", "/", "/0"):
        raise _fail(f"LOCATION entry {url!r} names a database; Redis Cluster only has database 0")
    return parts, NodeAddress(parts.hostname, port)


def parse_location(location: object) -> tuple[tuple[NodeAddress, ...], Credentials]:
    """Turn LOCATION (one URL, a comma-separated string, or a list of URLs) into startup nodes."""
    nodes, schemes, credentials = [], set(), Credentials()
    for url in _location_urls(location):
        parts, node = _node_url(url)
        schemes.add(parts.scheme)
        if parts.username:
            credentials["username"] = unquote(parts.username)
        if parts.password:
            credentials["password"] = unquote(parts.password)
        nodes.append(node)
    if len(schemes) > 1:
        raise _fail("LOCATION mixes redis:// and rediss:// URLs; use one scheme for the whole cluster")
    credentials["ssl"] = schemes == {"rediss"}
    return tuple(dict.fromkeys(nodes)), credentials


# -- OPTIONS ---------------------------------------------------------------------------------------------
def _without_deprecated_names(options: Mapping[str, Any]) -> dict[str, Any]:
    """`options` with the old names warned about and replaced. Old names merged into one option: the
    smallest value given keeps every bound it set, unless the new name is given too."""
    given = dict(options)
    for old, reason in RETIRED.items():
        if old in given:
            del given[old]
            _deprecated(f"OPTIONS[{old!r}] is ignored: {reason}; remove it from OPTIONS")
    merged: dict[str, list[Any]] = {}
    for old, new in RENAMED.items():
        if old in given:
            OPTIONS_BY_NAME[new].parse(given[old], given_as=old)
            merged.setdefault(new, []).append(given.pop(old))
            _deprecated(f"OPTIONS[{old!r}] is deprecated: OPTIONS[{new!r}] replaces it; rename it")
    for new, values in merged.items():
        given.setdefault(new, min(values))
    return given


def _deprecated(message: str) -> None:
    # Attributed to the code that called parse_settings.
    warnings.warn(f"django_distcache: {message}", DeprecationWarning, stacklevel=4)


def _connection(
    nodes: tuple[NodeAddress, ...], credentials: Credentials, typed: dict[str, Any]
) -> ConnectionSettings:
    ssl_options = typed["ssl"] or {}
    return ConnectionSettings(
        startup_nodes=nodes,
        username=typed["username"] or credentials.get("username"),
        password=typed["password"] or credentials.get("password"),
        ssl=credentials["ssl"] or bool(ssl_options),
        ssl_options=ssl_options,
        socket_timeout=typed["socket_timeout"],
        socket_connect_timeout=typed["socket_connect_timeout"],
        retries=typed["retries"],
        read_from_replicas=typed["read_from_replicas"] is True,
        replica_fallback=typed["read_from_replicas"] == "fallback",
        topology_refresh_interval=TOPOLOGY_REFRESH_INTERVAL,
        breaker_threshold=typed["breaker_threshold"],
        breaker_cooldown=typed["breaker_cooldown"],
        repair_window=typed["failover_repair_window"],
    )


def parse_settings(location: object, options: Mapping[str, Any]) -> CacheSettings:
    given = _without_deprecated_names(options)
    unknown = set(given) - set(DEFAULTS)
    if unknown:
        raise _fail(f"unknown OPTIONS {sorted(unknown)}; known options: {sorted(DEFAULTS)}")
    values = {**DEFAULTS, **given}
    nodes, credentials = parse_location(location)
    typed = {entry.attribute: entry.parse(values[entry.name]) for entry in OPTIONS}
    return CacheSettings(connection=_connection(nodes, credentials, typed), **typed)


# -- the options table of docs/configuration.md ------------------------------------------------------------
DOCS_BEGIN = "<!-- options: generated from django_distcache/conf.py by `make docs-options`; edit there -->"
DOCS_END = "<!-- end of options -->"


def _default_text(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def options_markdown() -> str:
    """The options of OPTIONS as Markdown: one table per docs section, then the deprecated names."""
    sections: dict[str, list[Option]] = {}
    for entry in OPTIONS:
        sections.setdefault(entry.section, []).append(entry)
    lines = []
    for section, entries in sections.items():
        lines += [f"### {section}", "", "| Key | Where | Default | Meaning |", "|---|---|---|---|"]
        lines += [f"| `{e.name}` | `OPTIONS` | `{_default_text(e.default)}` | {e.doc} |" for e in entries]
        lines.append("")
    lines += [
        "### Deprecated names",
        "",
        "Accepted for one more release, with a `DeprecationWarning`. Given both `NAMESPACE_CHECK_INTERVAL`"
        " and `TAG_VERSION_TTL` (and not `VERSION_CHECK_INTERVAL`), the smaller value is used.",
        "",
        "| Key | Instead |",
        "|---|---|",
    ]
    lines += [f"| `{old}` | `{new}` |" for old, new in RENAMED.items()]
    lines += [f"| `{old}` | nothing: {reason}; the value is ignored |" for old, reason in RETIRED.items()]
    return "\n".join(lines)


def with_options_table(markdown: str) -> str:
    """`markdown` (docs/configuration.md) with the text between its option markers rendered anew."""
    head, begin, rest = markdown.partition(DOCS_BEGIN)
    _, end, tail = rest.partition(DOCS_END)
    if not begin or not end:
        raise ValueError(f"the options markers are missing: {DOCS_BEGIN} ... {DOCS_END}")
    return f"{head}{DOCS_BEGIN}\n{options_markdown()}\n{DOCS_END}{tail}"


# -- plugins and the codec -------------------------------------------------------------------------------
# What a plugin class must offer, by kind: the methods the codec calls.
_PLUGIN_METHODS = {"serializer": ("dumps", "loads"), "compressor": ("compress", "decompress")}
# django-redis's own classes, often left in settings by a migration: their names here.
_DJANGO_REDIS_EQUIVALENTS = {
    "django_redis.serializers.pickle.PickleSerializer": "pickle",
    "django_redis.serializers.json.JSONSerializer": "json",
    "django_redis.serializers.msgpack.MSGPackSerializer": "msgpack",
    "django_redis.compressors.identity.IdentityCompressor": "none",
    "django_redis.compressors.zlib.ZlibCompressor": "zlib",
    "django_redis.compressors.zstd.ZStdCompressor": "zstd",
}


def _plugin_class(kind: str, registry: Mapping[str, object], spec: object) -> object:
    """What `spec` names: a registered class, a class by dotted path, or `spec` itself."""
    if not isinstance(spec, str):
        return spec
    if spec in registry:
        return registry[spec]
    if spec.startswith("django_redis."):
        ours = _DJANGO_REDIS_EQUIVALENTS.get(spec)
        hint = f"use {ours!r}" if ours else f"choose one of {sorted(registry)}"
        raise _fail(
            f"OPTIONS[{kind.upper()!r}] is django-redis's {spec!r}, which this backend cannot use: {hint}"
        )
    if "." not in spec:
        raise _fail(f"unknown {kind} {spec!r}; choose one of {sorted(registry)} or a dotted path")
    try:
        return import_string(spec)
    except ImportError as exc:
        raise _fail(f"cannot import {kind} {spec!r}: {exc}") from exc


def _load_plugin(kind: str, registry: Mapping[str, object], spec: object, **kwargs: Any) -> Any:
    cls = _plugin_class(kind, registry, spec)
    if not callable(cls):
        raise _fail(f"OPTIONS[{kind.upper()!r}] must name a {kind} class, got {spec!r}")
    try:
        instance = cls(**{k: v for k, v in kwargs.items() if v is not None})
    except ImportError as exc:
        raise _fail(f"the {kind} {spec!r} needs a package that is not installed: {exc}") from exc
    except TypeError as exc:
        raise _fail(f"the {kind} {spec!r} cannot be created without arguments: {exc}") from exc
    plugin_id = getattr(instance, "id", None)
    if not is_whole(plugin_id) or not 0 <= plugin_id <= 255:
        raise _fail(f"{kind} {spec!r} needs an integer 'id' from 0 to 255 (stored in every value)")
    if not isinstance(getattr(instance, "name", None), str):
        raise _fail(f"{kind} {spec!r} needs a str 'name'")
    for method in _PLUGIN_METHODS[kind]:
        if not callable(getattr(instance, method, None)):
            raise _fail(f"{kind} {spec!r} has no {method}() method")
    return instance


def signing_keys(explicit: str | None = None) -> list[bytes]:
    """Keys that sign pickled payloads: derived from SIGNING_KEY or SECRET_KEY (+ SECRET_KEY_FALLBACKS)."""
    from django.conf import settings

    secrets = (
        [explicit] if explicit else [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", [])]
    )
    return [
        hashlib.blake2b(s.encode(), person=b"distcache.sign", digest_size=32).digest() for s in secrets if s
    ]


def build_codec(settings: CacheSettings, key_prefix: str = "") -> Codec:
    """The cache's codec; its signatures bind `key_prefix`, so a value cannot move to another prefix."""
    pickled = settings.serializer == "pickle"
    serializer: Serializer = _load_plugin(
        "serializer",
        SERIALIZERS,
        settings.serializer,
        **({"protocol": settings.pickle_protocol} if pickled else {}),
    )
    leveled = settings.compressor in ("zlib", "zstd")
    compressor: Compressor = _load_plugin(
        "compressor",
        COMPRESSORS,
        settings.compressor,
        **({"level": settings.compress_level} if leveled else {}),
    )
    keys = signing_keys(settings.signing_key)
    if not keys and getattr(serializer, "needs_signature", True):
        raise _fail("SECRET_KEY is empty: the pickle serializer signs values with a key derived from it")
    return Codec(
        serializer,
        compressor,
        keys or [b"unsigned"],
        compress_min_size=settings.compress_min_size,
        max_value_size=settings.max_value_size,
        key_prefix=key_prefix,
    )


# The longest expiry Redis takes (its clock plus the expiry must fit in a signed 64-bit number of
# milliseconds); a longer timeout, infinity included, means "never expire", as Django's own backends treat it.
MAX_EXPIRY_MS = 2**62


def expiry_ms(timeout: object) -> int | None:
    """A timeout in seconds as milliseconds to live: None for "forever", 0 for "do not keep" (Django's 0
    and negatives). Anything but a real number (or None) is refused before anything is written."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real | decimal.Decimal):
        raise TypeError(
            f"timeout must be a number of seconds or None, got {type(timeout).__name__}: {timeout!r}"
        )
    # Computed in the timeout's own type (a Decimal or Fraction stays exact); typeshed's numbers.Real does
    # not declare the comparisons and arithmetic every real number has.
    seconds = cast(float, timeout)
    if not isinstance(timeout, numbers.Integral) and math.isnan(seconds):  # (a huge int overflows isnan)
        raise ValueError(f"timeout must be a number of seconds or None, got {timeout!r}")
    if seconds <= 0:
        return 0
    if seconds * 1000 >= MAX_EXPIRY_MS:  # (inf included)
        return None
    return max(1, int(seconds * 1000))


def _main(paths: list[str]) -> int:
    """`python -m django_distcache.conf docs/configuration.md`: rewrite the options table of each file."""
    for path in map(Path, paths or ["docs/configuration.md"]):
        before = path.read_text(encoding="utf-8")
        after = with_options_table(before)
        if after != before:
            path.write_text(after, encoding="utf-8")
        print(f"{path}: options table {'rewritten' if after != before else 'up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
