import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from entropy import packet as pk

u8, u16 = st.integers(0, 255), st.integers(0, 65535)
fragments = st.tuples(st.integers(1, 255), st.sampled_from([pk.KeyframeFragment, pk.Av1ReferenceFragment])).flatmap(
    lambda nc: st.builds(nc[1], seq=u16, frame=u16, ref=u8, index=st.integers(0, nc[0] - 1), count=st.just(nc[0]),
    data=st.binary(max_size=pk.MAX_PACKET - pk.OVERHEAD)))
tokens = st.builds(pk.TokenPacket, seq=u16, frame=u16, base=u8, ref=u8, ref_mask=u8,
                   data=st.binary(max_size=100))
feedback = st.builds(pk.Feedback, seq=u16, frame=u16, ref=u8, ref_mask=st.integers(0, 127), flags=st.integers(0, 7))
packets = st.one_of(fragments, tokens, feedback)


@given(packets)
def test_packet_round_trip(p):
    data = pk.to_bytes(p)
    assert len(data) <= pk.MAX_PACKET
    assert pk.from_bytes(data) == p


@given(packets, st.data())
def test_damage_is_detected(p, data):
    raw = bytearray(pk.to_bytes(p))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(pk.PacketError):
        pk.from_bytes(bytes(raw))


def test_rejects_truncated_oversized_and_foreign():
    good = pk.to_bytes(pk.TokenPacket(1, 2, 1, 0, 0, b"abc"))
    for bad in (b"", good[:5], good[:-1], bytes(pk.MAX_PACKET + 1), b"\x00" * 10):
        with pytest.raises(pk.PacketError):
            pk.from_bytes(bad)
    newer = bytearray(good)
    newer[0] = (pk.PACKET_VERSION + 1) << 4 | pk.PacketType.TOKEN
    with pytest.raises(pk.PacketError, match=f"version {pk.PACKET_VERSION + 1}"):
        pk.from_bytes(bytes(newer[:-2]) + pk._check(bytes(newer[:-2])))


@given(st.binary(max_size=80_000), st.integers(64, pk.MAX_PACKET))
def test_fragments_fit_and_reassemble(payload, size):
    pieces = pk.fragment(payload, size) if len(payload) <= 255 * (size - pk.OVERHEAD) else None
    if pieces is None:
        with pytest.raises(ValueError):
            pk.fragment(payload, size)
        return
    assert b"".join(pieces) == payload
    assert all(len(pk.to_bytes(pk.KeyframeFragment(0, 0, 0, i, len(pieces), piece))) <= size
               for i, piece in enumerate(pieces))


@given(st.integers(-10**6, 10**6), st.integers(-32767, 32767))
def test_unwrap_recovers_nearby_values(newest, offset):
    value = newest + offset
    assert pk.unwrap(value & 0xFFFF, 16, newest) == value


@given(st.integers(0, 10**6), st.sets(st.integers(0, 7), min_size=1))
def test_ref_set_round_trip(newest, back):
    refs = sorted({newest - b for b in back if newest - b >= 0} | {newest})
    ref, mask = pk.ref_set(refs)
    assert pk.read_ref_set(ref, mask, newest + random.Random(newest).randint(-100, 100)) == refs
