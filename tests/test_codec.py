"""The envelope round-trips any value, refuses what it did not sign, and reads foreign bytes as bytes."""

from __future__ import annotations

import pickle
import tracemalloc
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from django_distcache.codec import (
    DECODED_SIZE_LIMIT,
    MAGIC,
    OLD_MAGIC,
    Codec,
    DecodedTooLargeError,
    JSONSerializer,
    MsgpackSerializer,
    NoCompressor,
    PickleSerializer,
    SignatureError,
    UndecodableValueError,
    ValueTooLargeError,
    ZlibCompressor,
    ZstdCompressor,
    raw_header,
    tag_id,
)

KEY = b"k" * 32  # the signing key
AT = b"1:the-key"  # what a value is stored under (its key without the namespace generation)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text() | st.floats(allow_nan=False),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
pickle_values = st.recursive(
    json_values
    | st.integers()
    | st.binary()
    | st.tuples(st.integers(), st.text())
    | st.frozensets(st.integers()),
    lambda children: st.lists(children, max_size=5),
    max_leaves=20,
)


def codec(serializer=None, compressor=None, **kwargs) -> Codec:
    return Codec(serializer or PickleSerializer(), compressor or NoCompressor(), [KEY], **kwargs)


@given(pickle_values, st.sampled_from([NoCompressor(), ZlibCompressor(), ZstdCompressor()]))
def test_pickle_round_trip(value, compressor):
    c = codec(compressor=compressor, compress_min_size=0)
    assert c.decode(c.encode(value, AT), AT) == value


@given(json_values, st.sampled_from([JSONSerializer(), MsgpackSerializer()]))
def test_json_and_msgpack_round_trip(value, serializer):
    c = codec(serializer)
    assert c.decode(c.encode(value, AT), AT) == value


@given(st.integers(-(2**63), 2**63 - 1))
def test_int64_is_stored_bare_so_incrby_works(number):
    data = codec().encode(number, AT)
    assert data == str(number).encode()
    assert codec().decode(data, AT) == number


@pytest.mark.parametrize("data", [b"-0", b"007", b"+1", b"1 ", b"99999999999999999999"])
def test_bytes_redis_would_not_count_as_an_integer_stay_bytes(data):
    assert codec().decode(data, AT) == data


@given(st.binary())
def test_foreign_bytes_come_back_as_bytes_or_int(data):
    decoded = codec().decode(data, AT) if not data.startswith((MAGIC, OLD_MAGIC)) else None
    if decoded is not None:
        assert decoded == data or (isinstance(decoded, int) and str(decoded).encode() == data)


@given(pickle_values, st.integers(min_value=0), st.binary(min_size=1, max_size=1))
def test_any_tampering_with_a_signed_envelope_is_refused(value, position, replacement):
    data = bytearray(
        codec().encode(value if not isinstance(value, int) or isinstance(value, bool) else [value], AT)
    )
    position %= len(data)
    if position < 1 or data[position : position + 1] == replacement:
        return  # changing the magic makes it foreign bytes, returned as they are
    data[position : position + 1] = replacement
    with pytest.raises((SignatureError, UndecodableValueError)):  # refused: the cache treats it as a miss
        codec().decode(bytes(data), AT)


def test_unsigned_pickle_is_refused():
    signed = codec().encode({"a": 1}, AT)
    unsigned = Codec(PickleSerializer(), NoCompressor(), [KEY])
    unsigned._sign = False
    forged = unsigned.encode({"a": 1}, AT)
    assert forged != signed
    with pytest.raises(SignatureError):
        codec().decode(forged, AT)


def test_key_rotation_reads_values_signed_with_a_fallback_key():
    old = Codec(PickleSerializer(), NoCompressor(), [b"old" * 11])
    new = Codec(PickleSerializer(), NoCompressor(), [b"new" * 11, b"old" * 11])
    assert new.decode(old.encode("v", AT), AT) == "v"
    with pytest.raises(SignatureError):
        old.decode(new.encode("v", AT), AT)


def test_compression_only_above_threshold_and_only_when_smaller():
    c = codec(compressor=ZlibCompressor(), compress_min_size=100)
    assert b"a" * 50 in c.encode("a" * 50, AT)
    big = c.encode("a" * 5000, AT)
    assert len(big) < 200
    assert c.decode(big, AT) == "a" * 5000


def test_envelope_carries_timing_and_tags():
    c = codec()
    data = c.encode(
        "v", AT, soft_expiry=1000.5, recompute_time=0.25, tags={"product:1": 7, "catalog": 2**64 - 1}
    )
    envelope = c.decode_envelope(data, AT)
    assert envelope.value == "v"
    assert envelope.soft_expiry == 1000.5 and envelope.recompute_time == 0.25
    assert set(envelope.tags) == {tag_id("product:1"), tag_id("catalog")}
    assert envelope.tags.matches({tag_id("product:1"): 7, tag_id("catalog"): 2**64 - 1})
    assert not envelope.tags.matches({tag_id("product:1"): 8, tag_id("catalog"): 2**64 - 1})


def test_max_value_size():
    with pytest.raises(ValueTooLargeError):
        codec(max_value_size=100).encode("x" * 200, AT)


def test_pickle_errors_propagate_unchanged():
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        codec().encode(lambda: None, AT)


keys = st.text(min_size=1, max_size=30).map(str.encode)


