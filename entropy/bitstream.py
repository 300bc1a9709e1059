"""The .imfc container: a header, then self-delimiting chunks (a keyframe, a run of token frames,
a run of repeats of the newest keyframe's picture, or a run of frames whose references are
AV1-coded pictures). See docs/bitstream.md.

    file   = header chunk*
    header = "IMFC" version:u8 length:u16 fields[length] crc32:u32
    chunk  = type:u8 length:varint payload[length] crc32:u32     (crc over type, length, payload)

Every chunk can be parsed, checked and skipped on its own, so a damaged stream is detected at the
exact chunk and a reader can resynchronize on the next chunk whose CRC holds.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from enum import IntEnum
from fractions import Fraction
from pathlib import Path
from typing import Iterator

MAGIC = b"IMFC"
VERSION = 8  # 2 added token runs, 3 repeats, 4 keyframe quantization steps, 5 AV1 references, 6 their tokens
# sent only where used, 7 AV1 packets without their lengths and no mode bits without token frames;
# older streams still read
KEYFRAME_STEP_SINCE = 4
AV1_REFERENCES_SINCE = 5
LAZY_REFERENCE_TOKENS_SINCE = 6
SELF_DELIMITING_SINCE = 7
RESTORATION_SINCE = 8  # AV1 references are shown restored by the model's restoration, where it has one
OBU_SEQUENCE_HEADER = 1  # AV1 OBU types: a sequence header (an intra reference's first OBU), and
OBU_FRAME = 6  # a frame OBU (a frame header and its tile group), the last OBU of an imfc reference packet
MAX_PAYLOAD = 1 << 24  # 16 MiB: far above any real chunk, low enough to reject garbage lengths
MAX_PRESET_NAME = 32

# Limits on what a stream may claim, checked before anything is allocated for it (docs/bitstream.md).
# Each is far above what imfc writes and low enough that obeying the claim costs bounded memory.
MAX_FRAMES = 1 << 24  # header frame count: 7.8 days at 25 fps
DEFAULT_MAX_FRAMES = 30_000  # what `imfc decode` accepts unless told more (--max-frames): 20 min at 25 fps
MAX_RUN_FRAMES = 4096  # frames in one token run or repeat chunk (the encoder splits longer runs): a
# run is entropy-decoded at once, 4096 x 32 token symbols, about 2 MB with the rANS guard padding
MAX_SIDE = 4096  # coded frame size, and the source crop that `decode --upscale` restores
MAX_BANK = 8  # references a decoder keeps (a call names at most REF_WINDOW = 8)
MIN_FPS, MAX_FPS = Fraction(1, 100), Fraction(1000)
MAX_RATIONAL = 2**31 - 1
MAX_STREAM_BYTES = 1 << 30  # a whole .imfc file is read into memory: 1 GiB is 9 days at 10 kbps


class BitstreamError(Exception):
    pass


class ChunkType(IntEnum):
    KEYFRAME = 1  # a new reference: its token and its image, coded on their own
    FRAME = 2  # a token, coded as a delta from the previous frame's token
    TOKEN_RUN = 3  # the tokens of consecutive frames, each a delta from the one before, in one rANS stream
    REPEAT = 4  # consecutive frames that show the newest keyframe's picture again (no token)
    AV1_REFERENCES = 5  # frames whose references are AV1 packets: the packets, the tokens, the repeats


SINCE_VERSION = {ChunkType.TOKEN_RUN: 2, ChunkType.REPEAT: 3, ChunkType.AV1_REFERENCES: AV1_REFERENCES_SINCE}  # newer than version 1
REFERENCE_CHUNKS = (ChunkType.KEYFRAME, ChunkType.AV1_REFERENCES)  # the chunks that start a stream


_HEADER_FIELDS = struct.Struct("<8sHHIIIBHHHHH")


@dataclass(frozen=True)
class Header:
    preset: str
    model_id: bytes  # 8 bytes: hash of the weights that made the stream
    width: int  # coded frame size (the model's resolution)
    height: int
    fps_num: int
    fps_den: int
    frames: int
    bank_size: int  # references the decoder keeps (oldest evicted)
    source_width: int  # the source video and the square crop taken from it, for upscaling back
    source_height: int
    crop_left: int
    crop_top: int
    crop_size: int
    version: int = VERSION

    def check(self) -> None:
        """Raise BitstreamError naming the first field whose value no stream of imfc's can hold."""
        def bad(what: str, value: object, limit: str) -> BitstreamError:
            return BitstreamError(f"header: {what} {value} is implausible ({limit})")

        if not 1 <= self.frames <= MAX_FRAMES:
            raise bad("frame count", self.frames, f"1 to {MAX_FRAMES}")
        if not (1 <= self.width <= MAX_SIDE and self.height == self.width):
            raise bad("coded size", f"{self.width}x{self.height}", f"a square of 1 to {MAX_SIDE}")
        if self.fps_den == 0 or not MIN_FPS <= Fraction(self.fps_num, self.fps_den) <= MAX_FPS:
            raise bad("frame rate", f"{self.fps_num}/{self.fps_den}", f"{float(MIN_FPS)} to {MAX_FPS} fps")
        if max(self.fps_num, self.fps_den) > MAX_RATIONAL:  # FFmpeg's rationals, which the video writer needs
            raise bad("frame rate", f"{self.fps_num}/{self.fps_den}", f"numerator and denominator up to {MAX_RATIONAL}")
        if not 1 <= self.bank_size <= MAX_BANK:
            raise bad("bank size", self.bank_size, f"1 to {MAX_BANK}")
        if not (self.source_width >= 1 and self.source_height >= 1):
            raise bad("source size", f"{self.source_width}x{self.source_height}", "at least 1x1")
        if not 1 <= self.crop_size <= MAX_SIDE:
            raise bad("crop size", self.crop_size, f"1 to {MAX_SIDE}")
        if self.crop_left >= self.source_width or self.crop_top >= self.source_height:
            raise bad("crop origin", f"({self.crop_left}, {self.crop_top})",
                      f"inside the {self.source_width}x{self.source_height} source")

    def to_bytes(self) -> bytes:
        self.check()
        return self.pack()

    def pack(self) -> bytes:
        """The header's bytes without check(): for tests and fuzzers that build hostile streams."""
        name = self.preset.encode("ascii")
        if len(name) > MAX_PRESET_NAME or len(self.model_id) != 8:
            raise ValueError("preset name too long or model id not 8 bytes")
        fields = bytes([len(name)]) + name + _HEADER_FIELDS.pack(
            self.model_id, self.width, self.height, self.fps_num, self.fps_den, self.frames, self.bank_size,
            self.source_width, self.source_height, self.crop_left, self.crop_top, self.crop_size)
        head = MAGIC + bytes([self.version]) + struct.pack("<H", len(fields)) + fields
        return head + struct.pack("<I", zlib.crc32(head))

    @staticmethod
    def from_bytes(data: bytes) -> tuple["Header", int]:
        """-> (header, bytes consumed)."""
        if len(data) < 7 or data[:4] != MAGIC:
            raise BitstreamError("not an imfc bitstream (bad magic bytes)")
        version = data[4]
        if version > VERSION:
            raise BitstreamError(f"bitstream format version {version} is newer than this imfc reads ({VERSION}); upgrade imfc")
        if version < 1:
            raise BitstreamError(f"unknown bitstream format version {version}")
        (length,) = struct.unpack_from("<H", data, 5)
        end = 7 + length
        if len(data) < end + 4:
            raise BitstreamError("truncated header")
        (crc,) = struct.unpack_from("<I", data, end)
        if crc != zlib.crc32(data[:end]):
            raise BitstreamError("corrupted header (CRC mismatch)")
        n = data[7]
        if 8 + n + _HEADER_FIELDS.size != end:
            raise BitstreamError("malformed header")
        try:
            preset = data[8:8 + n].decode("ascii")
        except UnicodeDecodeError:
            raise BitstreamError("malformed header (preset name)") from None
        values = _HEADER_FIELDS.unpack_from(data, 8 + n)
        header = Header(preset, *values, version=version)
        header.check()
        return header, end + 4


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """-> (value, position after it); at most 4 bytes (values below 2^28), in their shortest form,
    so every value has one encoding."""
    value = 0
    for i in range(4):
        if pos + i >= len(data):
            raise BitstreamError("truncated")
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if i and not byte:
                raise BitstreamError("malformed varint (not in its shortest form)")
            return value, pos + i + 1
    raise BitstreamError("malformed length")


