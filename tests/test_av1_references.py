"""References as one AV1 stream (bitstream formats 5 and 6): conversion, coding, the chunk, the pipeline."""

import subprocess
import sys
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from codec.av1_reference import TEMPORAL_DELIMITER, Quantizer, ReferenceDecoder, ReferenceEncoder, quantizers_for_kbps, yuv420_to_rgb
from codec.files import encode_file, read_bitstream
from codec.nn.weights import load_weights
from codec.pipeline import (Decoder, Encoder, EncoderSettings, RateControl, SynthesisGate, pack_token_runs,
                            start_reference_stream)
from codec.video_io import center_box, crop_resize, probe, read_frames, to_tensor, to_uint8
from entropy.bitstream import (OBU_FRAME, OBU_SEQUENCE_HEADER, Av1ReferencesPayload, BitstreamError, ChunkType, Header,
                               _varint, read_stream, write_stream)
from tests.conftest import moving_square_clip

AV1 = EncoderSettings(keyframe_codec="av1", reference_interval=4, av1_crf=50)


def model_frames(path: Path, size: int, limit: int | None = None) -> list[torch.Tensor]:
    info = probe(path)
    box = center_box(info.width, info.height)
    return [to_tensor(crop_resize(f, box, size)) for f in read_frames(path, limit)]


def stream_bytes(model, settings: EncoderSettings, chunks, version: int | None = None) -> bytes:
    r = model.cfg.resolution
    header = Header("tiny", b"\0" * 8, r, r, 25, 1, sum(c.frames for c in chunks), settings.bank_size, r, r, 0, 0, r)
    return write_stream(header if version is None else replace(header, version=version), chunks)


# -- the 4:2:0 to RGB conversion ------------------------------------------------------------------
def test_conversion_matches_the_bt601_formula():
    """Integer conversion within one level of the float BT.601 limited-range formula, where chroma
    is flat (so upsampling does not enter)."""
    rng = np.random.default_rng(0)
    y = rng.integers(16, 236, (8, 8), dtype=np.uint8)
    u = np.full((4, 4), rng.integers(16, 241), np.uint8)
    v = np.full((4, 4), rng.integers(16, 241), np.uint8)
    rgb = yuv420_to_rgb(y, u, v).astype(float)
    yf, uf, vf = y - 16.0, float(u[0, 0]) - 128, float(v[0, 0]) - 128
    expect = np.stack([1.164 * yf + 1.596 * vf, 1.164 * yf - 0.392 * uf - 0.813 * vf, 1.164 * yf + 2.017 * uf], -1)
    assert np.abs(rgb - expect.clip(0, 255)).max() <= 1


def test_conversion_is_close_to_ffmpegs():
    """On a decoded real-looking picture, within 40 dB of libswscale's own conversion (measured:
    ours is closer to the source than swscale's, 41.0 against 39.6 dB on a talking head)."""
    frame = moving_square_clip(1, 64)[0]
    encoder = ReferenceEncoder(64, Fraction(25), Quantizer(30))
    packet, ours = encoder.code(frame)
    encoder.close()
    decoder = av.CodecContext.create("libdav1d", "r")
    decoder.thread_count = 1
    decoder.options = {"max_frame_delay": "1"}
    theirs = decoder.decode(av.Packet(packet))[0].to_ndarray(format="rgb24")
    mse = np.mean((ours.astype(float) - theirs) ** 2)
    assert 10 * np.log10(255 ** 2 / mse) > 35


# -- the AV1 reference stream ------------------------------------------------------------------------
def test_encoder_and_decoder_hold_the_same_pictures():
    frames = moving_square_clip(6, 64)
    encoder = ReferenceEncoder(64, Fraction(25, 4), Quantizer(50))
    decoder = ReferenceDecoder(64)
    for i, frame in enumerate(frames):
        packet, picture = encoder.code(frame, intra=i == 0)
        assert picture.shape == (64, 64, 3) and picture.dtype == np.uint8
        assert not packet.startswith(TEMPORAL_DELIMITER)  # 2 bytes a reference needs not carry
        assert np.array_equal(decoder.decode(packet), picture)
    encoder.close()


def test_packets_with_their_temporal_delimiter_decode_the_same():
    """Streams written before the delimiter was left out still decode, to the same pictures."""
    frames = moving_square_clip(3, 64)
    encoder = ReferenceEncoder(64, Fraction(25), Quantizer(50))
    coded = [encoder.code(f, intra=i == 0) for i, f in enumerate(frames)]
    encoder.close()
    decoder = ReferenceDecoder(64)
    for packet, picture in coded:
        assert np.array_equal(decoder.decode(TEMPORAL_DELIMITER + packet), picture)


