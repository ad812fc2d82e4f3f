"""Settings: the CACHES entry's LOCATION and OPTIONS, validated once, with errors that say what to fix.

Every option is documented in one table in docs/configuration.md; keep the two in step.
"""

from __future__ import annotations

import decimal
import hashlib
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from .codec import COMPRESSORS, SERIALIZERS, Codec

FAILURE_POLICIES = ("miss", "raise")

# option name -> (default, type check description)
DEFAULTS: dict[str, Any] = {
    "SERIALIZER": "pickle",
    "PICKLE_PROTOCOL": None,
    "COMPRESSOR": "none",
    "COMPRESS_MIN_SIZE": 1024,
    "COMPRESS_LEVEL": None,
    "MAX_VALUE_SIZE": 16 * 1024 * 1024,
    "SOCKET_TIMEOUT": 0.25,
    "SOCKET_CONNECT_TIMEOUT": 0.2,
    "RETRIES": 1,
    "READ_FROM_REPLICAS": False,
    "USERNAME": None,
    "PASSWORD": None,
    "SSL": None,
    "FAILURE_POLICY": "miss",
    "NAMESPACE_CHECK_INTERVAL": 1.0,
    "TAG_VERSION_TTL": 1.0,
    "TOPOLOGY_REFRESH_INTERVAL": 0.25,
    "OUTBOX_SIZE": 10000,
    "OUTBOX_DIR": None,
    "BREAKER_THRESHOLD": 3,
    "BREAKER_COOLDOWN": 1.0,
    "FAILOVER_REPAIR_WINDOW": 1.0,
    "SIGNING_KEY": None,
    # Stampede protection (docs/stampede.md)
    "STAMPEDE_LEASE_TIMEOUT": 10.0,
    "XFETCH_BETA": 1.0,
    # Write-behind (docs/write-behind.md)
    "BEHIND_SHARDS": 8,
    "BEHIND_BATCH_SIZE": 500,
    "BEHIND_IDLE_TIMEOUT": 30.0,
    "BEHIND_MAX_ATTEMPTS": 5,
    "BEHIND_TRIGGER_BACKLOG": 1000,
    "BEHIND_WAIT_REPLICAS": 0,
    "BEHIND_WAIT_TIMEOUT": 0.1,
}


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
    topology_refresh_interval: float = 0.25
    breaker_threshold: int = 3
    breaker_cooldown: float = 1.0
    # Seconds of acknowledged writes per primary a process keeps in mind: after that primary fails, the
    # keys it wrote in that window may be older on the replica that takes over (docs/failure.md).
    repair_window: float = 1.0


@dataclass(frozen=True)
class CacheSettings:
    connection: ConnectionSettings
    failure_policy: str
    namespace_check_interval: float
    options: dict[str, Any]


def _fail(message: str) -> ImproperlyConfigured:
    return ImproperlyConfigured(f"django_distcache: {message}")


def parse_location(location: str | list[str] | tuple[str, ...]) -> tuple[tuple[NodeAddress, ...], dict]:
    """Turn LOCATION (one URL, a comma-separated string, or a list of URLs) into startup nodes."""
    if isinstance(location, str):
        urls = [part.strip() for part in location.split(",") if part.strip()]
    elif isinstance(location, list | tuple):
        urls = list(location)
    else:
        raise _fail(f"LOCATION must be a URL or a list of URLs, got {type(location).__name__}")
    if not urls:
        raise _fail("LOCATION is empty: give at least one startup node, e.g. 'redis://127.0.0.1:7000'")
    nodes, schemes, credentials = [], set(), {}
    for url in urls:
        if not isinstance(url, str):
            raise _fail(f"LOCATION entries must be strings, got {url!r}")
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
        schemes.add(parts.scheme)
        if parts.username:
            credentials["username"] = unquote(parts.username)
        if parts.password:
            credentials["password"] = unquote(parts.password)
        nodes.append(NodeAddress(parts.hostname, port))
    if len(schemes) > 1:
        raise _fail("LOCATION mixes redis:// and rediss:// URLs; use one scheme for the whole cluster")
    credentials["ssl"] = schemes == {"rediss"}
    return tuple(dict.fromkeys(nodes)), credentials


