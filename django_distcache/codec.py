"""The envelope: how a Python value becomes the bytes stored in Redis, and back.

Every value this package writes carries a small header (format version, serializer and compressor ids,
creation time, optional soft expiry / recompute time / tag stamps) so that later features can read what
they need without a second round trip. Pickled payloads are signed, so bytes that another client wrote into
Redis are never unpickled; the signature binds the key the value was written for (and the KEY_PREFIX), so
a signed value copied to another key is refused too. Plain integers are stored bare (ASCII digits) so
INCRBY works on them. Decoding never produces more than the size cap: a small planted compressed value
cannot make a reader allocate gigabytes.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import json
import pickle
import re
import struct
import time
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

MAGIC = b"\xdc\x5e"
# 2: the signature binds the key (format 1 values are misses: their signature binds no key).
FORMAT_VERSION = 2
# What a payload may decode to when MAX_VALUE_SIZE is None: the largest value Redis itself accepts by
# default (proto-max-bulk-len).
DECODED_SIZE_LIMIT = 512 * 1024 * 1024

FLAG_SIGNED = 0x01
FLAG_TIMING = 0x02  # soft expiry and recompute time present
FLAG_TAGS = 0x04  # tag stamps present

# magic, format version, flags, serializer id, compressor id, created-at (unix seconds)
_HEADER = struct.Struct(">2sBBBBd")
_TIMING = struct.Struct(">df")  # soft expiry (unix seconds), recompute time (seconds)
_TAG_COUNT = struct.Struct(">H")
_TAG_VERSION = struct.Struct(">Q")
MAC_SIZE = 16
_PLAIN_PAYLOAD_AT = _HEADER.size + MAC_SIZE
_UNVERIFIED = object()


class _Expired:
    def __repr__(self) -> str:
        return "<expired>"


EXPIRED = _Expired()  # decode_stamped's value for an entry past its logical timeout

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_BARE_INT = re.compile(rb"0|-?[1-9][0-9]{0,18}")  # no "-0", no leading zeros: as Redis reads integers


class SignatureError(Exception):
    """An envelope claims to be ours but its signature does not verify (forged, or another SECRET_KEY)."""


class UndecodableValueError(Exception):
    """A stored value is ours (or claims to be) but cannot be decoded: corrupt, or of an unknown format."""


class DecodedTooLargeError(UndecodableValueError):
    """A stored payload decodes to more than the size cap (a decompression bomb, or a cap lowered since)."""


class Serializer(Protocol):
    id: int
    name: str

    def dumps(self, value: Any) -> bytes: ...
    def loads(self, data: bytes) -> Any: ...


class Compressor(Protocol):
    id: int
    name: str

    def compress(self, data: bytes) -> bytes: ...

    # Must not produce (nor allocate) more than `max_size` bytes: raise DecodedTooLargeError instead.
    def decompress(self, data: bytes, max_size: int) -> bytes: ...


class PickleSerializer:
    id, name, needs_signature = 1, "pickle", True

    def __init__(self, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
        self.protocol = protocol

    def dumps(self, value: Any) -> bytes:
        return pickle.dumps(value, self.protocol)

    def loads(self, data: bytes) -> Any:
        return pickle.loads(data)


class JSONSerializer:
    """JSON via Django's encoder (dates, decimals, UUIDs become strings; tuples come back as lists)."""

    id, name, needs_signature = 2, "json", False

    def __init__(self) -> None:
        from django.core.serializers.json import DjangoJSONEncoder

        self._encoder = DjangoJSONEncoder(separators=(",", ":"), ensure_ascii=False)

    def dumps(self, value: Any) -> bytes:
        return self._encoder.encode(value).encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


class MsgpackSerializer:
    id, name, needs_signature = 3, "msgpack", False

    def __init__(self) -> None:
        import msgpack

        self._msgpack = msgpack

    def dumps(self, value: Any) -> bytes:
        packed: bytes = self._msgpack.packb(value, use_bin_type=True)
        return packed

    def loads(self, data: bytes) -> Any:
        return self._msgpack.unpackb(data, raw=False, strict_map_key=False)


class NoCompressor:
    id, name = 0, "none"

    def compress(self, data: bytes) -> bytes:
        return data

    def decompress(self, data: bytes, max_size: int) -> bytes:
        if len(data) > max_size:
            raise DecodedTooLargeError(f"payload of {len(data)} bytes, over the cap of {max_size}")
        return data