def test_an_intra_refresh_decodes_on_a_fresh_decoder():
    frames = moving_square_clip(4, 64)
    encoder = ReferenceEncoder(64, Fraction(25), Quantizer(50))
    packets = [encoder.code(f, intra=i in (0, 2)) for i, f in enumerate(frames)]
    encoder.close()
    late = ReferenceDecoder(64)  # joins at the refresh, as a receiver after a loss does
    assert np.array_equal(late.decode(packets[2][0]), packets[2][1])
    assert np.array_equal(late.decode(packets[3][0]), packets[3][1])


def intra_bytes(quantizer: Quantizer, frame: np.ndarray) -> int:
    encoder = ReferenceEncoder(64, Fraction(25), quantizer)
    try:
        return len(encoder.code(frame, intra=True)[0])
    finally:
        encoder.close()


def test_any_preset_codes_pictures_every_decoder_holds():
    """The preset is the sender's search, not part of the stream: whichever it is, a fresh decoder
    of the packets holds the encoder's own pictures; out of range is refused."""
    frames = moving_square_clip(4, 64)
    for preset in (8, 4):
        encoder = ReferenceEncoder(64, Fraction(25), Quantizer(50, -32, preset))
        decoder = ReferenceDecoder(64)
        for i, f in enumerate(frames):
            packet, held = encoder.code(f, intra=i == 0)
            assert np.array_equal(decoder.decode(packet), held)
        encoder.close()
    assert all(q.preset == 2 for q in quantizers_for_kbps(3, 2) + quantizers_for_kbps(12, 2))
    for bad in (-1, 14):
        with pytest.raises(ValueError, match="preset"):
            Quantizer(63, None, bad)
        with pytest.raises(ValueError, match="preset"):
            EncoderSettings(keyframe_codec="av1", av1_preset=bad)


def test_quantizer_ladder_runs_from_dear_to_cheap_intra_frames():
    """Below 5 kbps only fixed qindex offsets at CRF 63, from 5 kbps CRF mode first."""
    frame = moving_square_clip(1, 64)[0]
    low, high = quantizers_for_kbps(3), quantizers_for_kbps(16)
    assert all(q.crf == 63 and q.intra_offset is not None for q in low)
    assert high[0] == Quantizer(55) and high[1:] == low
    assert quantizers_for_kbps(6)[0] == quantizers_for_kbps(12)[0] == Quantizer(63)
    sizes = [intra_bytes(q, frame) for q in high]
    assert all(a > b for a, b in zip(sizes, sizes[1:])), sizes


def test_a_slow_presets_stream_opens_once_on_the_rung_a_real_time_trial_chose():
    """The intra ladder is tried at preset 8, then the stream is opened at the asked preset on the
    first rung whose trial fitted; every decoder holds its first picture."""
    frame = moving_square_clip(1, 64)[0]
    ladder = quantizers_for_kbps(3, 2)
    trial_bytes = [intra_bytes(replace(q, preset=8), frame) for q in ladder[:2]]
    assert trial_bytes[0] > trial_bytes[1]
    encoder, packet, picture = start_reference_stream(64, Fraction(25), frame, 63, 3, 8 * trial_bytes[1], preset=2)
    assert encoder.quantizer == ladder[1] and encoder.quantizer.preset == 2
    assert np.array_equal(ReferenceDecoder(64).decode(packet), picture)
    encoder.close()


@pytest.mark.parametrize("packet, message", [
    (b"", "empty"),
    (b"\x12\x00\x0a\x0b\x00\x00\x00\x24\xc4\xff\xdf\x00\x68\x02", "decode"),  # a truncated sequence header
    (bytes(range(256)) * 4, "decode"),
])
def test_undecodable_packets_are_refused(packet, message):
    with pytest.raises(BitstreamError, match=message):
        ReferenceDecoder(64).decode(packet)


def test_an_inter_packet_without_its_intra_is_refused():
    encoder = ReferenceEncoder(64, Fraction(25), Quantizer(50))
    frames = moving_square_clip(2, 64)
    encoder.code(frames[0])
    inter, _ = encoder.code(frames[1])
    encoder.close()
    with pytest.raises(BitstreamError):
        ReferenceDecoder(64).decode(inter)


