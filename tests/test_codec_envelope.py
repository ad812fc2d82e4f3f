"""The compact envelope (format 3): every combination of its sections round-trips, both signatures (BLAKE2b
for small payloads, AES-GMAC for large) refuse forged, truncated and copied values, fallback keys verify,
values of the earlier format are misses, and the namespace generation is short and well formed."""

from __future__ import annotations

import itertools
import os
import pickle
import struct
import time

import pytest

from django_distcache.codec import (
    FLAG_CODEC,
    FLAG_GMAC,
    FLAG_SIGNED,
    FLAG_TAGS,
    FLAG_TIMING,
    FORMAT_VERSION,
    GMAC_MIN_SIZE,
    MAC_SIZE,
    MAGIC,
    TAG_DIGEST_SIZE,
    TAG_ID_SIZE,
    Codec,
    JSONSerializer,
    NoCompressor,
    PickleSerializer,
    SignatureError,
    UndecodableValueError,
    ZlibCompressor,
    tag_id,
)
from django_distcache.keys import GENERATION, GENERATION_LENGTH, RETIRED_GENERATION
from django_distcache.versioning import new_generation

KEY, OLD_KEY = b"s" * 32, b"o" * 32
AT = b"1:entry"
SMALL = {"id": 7, "name": "item 7"}
LARGE = os.urandom(GMAC_MIN_SIZE * 10)  # incompressible: stays uncompressed


def codec(keys=(KEY,), compressor=None, key_prefix="app", **kwargs) -> Codec:
    return Codec(
        PickleSerializer(), compressor or NoCompressor(), list(keys), key_prefix=key_prefix, **kwargs
    )


SHAPES = list(
    itertools.product(
        [SMALL, LARGE, b"z" * 5000],  # small, large incompressible, large compressible
        [None, 60.0],  # timing: soft expiry this many seconds after the test starts
        [None, {"catalogue": 2**63 + 5, "shop:1": 1}],  # tags
        [NoCompressor(), ZlibCompressor()],
    )
)


@pytest.mark.parametrize(("value", "soft_expiry", "tags", "compressor"), SHAPES)
def test_every_combination_of_sections_round_trips(value, soft_expiry, tags, compressor):
    if soft_expiry is not None:
        soft_expiry += time.time()  # not at collection: a long suite would have passed it
    c = codec(compressor=compressor)
    data = c.encode(value, AT, soft_expiry=soft_expiry, recompute_time=0.25, tags=tags)
    assert data[:1] == MAGIC and data[1] >> 5 == FORMAT_VERSION
    flags = data[1] & 0x1F
    assert flags & FLAG_SIGNED
    assert bool(flags & FLAG_TIMING) == (soft_expiry is not None)
    assert bool(flags & FLAG_TAGS) == bool(tags)
    envelope = c.decode_envelope(data, AT)
    assert envelope.value == value
    if tags:
        assert set(envelope.tags) == {tag_id(tag) for tag in tags}
        assert envelope.tags.matches({tag_id(tag): version for tag, version in tags.items()})
    else:
        assert envelope.tags is None
    if soft_expiry is not None:
        assert envelope.soft_expiry == pytest.approx(soft_expiry, abs=0.001)
        assert envelope.recompute_time == pytest.approx(0.25)
    assert c.decode_stamped(data, AT) == (value, envelope.tags)
    # Every one refused under another key, truncated, or with any byte of its signature changed.
    with pytest.raises(SignatureError):
        c.decode(data, b"1:another")
    for cut in (1, MAC_SIZE, len(data) - 3):
        with pytest.raises((SignatureError, UndecodableValueError)):
            c.decode(data[:-cut], AT)
    for position in range(len(data) - MAC_SIZE, len(data)):
        forged = bytearray(data)
        forged[position] ^= 0x01
        with pytest.raises(SignatureError):
            c.decode(bytes(forged), AT)


def test_only_what_an_entry_uses_is_stored():
    c = codec()
    payload = pickle.dumps(SMALL, pickle.HIGHEST_PROTOCOL)
    assert len(c.encode(SMALL, AT)) == len(payload) + 2 + MAC_SIZE  # magic, descriptor, MAC
    big = c.encode(LARGE, AT)
    assert big[1] & FLAG_GMAC
    assert (
        len(big) == len(pickle.dumps(LARGE, pickle.HIGHEST_PROTOCOL)) + 2 + 24 + MAC_SIZE
    )  # + salt, counter
    assert not c.encode(SMALL, AT)[1] & (FLAG_GMAC | FLAG_CODEC | FLAG_TIMING | FLAG_TAGS)


