"""Real-time packets: what one imfc call puts in each datagram. See docs/streaming.md.

    packet   = version:4 type:4 seq:u16 frame:u16 fields[3] payload check:u16
    KEYFRAME   fields = ref:u8 index:u8 count:u8      payload = fragment of a KeyframePayload
    TOKEN      fields = base:u8 ref:u8 ref_mask:u8    payload = rANS bytes of the token
    FEEDBACK   fields = ref:u8 ref_mask:u8 flags:u8   payload = empty   (receiver -> sender)
    AV1_REFERENCE fields = ref:u8 index:u8 count:u8   payload = fragment of an Av1ReferenceUnit

Every packet stands on its own: a datagram can be lost, duplicated or reordered without making
any other one unreadable. Counters on the wire are 8 or 16 bits and wrap; ``unwrap`` turns them
back into unbounded integers next to the newest value a side has seen (RFC 1982 style).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum

from entropy.bitstream import BitstreamError

PACKET_VERSION = 2  # 2: keyframe payloads carry their quantization step (bitstream format 4's form)
MAX_PACKET = 1200  # bytes: fits a 1280-byte IPv6 MTU with room for SCTP/DTLS/UDP framing
_HEAD = struct.Struct("<BHHBBB")  # version|type, seq, frame, three type-specific bytes
OVERHEAD = _HEAD.size + 2  # header and check: every packet's bytes beyond its payload
MAX_FRAGMENTS = 255
REF_WINDOW = 8  # references a packet can name: the newest one and the 7 ids before it
PENDING = 0x80  # TOKEN ref_mask bit: a newer keyframe is on its way


class PacketError(BitstreamError):
    pass


class PacketType(IntEnum):
    KEYFRAME = 1  # one fragment of a keyframe (new reference)
    TOKEN = 2  # one frame's token
    FEEDBACK = 3  # receiver state: newest decoded frame, references held, keyframe request
    AV1_REFERENCE = 4  # one fragment of an AV1-coded reference (new reference)


class Flags(IntEnum):
    KEYFRAME_REQUEST = 1  # like RTCP PLI: the receiver lost a keyframe (or an AV1 reference) and asks for a
    # fresh one (an AV1 intra frame)
    HAS_ACK = 2  # ``frame`` names a frame whose token the receiver decoded exactly
    HAS_REFS = 4  # ``ref``/``ref_mask`` name the references the receiver holds


@dataclass(frozen=True)
class KeyframeFragment:
    seq: int
    frame: int
    ref: int  # reference id (8 bits, wraps), one per keyframe
    index: int
    count: int
    data: bytes
    type = PacketType.KEYFRAME


@dataclass(frozen=True)
class Av1ReferenceFragment(KeyframeFragment):
    """A fragment of an AV1 reference: the fields of a keyframe fragment, another payload."""

    type = PacketType.AV1_REFERENCE


@dataclass(frozen=True)
class TokenPacket:
    seq: int
    frame: int
    base: int  # frames back to the token this one is a delta from; 0: coded on its own
    ref: int  # newest reference of the bank the frame was coded with
    ref_mask: int  # bit k < 7: reference ref-1-k is in the bank too; bit 7 (PENDING): the sender has
    # sent a newer keyframe it has no acknowledgement for (so a receiver without any trace of it asks again)
    data: bytes
    type = PacketType.TOKEN


@dataclass(frozen=True)
class Feedback:
    seq: int
    frame: int  # newest frame whose token the receiver decoded exactly (if HAS_ACK)
    ref: int  # newest reference the receiver holds (if HAS_REFS)
    ref_mask: int  # bit k: it holds reference ref-1-k too
    flags: int
    type = PacketType.FEEDBACK

    @property
    def data(self) -> bytes:
        return b""


Packet = KeyframeFragment | Av1ReferenceFragment | TokenPacket | Feedback


def _fields(p: Packet) -> tuple[int, int, int]:
    if isinstance(p, KeyframeFragment):
        return p.ref, p.index, p.count
    if isinstance(p, TokenPacket):
        return p.base, p.ref, p.ref_mask
    return p.ref, p.ref_mask, p.flags


def _check(data: bytes) -> bytes:
    # 16 bits of CRC-32: the transport already checksums (SCTP CRC32c) and authenticates (DTLS);
    # this guards against foreign or damaged datagrams for 2 bytes instead of 4 on every packet
    return struct.pack("<H", zlib.crc32(data) & 0xFFFF)


def to_bytes(p: Packet) -> bytes:
    head = _HEAD.pack(PACKET_VERSION << 4 | p.type, p.seq & 0xFFFF, p.frame & 0xFFFF, *_fields(p))
    out = head + p.data
    if len(out) + 2 > MAX_PACKET:
        raise ValueError(f"packet of {len(out) + 2} bytes exceeds {MAX_PACKET}")
    return out + _check(out)


def from_bytes(data: bytes) -> Packet:
    """Parse one datagram. Raises PacketError on anything that is not a valid imfc packet."""
    if len(data) < OVERHEAD or len(data) > MAX_PACKET:
        raise PacketError(f"packet of {len(data)} bytes")
    if _check(data[:-2]) != data[-2:]:
        raise PacketError("damaged packet (check mismatch)")
    vt, seq, frame, a, b, c = _HEAD.unpack_from(data)
    version, kind = vt >> 4, vt & 0xF
    if version != PACKET_VERSION:
        raise PacketError(f"packet format version {version}, this imfc speaks {PACKET_VERSION}")
    payload = bytes(data[_HEAD.size:-2])
    if kind in (PacketType.KEYFRAME, PacketType.AV1_REFERENCE):
        if c == 0 or b >= c:
            raise PacketError(f"fragment {b} of {c}")
        cls = KeyframeFragment if kind == PacketType.KEYFRAME else Av1ReferenceFragment
        return cls(seq, frame, a, b, c, payload)
    if kind == PacketType.TOKEN:
        return TokenPacket(seq, frame, a, b, c, payload)
    if kind == PacketType.FEEDBACK:
        if payload:
            raise PacketError("feedback with a payload")
        return Feedback(seq, frame, a, b, c)
    raise PacketError(f"unknown packet type {kind}")


def fragment(payload: bytes, max_packet: int = MAX_PACKET) -> list[bytes]:
    """Split a keyframe payload (or AV1 reference unit) into pieces that fit packets of ``max_packet`` bytes."""
    room = max_packet - OVERHEAD
    pieces = [payload[i:i + room] for i in range(0, len(payload), room)] or [b""]
    if len(pieces) > MAX_FRAGMENTS:
        raise ValueError(f"keyframe of {len(payload)} bytes needs more than {MAX_FRAGMENTS} packets")
    return pieces


def unwrap(value: int, bits: int, newest: int) -> int:
    """The unbounded integer whose low ``bits`` are ``value`` and that lies closest to ``newest``."""
    span = 1 << bits
    delta = (value - newest) % span
    if delta >= span // 2:
        delta -= span
    return newest + delta


def ref_set(refs: list[int]) -> tuple[int, int]:
    """Reference ids (unbounded, within REF_WINDOW of the newest) -> (newest & 0xFF, mask)."""
    newest = max(refs)
    mask = 0
    for r in refs:
        if r != newest:
            k = newest - 1 - r
            if not 0 <= k < REF_WINDOW - 1:
                raise ValueError(f"reference {r} is not within {REF_WINDOW} of {newest}")
            mask |= 1 << k
    return newest & 0xFF, mask


def read_ref_set(ref: int, mask: int, newest_known: int) -> list[int]:
    """Inverse of ref_set, unwrapped next to ``newest_known`` -> ids in ascending order."""
    newest = unwrap(ref, 8, newest_known)
    return sorted([newest] + [newest - 1 - k for k in range(REF_WINDOW - 1) if mask >> k & 1])