def test_a_picture_larger_than_the_stream_is_refused_before_it_is_allocated():
    encoder = ReferenceEncoder(128, Fraction(25), Quantizer(50))
    packet, _ = encoder.code(moving_square_clip(1, 128)[0])
    encoder.close()
    with pytest.raises(BitstreamError, match="does not decode"):  # libdav1d's frame size limit
        ReferenceDecoder(64).decode(packet)


# -- the AV1_REFERENCES chunk ------------------------------------------------------------------------
def obu(kind: int, body: bytes) -> bytes:
    """An AV1 OBU with its size field (as SVT-AV1 writes them): LEB128, which is the varint's form."""
    return bytes([kind << 3 | 2]) + _varint(len(body)) + body


@settings(max_examples=80)
@given(st.integers(1, 300), st.data())
def test_payload_round_trip(frames, data):
    """Both layouts: version 7's (packets without lengths, no mode bits without token frames) and
    the one before."""
    positions = sorted({0, *data.draw(st.lists(st.integers(0, frames - 1), max_size=8))})
    packet = st.tuples(st.booleans(), st.binary(max_size=20), st.binary(max_size=200)).map(
        lambda p: (obu(OBU_SEQUENCE_HEADER, p[1]) if p[0] else b"") + obu(OBU_FRAME, p[2]))
    references = tuple((i, data.draw(packet)) for i in positions)
    modes = tuple(data.draw(st.lists(st.booleans(), min_size=frames - len(positions), max_size=frames - len(positions))))
    payload = Av1ReferencesPayload(frames, references, modes, data.draw(st.binary(min_size=1, max_size=9)))
    back = Av1ReferencesPayload.from_bytes(payload.to_bytes(compact=False))
    assert back == payload == Av1ReferencesPayload.from_bytes(payload.to_bytes(), compact=True)
    saved = len(payload.to_bytes(compact=False)) - len(payload.to_bytes())
    packet_lengths = sum(len(_varint(len(p))) for _, p in references)
    mode_bits = 0 if any(modes) else (len(modes) + 7) // 8  # left out where no frame is a token frame
    assert saved == packet_lengths + mode_bits - len(_varint(sum(modes)))  # for the token frame count
    assert back.token_count(lazy=False) == len(positions) + sum(modes)
    # format 6: a reference's token only where a token frame follows it before the next reference
    kinds, mode = [], iter(modes)
    for i in range(frames):
        kinds.append("R" if i in positions else "T" if next(mode) else "H")
    segments = "".join(kinds).split("R")[1:]
    used = sum("T" in segment for segment in segments)
    assert back.token_count(lazy=True) == sum(modes) + used
    assert back.used_references() == [k for k, segment in enumerate(segments) if "T" in segment]
    if not any(modes):  # references and repeats alone send no token at all
        lazy = Av1ReferencesPayload(frames, references, modes, b"")
        assert Av1ReferencesPayload.from_bytes(lazy.to_bytes(), lazy=True, compact=True) == lazy
        with pytest.raises(BitstreamError, match="no tokens"):
            Av1ReferencesPayload.from_bytes(lazy.to_bytes(), lazy=False, compact=True)
        with pytest.raises(BitstreamError, match="tokens where no token is sent"):
            Av1ReferencesPayload.from_bytes(payload.to_bytes(), lazy=True, compact=True)


@pytest.mark.parametrize("payload, message", [
    (b"\x00\x01\x00\x01\xaa\x01", "over 0 frames"),
    (b"\x02\x00\x01", "0 references"),
    (b"\x02\x01\x01\x01\xaa\x00\x01", "reference positions"),  # the first reference not at frame 0
    (b"\x02\x02\x00\x01\xaa\x02\x01\xbb\x01", "reference positions"),  # the second past the last frame
    (b"\x02\x01\x00\x05\xaa\x00\x01", "packet length"),
    (b"\x03\x01\x00\x01\xaa\x04\x01", "mode bits past"),
    (b"\x02\x01\x00\x01\xaa\x01", "no tokens"),
])
def test_malformed_payloads_are_refused(payload, message):
    with pytest.raises(BitstreamError, match=message):
        Av1ReferencesPayload.from_bytes(payload)


FRAME = obu(OBU_FRAME, b"\xaa")  # 0x32 0x01 0xaa