def test_large_values_get_a_fresh_nonce_every_time():
    c = codec()
    first, second = c.encode(LARGE, AT), c.encode(LARGE, AT)
    assert first[2:26] != second[2:26]  # the same salt, the next counter
    assert c.decode(first, AT) == c.decode(second, AT) == LARGE


@pytest.mark.parametrize("value", [SMALL, LARGE])
def test_a_value_signed_with_a_fallback_key_verifies_and_is_re_signed_on_rebind(value):
    old = codec(keys=(OLD_KEY,)).encode(value, AT, tags={"t": 1})
    rotated = codec(keys=(KEY, OLD_KEY))
    assert rotated.decode(old, AT) == value
    moved = rotated.rebind(old, AT, b"2:entry")
    assert codec().decode(moved, b"2:entry") == value  # signed with the current key now
    with pytest.raises(SignatureError):
        codec().decode(old, AT)  # the fallback gone: refused


@pytest.mark.parametrize("value", [SMALL, LARGE])
def test_the_signature_binds_the_key_prefix_and_the_signing_key(value):
    data = codec().encode(value, AT)
    for other in (codec(key_prefix="other"), codec(keys=(OLD_KEY,))):
        with pytest.raises(SignatureError):
            other.decode(data, AT)


def test_a_gmac_flag_set_on_a_blake2b_value_or_cleared_on_a_gmac_value_is_refused():
    c = codec()
    for value in (SMALL, LARGE):
        data = bytearray(c.encode(value, AT))
        data[1] ^= FLAG_GMAC
        with pytest.raises((SignatureError, UndecodableValueError)):
            c.decode(bytes(data), AT)


def test_values_of_the_earlier_format_are_misses_never_bytes():
    # What releases with format 2 wrote: magic 0xDC5E, version, flags, ids, created-at, MAC, payload.
    old = b"\xdc\x5e" + bytes((2, FLAG_SIGNED, 1, 0)) + struct.pack(">d", 0.0) + b"\0" * MAC_SIZE
    old += pickle.dumps("old", pickle.HIGHEST_PROTOCOL)
    with pytest.raises(UndecodableValueError, match="earlier release"):
        codec().decode(old, AT)
    with pytest.raises(UndecodableValueError):
        codec().rebind(old, AT, b"2:entry")


def test_bare_integers_stay_bare_and_unsigned_json_stays_readable():
    assert codec().encode(12, AT) == b"12"
    assert codec().decode(b"12", AT) == 12
    json = Codec(JSONSerializer(), NoCompressor(), [KEY])
    data = json.encode({"a": [1, 2]}, AT)
    assert data[1] & FLAG_CODEC and not data[1] & FLAG_SIGNED
    assert json.decode(data, AT) == {"a": [1, 2]}
    with pytest.raises(SignatureError):
        codec().decode(data, AT)  # a pickle cache accepts nothing unsigned


def test_large_values_decode_from_a_view_of_the_reply_within_the_size_cap():
    c = codec(max_value_size=GMAC_MIN_SIZE * 20)
    assert c.decode(c.encode(LARGE, AT), AT) == LARGE
    small_cap = codec(max_value_size=GMAC_MIN_SIZE * 5)
    with pytest.raises(UndecodableValueError):
        small_cap.decode(c.encode(LARGE, AT), AT)


def test_generations_are_short_well_formed_and_do_not_repeat():
    drawn = {new_generation() for _ in range(20_000)}
    assert len(drawn) == 20_000
    for generation in list(drawn)[:500]:
        assert len(generation) == GENERATION_LENGTH == 8
        assert GENERATION.fullmatch(generation.encode())
        assert not generation.startswith("~")
    assert RETIRED_GENERATION.fullmatch(b"AAAAAAAAAAA")  # the earlier 11-character form is still purged
    assert not GENERATION.fullmatch(b"AAAAAAAAAAA")