@given(pickle_values, keys, keys)
def test_a_signed_value_is_refused_under_any_other_key(value, key, other):
    data = codec().encode([value], key)
    assert codec().decode(data, key) == [value]
    if other != key:
        with pytest.raises(SignatureError):
            codec().decode(data, other)


def test_a_value_signed_for_one_user_does_not_pass_for_another():
    data = codec().encode(False, b"1:user:1:is_staff", tags={"user:1": 7})  # tags: an envelope, not bare
    with pytest.raises(SignatureError):
        codec().decode(data, b"1:user:2:is_staff")
    # Nor does a suffix of the key moved into the payload (pickle ignores bytes after its STOP opcode).
    with pytest.raises(SignatureError):
        codec().decode(data + b"is_staff", b"1:user:1:")


def test_a_signed_value_is_refused_under_another_key_prefix():
    data = codec(key_prefix="shop").encode(["v"], AT)
    assert codec(key_prefix="shop").decode(data, AT) == ["v"]
    with pytest.raises(SignatureError):
        codec(key_prefix="blog").decode(data, AT)
    with pytest.raises(SignatureError):
        codec(key_prefix="sho").decode(data, b"p" + AT)  # the prefix is framed, not just concatenated


def test_rebind_signs_a_value_for_its_new_key_once_its_own_signature_verifies():
    c = codec()
    data = c.encode({"v": 1}, b"1:k", soft_expiry=2e9, tags={"t": 3})
    moved = c.rebind(data, b"1:k", b"2:k")
    envelope = c.decode_envelope(moved, b"2:k")
    assert (envelope.value, envelope.soft_expiry) == ({"v": 1}, 2e9)
    assert envelope.tags is not None and envelope.tags.matches({tag_id("t"): 3})
    with pytest.raises(SignatureError):
        c.decode(moved, b"1:k")
    with pytest.raises(SignatureError):
        c.rebind(data, b"1:other", b"2:k")
    assert c.rebind(b"41", b"1:k", b"2:k") == b"41"  # bare integers and foreign bytes move as they are


def test_bare_integers_are_not_signed_so_they_can_be_copied_between_keys():
    assert codec().decode(codec().encode(1, b"1:user:1:is_staff"), b"1:user:2:is_staff") == 1


def test_a_value_of_another_format_version_is_undecodable_not_bytes():
    data = bytearray(codec().encode("v", AT))
    data[1] = (data[1] & 0x1F) | (5 << 5)  # a format this release does not know
    with pytest.raises(UndecodableValueError, match="format 5"):
        codec().decode(bytes(data), AT)


def _unsigned_envelope(compressor_id: int, payload: bytes, serializer_id: int = JSONSerializer.id) -> bytes:
    return raw_header(0, serializer_id, compressor_id) + payload


def _zlib_bomb(size: int) -> bytes:
    stream, block = zlib.compressobj(9), b" " * (1 << 20)
    return b"".join(stream.compress(block) for _ in range(size >> 20)) + stream.flush()


def _zstd_bomb(size: int, declared: bool) -> bytes:
    import zstandard

    writer = zstandard.ZstdCompressor(write_content_size=declared).compressobj(size=size if declared else -1)
    block = b" " * (1 << 20)
    return b"".join(writer.compress(block) for _ in range(size >> 20)) + writer.flush()


@pytest.mark.parametrize(
    "compressor_id, bomb",
    [
        (1, lambda: _zlib_bomb(256 << 20)),
        (2, lambda: _zstd_bomb(256 << 20, True)),
        (2, lambda: _zstd_bomb(256 << 20, False)),
    ],
    ids=["zlib", "zstd-declared", "zstd-undeclared"],
)
def test_a_planted_decompression_bomb_never_decodes_past_the_cap(compressor_id, bomb):
    """A 256 MiB payload squeezed into a few hundred KB, in an unsigned JSON cache that compresses nothing:
    refused once the cap (here 1 MiB) is reached, having allocated about that much."""
    data = _unsigned_envelope(compressor_id, bomb())
    json_codec = codec(JSONSerializer(), max_value_size=1 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(DecodedTooLargeError):
            json_codec.decode(data, AT)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"decoding the bomb allocated {peak >> 20} MiB"


def test_without_max_value_size_decoding_stops_at_the_documented_limit():
    assert codec(JSONSerializer()).max_decoded_size == DECODED_SIZE_LIMIT == 512 << 20


def test_a_value_that_would_decode_past_the_cap_is_refused_at_write_even_compressed():
    small_when_compressed = "x" * 5000
    with pytest.raises(ValueTooLargeError, match="serialized"):
        codec(compressor=ZlibCompressor(), compress_min_size=0, max_value_size=1000).encode(
            small_when_compressed, AT
        )


def test_a_compressor_class_without_max_size_still_has_its_output_capped():
    class OldStyle:
        id, name = 200, "old-style"

        def compress(self, data):
            return zlib.compress(data)

        def decompress(self, data):
            return zlib.decompress(data)

    old_style = codec(JSONSerializer(), OldStyle(), compress_min_size=0, max_value_size=10_000)
    assert old_style.decode(old_style.encode("x" * 5000, AT), AT) == "x" * 5000
    with pytest.raises(DecodedTooLargeError):
        old_style.decode(_unsigned_envelope(200, zlib.compress(b'"' + b"x" * 20_000 + b'"')), AT)