class ZlibCompressor:
    id, name = 1, "zlib"

    def __init__(self, level: int = 6) -> None:
        self.level = level

    def compress(self, data: bytes) -> bytes:
        return zlib.compress(data, self.level)

    def decompress(self, data: bytes, max_size: int) -> bytes:
        stream = zlib.decompressobj()
        output = stream.decompress(data, max_size + 1)  # stops there, whatever the input would give
        if len(output) > max_size:
            raise DecodedTooLargeError(f"zlib payload decompresses to over the cap of {max_size} bytes")
        if not stream.eof:
            raise zlib.error("incomplete or truncated stream")
        return output


class ZstdCompressor:
    id, name = 2, "zstd"

    def __init__(self, level: int = 3) -> None:
        import zstandard

        self._zstandard = zstandard
        self._compressor = zstandard.ZstdCompressor(level=level)
        self._decompressor = zstandard.ZstdDecompressor()

    def compress(self, data: bytes) -> bytes:
        return self._compressor.compress(data)

    def decompress(self, data: bytes, max_size: int) -> bytes:
        declared = self._zstandard.frame_content_size(data)
        if declared > max_size:
            raise DecodedTooLargeError(f"zstd payload declares {declared} bytes, over the cap of {max_size}")
        if declared >= 0:  # the output buffer is the declared size; zstd refuses to write past it
            return self._decompressor.decompress(data)
        reader = self._decompressor.stream_reader(data)  # no size declared: read up to the cap only
        parts, size = [], 0
        while chunk := reader.read(max_size + 1 - size):
            parts.append(chunk)
            size += len(chunk)
            if size > max_size:
                raise DecodedTooLargeError(f"zstd payload decompresses to over the cap of {max_size} bytes")
        return b"".join(parts)


SERIALIZERS: dict[str, type[Serializer]] = {
    "pickle": PickleSerializer,
    "json": JSONSerializer,
    "msgpack": MsgpackSerializer,
}
COMPRESSORS: dict[str, type[Compressor]] = {
    "none": NoCompressor,
    "zlib": ZlibCompressor,
    "zstd": ZstdCompressor,
}


@dataclass(slots=True)
class Envelope:
    """A decoded stored value with its metadata."""

    value: Any
    created_at: float = 0.0
    soft_expiry: float | None = None
    recompute_time: float | None = None
    tags: dict[str, int] = field(default_factory=dict)


