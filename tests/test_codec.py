"""The envelope round-trips any value, refuses what it did not sign, and reads foreign bytes as bytes."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from django_distcache.codec import (
    MAGIC,
    Codec,
    JSONSerializer,
    MsgpackSerializer,
    NoCompressor,
    PickleSerializer,
    SignatureError,
    UndecodableValueError,
    ValueTooLargeError,
    ZlibCompressor,
    ZstdCompressor,
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
    decoded = codec().decode(data, AT) if not data.startswith(MAGIC) else None
    if decoded is not None:
        assert decoded == data or (isinstance(decoded, int) and str(decoded).encode() == data)


@given(pickle_values, st.integers(min_value=0), st.binary(min_size=1, max_size=1))
def test_any_tampering_with_a_signed_envelope_is_refused(value, position, replacement):
    data = bytearray(
        codec().encode(value if not isinstance(value, int) or isinstance(value, bool) else [value], AT)
    )
    position %= len(data)
    if position < 2 or data[position : position + 1] == replacement:
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
    assert envelope.tags == {"product:1": 7, "catalog": 2**64 - 1}


def test_max_value_size():
    with pytest.raises(ValueTooLargeError):
        codec(max_value_size=100).encode("x" * 200, AT)


def test_pickle_errors_propagate_unchanged():
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        codec().encode(lambda: None, AT)
