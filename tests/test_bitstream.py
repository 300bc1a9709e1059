import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from entropy import bitstream
from entropy.bitstream import (
    MAX_BANK, MAX_FRAMES, MAX_RUN_FRAMES, MAX_SIDE, VERSION, BitstreamError, Chunk, ChunkType, Header, KeyframePayload,
    RepeatPayload, TokenRunPayload, iter_chunks, read_file, read_stream, resync, write_stream,
)

@st.composite
def headers(draw) -> Header:
    """Headers a stream of imfc's can hold (Header.check's limits)."""
    side = draw(st.integers(1, MAX_SIDE))
    fps_den = draw(st.integers(1, 1001))
    fps_num = draw(st.integers(max(1, -(-fps_den // 100)), 1000 * fps_den))
    source_width, source_height = draw(st.integers(1, 65535)), draw(st.integers(1, 65535))
    return Header(
        preset=draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=32)),
        model_id=draw(st.binary(min_size=8, max_size=8)), width=side, height=side, fps_num=fps_num,
        fps_den=fps_den, frames=draw(st.integers(1, MAX_FRAMES)), bank_size=draw(st.integers(1, MAX_BANK)),
        source_width=source_width, source_height=source_height,
        crop_left=draw(st.integers(0, source_width - 1)), crop_top=draw(st.integers(0, source_height - 1)),
        crop_size=draw(st.integers(1, MAX_SIDE)))


chunks = st.builds(Chunk, type=st.sampled_from(list(ChunkType)), payload=st.binary(max_size=300))


def header(frames: int) -> Header:
    return Header("tiny", bytes(range(8)), 64, 64, 25, 1, frames, 2, 320, 240, 40, 0, 240)


@given(headers())
def test_header_round_trip(h):
    data = h.to_bytes()
    parsed, used = Header.from_bytes(data + b"trailing")
    assert parsed == h and used == len(data)


@given(st.lists(chunks, max_size=20))
def test_chunks_round_trip(items):
    h = header(len(items) + 1)
    data = write_stream(h, items)
    _, pos = Header.from_bytes(data)
    assert list(iter_chunks(data, pos)) == items


@given(st.binary(max_size=50), st.binary(max_size=500), st.integers(0, 255))
def test_keyframe_payload_round_trip(token, image, step):
    p = KeyframePayload(token, image, step)
    assert KeyframePayload.from_bytes(p.to_bytes()) == p


@given(st.binary(max_size=50), st.binary(max_size=500))
def test_keyframe_payload_before_version_4_has_no_step(token, image):
    """Format 1-3 keyframes (and call packets) carry no step byte: they read as step 0, and only
    step 0 can be written that way."""
    p = KeyframePayload(token, image)
    assert len(p.to_bytes(with_step=False)) == len(p.to_bytes()) - 1
    assert KeyframePayload.from_bytes(p.to_bytes(with_step=False), with_step=False) == p
    with pytest.raises(ValueError):
        KeyframePayload(token, image, 3).to_bytes(with_step=False)


def test_keyframe_payload_without_room_for_its_step_is_refused():
    with pytest.raises(BitstreamError, match="malformed keyframe"):
        KeyframePayload.from_bytes(bytes([3]) + b"tok")


@given(st.integers(1, MAX_RUN_FRAMES), st.binary(max_size=100))
def test_token_run_payload_round_trip(frames, tokens):
    p = TokenRunPayload(frames, tokens)
    assert TokenRunPayload.from_bytes(p.to_bytes()) == p


def test_runs_longer_than_the_limit_are_refused():
    """A run is decoded at once, so its length bounds the decoder's memory (the bomb files of
    issue 17 announced 2^20 and 2^24 frames in one run of a few bytes)."""
    with pytest.raises(BitstreamError, match=f"token run of {MAX_RUN_FRAMES + 1} frames"):
        TokenRunPayload.from_bytes(TokenRunPayload(MAX_RUN_FRAMES + 1, b"rans").to_bytes())
    with pytest.raises(BitstreamError, match=f"repeat of {2**20} frames"):
        RepeatPayload.from_bytes(RepeatPayload(2**20).to_bytes())


def test_varints_must_be_in_their_shortest_form():
    assert RepeatPayload.from_bytes(bytes([0x85, 0x01])) == RepeatPayload(133)
    with pytest.raises(BitstreamError, match="shortest form"):
        RepeatPayload.from_bytes(bytes([0x85, 0x00]))
    with pytest.raises(BitstreamError, match="malformed length"):
        RepeatPayload.from_bytes(bytes([0xFF] * 5))


def test_token_runs_count_their_frames():
    key = Chunk(ChunkType.KEYFRAME, KeyframePayload(b"tok", bytes(50)).to_bytes())
    run = Chunk(ChunkType.TOKEN_RUN, TokenRunPayload(7, b"rans").to_bytes())
    assert read_stream(write_stream(header(9), [key, run, Chunk(ChunkType.FRAME, b"x")]))[1][1].frames == 7
    with pytest.raises(BitstreamError, match="truncated: header announces 10 frames, stream holds 8"):
        read_stream(write_stream(header(10), [key, run]))
    with pytest.raises(BitstreamError, match=r"malformed: header announces 3 frames, chunk 1 at byte \d+ brings the stream to 8"):
        read_stream(write_stream(header(3), [key, run]))
    with pytest.raises(BitstreamError, match="no frames"):
        read_stream(write_stream(header(1), [key, Chunk(ChunkType.TOKEN_RUN, b"\x00rans")]))
    with pytest.raises(BitstreamError, match="token run in a version 1 stream"):
        read_stream(write_stream(replace(header(8), version=1), [key, run]))



def test_repeats_count_their_frames():
    key = Chunk(ChunkType.KEYFRAME, KeyframePayload(b"tok", bytes(50)).to_bytes())
    repeat = Chunk(ChunkType.REPEAT, RepeatPayload(300).to_bytes())
    assert RepeatPayload.from_bytes(repeat.payload) == RepeatPayload(300)
    assert read_stream(write_stream(header(301), [key, repeat]))[1][1].frames == 300
    for bad in (b"\x00", b"\x05\x00", b""):
        with pytest.raises(BitstreamError, match="repeat|truncated"):
            read_stream(write_stream(header(2), [key, Chunk(ChunkType.REPEAT, bad)]))
    with pytest.raises(BitstreamError, match="repeat in a version 2 stream"):
        read_stream(write_stream(replace(header(301), version=2), [key, repeat]))

def sample_stream(n=10):
    items = [Chunk(ChunkType.KEYFRAME, KeyframePayload(b"tok", bytes(200)).to_bytes())]
    items += [Chunk(ChunkType.FRAME, bytes([i]) * (5 + i)) for i in range(n - 1)]
    return write_stream(header(n), items), items


def test_read_stream_checks_frame_count():
    data, items = sample_stream()
    assert read_stream(data)[1] == items
    last = len(items[-1].to_bytes())
    with pytest.raises(BitstreamError, match="truncated: header announces 10 frames, stream holds 9"):
        read_stream(data[:-last])


def test_truncation_inside_a_chunk_names_the_chunk():
    data, _ = sample_stream()
    with pytest.raises(BitstreamError, match=r"chunk 9 at byte \d+: truncated"):
        read_stream(data[:-3])


def damage_chunk_3():
    """-> (stream with a bit flipped inside chunk 3, offset of chunk 3, offset of chunk 4)."""
    data, items = sample_stream()
    _, pos = Header.from_bytes(data)
    third = pos + sum(len(c.to_bytes()) for c in items[:3])
    damaged = bytearray(data)
    damaged[third + 3] ^= 0x40
    return bytes(damaged), third, third + len(items[3].to_bytes())


def test_flipped_byte_is_detected_at_its_chunk():
    damaged, third, _ = damage_chunk_3()
    with pytest.raises(BitstreamError, match=f"chunk 3 at byte {third}"):
        read_stream(damaged)


def test_resync_finds_the_next_chunk():
    damaged, third, fourth = damage_chunk_3()
    assert resync(damaged, third) == fourth


@pytest.mark.parametrize("mutate, message", [
    (lambda d: b"XXXX" + d[4:], "bad magic"),
    (lambda d: d[:4] + bytes([VERSION + 1]) + d[5:], "newer than this imfc reads"),
    (lambda d: d[:10] + bytes([d[10] ^ 1]) + d[11:], "corrupted header"),
    (lambda d: d[:5], "truncated header|bad magic"),
    (lambda d: b"", "bad magic"),
])
def test_bad_headers(mutate, message):
    data, _ = sample_stream()
    with pytest.raises(BitstreamError, match=message):
        read_stream(mutate(data))


def test_stream_must_start_with_keyframe():
    data = write_stream(header(1), [Chunk(ChunkType.FRAME, b"x")])
    with pytest.raises(BitstreamError, match="keyframe"):
        read_stream(data)


@settings(deadline=None)
@given(st.data())
def test_parser_survives_mutations(data):
    """Fuzz: mutated streams either parse or raise BitstreamError; never anything else, never hang."""
    stream, _ = sample_stream()
    buf = bytearray(stream)
    for _ in range(data.draw(st.integers(1, 8))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        pos = data.draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip" and buf:
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del buf[pos:]
        elif op == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del buf[pos:pos + data.draw(st.integers(1, 8))]
    try:
        read_stream(bytes(buf))
    except BitstreamError:
        pass


def test_parser_survives_thousands_of_random_mutations():
    stream, _ = sample_stream()
    rng = random.Random(0)
    for _ in range(3000):
        buf = bytearray(stream)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(buf))
            buf[i] = rng.randrange(256)
        if rng.random() < 0.3:
            del buf[rng.randrange(len(buf)):]
        try:
            read_stream(bytes(buf))
        except BitstreamError:
            pass


@pytest.mark.parametrize("field, value, message", [
    ("frames", 0, "frame count 0"),
    ("frames", MAX_FRAMES + 1, f"frame count {MAX_FRAMES + 1}"),
    ("width", 96, "coded size 96x64"),
    ("width", 0, "coded size 0x64"),
    ("fps_den", 0, "frame rate 25/0"),
    ("fps_num", 0, "frame rate 0/1"),
    ("fps_num", 10**6, "frame rate 1000000/1"),
    ("bank_size", 0, "bank size 0"),
    ("bank_size", MAX_BANK + 1, f"bank size {MAX_BANK + 1}"),
    ("source_width", 0, "source size 0x240"),
    ("crop_size", 0, "crop size 0"),
    ("crop_size", 65535, "crop size 65535"),
    ("crop_left", 320, r"crop origin \(320, 0\)"),
])
def test_implausible_header_fields_are_refused(field, value, message):
    """Every header field that the decoder allocates by, or divides by, is checked when read; a
    valid CRC does not make a lying header acceptable. The writer refuses the same headers."""
    h = replace(header(3), **{field: value})
    with pytest.raises(BitstreamError, match=f"header: {message} is implausible"):
        Header.from_bytes(h.pack())
    with pytest.raises(BitstreamError, match=message):
        h.to_bytes()


def test_read_file_limits(tmp_path, monkeypatch):
    data, _ = sample_stream()
    path = tmp_path / "s.imfc"
    path.write_bytes(data)
    assert read_file(path)[0].frames == 10
    with pytest.raises(BitstreamError, match="holds 10 frames, more than the limit of 9; pass --max-frames 10"):
        read_file(path, max_frames=9)
    monkeypatch.setattr(bitstream, "MAX_STREAM_BYTES", len(data) - 1)
    with pytest.raises(BitstreamError, match="more than an .imfc file can hold"):
        read_file(path)
    with pytest.raises(BitstreamError, match="no such file"):
        read_file(tmp_path / "missing.imfc")
    with pytest.raises(BitstreamError, match="is a directory"):
        read_file(tmp_path)


def test_malformed_keyframe_is_refused_when_the_stream_is_read():
    bad = Chunk(ChunkType.KEYFRAME, bytes([200]) + b"short")
    data = write_stream(header(1), [bad])
    _, pos = Header.from_bytes(data)
    with pytest.raises(BitstreamError, match=f"chunk 0 at byte {pos}: malformed keyframe payload"):
        read_stream(data)