@dataclass(frozen=True)
class Chunk:
    type: ChunkType
    payload: bytes
    offset: int | None = field(default=None, compare=False, repr=False)  # byte where it began in the stream read

    @property
    def where(self) -> str:
        return "" if self.offset is None else f" at byte {self.offset}"

    @property
    def frames(self) -> int:
        """Frames this chunk holds. Raises BitstreamError on a malformed run."""
        if self.type == ChunkType.TOKEN_RUN:
            return TokenRunPayload.from_bytes(self.payload).frames
        if self.type == ChunkType.REPEAT:
            return RepeatPayload.from_bytes(self.payload).frames
        if self.type == ChunkType.AV1_REFERENCES:
            return Av1ReferencesPayload.frame_count(self.payload)
        return 1

    def to_bytes(self) -> bytes:
        head = bytes([self.type]) + _varint(len(self.payload))
        return head + self.payload + struct.pack("<I", zlib.crc32(head + self.payload))


def read_chunk(data: bytes, pos: int) -> tuple[Chunk, int]:
    """The chunk starting at ``pos`` -> (chunk, position after it). Raises BitstreamError."""
    kind = data[pos]
    if kind not in ChunkType._value2member_map_:
        raise BitstreamError(f"unknown chunk type {kind}")
    length, start = _read_varint(data, pos + 1)
    if length > MAX_PAYLOAD:
        raise BitstreamError("implausible chunk length")
    end = start + length
    if end + 4 > len(data):
        raise BitstreamError("truncated")
    (crc,) = struct.unpack_from("<I", data, end)
    if crc != zlib.crc32(data[pos:end]):
        raise BitstreamError("corrupted (CRC mismatch)")
    return Chunk(ChunkType(kind), bytes(data[start:end]), pos), end + 4