@pytest.mark.parametrize("payload, message", [
    (b"\x02\x01\x00\x30\x01\xaa\x00\x01", "an OBU without its size"),  # a frame OBU, no size field
    (b"\x02\x01\x00\xb2\x01\xaa\x00\x01", "forbidden bit"),
    (b"\x02\x01\x00\x0a\x01\xaa", "no frame OBU"),  # a sequence header and nothing after
    (b"\x02\x01\x00\x32\x05\xaa\x00\x01", "past the payload's end"),
    (b"\x02\x01\x00\x32" + b"\x80" * 8 + b"\x00", "over 8 bytes"),
    (b"\x03\x01\x00" + FRAME + b"\x03\x07\x01", "3 token frames of 2"),
    (b"\x03\x01\x00" + FRAME + b"\x01\x03\x01", "2 token frame bits, 1 token frames announced"),
    (b"\x03\x01\x00" + FRAME + b"\x01", "truncated frame modes"),
    (b"\x03\x01\x00" + FRAME + b"\x00", "no tokens"),
])
def test_malformed_version_7_payloads_are_refused(payload, message):
    with pytest.raises(BitstreamError, match=message):
        Av1ReferencesPayload.from_bytes(payload, compact=True)


def test_a_packet_that_does_not_end_with_its_frame_obu_keeps_the_old_layout():
    odd = Av1ReferencesPayload(1, ((0, FRAME + b"\x00"),), (), b"\x01")
    with pytest.raises(ValueError, match="needs its length"):
        odd.to_bytes()
    assert Av1ReferencesPayload.from_bytes(odd.to_bytes(compact=False)) == odd


# -- the pipeline -----------------------------------------------------------------------------------
def test_files_decode_exactly_what_the_encoder_showed(tiny_weights, synthetic_video):
    model = load_weights(tiny_weights)
    frames = model_frames(synthetic_video, model.cfg.resolution)
    encoder = Encoder(model, AV1)
    encoded = [encoder.encode(x) for x in frames]
    encoder.close()
    kinds = [e.chunk.type for e in encoded]
    assert [i for i, k in enumerate(kinds) if k == ChunkType.AV1_REFERENCES] == [0, 4, 8]
    chunks = pack_token_runs(model, [e.chunk for e in encoded])
    assert [c.type for c in chunks] == [ChunkType.AV1_REFERENCES] and chunks[0].frames == len(frames)
    _, parsed = read_stream(stream_bytes(model, AV1, chunks))
    decoder = Decoder(load_weights(tiny_weights), (model.cfg.resolution,) * 2, AV1.bank_size)
    decoded = [x for c in parsed for x in decoder.decode_frames(c)]
    assert len(decoded) == len(frames)
    for e, x in zip(encoded, decoded):
        assert torch.equal(e.x_hat, x)


def test_frames_between_references_never_show_a_worse_synthesis(tiny_weights, synthetic_video):
    """With no bits weighed (lambda 0), a frame is a token frame only where its synthesis is closer
    to the frame than the held picture by the synthesis margin, and a repeat otherwise: a wider
    margin, fewer token frames."""
    model = load_weights(tiny_weights)
    frames = model_frames(synthetic_video, model.cfg.resolution)
    token_frames = []
    for margin in (1.0, 1.25, 4.0):
        settings = EncoderSettings(keyframe_codec="av1", reference_interval=6, av1_crf=50, lmbda=0.0,
                                   synthesis_margin=margin)
        encoder = Encoder(model, settings)
        shown = 0
        for x in frames:
            picture = encoder.state.picture
            out = encoder.encode(x)
            if out.chunk.type == ChunkType.FRAME:
                assert margin * (out.x_hat - x).square().mean() < (picture - x).square().mean()
                shown += 1
        encoder.close()
        token_frames.append(shown)
    assert token_frames[0] > 0 and token_frames == sorted(token_frames, reverse=True)
    with pytest.raises(ValueError, match="synthesis margin"):
        EncoderSettings(synthesis_margin=0.0)


def test_a_frame_its_held_picture_matches_is_held_without_a_synthesis(tiny_weights, synthetic_video, monkeypatch):
    """The closed loop skips the synthesis where the held picture is within 30 dB of the frame
    (holding always won there, measured), and still synthesizes where it is not."""
    model = load_weights(tiny_weights)
    x = model_frames(synthetic_video, model.cfg.resolution, 1)[0]
    calls = []
    synthesize = model.synthesize
    monkeypatch.setattr(model, "synthesize", lambda *a: calls.append(1) or synthesize(*a))
    encoder = Encoder(model, EncoderSettings(keyframe_codec="av1", reference_interval=10, av1_crf=5))
    encoder.encode(x)
    assert (encoder.state.picture - x).square().mean() < 1e-3  # the reference is that close
    assert [encoder.encode(x).chunk.type for _ in range(3)] == [ChunkType.REPEAT] * 3 and not calls
    encoder.encode(torch.rand_like(x))
    encoder.close()
    assert calls == [1]