class Codec:
    """Encodes values into envelopes and decodes them; pure logic, no I/O.

    Every encode and decode takes the `key` the value is stored under, which its signature binds: the cache
    passes the entry's key without the namespace generation (KeyLayout.identity: the version and the key),
    and `key_prefix` is bound into every signature at construction. Keys are UTF-8 text; payloads that are
    not entries use identities that start with 0xFE, a byte UTF-8 never contains.
    """

    def __init__(
        self,
        serializer: Serializer,
        compressor: Compressor,
        signing_keys: Iterable[bytes],
        compress_min_size: int = 1024,
        max_value_size: int | None = None,
        key_prefix: str = "",
    ) -> None:
        keys = list(signing_keys)
        if not keys:
            raise ValueError("Codec needs at least one signing key")
        self.serializer = serializer
        self.compressor = compressor
        self.compress_min_size = compress_min_size
        self.max_value_size = max_value_size
        # Nothing written may decode to more than this, and nothing read is decoded past it.
        self.max_decoded_size = DECODED_SIZE_LIMIT if max_value_size is None else max_value_size
        # Keyed BLAKE2b set up once per key, with the KEY_PREFIX already fed in; each MAC starts from a copy
        # (the key schedule is the slow part) and feeds the key, the header and the payload. The key ends
        # where the header starts: the header starts with MAGIC, and 0xDC 0x5E occurs in no UTF-8 text.
        prefix = key_prefix.encode()
        bound_prefix = len(prefix).to_bytes(4, "big") + prefix
        self._signer = _keyed(keys[0], bound_prefix)
        self._verifiers = [_keyed(key, bound_prefix) for key in keys]
        self._sign = getattr(serializer, "needs_signature", True)
        self._decompressors: dict[int, Compressor] = {compressor.id: compressor, 0: NoCompressor()}
        self._unbounded_plugin = _decompress_takes_no_cap(compressor)
        self._serializers: dict[int, Serializer] = {serializer.id: serializer}
        # The common stored value (signed, uncompressed, no timing, no tags, this serializer) has a header
        # whose first six bytes are always these; decode() checks them in one comparison.
        self._plain_signed_prefix = MAGIC + bytes((FORMAT_VERSION, FLAG_SIGNED, serializer.id, 0))
        self._tagged_signed_prefix = MAGIC + bytes(
            (FORMAT_VERSION, FLAG_SIGNED | FLAG_TAGS, serializer.id, 0)
        )
        self._loads = serializer.loads

    # -- encoding ---------------------------------------------------------------------------------------
    def encode(
        self,
        value: Any,
        key: bytes,
        *,
        soft_expiry: float | None = None,
        recompute_time: float | None = None,
        tags: dict[str, int] | None = None,
        now: float | None = None,
        prepared: tuple[bytes, int] | None = None,
    ) -> bytes:
        """Return the bytes to store under `key`; raises the serializer's own error (e.g. PicklingError) on
        bad input, ValueTooLargeError over the size cap. `prepared`: what prepare(value) gave."""
        if type(value) is int and _INT64_MIN <= value <= _INT64_MAX and soft_expiry is None and not tags:
            return b"%d" % value
        payload, compressor_id = self.prepare(value) if prepared is None else prepared
        flags = FLAG_SIGNED if self._sign else 0
        extra = b""
        if soft_expiry is not None:
            flags |= FLAG_TIMING
            extra += _TIMING.pack(soft_expiry, recompute_time or 0.0)
        if tags:
            flags |= FLAG_TAGS
            extra += encode_tag_stamps(tags)
        head = (
            _HEADER.pack(
                MAGIC,
                FORMAT_VERSION,
                flags,
                self.serializer.id,
                compressor_id,
                time.time() if now is None else now,
            )
            + extra
        )
        if self._sign:
            data = head + self._mac(self._signer, key, head, payload) + payload
        else:
            data = head + payload
        if self.max_value_size is not None and len(data) > self.max_value_size:
            raise ValueTooLargeError(f"Encoded value is {len(data)} bytes, {self._over_the_cap()}")
        return data

    def prepare(self, value: Any) -> tuple[bytes, int]:
        """The payload of `value` (serialized, compressed when that pays) and its compressor id: the part of
        encode() that can refuse a value, for a caller that must refuse it before any I/O (a tagged write
        reads its tags' versions, creating their keys, before it can encode)."""
        payload = self.serializer.dumps(value)
        if len(payload) > self.max_decoded_size:
            raise ValueTooLargeError(f"Serialized value is {len(payload)} bytes, {self._over_the_cap()}")
        if len(payload) >= self.compress_min_size and self.compressor.id:
            compressed = self.compressor.compress(payload)
            if len(compressed) < len(payload):
                return compressed, self.compressor.id
        return payload, 0

    def _over_the_cap(self) -> str:
        if self.max_value_size is None:
            return f"over the {DECODED_SIZE_LIMIT} bytes a value may decode to; nothing was written"
        # The serialized size is capped as well as the stored one: every value written can be read back.
        return (
            f"over the configured MAX_VALUE_SIZE of {self.max_value_size} bytes (it bounds the serialized "
            "value as well as the stored bytes); nothing was written"
        )

    def rebind(self, data: bytes, key: bytes, new_key: bytes) -> bytes:
        """`data`, stored under `key`, as it must be stored under `new_key` (incr_version): a signed envelope
        gets a new signature once its own verifies, anything else is returned as it is. Raises
        SignatureError or UndecodableValueError for a value a read would refuse."""
        if data[:2] != MAGIC or len(data) < _HEADER.size:
            return data
        flags, serializer_id, _, _, _, _, _, offset = self._head(data)
        if not flags & FLAG_SIGNED:
            if self._sign or serializer_id == PickleSerializer.id:
                raise SignatureError("unsigned payload refused")  # as a read refuses it
            return data  # what a read makes of it does not depend on the key
        head, mac, payload = data[:offset], data[offset : offset + MAC_SIZE], data[offset + MAC_SIZE :]
        if not self._verified(key, head, mac, payload):
            raise SignatureError("stored value's signature does not verify")
        return head + self._mac(self._signer, new_key, head, payload) + payload

    @staticmethod
    def _mac(prepared: hashlib.blake2b, key: bytes, head: bytes, payload: bytes) -> bytes:
        mac = prepared.copy()
        mac.update(key)
        mac.update(head)
        mac.update(payload)
        return mac.digest()

    def _verified(self, key: bytes, head: bytes, mac: bytes, payload: bytes) -> bool:
        for verifier in self._verifiers:
            if hmac.compare_digest(self._mac(verifier, key, head, payload), mac):
                return True
        return False

    # -- decoding ---------------------------------------------------------------------------------------
    def decode(self, data: bytes, key: bytes) -> Any:
        """Return the value stored under `key`: ours decoded, a bare integer as int, anything else as the
        raw bytes."""
        return self.decode_stamped(data, key)[0]

    def decode_stamped(self, data: bytes, key: bytes) -> tuple[Any, dict[str, int] | None]:
        """The stored value and its tag stamps (None when it carries none)."""
        if data[:2] != MAGIC:
            return (int(data) if _BARE_INT.fullmatch(data) else data), None
        # Fast paths for the two common shapes (signed, not compressed, no timing; without or with tags).
        # Anything unusual (another key, a corrupt value) takes decode_envelope, which decides what it is.
        prefix = data[:6]
        if prefix == self._plain_signed_prefix and len(data) >= _PLAIN_PAYLOAD_AT:
            value = self._open_signed(data, _HEADER.size, key)
            if value is not _UNVERIFIED:
                return value, None
        elif prefix == self._tagged_signed_prefix:
            try:
                tags, head_end = decode_tag_stamps(data, _HEADER.size)
            except (struct.error, IndexError, UnicodeDecodeError):
                tags = None
            if tags is not None:
                value = self._open_signed(data, head_end, key)
                if value is not _UNVERIFIED:
                    return value, tags
        envelope = self.decode_envelope(data, key)
        if envelope.soft_expiry is not None and envelope.soft_expiry <= time.time():
            # Past its timeout, kept only for stale-while-revalidate readers (stampede.py): a miss here.
            return EXPIRED, None
        return envelope.value, envelope.tags or None

    def _open_signed(self, data: bytes, head_end: int, key: bytes) -> Any:
        """Verify `head | MAC | payload` with the current key and load the payload; _UNVERIFIED otherwise
        (the general path then tries the fallback keys and reports what is wrong)."""
        payload = data[head_end + MAC_SIZE :]
        mac = self._signer.copy()
        mac.update(key)
        mac.update(data[:head_end])
        mac.update(payload)
        if not hmac.compare_digest(mac.digest(), data[head_end : head_end + MAC_SIZE]):
            return _UNVERIFIED
        try:
            return self._loads(payload)
        except Exception as error:
            raise UndecodableValueError(f"{type(error).__name__}: {error}") from error

    def decode_envelope(self, data: bytes, key: bytes) -> Envelope:
        if data[:2] != MAGIC:
            return Envelope(int(data) if _BARE_INT.fullmatch(data) else data)
        if len(data) < _HEADER.size:
            return Envelope(data)
        flags, serializer_id, compressor_id, created_at, soft_expiry, recompute_time, tags, offset = (
            self._head(data)
        )
        if flags & FLAG_SIGNED:
            head, mac, payload = data[:offset], data[offset : offset + MAC_SIZE], data[offset + MAC_SIZE :]
            if not self._verified(key, head, mac, payload):
                raise SignatureError("stored value's signature does not verify")
        else:
            # A cache that signs what it writes accepts nothing unsigned: a planted value is a miss.
            if self._sign or serializer_id == PickleSerializer.id:
                raise SignatureError("unsigned payload refused")
            payload = data[offset:]
        serializer = self._serializer_for(serializer_id)
        # Only now, past the signature: what is decompressed (and how much) is ours, or the cache is
        # unsigned by choice; either way never more than the cap.
        try:
            payload = self._decompress(compressor_id, payload)
            value = serializer.loads(payload)
        except UndecodableValueError:
            raise
        except Exception as error:
            raise UndecodableValueError(f"{type(error).__name__}: {error}") from error
        return Envelope(value, created_at, soft_expiry, recompute_time, tags)

    def _head(self, data: bytes) -> tuple[int, int, int, float, Any, Any, dict[str, int], int]:
        """flags, serializer id, compressor id, created at, soft expiry, recompute time, tag stamps, and
        where the header ends, of `data` (which starts with MAGIC and is at least a header long)."""
        _, version, flags, serializer_id, compressor_id, created_at = _HEADER.unpack_from(data)
        if version != FORMAT_VERSION:
            raise UndecodableValueError(
                f"envelope format {version}, this release reads format {FORMAT_VERSION} (written by another "
                "release of django-distcache)"
            )
        offset = _HEADER.size
        soft_expiry = recompute_time = None
        tags: dict[str, int] = {}
        try:
            if flags & FLAG_TIMING:
                soft_expiry, recompute_time = _TIMING.unpack_from(data, offset)
                offset += _TIMING.size
            if flags & FLAG_TAGS:
                tags, offset = decode_tag_stamps(data, offset)
        except (struct.error, IndexError, UnicodeDecodeError) as error:
            raise UndecodableValueError(f"corrupt envelope header: {error}") from None
        return flags, serializer_id, compressor_id, created_at, soft_expiry, recompute_time, tags, offset

    def _decompress(self, compressor_id: int, payload: bytes) -> bytes:
        cap = self.max_decoded_size
        if not compressor_id:
            if len(payload) > cap:
                raise DecodedTooLargeError(f"payload of {len(payload)} bytes, over the cap of {cap}")
            return payload
        compressor = self._decompressor_for(compressor_id)
        if compressor is self.compressor and self._unbounded_plugin:
            output = compressor.decompress(payload)  # type: ignore[call-arg]
            if len(output) > cap:
                raise DecodedTooLargeError(
                    f"payload decompresses to {len(output)} bytes, over the cap of {cap}"
                )
            return output
        return compressor.decompress(payload, cap)

    def _serializer_for(self, serializer_id: int) -> Serializer:
        # Values written under another SERIALIZER setting stay readable after a switch.
        return _plugin_by_id(self._serializers, SERIALIZERS, serializer_id, "serializer")

    def _decompressor_for(self, compressor_id: int) -> Compressor:
        return _plugin_by_id(self._decompressors, COMPRESSORS, compressor_id, "compressor")


