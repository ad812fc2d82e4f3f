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

import contextlib
import functools
import hashlib
import hmac
import inspect
import itertools
import json
import os
import pickle
import re
import struct
import time
import weakref
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# Format 3, the compact envelope (docs/serialization.md has the byte map):
#   MAGIC | descriptor | [codec] | [timing] | [tag stamps] | [nonce] | payload | [MAC]
# MAGIC is one byte that never starts UTF-8 text, a pickle, JSON, msgpack or an integer (0xC1 is invalid in
# UTF-8 and unused by msgpack); the descriptor is the format version (high 3 bits) and the flags.
MAGIC = b"\xc1"
FORMAT_VERSION = 3
# What earlier releases wrote (formats 1 and 2): read as a miss, never as foreign bytes.
OLD_MAGIC = b"\xdc\x5e"
# What a payload may decode to when MAX_VALUE_SIZE is None: the largest value Redis itself accepts by
# default (proto-max-bulk-len).
DECODED_SIZE_LIMIT = 512 * 1024 * 1024

FLAG_SIGNED = 0x01
FLAG_TIMING = 0x02  # soft expiry (varint Unix ms) and recompute time (varint µs) present
FLAG_TAGS = 0x04  # tag stamps present
FLAG_CODEC = 0x08  # serializer id and compressor id follow (a byte each); absent: pickle, uncompressed
FLAG_GMAC = 0x10  # signed with AES-GMAC, a salt and counter before the payload (large ones); else BLAKE2b
_FLAGS = 0x1F
_VERSION_BITS = FORMAT_VERSION << 5

MAC_SIZE = 16
# A large payload's nonce field: a 16-byte salt naming the writer's AES-GMAC subkey, then an 8-byte counter
# (the AES nonce is the counter behind four zero bytes). Every writer (a process, again after a fork) draws a
# salt of its own and counts from zero, so no AES nonce is ever used twice under one key: nothing rests on
# random 96-bit nonces not colliding, which would wear thin after some 2^32 writes of one SECRET_KEY.
SALT_SIZE = 16
NONCE_SIZE = SALT_SIZE + 8
_SUBKEYS_KEPT = 256  # subkeys a reader keeps (one per writer epoch it has read values of)
# Payloads from this size on are signed with AES-GMAC (about 1 µs per 10 KB with AES-NI/VAES and CLMUL,
# against 8-10 µs for BLAKE2b); below it BLAKE2b is as fast and needs no nonce (24 bytes saved per entry).
GMAC_MIN_SIZE = 1024
_PICKLE_ID = 1
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
    tags: TagStamps | None = None


