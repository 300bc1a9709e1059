import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from codec.files import decode_file, encode_file, read_bitstream
from codec.pipeline import Decoder, Encoder, EncoderSettings, pack_token_runs
from codec.video_io import (
    center_box,
    crop_resize,
    probe,
    read_frames,
    to_tensor,
    to_uint8,
)
from codec.nn.weights import load_weights
from codec.nn.keyframe_codec import KEYFRAME_STEPS
from entropy.bitstream import BitstreamError, Chunk, ChunkType, KeyframePayload, RepeatPayload, write_stream
from entropy.coding import encode_symbols

ALWAYS_TOKENS = EncoderSettings(quality_floor=0.0, max_keyframe_interval=5, bank_size=2, repeat_keyframe=False)


def model_frames(path: Path, size: int, limit: int | None = None):
    info = probe(path)
    box = center_box(info.width, info.height)
    return [to_tensor(crop_resize(f, box, size)) for f in read_frames(path, limit)]


@settings(deadline=None, max_examples=60)
@given(st.lists(st.lists(st.floats(-40, 40), min_size=8, max_size=8), min_size=1, max_size=6))
def test_token_chain_round_trip(tiny_weights, tokens):
    """Any token chain, in range or far out in the tails of the priors, decodes to exactly what the
    encoder reconstructed, and within half a quantization step of the input."""
    model = load_weights(tiny_weights)
    u_prev = None
    for values in tokens:
        u = torch.tensor([values])
        data, u_hat = model.compress_token(u, u_prev)
        assert torch.equal(model.decompress_token(data, u_prev), u_hat)
        # half a step of rounding, plus float32 error in adding the tables' median offsets to values up to ~40
        assert (u_hat - u).abs().max() <= 0.5 + 1e-4
        u_prev = u_hat


def test_in_process_decode_equals_closed_loop(tiny_weights, synthetic_video):
    model = load_weights(tiny_weights)
    frames = model_frames(synthetic_video, model.cfg.resolution)
    encoder = Encoder(model, ALWAYS_TOKENS)
    encoded = [encoder.encode(x) for x in frames]
    kinds = [e.chunk.type for e in encoded]
    assert [i for i, k in enumerate(kinds) if k == ChunkType.KEYFRAME] == [0, 6]  # interval 5: 5 token frames each
    decoder = Decoder(load_weights(tiny_weights), (model.cfg.resolution,) * 2, ALWAYS_TOKENS.bank_size)
    for e in encoded:
        assert torch.equal(decoder.decode(e.chunk), e.x_hat)


def test_token_runs_hold_the_same_frames_in_fewer_bytes(tiny_weights, synthetic_video):
    model = load_weights(tiny_weights)
    encoder = Encoder(model, ALWAYS_TOKENS)
    encoded = [encoder.encode(x) for x in model_frames(synthetic_video, model.cfg.resolution)]
    single = [e.chunk for e in encoded]
    packed = pack_token_runs(model, single)
    assert [c.type for c in packed] == [ChunkType.KEYFRAME, ChunkType.TOKEN_RUN] * 2
    assert [c.frames for c in packed] == [1, 5, 1, 5]
    token_bytes = [sum(len(c.to_bytes()) for c in chunks if c.type != ChunkType.KEYFRAME) for chunks in (single, packed)]
    assert token_bytes[1] < token_bytes[0] - 10 * 6  # at least the 6 bytes of chunk framing per frame saved
    decoder = Decoder(load_weights(tiny_weights), (model.cfg.resolution,) * 2, ALWAYS_TOKENS.bank_size)
    decoded = [x for c in packed for x in decoder.decode_frames(c)]
    assert all(torch.equal(a, e.x_hat) for a, e in zip(decoded, encoded, strict=True))



def off_synthesis(path: Path):
    """The model at ``path`` with every synthesized frame 0.5 too bright: a still frame is then
    plainly nearer the keyframe's picture (an untrained model's synthesis is that picture, or all
    but: nothing to choose between)."""
    model = load_weights(path)
    with torch.no_grad():
        model.frame_decoder.to_full.bias += 0.5
    return model