def test_synthesis_gate_skips_where_holding_is_known_to_win():
    gate = SynthesisGate(probe_interval=0)  # no budget: the rules alone
    gate.new_reference()
    gate.next_frame()
    assert not gate.worth_synthesizing(5e-4)  # held picture within 30 dB
    assert gate.worth_synthesizing(4e-3)
    gate.synthesized(6e-3, won=False)  # lost: worth asking again only once holding is nearly as bad
    gate.next_frame()
    assert not gate.worth_synthesizing(4e-3) and gate.worth_synthesizing(5e-3)
    gate.synthesized(4e-3, won=True)
    gate.next_frame()
    assert gate.worth_synthesizing(2e-3)
    gate.synthesized(6e-3, won=False)
    gate.new_reference()  # a new reference, a new synthesis to expect
    gate.next_frame()
    assert gate.worth_synthesizing(2e-3)


def test_synthesis_gate_probes_within_its_budget_and_follows_wins():
    gate = SynthesisGate()
    asked = []
    for frame in range(100):
        if frame % 10 == 0:
            gate.new_reference()
        gate.next_frame()
        if gate.worth_synthesizing(4e-3):
            asked.append(frame)
            gate.synthesized(8e-3, won=False)  # every synthesis loses, by far
    # one probe per probe interval, none on a reference's first frame, unless holding is no option
    assert len(asked) <= 100 // gate.probe_interval + 1
    assert all(b - a >= gate.probe_interval for a, b in zip(asked, asked[1:]))
    assert asked and all(f % 10 != 0 for f in asked)
    gate.new_reference(), gate.next_frame()
    assert not gate.worth_synthesizing(4e-3) and gate.worth_synthesizing(float("inf"))
    gate.next_frame()
    gate.since_probe = gate.probe_interval
    assert gate.worth_synthesizing(4e-3)
    gate.synthesized(1e-3, won=True)  # a win: the next frames are continuations, free of the budget
    for _ in range(5):
        gate.next_frame()
        assert gate.worth_synthesizing(4e-3)
        gate.synthesized(1e-3, won=True)
    gate.new_reference(), gate.next_frame()  # ... the first frame after a new reference too
    assert gate.worth_synthesizing(4e-3)
    gate.synthesized(8e-3, won=False)
    gate.new_reference(), gate.next_frame()  # a loss before it: the first frame after holds
    assert not gate.worth_synthesizing(4e-3)


# Frames 1-11 after references at 0, 3, 6 and 9: H a repeat, T a token frame. References 0 and 6 are
# followed by repeats alone, so format 6 never sends their tokens.
PATTERN = "RHHRTHRHHRTT"


def encode_pattern(model, frames, settings: EncoderSettings, lazy: bool = True) -> list:
    """Frames coded with the repeats and token frames of PATTERN: a prohibitive lambda makes a frame
    repeat, no holding makes it a token frame."""
    encoder = Encoder(model, settings, lazy_reference_tokens=lazy)
    encoded = []
    for kind, x in zip(PATTERN, frames):
        encoder.settings = replace(settings, lmbda=1e9) if kind == "H" else replace(settings, repeat_keyframe=False)
        encoded.append(encoder.encode(x))
    encoder.close()
    kinds = "".join({ChunkType.AV1_REFERENCES: "R", ChunkType.FRAME: "T", ChunkType.REPEAT: "H"}[e.chunk.type]
                    for e in encoded)
    assert kinds == PATTERN
    return encoded


def decode_all(tiny_weights, model, settings, chunks, version=None) -> list:
    header, parsed = read_stream(stream_bytes(model, settings, chunks, version))
    decoder = Decoder(load_weights(tiny_weights), (model.cfg.resolution,) * 2, settings.bank_size, header.version)
    return [x for c in parsed for x in decoder.decode_frames(c)]