class Codec:
    """Encodes values into envelopes and decodes them; pure logic, no I/O.

    Every encode and decode takes the `key` the value is stored under, which its signature binds: the cache
    passes the entry's key without the namespace generation (KeyLayout.identity: the version and the key),
    and `key_prefix` is bound into every signature at construction. Keys are UTF-8 text; payloads that are
    not entries use identities that start with 0xFE, a byte UTF-8 never contains.

    Signatures (16 bytes, at the end): payloads under GMAC_MIN_SIZE get keyed BLAKE2b over the key, the
    header and the payload (the key ends where the header starts: MAGIC, 0xC1, occurs in no UTF-8 text).
    Larger ones get AES-GMAC: AES-256-GCM with the header, salt, counter and payload as the authenticated
    data and the key as the (discarded) plaintext, so the tag binds all of them. Its AES key is derived from
    the signing key, the KEY_PREFIX and the writer's salt; the nonce is the writer's counter (SALT_SIZE).
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
        # (the key schedule is the slow part). The AES-GMAC keys are derived once per key as well.
        prefix = key_prefix.encode()
        bound_prefix = len(prefix).to_bytes(4, "big") + prefix
        self._signers = [_Signer(key, bound_prefix) for key in keys]
        self._signer = self._signers[0]
        self._sign = getattr(serializer, "needs_signature", True)
        self._decompressors: dict[int, Compressor] = {compressor.id: compressor, 0: NoCompressor()}
        self._unbounded_plugin = _decompress_takes_no_cap(compressor)
        self._serializers: dict[int, Serializer] = {serializer.id: serializer}
        # pickle.loads itself for the built-in pickle serializer: one call less per value read.
        self._loads = pickle.loads if type(serializer) is PickleSerializer else serializer.loads
        # The descriptors of the common stored values (signed pickle, uncompressed, no timing): decode()
        # recognises them with one comparison of the first two bytes.
        self._plain_blake = MAGIC + bytes((_VERSION_BITS | FLAG_SIGNED,))
        self._plain_gmac = MAGIC + bytes((_VERSION_BITS | FLAG_SIGNED | FLAG_GMAC,))
        # Pickle reads straight from a view of the reply; another serializer gets bytes (json.loads, for
        # one, takes no memoryview), and values of the other serializer take the general path.
        self._takes_view = isinstance(serializer, PickleSerializer)
        if serializer.id != _PICKLE_ID:
            self._plain_blake = self._plain_gmac = b"not a descriptor"

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
        bad input, ValueTooLargeError over the size cap. `prepared`: what prepare(value) gave. `now` is
        accepted for callers of format 2 (which stored it); format 3 stores no creation time."""
        if type(value) is int and _INT64_MIN <= value <= _INT64_MAX and soft_expiry is None and not tags:
            return b"%d" % value
        payload, compressor_id = self.prepare(value) if prepared is None else prepared
        head = self._head_bytes(payload, compressor_id, soft_expiry, recompute_time, tags)
        data = self._signer.seal(key, head, payload) if self._sign else head + payload
        if self.max_value_size is not None and len(data) > self.max_value_size:
            raise ValueTooLargeError(f"Encoded value is {len(data)} bytes, {self._over_the_cap()}")
        return data

    def _head_bytes(
        self,
        payload: bytes,
        compressor_id: int,
        soft_expiry: float | None,
        recompute_time: float | None,
        tags: dict[str, int] | None,
    ) -> bytes:
        flags = 0
        extra = b""
        if self._sign:
            flags = FLAG_SIGNED | (FLAG_GMAC if len(payload) >= GMAC_MIN_SIZE else 0)
        if compressor_id or self.serializer.id != _PICKLE_ID:
            flags |= FLAG_CODEC
            extra = bytes((self.serializer.id, compressor_id))
        if soft_expiry is not None:
            flags |= FLAG_TIMING
            extra += _varint(max(0, round(soft_expiry * 1000))) + _varint(
                max(0, round((recompute_time or 0.0) * 1_000_000))
            )
        if tags:
            flags |= FLAG_TAGS
            extra += encode_tag_stamps(tags)
        return MAGIC + bytes((_VERSION_BITS | flags,)) + extra

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
        gets a new signature (and a new nonce) once its own verifies, anything else is returned as it is.
        Raises SignatureError or UndecodableValueError for a value a read would refuse."""
        if data[:2] == OLD_MAGIC:
            raise UndecodableValueError(_OLD_FORMAT)
        if data[:1] != MAGIC:
            return data
        parsed = self._parse(data)
        if not parsed.flags & FLAG_SIGNED:
            if self._sign or parsed.serializer_id == _PICKLE_ID:
                raise SignatureError("unsigned payload refused")  # as a read refuses it
            return data  # what a read makes of it does not depend on the key
        view = memoryview(data)
        if not self._verified(key, view, parsed):
            raise SignatureError("stored value's signature does not verify")
        return self._signer.seal(new_key, data[: parsed.head_end], view[parsed.payload_at : -MAC_SIZE])

    def _verified(self, key: bytes, view: memoryview, parsed: _Parsed) -> bool:
        return any(signer.verify(key, view, parsed.flags, parsed.head_end) for signer in self._signers)

    # -- decoding ---------------------------------------------------------------------------------------
    def decode(self, data: bytes, key: bytes) -> Any:
        """Return the value stored under `key`: ours decoded, a bare integer as int, anything else as the
        raw bytes."""
        return self.decode_stamped(data, key)[0]

    def decode_stamped(self, data: bytes, key: bytes) -> tuple[Any, TagStamps | None]:
        """The stored value and its tag stamps (None when it carries none)."""
        descriptor = data[:2]
        # Fast paths for the common shape (signed pickle, not compressed, no timing, no tags): verified and
        # loaded straight from the reply, without copying the payload. Anything else (another key, a
        # corrupt value, tags, timing) takes decode_envelope, which decides what it is.
        if descriptor == self._plain_blake and len(data) >= 2 + MAC_SIZE:
            # Small (under GMAC_MIN_SIZE): slicing copies cost less than making views. verify_blake and
            # _load, inlined: a get_many(100) of small values runs this a hundred times.
            mac = self._signer._blake.copy()
            mac.update(key)
            mac.update(data[:-MAC_SIZE])
            if hmac.compare_digest(mac.digest(), data[-MAC_SIZE:]):
                payload = data[2:-MAC_SIZE]
                if len(payload) <= self.max_decoded_size and self._takes_view:
                    try:
                        return self._loads(payload), None
                    except Exception as error:
                        raise UndecodableValueError(f"{type(error).__name__}: {error}") from error
                return self._load(payload), None
        elif descriptor == self._plain_gmac and len(data) >= 2 + NONCE_SIZE + MAC_SIZE:
            view = memoryview(data)
            if self._signer.verify_gmac(key, view):
                return self._load(view[2 + NONCE_SIZE : -MAC_SIZE]), None
        elif data[:1] != MAGIC and descriptor != OLD_MAGIC:
            return (int(data) if _BARE_INT.fullmatch(data) else data), None
        envelope = self.decode_envelope(data, key)
        if envelope.soft_expiry is not None and envelope.soft_expiry <= time.time():
            # Past its timeout, kept only for stale-while-revalidate readers (stampede.py): a miss here.
            return EXPIRED, None
        return envelope.value, envelope.tags or None

    def _load(self, payload: bytes | memoryview) -> Any:
        if len(payload) > self.max_decoded_size:
            raise DecodedTooLargeError(
                f"payload of {len(payload)} bytes, over the cap of {self.max_decoded_size}"
            )
        try:
            return self._loads(payload if self._takes_view else bytes(payload))  # type: ignore[arg-type]
        except Exception as error:
            raise UndecodableValueError(f"{type(error).__name__}: {error}") from error

    def decode_envelope(self, data: bytes, key: bytes) -> Envelope:
        if data[:2] == OLD_MAGIC:
            raise UndecodableValueError(_OLD_FORMAT)
        if data[:1] != MAGIC:
            return Envelope(int(data) if _BARE_INT.fullmatch(data) else data)
        parsed = self._parse(data)
        view = memoryview(data)
        if parsed.flags & FLAG_SIGNED:
            if not self._verified(key, view, parsed):
                raise SignatureError("stored value's signature does not verify")
            payload = view[parsed.payload_at : -MAC_SIZE]
        else:
            # A cache that signs what it writes accepts nothing unsigned: a planted value is a miss.
            if self._sign or parsed.serializer_id == _PICKLE_ID:
                raise SignatureError("unsigned payload refused")
            payload = view[parsed.payload_at :]
        serializer = self._serializer_for(parsed.serializer_id)
        # Only now, past the signature: what is decompressed (and how much) is ours, or the cache is
        # unsigned by choice; either way never more than the cap.
        try:
            decoded = self._decompress(parsed.compressor_id, payload)
            if not isinstance(serializer, PickleSerializer):
                decoded = bytes(decoded)
            value = serializer.loads(decoded)
        except UndecodableValueError:
            raise
        except Exception as error:
            raise UndecodableValueError(f"{type(error).__name__}: {error}") from error
        return Envelope(value, 0.0, parsed.soft_expiry, parsed.recompute_time, parsed.tags)

    def _parse(self, data: bytes) -> _Parsed:
        """The header of `data` (which starts with MAGIC); UndecodableValueError if it is not one."""
        if len(data) < 2:
            raise UndecodableValueError("truncated envelope")
        descriptor = data[1]
        if descriptor >> 5 != FORMAT_VERSION:
            raise UndecodableValueError(
                f"envelope format {descriptor >> 5}, this release reads format {FORMAT_VERSION} (written by "
                "another release of django-distcache)"
            )
        flags = descriptor & _FLAGS
        serializer_id, compressor_id = _PICKLE_ID, 0
        soft_expiry = recompute_time = None
        tags: TagStamps | None = None
        offset = 2
        try:
            if flags & FLAG_CODEC:
                serializer_id, compressor_id = data[offset], data[offset + 1]
                offset += 2
            if flags & FLAG_TIMING:
                expiry_ms, offset = _read_varint(data, offset)
                recompute_us, offset = _read_varint(data, offset)
                soft_expiry, recompute_time = expiry_ms / 1000, recompute_us / 1_000_000
            if flags & FLAG_TAGS:
                tags, offset = decode_tag_stamps(data, offset)
        except (struct.error, IndexError, UnicodeDecodeError) as error:
            raise UndecodableValueError(f"corrupt envelope header: {error}") from None
        head_end = offset
        payload_at = offset + (NONCE_SIZE if flags & FLAG_GMAC else 0)
        if len(data) < payload_at + (MAC_SIZE if flags & FLAG_SIGNED else 0):
            raise UndecodableValueError("truncated envelope")
        return _Parsed(
            flags, serializer_id, compressor_id, soft_expiry, recompute_time, tags, head_end, payload_at
        )

    def _decompress(self, compressor_id: int, payload: memoryview) -> Any:
        cap = self.max_decoded_size
        if not compressor_id:
            if len(payload) > cap:
                raise DecodedTooLargeError(f"payload of {len(payload)} bytes, over the cap of {cap}")
            return payload
        compressor = self._decompressor_for(compressor_id)
        if compressor is self.compressor and self._unbounded_plugin:
            output = compressor.decompress(bytes(payload))  # type: ignore[call-arg]
            if len(output) > cap:
                raise DecodedTooLargeError(
                    f"payload decompresses to {len(output)} bytes, over the cap of {cap}"
                )
            return output
        return compressor.decompress(bytes(payload), cap)

    def _serializer_for(self, serializer_id: int) -> Serializer:
        # Values written under another SERIALIZER setting stay readable after a switch.
        return _plugin_by_id(self._serializers, SERIALIZERS, serializer_id, "serializer")

    def _decompressor_for(self, compressor_id: int) -> Compressor:
        return _plugin_by_id(self._decompressors, COMPRESSORS, compressor_id, "compressor")


def raw_header(
    flags: int, serializer_id: int = _PICKLE_ID, compressor_id: int = 0, version: int = FORMAT_VERSION
) -> bytes:
    """The first bytes of an envelope with these fields and no timing or tags (for tests and tools that
    write envelopes by hand): MAGIC, the descriptor, and the codec bytes when they are not the defaults."""
    codec = b""
    if serializer_id != _PICKLE_ID or compressor_id:
        flags |= FLAG_CODEC
        codec = bytes((serializer_id, compressor_id))
    return MAGIC + bytes(((version << 5) | flags,)) + codec


_OLD_FORMAT = (
    "envelope of format 1 or 2, written by an earlier release of django-distcache: read as a miss "
    "(docs/serialization.md)"
)


@dataclass(slots=True)
class _Parsed:
    flags: int
    serializer_id: int
    compressor_id: int
    soft_expiry: float | None
    recompute_time: float | None
    tags: TagStamps | None
    head_end: int  # where the header ends (and the nonce, if any, starts)
    payload_at: int


class _Signer:
    """One signing key's two MACs, both bound to the KEY_PREFIX."""

    def __init__(self, signing_key: bytes, bound_prefix: bytes) -> None:
        self._blake = hashlib.blake2b(key=signing_key, digest_size=MAC_SIZE)
        self._blake.update(bound_prefix)
        # AES-GMAC subkeys: a BLAKE2b of the KEY_PREFIX and a salt under the signing key, personalised so
        # that a subkey equals no MAC.
        self._subkey_base = hashlib.blake2b(key=signing_key, digest_size=32, person=b"distcache-gmac")
        self._subkey_base.update(bound_prefix)
        self._subkeys: dict[bytes, AESGCM] = {}
        self._new_epoch()
        _signers.add(self)

    def _new_epoch(self) -> None:
        """A salt (so a subkey) of this writer's own, and a counter from zero."""
        salt = os.urandom(SALT_SIZE)
        self._salt, self._aes, self._counter = salt, self._subkey(salt), itertools.count()

    def _subkey(self, salt: bytes | memoryview) -> AESGCM:
        salt = bytes(salt)
        aes = self._subkeys.get(salt)
        if aes is None:
            derived = self._subkey_base.copy()
            derived.update(salt)
            aes = AESGCM(derived.digest())
            if len(self._subkeys) >= _SUBKEYS_KEPT:
                with contextlib.suppress(RuntimeError, StopIteration, KeyError):  # another thread's turn
                    self._subkeys.pop(next(iter(self._subkeys)))  # the oldest
            self._subkeys[salt] = aes
        return aes

    def seal(self, key: bytes, head: bytes, payload: bytes | memoryview) -> bytes:
        """`head | [nonce] | payload | MAC`, as the head's GMAC flag says."""
        if head[1] & FLAG_GMAC:
            salt, aes, counter = self._salt, self._aes, next(self._counter)
            signed = head + salt + counter.to_bytes(8, "big") + payload
            return signed + aes.encrypt(bytes(4) + counter.to_bytes(8, "big"), key, signed)[-MAC_SIZE:]
        mac = self._blake.copy()
        mac.update(key)
        mac.update(head)
        mac.update(payload)
        return head + payload + mac.digest()

    def verify(self, key: bytes, view: memoryview, flags: int, head_end: int) -> bool:
        if flags & FLAG_GMAC:
            return self.verify_gmac(key, view, head_end)
        return self.verify_blake(key, view)

    def verify_blake(self, key: bytes, data: bytes | memoryview) -> bool:
        """`data` is `head | payload | MAC`: the MAC covers the key and everything before it."""
        mac = self._blake.copy()
        mac.update(key)
        mac.update(data[:-MAC_SIZE])
        return hmac.compare_digest(mac.digest(), data[-MAC_SIZE:])

    def verify_gmac(self, key: bytes, view: memoryview, head_end: int = 2) -> bool:
        aes = self._subkey(view[head_end : head_end + SALT_SIZE])
        nonce = bytes(4) + bytes(view[head_end + SALT_SIZE : head_end + NONCE_SIZE])
        tag = aes.encrypt(nonce, key, view[:-MAC_SIZE])[-MAC_SIZE:]
        return hmac.compare_digest(tag, view[-MAC_SIZE:])