def _keyed(signing_key: bytes, bound_prefix: bytes) -> hashlib.blake2b:
    prepared = hashlib.blake2b(key=signing_key, digest_size=MAC_SIZE)
    prepared.update(bound_prefix)
    return prepared


def _decompress_takes_no_cap(compressor: Any) -> bool:
    """A compressor class written before decompress() took `max_size`: its output is checked after the
    fact (its memory is not bounded; docs/serialization.md)."""
    try:
        parameters = inspect.signature(compressor.decompress).parameters
    except (TypeError, ValueError):
        return False
    return len(parameters) < 2 and not any(p.kind is p.VAR_POSITIONAL for p in parameters.values())


_Plugin = TypeVar("_Plugin", Serializer, Compressor)


def _plugin_by_id(
    loaded: dict[int, _Plugin], registry: Mapping[str, type[_Plugin]], plugin_id: int, kind: str
) -> _Plugin:
    plugin = loaded.get(plugin_id)
    if plugin is None:
        cls = next((cls for cls in registry.values() if cls.id == plugin_id), None)
        if cls is None:
            raise UndecodableValueError(f"unknown {kind} id {plugin_id}")
        plugin = loaded[plugin_id] = cls()
    return plugin


class ValueTooLargeError(ValueError):
    """The encoded value is larger than MAX_VALUE_SIZE."""


def encode_tag_stamps(tags: dict[str, int]) -> bytes:
    parts = [_TAG_COUNT.pack(len(tags))]
    for name, version in tags.items():
        raw = name.encode()
        if len(raw) > 255:
            raise ValueError(f"tag name over 255 bytes: {name[:40]!r}...")
        parts.append(bytes((len(raw),)) + raw + _TAG_VERSION.pack(version))
    return b"".join(parts)


def decode_tag_stamps(data: bytes, offset: int) -> tuple[dict[str, int], int]:
    (count,) = _TAG_COUNT.unpack_from(data, offset)
    offset += _TAG_COUNT.size
    tags = {}
    for _ in range(count):
        size = data[offset]
        name = data[offset + 1 : offset + 1 + size].decode()
        offset += 1 + size
        (tags[name],) = _TAG_VERSION.unpack_from(data, offset)
        offset += _TAG_VERSION.size
    return tags, offset