@pytest.mark.parametrize("bank_size", [1, 2])
def test_a_reference_sends_its_token_only_where_a_token_frame_follows(tiny_weights, synthetic_video, bank_size):
    """Format 6: the tokens of references followed by repeats alone are never sent, and the stream
    still decodes exactly, with a bank of 2 too (the encoder forgets such a reference, which no
    decoder holds), packed or one chunk a frame."""
    model = load_weights(tiny_weights)
    settings = replace(AV1, reference_interval=3, bank_size=bank_size)
    encoded = encode_pattern(model, model_frames(synthetic_video, model.cfg.resolution), settings)
    chunks = pack_token_runs(model, [e.chunk for e in encoded])
    payload = Av1ReferencesPayload.from_bytes(chunks[0].payload, lazy=True, compact=True)
    assert payload.used_references() == [1, 3] and payload.token_count(lazy=True) == 2 + 3
    for parts in (chunks, [e.chunk for e in encoded]):
        decoded = decode_all(tiny_weights, model, settings, parts)
        assert all(torch.equal(e.x_hat, x) for e, x in zip(encoded, decoded, strict=True))
    eager = encode_pattern(model, model_frames(synthetic_video, model.cfg.resolution), settings, lazy=False)
    eager_chunks = pack_token_runs(model, [e.chunk for e in eager], version=5)
    assert len(chunks[0].payload) < len(eager_chunks[0].payload)


def test_the_encoder_makes_a_bank_entry_only_for_a_reference_it_synthesizes_from(tiny_weights, synthetic_video):
    """E_F and IMF_D run on a reference at its first synthesis: references followed by holds that
    the gate decides without synthesizing (PATTERN's 0 and 6) cost neither encoder nor decoder."""
    model = load_weights(tiny_weights)
    settings = replace(AV1, reference_interval=3)
    made = []
    reference = model.reference
    model.reference = lambda *a: made.append(1) or reference(*a)
    encoder = Encoder(model, settings)
    encoded = []
    for kind, x in zip(PATTERN, model_frames(synthetic_video, model.cfg.resolution)):
        encoder.gate.worth_synthesizing = lambda hold_mse: kind != "H"
        encoder.settings = replace(settings, repeat_keyframe=kind == "H")
        encoded.append(encoder.encode(x))
    encoder.close()
    assert "".join(e.chunk.type.name[0] for e in encoded) == "ARRAFRARRAFF" and len(made) == 2
    decoded = decode_all(tiny_weights, model, settings, pack_token_runs(model, [e.chunk for e in encoded]))
    assert all(torch.equal(e.x_hat, x) for e, x in zip(encoded, decoded, strict=True))


def test_format_5_streams_with_every_references_token_still_decode(tiny_weights, synthetic_video):
    model = load_weights(tiny_weights)
    settings = replace(AV1, reference_interval=3, bank_size=2)
    encoded = encode_pattern(model, model_frames(synthetic_video, model.cfg.resolution), settings, lazy=False)
    chunks = pack_token_runs(model, [e.chunk for e in encoded], version=5)
    assert Av1ReferencesPayload.from_bytes(chunks[0].payload).token_count(lazy=False) == 4 + 3
    decoded = decode_all(tiny_weights, model, settings, chunks, version=5)
    assert all(torch.equal(e.x_hat, x) for e, x in zip(encoded, decoded, strict=True))


def test_format_6_streams_with_packet_lengths_still_decode_and_7_is_smaller(tiny_weights, synthetic_video):
    """Version 7 leaves out each packet's length and, without token frames, the mode bits; the same
    frames packed as version 6 decode the same, and a version 6 reader's layout is refused as 7's."""
    model = load_weights(tiny_weights)
    settings = replace(AV1, reference_interval=3)
    encoded = encode_pattern(model, model_frames(synthetic_video, model.cfg.resolution), settings)
    six, seven = (pack_token_runs(model, [e.chunk for e in encoded], version=v) for v in (6, 7))
    packets = Av1ReferencesPayload.from_bytes(seven[0].payload, lazy=True, compact=True).references
    assert len(six[0].payload) - len(seven[0].payload) == sum(len(_varint(len(p))) for _, p in packets) - 1
    for version, chunks in ((6, six), (7, seven)):
        decoded = decode_all(tiny_weights, model, settings, chunks, version=version)
        assert all(torch.equal(e.x_hat, x) for e, x in zip(encoded, decoded, strict=True))
    with pytest.raises(BitstreamError, match="chunk 0"):
        read_stream(stream_bytes(model, settings, six, version=7))