_signers: weakref.WeakSet[_Signer] = weakref.WeakSet()


def _new_epochs_after_fork() -> None:
    # A child must not go on counting with its parent's subkey: both would use the same nonces.
    for signer in list(_signers):
        signer._new_epoch()


os.register_at_fork(after_in_child=_new_epochs_after_fork)


def _varint(number: int) -> bytes:
    """LEB128: seven bits a byte, low bits first."""
    out = bytearray()
    while number > 0x7F:
        out.append((number & 0x7F) | 0x80)
        number >>= 7
    out.append(number)
    return bytes(out)


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    number = shift = 0
    while True:
        byte = data[offset]
        offset += 1
        number |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return number, offset
        shift += 7
        if shift > 63:
            raise IndexError("varint longer than 9 bytes")


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


# -- tag stamps ------------------------------------------------------------------------------------------
# A tagged entry carries the ids of its tags and ONE digest of their versions at write time (tags.py says
# why). A tag's id is a 32-bit BLAKE2b of its name; its tag key is named by the id, so the id alone tells a
# reader which key to read. Two tags whose ids collide share one key and one version: invalidating either
# invalidates both, which can make entries miss more, never serve stale.
TAG_ID_SIZE = 4
TAG_DIGEST_SIZE = 8
_TAG_ID_PERSON = b"distcache-tagid"
_TAG_DIGEST_PERSON = b"distcache-stamp"