def iter_chunks(data: bytes, pos: int) -> Iterator[Chunk]:
    """Every chunk from ``pos`` to the end; the first damaged one raises BitstreamError naming it."""
    index = 0
    while pos < len(data):
        try:
            chunk, pos_next = read_chunk(data, pos)
        except BitstreamError as e:
            raise BitstreamError(f"chunk {index} at byte {pos}: {e}") from None
        yield chunk
        pos = pos_next
        index += 1


def resync(data: bytes, pos: int) -> int | None:
    """The first position at or after ``pos`` where a valid chunk starts, or None."""
    for p in range(pos, len(data)):
        try:
            read_chunk(data, p)
            return p
        except BitstreamError:
            continue
    return None


@dataclass(frozen=True)
class KeyframePayload:
    token: bytes
    image: bytes
    step: int = 0  # index of the image's quantization step (codec.nn.keyframe_codec.KEYFRAME_STEPS)

    # Before format 4 a keyframe had no step byte: its image was always coded at step 0.
    def to_bytes(self, with_step: bool = True) -> bytes:
        if not with_step and self.step:
            raise ValueError("a keyframe without a step field must use step 0")
        return _varint(len(self.token)) + self.token + (bytes([self.step]) if with_step else b"") + self.image

    @staticmethod
    def from_bytes(payload: bytes, with_step: bool = True) -> "KeyframePayload":
        n, pos = _read_varint(payload, 0)
        if pos + n + with_step > len(payload):
            raise BitstreamError("malformed keyframe payload")
        step = payload[pos + n] if with_step else 0
        return KeyframePayload(payload[pos:pos + n], payload[pos + n + with_step:], step)