def test_a_reference_token_due_across_chunks(tiny_weights, synthetic_video, monkeypatch):
    """Chunks split between a reference and its first token frame (a file's chunks hold at most
    MAX_RUN_FRAMES frames, here 4): the token run after it starts with the reference's token."""
    monkeypatch.setattr("codec.pipeline.MAX_RUN_FRAMES", 4)
    model = load_weights(tiny_weights)
    settings = replace(AV1, reference_interval=3)
    encoded = encode_pattern(model, model_frames(synthetic_video, model.cfg.resolution), settings)
    chunks = pack_token_runs(model, [e.chunk for e in encoded])
    assert ChunkType.TOKEN_RUN in [c.type for c in chunks]
    decoded = decode_all(tiny_weights, model, settings, chunks)
    assert all(torch.equal(e.x_hat, x) for e, x in zip(encoded, decoded, strict=True))


def test_per_frame_chunks_decode_one_by_one(tiny_weights, synthetic_video):
    """The streaming form: each frame its own chunk, decoded as it arrives."""
    model = load_weights(tiny_weights)
    encoder = Encoder(model, AV1)
    encoded = [encoder.encode(x) for x in model_frames(synthetic_video, model.cfg.resolution)]
    encoder.close()
    decoder = Decoder(load_weights(tiny_weights), (model.cfg.resolution,) * 2, AV1.bank_size)
    for e in encoded:
        assert torch.equal(decoder.decode(e.chunk), e.x_hat)


def test_learned_keyframes_and_av1_references_share_one_token_chain(tiny_weights, synthetic_video):
    """A stream may switch codecs at a reference (AV1 references after learned keyframes):
    each reference's token continues the chain, and the whole decodes exactly."""
    model = load_weights(tiny_weights)
    frames = model_frames(synthetic_video, model.cfg.resolution)
    learned = Encoder(model, EncoderSettings(quality_floor=0.0, max_kbps=0.0))
    av1 = Encoder(model, AV1)
    first = [learned.encode(x) for x in frames[:5]]
    av1.state = learned.state  # the AV1 encoder carries on from the learned one's bank and chain
    second = [av1.encode(x) for x in frames[5:]]
    av1.close()
    chunks = pack_token_runs(model, [e.chunk for e in first + second])
    decoder = Decoder(load_weights(tiny_weights), (model.cfg.resolution,) * 2, AV1.bank_size)
    decoded = [x for c in chunks for x in decoder.decode_frames(c)]
    assert all(torch.equal(e.x_hat, x) for e, x in zip(first + second, decoded))


def test_a_damaged_packet_is_one_error_naming_its_chunk(tiny_weights, synthetic_video, tmp_path):
    model = load_weights(tiny_weights)
    stream = tmp_path / "s.imfc"
    encode_file(synthetic_video, stream, model, AV1, progress=False)
    header, chunks = read_bitstream(stream, model)
    p = Av1ReferencesPayload.from_bytes(chunks[0].payload, lazy=True, compact=True)
    broken = ((0, obu(OBU_FRAME, b"\xff" * len(p.references[0][1]))),) + p.references[1:]  # parses, does not decode
    bad = Av1ReferencesPayload(p.frames, broken, p.modes, p.tokens)
    from codec.files import decoded_frames
    from entropy.bitstream import Chunk
    decoder = Decoder(model, (header.height, header.width), header.bank_size, header.version)
    with pytest.raises(BitstreamError, match="chunk 0 at byte 40: AV1 reference packet"):
        list(decoded_frames(decoder, Chunk(ChunkType.AV1_REFERENCES, bad.to_bytes()), "chunk 0 at byte 40"))


def test_a_files_last_references_leave_room_for_a_costly_one():
    """Near a file's end a reference is due only if the frames left could repay SURPRISE times its
    expected cost; a stream without an end keeps its pace to the end."""
    fps, kbps = 25, 3.0
    call, file = RateControl(kbps, fps), RateControl(kbps, fps, frames=100)
    cost = 1200  # bits: a reference every 10 frames, whose reserve is 20 frames at the end
    for rate in (call, file):
        rate.pay(cost, reference=True)
    due, level, last = {}, {}, {"call": -1, "file": -1}
    for frame in range(100):
        for name, rate in (("call", call), ("file", file)):
            rate.next_frame()
            if rate.affords_reference(frame - last[name]):
                last[name] = frame
                due.setdefault(name, []).append(frame)
                rate.pay(cost, reference=True)
                level[name] = rate.level
    last = due["file"][-1]
    assert due["file"] == [f for f in due["call"] if f <= last]  # alike until the file's end draws near
    frames_left = 100 - 1 - last
    room = level["file"] + file.fill * frames_left  # what the rest of the file could still repay
    assert room >= (RateControl.SURPRISE - 1) * file.reference_bits
    assert due["call"][-1] > last  # the call kept sending where the file stopped