@functools.lru_cache(maxsize=65536)
def tag_id(name: str) -> int:
    """The 32-bit id of a tag: it names the tag's key and stands for the tag in the entries carrying it."""
    return int.from_bytes(
        hashlib.blake2b(name.encode(), digest_size=TAG_ID_SIZE, person=_TAG_ID_PERSON).digest(), "big"
    )


def tag_digest(ids: Iterable[int], versions: Mapping[int, int | None]) -> bytes:
    """The digest of the versions of the tags `ids` (sorted, distinct). A version of None (two tags of one
    write with one id and different versions) gives a digest no set of current versions reproduces."""
    ids = tuple(ids)
    return _digest_of(_pack_ids(ids), [versions[tag] for tag in ids])


def _pack_ids(ids: tuple[int, ...]) -> bytes:
    return struct.pack(f">{len(ids)}I", *ids)


_DIGEST_BASE = hashlib.blake2b(digest_size=TAG_DIGEST_SIZE, person=_TAG_DIGEST_PERSON)


def _digest_of(packed_ids: bytes, versions: list[int | None]) -> bytes:
    digest = _DIGEST_BASE.copy()
    digest.update(packed_ids)
    # Versions as decimal text, so any integer a tag key may hold (even one written behind our back) is
    # read; "-" (None) is no integer's text.
    digest.update(b",".join(b"-" if version is None else b"%d" % version for version in versions))
    return digest.digest()