@dataclass(frozen=True)
class Av1ReferenceUnit:
    """One AV1 reference as a call sends it (packet type AV1_REFERENCE, docs/streaming.md):
    ``intra`` (decodable on its own: the receiver starts its AV1 decoder anew) or predicted from the
    reference sent just before it; ``base``, as in a TOKEN packet, the frames back to the token that
    the reference's token is a delta from (0: coded on its own); the token's rANS bytes; the AV1
    packet.

        unit = flags:u8 (bit 0: intra) base:u8 token_length:varint token av1_packet"""

    intra: bool
    base: int
    token: bytes
    packet: bytes

    def to_bytes(self) -> bytes:
        return bytes([int(self.intra), self.base]) + _varint(len(self.token)) + self.token + self.packet

    @staticmethod
    def from_bytes(payload: bytes) -> "Av1ReferenceUnit":
        if len(payload) < 3 or payload[0] > 1:
            raise BitstreamError("malformed AV1 reference unit")
        n, pos = _read_varint(payload, 2)
        if pos + n >= len(payload):
            raise BitstreamError("malformed AV1 reference unit (no AV1 packet after the token)")
        return Av1ReferenceUnit(bool(payload[0]), payload[1], payload[pos:pos + n], payload[pos + n:])


@dataclass(frozen=True)
class TokenRunPayload:
    frames: int
    tokens: bytes  # rANS bytes of the frames' token deltas, frame after frame

    def to_bytes(self) -> bytes:
        return _varint(self.frames) + self.tokens

    @staticmethod
    def from_bytes(payload: bytes) -> "TokenRunPayload":
        n, pos = _read_varint(payload, 0)
        if n == 0:
            raise BitstreamError("malformed token run (no frames)")
        if n > MAX_RUN_FRAMES:
            raise BitstreamError(f"token run of {n} frames (at most {MAX_RUN_FRAMES})")
        return TokenRunPayload(n, payload[pos:])


@dataclass(frozen=True)
class RepeatPayload:
    frames: int

    def to_bytes(self) -> bytes:
        return _varint(self.frames)

    @staticmethod
    def from_bytes(payload: bytes) -> "RepeatPayload":
        n, pos = _read_varint(payload, 0)
        if n == 0 or pos != len(payload):
            raise BitstreamError("malformed repeat")
        if n > MAX_RUN_FRAMES:
            raise BitstreamError(f"repeat of {n} frames (at most {MAX_RUN_FRAMES})")
        return RepeatPayload(n)