def test_rate_target_is_kept_on_a_moving_clip(tiny_weights):
    """--kbps: over 4 s the whole stream, header included, stays within 10% of the target."""
    model = load_weights(tiny_weights)
    fps, kbps = 25, 12.0
    clip = moving_square_clip(100, 64, seed=3)
    settings = EncoderSettings(keyframe_codec="av1", kbps=kbps)
    encoder = Encoder(model, settings, fps)
    encoded = [encoder.encode(to_tensor(f)) for f in clip]
    encoder.close()
    data = stream_bytes(model, settings, pack_token_runs(model, [e.chunk for e in encoded]))
    assert 8 * len(data) <= 1.1 * kbps * 1000 * len(clip) / fps
    assert sum(e.chunk.type == ChunkType.AV1_REFERENCES for e in encoded) > 1  # it spends, not just holds


@pytest.mark.parametrize("weights, version", [("tiny_weights", 7), ("restoring_weights", 8)])
def test_cross_process_decode_is_bit_exact(request, weights, version, synthetic_video, tmp_path):
    """Encode here with 2 threads; decode with the CLI in another process with 1 thread (format 8:
    the references shown restored, as the encoder showed them)."""
    weights = request.getfixturevalue(weights)
    settings = replace(AV1, restore=True)
    torch.set_num_threads(2)
    try:
        model = load_weights(weights)
        encoder = Encoder(model, settings)
        recon = [to_uint8(encoder.encode(x).x_hat) for x in model_frames(synthetic_video, model.cfg.resolution)]
        encoder.close()
        stream = tmp_path / "s.imfc"
        encode_file(synthetic_video, stream, model, settings, progress=False)
    finally:
        torch.set_num_threads(1)
    assert read_bitstream(stream)[0].version == version
    out = tmp_path / "frames"
    r = subprocess.run([sys.executable, "-m", "tools.cli", "decode", str(stream), "-o", str(out), "--weights",
                        str(weights), "--threads", "1", "-q"], capture_output=True, text=True,
                       cwd=Path(__file__).parents[1], timeout=600)
    assert r.returncode == 0, r.stderr
    decoded = [np.array(Image.open(p)) for p in sorted(out.glob("*.png"))]
    assert len(decoded) == len(recon)
    assert all(np.array_equal(a, b) for a, b in zip(decoded, recon))


def test_references_come_at_an_even_pace():
    """References of a steady cost come every cost / fill frames, whatever the bucket held."""
    fps, kbps = 25, 3.0  # 120 bits a frame
    rate = RateControl(kbps, fps)
    rate.level = rate.capacity  # a full bucket spreads over the next window, it is not spent at once
    due = [-1]
    for frame in range(200):
        rate.next_frame()
        if rate.affords_reference(frame - due[-1]):
            due.append(frame)
            rate.pay(480, reference=True)
    gaps = np.diff(due[1:])
    assert gaps[0] < 4 and set(gaps[-20:]) == {4}  # the full bucket first, then its running cost / fill


def test_a_files_overhead_is_paid_with_its_first_intra_frame():
    rate = RateControl(3.0, 25, frames=100)
    assert rate.level == 0 and rate.horizon_frames == 95
    rate.pay(4000, reference=True, intra=True)
    assert rate.debts == [[(4000 + RateControl.STREAM_OVERHEAD_BITS) / 95, 95]] and rate.overhead == 0
    rate.pay(4000, reference=True, intra=True)  # a later intra frame pays only itself
    assert rate.debts[-1] == [4000 / 95, 95]


def test_no_reference_where_holding_is_as_good(tiny_weights):
    """A still picture: the first reference is as close as any later one would be, so under a rate
    target no other follows, unless the reference gain is 0 (whenever the rate affords one)."""
    model = load_weights(tiny_weights)
    still = np.repeat(moving_square_clip(1, 64, seed=5), 40, axis=0)
    counts = {}
    for gain in (EncoderSettings.reference_gain, 0.0):
        encoder = Encoder(model, EncoderSettings(keyframe_codec="av1", kbps=8.0, reference_gain=gain), 25, len(still))
        chunks = [encoder.encode(to_tensor(f)).chunk for f in still]
        encoder.close()
        counts[gain] = sum(c.type == ChunkType.AV1_REFERENCES for c in chunks)
    assert counts[EncoderSettings.reference_gain] == 1 and counts[0.0] > 1
    with pytest.raises(ValueError, match="reference gain"):
        EncoderSettings(keyframe_codec="av1", reference_gain=-1)