def test_frames_like_the_keyframe_repeat_its_picture(tiny_weights, synthetic_video):
    """Frames that the keyframe's picture matches better than a synthesis go out as repeats (here all
    of them, still or moving): one 7-byte chunk per run once packed, the token chain left where it was, every frame decoded to
    exactly what the encoder showed. Turned off, no frame repeats."""
    model = off_synthesis(tiny_weights)
    frames = model_frames(synthetic_video, model.cfg.resolution)
    clip = [frames[0]] * 3 + frames[1:4]
    settings = EncoderSettings(quality_floor=0.0)
    encoder = Encoder(model, settings)
    encoded = [encoder.encode(x) for x in clip]
    assert [e.chunk.type for e in encoded[:3]] == [ChunkType.KEYFRAME] + [ChunkType.REPEAT] * 2
    assert all(e.x_hat is encoded[0].x_hat for e in encoded[1:3])
    packed = pack_token_runs(model, [e.chunk for e in encoded])
    assert [(c.type, c.frames) for c in packed] == [(ChunkType.KEYFRAME, 1), (ChunkType.REPEAT, 5)]
    assert len(packed[1].to_bytes()) == 7
    decoder = Decoder(off_synthesis(tiny_weights), (model.cfg.resolution,) * 2, settings.bank_size)
    decoded = [x for c in packed for x in decoder.decode_frames(c)]
    assert all(torch.equal(a, e.x_hat) for a, e in zip(decoded, encoded, strict=True))
    off = Encoder(model, replace(settings, repeat_keyframe=False))
    assert all(off.encode(x).chunk.type != ChunkType.REPEAT for x in clip)


def test_repeats_leave_the_token_chain_alone(tiny_weights, synthetic_video):
    """A repeat between two token frames: the second token's delta is still taken from the first."""
    model = load_weights(tiny_weights)
    encoder = Encoder(model, ALWAYS_TOKENS)
    encoded = [encoder.encode(x) for x in model_frames(synthetic_video, model.cfg.resolution)[:4]]
    repeat = Chunk(ChunkType.REPEAT, RepeatPayload(1).to_bytes())
    chunks = [e.chunk for e in encoded[:2]] + [repeat] + [e.chunk for e in encoded[2:]]
    expected = [e.x_hat for e in encoded[:2]] + [encoded[0].x_hat] + [e.x_hat for e in encoded[2:]]
    decoder = Decoder(load_weights(tiny_weights), (model.cfg.resolution,) * 2, ALWAYS_TOKENS.bank_size)
    decoded = [x for c in pack_token_runs(model, chunks) for x in decoder.decode_frames(c)]
    assert all(torch.equal(a, b) for a, b in zip(decoded, expected, strict=True))


def without_step(chunk: Chunk) -> Chunk:
    """A keyframe chunk as formats 1-3 wrote it."""
    if chunk.type != ChunkType.KEYFRAME:
        return chunk
    return Chunk(chunk.type, KeyframePayload.from_bytes(chunk.payload).to_bytes(with_step=False))


def test_version_1_streams_still_decode(tiny_weights, synthetic_video, tmp_path):
    """One chunk per token frame and format version 1, as imfc wrote before token runs."""
    model = load_weights(tiny_weights)
    settings = replace(ALWAYS_TOKENS, keyframe_step=1.0)  # the only step before version 4
    new = tmp_path / "new.imfc"
    encode_file(synthetic_video, new, model, settings, progress=False)
    header, _ = read_bitstream(new, model)
    encoder = Encoder(model, settings)
    chunks = [without_step(encoder.encode(x).chunk) for x in model_frames(synthetic_video, model.cfg.resolution)]
    old = tmp_path / "old.imfc"
    old.write_bytes(write_stream(replace(header, version=1), chunks))
    a, b = tmp_path / "a", tmp_path / "b"
    decode_file(new, a, model, progress=False)
    decode_file(old, b, model, progress=False)
    pngs = sorted(a.glob("*.png"))
    assert len(pngs) == 12 and all(np.array_equal(np.array(Image.open(p)), np.array(Image.open(b / p.name))) for p in pngs)