def _positive_number(name: str, value: Any, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:  # (nan too)
        raise _fail(f"OPTIONS[{name!r}] must be a non-negative number, got {value!r}")
    return value


def parse_settings(location: Any, options: dict[str, Any]) -> CacheSettings:
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise _fail(f"unknown OPTIONS {sorted(unknown)}; known options: {sorted(DEFAULTS)}")
    opts = {**DEFAULTS, **options}
    nodes, credentials = parse_location(location)
    if opts["FAILURE_POLICY"] not in FAILURE_POLICIES:
        raise _fail(
            f"OPTIONS['FAILURE_POLICY'] must be one of {FAILURE_POLICIES}, got {opts['FAILURE_POLICY']!r}"
        )
    if opts["READ_FROM_REPLICAS"] not in (False, True, "fallback"):
        raise _fail(
            "OPTIONS['READ_FROM_REPLICAS'] must be False (primaries only), True (replicas in turn) or "
            f"'fallback' (replicas while a primary is unreachable), got {opts['READ_FROM_REPLICAS']!r}"
        )
    for name in ("SOCKET_TIMEOUT", "SOCKET_CONNECT_TIMEOUT"):
        _positive_number(name, opts[name], allow_none=True)
    for name in (
        "COMPRESS_MIN_SIZE",
        "NAMESPACE_CHECK_INTERVAL",
        "TAG_VERSION_TTL",
        "TOPOLOGY_REFRESH_INTERVAL",
        "RETRIES",
    ):
        _positive_number(name, opts[name])
    _positive_number("MAX_VALUE_SIZE", opts["MAX_VALUE_SIZE"], allow_none=True)
    _positive_number("XFETCH_BETA", opts["XFETCH_BETA"])
    if _positive_number("STAMPEDE_LEASE_TIMEOUT", opts["STAMPEDE_LEASE_TIMEOUT"]) <= 0:
        raise _fail("OPTIONS['STAMPEDE_LEASE_TIMEOUT'] must be more than 0 seconds")
    for name in (
        "BEHIND_IDLE_TIMEOUT",
        "BEHIND_WAIT_TIMEOUT",
        "BEHIND_WAIT_REPLICAS",
        "BEHIND_TRIGGER_BACKLOG",
    ):
        _positive_number(name, opts[name])
    _positive_number("BREAKER_COOLDOWN", opts["BREAKER_COOLDOWN"])
    _positive_number("FAILOVER_REPAIR_WINDOW", opts["FAILOVER_REPAIR_WINDOW"])
    if opts["OUTBOX_DIR"] not in (None, False) and not isinstance(opts["OUTBOX_DIR"], str | os.PathLike):
        raise _fail(
            "OPTIONS['OUTBOX_DIR'] must be a directory path, None (the default place) or False (none)"
        )
    for name in (
        "BEHIND_SHARDS",
        "BEHIND_BATCH_SIZE",
        "BEHIND_MAX_ATTEMPTS",
        "BREAKER_THRESHOLD",
        "OUTBOX_SIZE",
    ):
        value = opts[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _fail(f"OPTIONS[{name!r}] must be a whole number of at least 1, got {value!r}")
    if opts["SSL"] is not None and not isinstance(opts["SSL"], dict):
        raise _fail("OPTIONS['SSL'] must be a dict of redis-py ssl_* connection arguments")
    ssl_options = dict(opts["SSL"] or {})
    connection = ConnectionSettings(
        startup_nodes=nodes,
        username=opts["USERNAME"] or credentials.get("username"),
        password=opts["PASSWORD"] or credentials.get("password"),
        ssl=credentials["ssl"] or bool(ssl_options),
        ssl_options=ssl_options,
        socket_timeout=opts["SOCKET_TIMEOUT"],
        socket_connect_timeout=opts["SOCKET_CONNECT_TIMEOUT"],
        retries=int(opts["RETRIES"]),
        read_from_replicas=opts["READ_FROM_REPLICAS"] is True,
        replica_fallback=opts["READ_FROM_REPLICAS"] == "fallback",
        topology_refresh_interval=float(opts["TOPOLOGY_REFRESH_INTERVAL"]),
        breaker_threshold=int(opts["BREAKER_THRESHOLD"]),
        breaker_cooldown=float(opts["BREAKER_COOLDOWN"]),
        repair_window=float(opts["FAILOVER_REPAIR_WINDOW"]),
    )
    return CacheSettings(
        connection=connection,
        failure_policy=opts["FAILURE_POLICY"],
        namespace_check_interval=float(opts["NAMESPACE_CHECK_INTERVAL"]),
        options=opts,
    )


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


def _load_plugin(kind: str, registry: dict[str, type], spec: Any, **kwargs: Any) -> Any:
    option = kind.upper()
    if isinstance(spec, str) and spec in registry:
        cls = registry[spec]
    elif isinstance(spec, str) and spec.startswith("django_redis."):
        ours = _DJANGO_REDIS_EQUIVALENTS.get(spec)
        hint = f"use {ours!r}" if ours else f"choose one of {sorted(registry)}"
        raise _fail(f"OPTIONS[{option!r}] is django-redis's {spec!r}, which this backend cannot use: {hint}")
    elif isinstance(spec, str) and "." in spec:
        try:
            cls = import_string(spec)
        except ImportError as exc:
            raise _fail(f"cannot import {kind} {spec!r}: {exc}") from exc
    elif isinstance(spec, str):
        raise _fail(f"unknown {kind} {spec!r}; choose one of {sorted(registry)} or a dotted path")
    else:
        cls = spec
    if not callable(cls):
        raise _fail(f"OPTIONS[{option!r}] must name a {kind} class, got {spec!r}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        instance = cls(**kwargs)
    except ImportError as exc:
        raise _fail(f"the {kind} {spec!r} needs a package that is not installed: {exc}") from exc
    except TypeError as exc:
        raise _fail(f"the {kind} {spec!r} cannot be created without arguments: {exc}") from exc
    plugin_id = getattr(instance, "id", None)
    if isinstance(plugin_id, bool) or not isinstance(plugin_id, int) or not 0 <= plugin_id <= 255:
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
    opts = settings.options
    serializer_kwargs = {"protocol": opts["PICKLE_PROTOCOL"]} if opts["SERIALIZER"] == "pickle" else {}
    serializer = _load_plugin("serializer", SERIALIZERS, opts["SERIALIZER"], **serializer_kwargs)
    compressor_kwargs = {"level": opts["COMPRESS_LEVEL"]} if opts["COMPRESSOR"] in ("zlib", "zstd") else {}
    compressor = _load_plugin("compressor", COMPRESSORS, opts["COMPRESSOR"], **compressor_kwargs)
    keys = signing_keys(opts["SIGNING_KEY"])
    if not keys and getattr(serializer, "needs_signature", True):
        raise _fail("SECRET_KEY is empty: the pickle serializer signs values with a key derived from it")
    return Codec(
        serializer,
        compressor,
        keys or [b"unsigned"],
        compress_min_size=opts["COMPRESS_MIN_SIZE"],
        max_value_size=opts["MAX_VALUE_SIZE"],
        key_prefix=key_prefix,
    )


# The longest expiry Redis takes (its clock plus the expiry must fit in a signed 64-bit number of
# milliseconds); a longer timeout, infinity included, means "never expire", as Django's own backends treat it.
MAX_EXPIRY_MS = 2**62


def expiry_ms(timeout: Any) -> int | None:
    """A timeout in seconds as milliseconds to live: None for "forever", 0 for "do not keep" (Django's 0
    and negatives). Anything but a real number (or None) is refused before anything is written."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real | decimal.Decimal):
        raise TypeError(
            f"timeout must be a number of seconds or None, got {type(timeout).__name__}: {timeout!r}"
        )
    if not isinstance(timeout, int) and math.isnan(timeout):
        raise ValueError(f"timeout must be a number of seconds or None, got {timeout!r}")
    if timeout <= 0:
        return 0
    if timeout * 1000 >= MAX_EXPIRY_MS:  # (inf included)
        return None
    return max(1, int(timeout * 1000))