@dataclass(frozen=True)
class Av1ReferencesPayload:
    """Consecutive frames whose references are AV1-coded pictures: a file holds one such chunk per
    4,096 frames, so a reference pays 2 bytes of framing, not a chunk's 14.

    Frame 0 is a reference. A reference frame shows its decoded picture; any other frame either
    synthesizes from a token (its ``modes`` flag is True) or repeats the newest reference's picture
    (False). ``tokens`` is one rANS stream of the token deltas of every reference and token frame,
    in frame order, each from the token before (a reference's token is that of its picture).

    With ``lazy`` tokens (version 6) a reference's token is sent only where a token frame follows it
    before the next reference, just before the first such frame: most references at a few kbps are
    followed by repeats alone, and their 4-6 byte tokens would serve nothing."""

    frames: int
    references: tuple[tuple[int, bytes], ...]  # (frame index, AV1 packet), in order, the first at 0
    modes: tuple[bool, ...]  # one per frame that is not a reference: True for a token frame
    tokens: bytes

    def token_count(self, lazy: bool) -> int:
        if not lazy:
            return len(self.references) + sum(self.modes)
        return sum(self.modes) + len(self.used_references())

    def used_references(self) -> list[int]:
        """Which references (their order in ``references``) a token frame in this chunk follows
        before the next reference."""
        starts = {i for i, _ in self.references}
        used, newest, mode = [], -1, iter(self.modes)
        for frame in range(self.frames):
            if frame in starts:
                newest += 1
            elif next(mode) and newest not in used[-1:]:
                used.append(newest)
        return used

    @staticmethod
    def frame_count(payload: bytes) -> int:
        """The frames of a payload of any version (its first field), checked against the limit."""
        frames, _ = _read_varint(payload, 0)
        if not 1 <= frames <= MAX_RUN_FRAMES:
            raise BitstreamError(f"AV1 references over {frames} frames (1 to {MAX_RUN_FRAMES})")
        return frames

    def to_bytes(self, compact: bool = True) -> bytes:
        """``compact`` (version 7): each packet without its length (it ends with its frame OBU:
        `av1_packet_end`) and, where no frame is a token frame, no mode bits."""
        positions = [i for i, _ in self.references]
        if (not self.references or positions[0] != 0 or positions != sorted(set(positions)) or positions[-1] >= self.frames
                or len(self.modes) != self.frames - len(positions) or self.frames > MAX_RUN_FRAMES
                or not all(p for _, p in self.references)):
            raise ValueError("malformed AV1 references payload")
        if compact and any(av1_packet_end(p, 0) != len(p) for _, p in self.references):
            raise ValueError("an AV1 packet that does not end with its one frame OBU needs its length")
        out = bytearray(_varint(self.frames) + _varint(len(self.references)))
        previous = 0
        for i, packet in self.references:
            out += _varint(i - previous) + (b"" if compact else _varint(len(packet))) + packet
            previous = i
        bits = bytearray((len(self.modes) + 7) // 8)
        for i, token in enumerate(self.modes):
            bits[i // 8] |= token << (i % 8)
        if compact:
            bits = _varint(sum(self.modes)) + (bits if any(self.modes) else b"")
        return bytes(out + bits) + self.tokens

    @staticmethod
    def from_bytes(payload: bytes, lazy: bool | None = False, compact: bool = False) -> "Av1ReferencesPayload":
        """``lazy``: version 6's tokens, where a chunk of references and repeats alone has none;
        None: whichever (the tokens not checked against the frames); ``compact``: version 7's
        layout (to_bytes)."""
        def bad(what: str) -> BitstreamError:
            return BitstreamError(f"malformed AV1 references ({what})")

        frames = Av1ReferencesPayload.frame_count(payload)
        count, pos = _read_varint(payload, len(_varint(frames)))  # varints are in their shortest form
        if not 1 <= count <= frames:
            raise bad(f"{count} references in {frames} frames")
        references, index = [], 0
        for k in range(count):
            gap, pos = _read_varint(payload, pos)
            if (gap == 0) != (k == 0) or index + gap >= frames:
                raise bad("reference positions")
            index += gap
            if compact:
                end = av1_packet_end(payload, pos)
            else:
                n, pos = _read_varint(payload, pos)
                if n == 0 or pos + n > len(payload):
                    raise bad("packet length")
                end = pos + n
            references.append((index, payload[pos:end]))
            pos = end
        others = frames - count
        width = (others + 7) // 8
        if compact:
            token_frames, pos = _read_varint(payload, pos)
            if token_frames > others:
                raise bad(f"{token_frames} token frames of {others}")
            width = width if token_frames else 0
        bits = payload[pos:pos + width]
        if len(bits) < width:
            raise bad("truncated frame modes")
        if width and bits[-1] >> (others % 8 or 8):
            raise bad("frame mode bits past its frames")
        tokens = payload[pos + width:]
        modes = tuple(bool(bits[i // 8] >> (i % 8) & 1) for i in range(others)) if width else (False,) * others
        if compact and sum(modes) != token_frames:
            raise bad(f"{sum(modes)} token frame bits, {token_frames} token frames announced")
        out = Av1ReferencesPayload(frames, tuple(references), modes, tokens)
        if lazy is not None and bool(tokens) != bool(out.token_count(lazy)):
            raise bad("no tokens" if tokens == b"" else "tokens where no token is sent")
        return out


def iter_obus(data: bytes, pos: int = 0) -> Iterator[tuple[int, int]]:
    """The OBUs of AV1 data from ``pos`` (low-overhead format, each with its size field, as SVT-AV1
    writes them) -> (OBU type, position after it), one by one. Raises BitstreamError on an OBU
    without its size, with the forbidden bit, or running past the data."""
    def bad(what: str) -> BitstreamError:
        return BitstreamError(f"malformed AV1 packet ({what})")

    while pos < len(data):
        h = data[pos]
        if h & 0x80 or not h & 0x02:
            raise bad("forbidden bit set" if h & 0x80 else "an OBU without its size")
        pos += 2 if h & 0x04 else 1  # the extension byte, where there is one
        size = 0
        for i in range(8):  # leb128, at most 8 bytes (AV1 allows padded forms)
            if pos >= len(data):
                raise bad("truncated OBU size")
            byte = data[pos]
            pos += 1
            size |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                break
        else:
            raise bad("OBU size over 8 bytes")
        if size > len(data) - pos:
            raise bad("OBU past the payload's end")
        pos += size
        yield h >> 3 & 0x0F, pos


def has_sequence_header(packet: bytes) -> bool:
    """Whether an AV1 packet holds a sequence header OBU, as SVT-AV1's intra frames do."""
    try:
        return any(kind == OBU_SEQUENCE_HEADER for kind, _ in iter_obus(packet))
    except BitstreamError:
        return False


def av1_packet_end(data: bytes, pos: int) -> int:
    """Where the AV1 packet at ``pos`` ends: after its first frame OBU. An imfc reference packet is
    a sequence header (intra frames only) and one frame OBU, so from version 7 it needs no length.
    Raises BitstreamError."""
    for kind, end in iter_obus(data, pos):
        if kind == OBU_FRAME:
            return end
    raise BitstreamError("malformed AV1 packet (no frame OBU)")


def write_stream(header: Header, chunks: list[Chunk]) -> bytes:
    return header.to_bytes() + b"".join(c.to_bytes() for c in chunks)


def read_stream(data: bytes) -> tuple[Header, list[Chunk]]:
    """Parse a whole stream, checking every CRC, every run length and keyframe payload, and that the
    chunks hold exactly the header's frame count. Errors name the chunk and its byte."""
    header, pos = Header.from_bytes(data)
    chunks, frames = [], 0
    for i, c in enumerate(iter_chunks(data, pos)):
        try:
            if header.version < SINCE_VERSION.get(c.type, 1):
                raise BitstreamError(f"a {c.type.name.lower().replace('_', ' ')} in a version {header.version} stream")
            if i == 0 and c.type not in REFERENCE_CHUNKS:
                raise BitstreamError("a stream must start with a keyframe")
            if c.type == ChunkType.KEYFRAME:
                KeyframePayload.from_bytes(c.payload, header.version >= KEYFRAME_STEP_SINCE)
            if c.type == ChunkType.AV1_REFERENCES:
                Av1ReferencesPayload.from_bytes(c.payload, header.version >= LAZY_REFERENCE_TOKENS_SINCE,
                                                header.version >= SELF_DELIMITING_SINCE)
            frames += c.frames
        except BitstreamError as e:
            raise BitstreamError(f"chunk {i}{c.where}: {e}") from None
        if frames > header.frames:  # stop at once: the rest cannot be right either
            raise BitstreamError(f"malformed: header announces {header.frames} frames, chunk {i}{c.where} "
                                 f"brings the stream to {frames}")
        chunks.append(c)
    if frames < header.frames:
        raise BitstreamError(f"truncated: header announces {header.frames} frames, stream holds {frames}")
    return header, chunks


def read_file(path: Path, max_frames: int = MAX_FRAMES) -> tuple[Header, list[Chunk]]:
    """An .imfc file -> read_stream's (header, chunks), refusing files over MAX_STREAM_BYTES and
    streams of more than ``max_frames`` frames before anything is decoded."""
    path = Path(path)
    if not path.exists():
        raise BitstreamError(f"{path}: no such file")
    if path.is_dir():
        raise BitstreamError(f"{path}: is a directory")
    if path.stat().st_size > MAX_STREAM_BYTES:
        raise BitstreamError(f"{path}: {path.stat().st_size} bytes, more than an .imfc file can hold ({MAX_STREAM_BYTES})")
    try:
        header, chunks = read_stream(path.read_bytes())
    except BitstreamError as e:
        raise BitstreamError(f"{path}: {e}") from None
    if header.frames > max_frames:
        raise BitstreamError(f"{path}: holds {header.frames} frames, more than the limit of {max_frames}; "
                             f"pass --max-frames {header.frames} to decode it")
    return header, chunks