def test_keyframe_steps_decode_exactly_and_coarser_costs_less(tiny_weights, synthetic_video):
    """Every quantization step codes to bytes that decode to exactly the encoder's picture; coarser
    steps cost fewer bytes and give another picture; step 0 is the EntropyBottleneck's
    own coding, so streams written before steps existed decode the same."""
    model = load_weights(tiny_weights)
    codec, x = model.keyframe_codec, model_frames(synthetic_video, model.cfg.resolution)[0]
    with torch.no_grad():
        codec.g_a[-1].weight.mul_(20)  # an untrained latent is near 0: give every step something to round
        sizes, pictures = [], []
        for i, step in enumerate(KEYFRAME_STEPS):
            data, x_hat = codec.compress(x, i)
            assert torch.equal(codec.decompress(data, x.shape[-2:], i), x_hat)
            # forward() in eval rounds like compress() and runs the same synthesis; 1e-5 (400x below an
            # 8-bit level) allows only float32 reordering between the batched and single paths
            assert torch.allclose(codec(x, torch.tensor([step])).x_hat.clamp(0, 1), x_hat, atol=1e-5)
            sizes.append(len(data))
            pictures.append(x_hat)
        assert sizes == sorted(sizes, reverse=True) and sizes[-1] < 0.8 * sizes[0]
        assert not torch.equal(pictures[-1], pictures[0])
        assert codec.compress(x, 0)[0] == encode_symbols(codec.entropy_bottleneck, codec.g_a(x * 2 - 1))


def test_streams_with_coarse_keyframes_decode_exactly(tiny_weights, synthetic_video, tmp_path):
    model = load_weights(tiny_weights)
    settings = replace(ALWAYS_TOKENS, keyframe_step=2.5)
    encoder = Encoder(model, settings)
    encoded = [encoder.encode(x) for x in model_frames(synthetic_video, model.cfg.resolution)]
    keyframes = [KeyframePayload.from_bytes(e.chunk.payload) for e in encoded if e.chunk.type == ChunkType.KEYFRAME]
    assert [k.step for k in keyframes] == [KEYFRAME_STEPS.index(2.5)] * 2
    decoder = Decoder(load_weights(tiny_weights), (model.cfg.resolution,) * 2, settings.bank_size)
    assert all(torch.equal(decoder.decode(e.chunk), e.x_hat) for e in encoded)
    stream = tmp_path / "s.imfc"
    encode_file(synthetic_video, stream, model, settings, progress=False)
    assert read_bitstream(stream, model)[0].version == 4
    with pytest.raises(ValueError, match="keyframe step"):
        EncoderSettings(keyframe_step=1.1)


def test_unknown_keyframe_step_is_refused(tiny_weights, synthetic_video):
    model = load_weights(tiny_weights)
    chunk = Encoder(model, ALWAYS_TOKENS).encode(model_frames(synthetic_video, model.cfg.resolution)[0]).chunk
    bad = replace(KeyframePayload.from_bytes(chunk.payload), step=len(KEYFRAME_STEPS))
    decoder = Decoder(model, (model.cfg.resolution,) * 2, ALWAYS_TOKENS.bank_size)
    with pytest.raises(BitstreamError, match="step"):
        decoder.decode(Chunk(ChunkType.KEYFRAME, bad.to_bytes()))


def test_quality_floor_forces_keyframes(tiny_weights, synthetic_video):
    model = load_weights(tiny_weights)
    encoder = Encoder(model, EncoderSettings(quality_floor=99.0))
    kinds = [encoder.encode(x).chunk.type for x in model_frames(synthetic_video, model.cfg.resolution)]
    assert all(k == ChunkType.KEYFRAME for k in kinds)