def test_large_values_never_share_an_aes_nonce_under_one_key_not_even_across_a_fork():
    """AES-GMAC breaks if a nonce is used twice under one key: each writer signs under a subkey of its
    own salt and counts, and a forked child draws a salt of its own before it writes."""
    import multiprocessing

    writer_codec = codec()
    sealed = [writer_codec.encode(LARGE, b"k") for _ in range(3)]
    salts = {value[2:18] for value in sealed}
    counters = [int.from_bytes(value[18:26], "big") for value in sealed]
    assert len(salts) == 1 and counters == sorted(set(counters))  # one salt, a new number every time
    reader, writer = multiprocessing.Pipe(duplex=False)
    child = multiprocessing.get_context("fork").Process(
        target=lambda: writer.send(writer_codec.encode(LARGE, b"k"))
    )
    child.start()
    from_child = reader.recv()
    child.join()
    assert from_child[2:18] not in salts
    assert all(codec().decode(value, b"k") == LARGE for value in [*sealed, from_child])


# -- tag stamps: ids and one digest ---------------------------------------------------------------------------
THREE = {"catalogue": 2**64 - 1, "shop:12": 0, "a-much-longer-tag-name:" + "x" * 150: 12345}


def test_tags_cost_four_bytes_each_and_eight_for_the_digest_whatever_their_names():
    c = codec()
    untagged = len(c.encode(SMALL, AT))
    assert len(c.encode(SMALL, AT, tags=THREE)) == untagged + 1 + 3 * TAG_ID_SIZE + TAG_DIGEST_SIZE
    assert len(c.encode(SMALL, AT, tags={"t": 1})) == untagged + 1 + TAG_ID_SIZE + TAG_DIGEST_SIZE


def test_the_stamp_matches_only_the_versions_it_was_written_with():
    c = codec()
    stamps = c.decode_envelope(c.encode(SMALL, AT, tags=THREE), AT).tags
    versions = {tag_id(tag): version for tag, version in THREE.items()}
    assert stamps.matches(versions)
    for tag in THREE:
        changed = dict(versions)
        changed[tag_id(tag)] = (versions[tag_id(tag)] + 1) % 2**64  # one invalidation, any one tag
        assert not stamps.matches(changed)
        missing = dict(versions)
        missing[tag_id(tag)] = None  # a vanished tag key
        assert not stamps.matches(missing)
        del missing[tag_id(tag)]
        assert not stamps.matches(missing)


def test_two_names_of_one_key_with_two_versions_make_an_entry_born_stale():
    c = codec()
    twin, other_twin = "twin:25487", "twin:53815"  # one 32-bit id
    assert tag_id(twin) == tag_id(other_twin)
    same = c.decode_envelope(c.encode(SMALL, AT, tags={twin: 5, other_twin: 5}), AT).tags
    assert same.ids == (tag_id(twin),) and same.matches({tag_id(twin): 5})
    split = c.decode_envelope(c.encode(SMALL, AT, tags={twin: 5, other_twin: 6}), AT).tags
    assert not split.matches({tag_id(twin): 5}) and not split.matches({tag_id(twin): 6})


def test_any_change_to_the_tag_section_is_refused():
    c = codec()
    data = c.encode(SMALL, AT, tags=THREE)
    section_end = 2 + 1 + 3 * TAG_ID_SIZE + TAG_DIGEST_SIZE
    for position in range(2, section_end):
        forged = bytearray(data)
        forged[position] ^= 0x01
        with pytest.raises((SignatureError, UndecodableValueError)):
            c.decode(bytes(forged), AT)


@pytest.mark.parametrize("section", [b"\x00", b"\x05" + b"\x01" * 10, b"\xff\xff\xff\xff\x0f", b"\x80"])
def test_a_corrupt_tag_section_is_undecodable_signed_or_not(section):
    signed = MAGIC + bytes(((FORMAT_VERSION << 5) | FLAG_SIGNED | FLAG_TAGS,)) + section
    with pytest.raises(UndecodableValueError):
        codec().decode_envelope(signed, AT)
    unsigned = Codec(JSONSerializer(), NoCompressor(), [KEY])
    header = MAGIC + bytes(((FORMAT_VERSION << 5) | FLAG_TAGS | FLAG_CODEC,)) + bytes((2, 0))
    with pytest.raises(UndecodableValueError):
        unsigned.decode_envelope(header + section, AT)
