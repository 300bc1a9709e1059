"""Hostile input: bomb files, lying headers, and the structure-aware fuzzer (tests/fuzz.py) over
files and call packets. Every case is seeded; a case's outcome never depends on timing."""

import random
from dataclasses import replace

import pytest

from entropy.bitstream import (
    DEFAULT_MAX_FRAMES, MAX_RUN_FRAMES, BitstreamError, Chunk, ChunkType, RepeatPayload, TokenRunPayload, read_stream,
)
from tests import fuzz
from tools import decode as decode_tool

from .test_cli_errors import check_error


@pytest.fixture(scope="module")
def model():
    return fuzz.fuzz_model()


@pytest.fixture(scope="module")
def seeds(model):
    return fuzz.seed_streams(model)


def bomb(seed: bytes, chunk: Chunk, count: int = 1) -> bytes:
    """The bombs of issue 17: a real stream, then ``count`` copies of a run chunk, every CRC valid
    and the header's frame count raised to match."""
    parts = fuzz.Parts.of(seed)
    parts.chunks += [(int(chunk.type), chunk.payload)] * count
    frames = parts.header.frames + count * fuzz.chunk_frames(int(chunk.type), chunk.payload)
    parts.header = replace(parts.header, frames=frames)
    return parts.to_bytes()


@pytest.mark.parametrize("chunk, count, message", [
    (Chunk(ChunkType.TOKEN_RUN, TokenRunPayload(2**20, b"\x01\x02\x03\x04").to_bytes()), 1, "token run of 1048576 frames"),
    (Chunk(ChunkType.TOKEN_RUN, TokenRunPayload(2**24, b"\x01\x02\x03\x04").to_bytes()), 1, "frame count 16777226 is implausible"),
    (Chunk(ChunkType.REPEAT, RepeatPayload(2**20).to_bytes()), 1, "repeat of 1048576 frames"),
    # runs of legal length, but 2^20 frames in all: the decoder's frame cap refuses them
    (Chunk(ChunkType.REPEAT, RepeatPayload(MAX_RUN_FRAMES).to_bytes()), 256, "pass --max-frames"),
    (Chunk(ChunkType.TOKEN_RUN, TokenRunPayload(MAX_RUN_FRAMES, b"\x01\x02").to_bytes()), 256, "pass --max-frames"),
])
def test_bomb_files_are_refused_before_decoding(model, seeds, tmp_path, chunk, count, message):
    data = bomb(seeds[0], chunk, count)
    outcome, frames, detail = fuzz.decode_case(data, model, tmp_path, DEFAULT_MAX_FRAMES)
    assert (outcome, frames) == ("refused", 0) and message in detail


def test_bomb_file_through_the_command_line(seeds, tmp_path, capsys):
    """`imfc decode` refuses it with one line and exit 1, before it loads any model (the
    weights file given does not even exist), and writes nothing."""
    path = tmp_path / "bomb.imfc"
    path.write_bytes(bomb(seeds[0], Chunk(ChunkType.REPEAT, RepeatPayload(MAX_RUN_FRAMES).to_bytes()), 256))
    out = tmp_path / "out.mp4"
    code = decode_tool.main([str(path), "-o", str(out), "--weights", str(tmp_path / "none.safetensors")])
    check_error(capsys, code, "holds 1048586 frames, more than the limit of 30000", out)


@pytest.mark.parametrize("field, value, message", [
    ("width", 128, "coded size"), ("height", 32, "coded size"), ("bank_size", 0, "bank size 0"),
    ("fps_den", 0, "frame rate"), ("crop_size", 60000, "crop size"),
    ("fps_num", 3_000_000_001, "up to 2147483647"),  # 1 fps, but past FFmpeg's rationals (fuzz, seed 17)
])
def test_lying_headers_with_valid_crcs_are_refused(model, seeds, tmp_path, field, value, message):
    """The header fields that once reached the networks (a size the model does not code made
    avg_pool2d and conv_transpose2d raise, or allocate without end) or the video writer are refused
    cleanly."""
    parts = fuzz.Parts.of(seeds[0])
    for f, v in ((field, value),) + ((("height", value),) if field == "width" else ()) + (
            (("fps_den", 3_000_000_000),) if field == "fps_num" else ()):
        parts.header = replace(parts.header, **{f: v})
    outcome, _, detail = fuzz.decode_case(parts.to_bytes(), model, tmp_path, DEFAULT_MAX_FRAMES)
    assert outcome == "refused" and message in detail


def test_seed_streams_decode(model, seeds, tmp_path):
    for data in seeds:
        assert fuzz.decode_case(data, model, tmp_path, DEFAULT_MAX_FRAMES)[:2] == ("decoded", 10)


def test_structured_mutants_parse_or_are_refused():
    """Parser level, many cases: every mutant either parses or raises BitstreamError."""
    rng = random.Random(11)
    stream = fuzz.seed_streams(fuzz.fuzz_model())[1]
    parsed = 0
    for _ in range(3000):
        data = fuzz.mutate_stream(stream, rng)
        try:
            read_stream(data)
            parsed += 1
        except BitstreamError:
            pass
    assert 300 < parsed < 2700  # the mutants reach both outcomes


def test_fuzz_files(model):
    """1,200 mutants decoded as `imfc decode` does: none crashes, every refusal is one line and
    leaves no output; enough of them decode that the decoder behind the CRCs is exercised."""
    t = fuzz.fuzz_files(model, 1200, seed=2026)
    assert t.crashed == [], t.crashed[0]
    assert t.decoded > 200 and t.refused > 200
    assert len(t.reasons) > 15  # many different refusals: the mutants reach many checks


def test_fuzz_calls(model):
    """600 damaged, reordered, duplicated and wrapping calls and hostile feedback: the receiver
    and sender never raise and their state stays within its bounds."""
    t = fuzz.fuzz_calls(model, 600, seed=2026)
    assert t.crashed == [], t.crashed[0]
    assert t.frames > 300  # frames were shown: the packets reached the decoder


@pytest.mark.parametrize("start", [(65530, 65532, 254), (32760, 32767, 127), (70_000, 131_070, 511)])
def test_a_call_whose_counters_wrap_shows_every_frame(model, start):
    """Sequence numbers, frame ids and reference ids wrap on the wire (16 and 8 bits) in the
    middle of this call; the receiver unwraps them and shows all 10 frames in order."""
    packets = [fuzz.shift_ids(d, *start) for d in fuzz.seed_call(model)]
    assert fuzz.call_case(packets, model, start) == ("decoded", 10, "")


def test_a_call_reordered_and_duplicated_shows_frames_in_order(model):
    packets = fuzz.seed_call(model)
    rng = random.Random(3)
    for _ in range(20):
        mixed = packets + rng.sample(packets, 8)  # duplicates
        for _ in range(5):  # neighbours swapped, as reordering networks do
            i = rng.randrange(len(mixed) - 1)
            mixed[i], mixed[i + 1] = mixed[i + 1], mixed[i]
        outcome, shown, detail = fuzz.call_case(mixed, model)
        assert outcome == "decoded" and shown >= 1, detail