def test_rate_cap_holds_back_the_floors_keyframes(tiny_weights, synthetic_video):
    """With a floor that every token frame misses, an uncapped encoder sends only keyframes; a cap
    lets through only the keyframes its bucket can pay for, and the stream stays within the cap
    (plus the bucket's 2 s) while a decoder still reproduces every frame."""
    model = load_weights(tiny_weights)
    frames = model_frames(synthetic_video, model.cfg.resolution)
    fps = 5.0  # the 12 frames outlast the 2 s bucket
    keyframe_bits = 8 * len(Encoder(model, EncoderSettings(quality_floor=99.0)).encode(frames[0]).chunk.payload)
    kbps = keyframe_bits * fps / 4 / 1000  # pays for a keyframe every 4 frames; the bucket holds 2.5
    settings = EncoderSettings(quality_floor=99.0, max_kbps=kbps)
    encoded = list(map(Encoder(model, settings, fps).encode, frames))
    kinds = [e.chunk.type for e in encoded]
    assert kinds[0] == ChunkType.KEYFRAME and 1 < kinds.count(ChunkType.KEYFRAME) < len(frames) / 2
    spent = sum(8 * len(e.chunk.payload) for e in encoded)
    assert spent <= 1000 * kbps * (len(frames) / fps + 2.0)
    decoder = Decoder(load_weights(tiny_weights), (model.cfg.resolution,) * 2, settings.bank_size)
    assert all(torch.equal(decoder.decode(e.chunk), e.x_hat) for e in encoded)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1], timeout=600)


def test_cross_process_decode_is_bit_exact(tiny_weights, synthetic_video, tmp_path):
    """Encode here with 2 threads; decode in another process with 1 thread; compare every pixel."""
    torch.set_num_threads(2)
    model = load_weights(tiny_weights)
    encoder = Encoder(model, ALWAYS_TOKENS)
    recon = [to_uint8(encoder.encode(x).x_hat) for x in model_frames(synthetic_video, model.cfg.resolution)]
    stream = tmp_path / "s.imfc"
    encode_file(synthetic_video, stream, model, ALWAYS_TOKENS, progress=False)
    out = tmp_path / "frames"
    r = run_cli("decode", str(stream), "-o", str(out), "--weights", str(tiny_weights), "--threads", "1", "-q")
    assert r.returncode == 0, r.stderr
    decoded = [np.array(Image.open(p)) for p in sorted(out.glob("*.png"))]
    assert len(decoded) == len(recon)
    for a, b in zip(decoded, recon):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".y4m", ""])
def test_file_round_trip(tiny_weights, synthetic_video, tmp_path, suffix):
    model = load_weights(tiny_weights)
    stream = tmp_path / "s.imfc"
    s = encode_file(synthetic_video, stream, model, ALWAYS_TOKENS, progress=False)
    assert s.frames == 12 and s.bytes == stream.stat().st_size and s.kbps > 0
    header, chunks = read_bitstream(stream, model)
    assert (header.source_width, header.source_height, header.crop_size) == (80, 64, 64)
    out = tmp_path / f"out{suffix}"
    d = decode_file(stream, out, model, progress=False)
    assert d.frames == 12
    if suffix:
        info = probe(out)
        assert (info.width, info.height) == (64, 64) and info.fps == 25
        assert len(list(read_frames(out))) == 12
    else:
        assert len(list(out.glob("*.png"))) == 12
    assert not list(tmp_path.glob(".*part*"))


def test_upscale_to_crop_size(tiny_weights, synthetic_video, tmp_path):
    model = load_weights(tiny_weights)
    stream = tmp_path / "s.imfc"
    encode_file(synthetic_video, stream, model, ALWAYS_TOKENS, max_frames=3, progress=False)
    out = tmp_path / "up"
    decode_file(stream, out, model, upscale=True, progress=False)
    assert np.array(Image.open(sorted(out.glob("*.png"))[0])).shape == (64, 64, 3)  # crop 64 == model size here


@pytest.mark.slow
def test_real_clip_round_trip(tiny_weights, shared_clip, tmp_path):
    model = load_weights(tiny_weights)
    stream = tmp_path / "clip.imfc"
    s = encode_file(shared_clip, stream, model, ALWAYS_TOKENS, max_frames=20, progress=False)
    assert s.frames == 20
    r = run_cli("decode", str(stream), "-o", str(tmp_path / "clip.mp4"), "--weights", str(tiny_weights), "-q")
    assert r.returncode == 0, r.stderr
    assert len(list(read_frames(tmp_path / "clip.mp4"))) == 20