class TagStamps:
    """What a tagged entry says of its tags: their ids (sorted, distinct) and the digest of their versions
    when it was written. Iterating gives the ids, which TagVersions.current() reads."""

    __slots__ = ("digest", "ids", "_packed")

    def __init__(self, ids: tuple[int, ...], digest: bytes, packed: bytes | None = None) -> None:
        self.ids = ids
        self.digest = digest
        self._packed = _pack_ids(ids) if packed is None else packed  # the ids as stored

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TagStamps) and (self.ids, self.digest) == (other.ids, other.digest)

    def __hash__(self) -> int:
        return hash((self.ids, self.digest))

    def __repr__(self) -> str:
        return f"TagStamps(ids={self.ids!r}, digest={self.digest.hex()})"

    def matches(self, versions: Mapping[int, int | None]) -> bool:
        """True if `versions` (tag id -> current version, None for a missing tag key) are the versions the
        entry was stamped with; a missing tag key or any changed version is False (a miss)."""
        current = [versions.get(tag) for tag in self.ids]
        if None in current:
            return False
        return _digest_of(self._packed, current) == self.digest


def encode_tag_stamps(tags: Mapping[str, int]) -> bytes:
    """varint count, the ids (4 bytes each, sorted), then the 8-byte digest of the versions."""
    versions: dict[int, int | None] = {}
    for name, version in tags.items():
        tag = tag_id(name)
        if tag in versions and versions[tag] != version:
            # Two tags sharing a key came with two versions (read at two moments): the entry is born
            # stale rather than stamped with the later version, which may postdate its computation.
            versions[tag] = None
        else:
            versions.setdefault(tag, version)
    ids = tuple(sorted(versions))
    packed = _pack_ids(ids)
    return _varint(len(ids)) + packed + _digest_of(packed, [versions[tag] for tag in ids])


def decode_tag_stamps(data: bytes, offset: int) -> tuple[TagStamps, int]:
    count, offset = _read_varint(data, offset)
    end = offset + count * TAG_ID_SIZE
    if not count or end + TAG_DIGEST_SIZE > len(data):
        raise IndexError("tag section empty or cut short")
    packed = bytes(data[offset:end])
    stamps = TagStamps(struct.unpack(f">{count}I", packed), bytes(data[end : end + TAG_DIGEST_SIZE]), packed)
    return stamps, end + TAG_DIGEST_SIZE
