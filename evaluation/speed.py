"""Speed of imfc and of libx264 on the same frames: frames/s, per-frame latency, memory.

Latency is wall clock per frame, one frame at a time as in a call (no batching, no lookahead):
for imfc, one ``Encoder.encode`` / ``Decoder.decode`` call (references, learned or AV1,
included); for x264, one frame sent to the encoder and its packets received (zerolatency: a
frame's packet comes out with it), and one packet decoded. Keyframes are included in imfc's numbers (they cost more than token frames).

Beside wall clock, each run records the process's CPU time (all its threads) per frame: on a
machine shared with other work, wall clock stretches with the contention, CPU time much less.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np
import torch

from evaluation.anchors import Anchor, round_trip
from codec.files import stream_version
from codec.nn.model import IMFCodec
from codec.pipeline import Decoder, Encoder, EncoderSettings
from codec.video_io import to_tensor
from entropy.bitstream import ChunkType
from entropy.coding import bits_to_kbps


@dataclass(frozen=True)
class Speed:
    codec: str
    threads: int
    frames: int
    keyframes: int
    kbps: float  # payload bytes (imfc: chunks; x264: elementary stream), for context
    encode_fps: float
    decode_fps: float
    encode_p50_ms: float
    encode_p95_ms: float
    decode_p50_ms: float
    decode_p95_ms: float
    encode_cpu_ms: float  # mean process CPU time per frame, all threads
    decode_cpu_ms: float
    token_frames: int | None = None  # imfc: frames the decoder synthesized (the model's cost shows only there)
    token_decode_p95_ms: float | None = None  # imfc: decode latency of those frames alone


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _speed(codec: str, threads: int, keyframes: int, size: int, fps: Fraction, enc: list[float], dec: list[float],
           enc_cpu: float, dec_cpu: float) -> Speed:
    e, d = np.array(enc) * 1000, np.array(dec) * 1000
    return Speed(codec, threads, len(enc), keyframes, bits_to_kbps(8 * size, len(enc), float(fps)),
                 len(e) / (e.sum() / 1000), len(d) / (d.sum() / 1000), float(np.percentile(e, 50)),
                 float(np.percentile(e, 95)), float(np.percentile(d, 50)), float(np.percentile(d, 95)),
                 enc_cpu * 1000 / len(e), dec_cpu * 1000 / len(d))


def bench_imfc(model: IMFCodec, frames: np.ndarray, fps: Fraction, threads: int,
               settings: EncoderSettings = EncoderSettings(), warmup: int = 2) -> Speed:
    """Encode then decode (T, R, R, 3) uint8 frames with ``threads`` torch threads."""
    torch.set_num_threads(threads)
    x = [to_tensor(f) for f in frames]
    warm = Encoder(model, settings, float(fps), len(x))  # first calls pay for allocator and kernel setup
    for f in x[:warmup]:
        warm.encode(f)
    warm.close()
    encoder, chunks, enc = Encoder(model, settings, float(fps), len(x)), [], []
    cpu = time.process_time()
    for f in x:
        start = time.perf_counter()
        chunks.append(encoder.encode(f).chunk)
        enc.append(time.perf_counter() - start)
    enc_cpu = time.process_time() - cpu
    encoder.close()
    r = model.cfg.resolution
    decoder, dec = Decoder(model, (r, r), settings.bank_size, stream_version(chunks, encoder.restore)), []
    cpu = time.process_time()
    for c in chunks:
        start = time.perf_counter()
        decoder.decode(c)
        dec.append(time.perf_counter() - start)
    dec_cpu = time.process_time() - cpu
    keyframes = sum(c.type in (ChunkType.KEYFRAME, ChunkType.AV1_REFERENCES) for c in chunks)
    speed = _speed("imfc", threads, keyframes, sum(len(c.payload) for c in chunks), fps, enc, dec, enc_cpu, dec_cpu)
    token = [1000 * d for c, d in zip(chunks, dec) if c.type == ChunkType.FRAME]
    return replace(speed, token_frames=len(token), token_decode_p95_ms=float(np.percentile(token, 95)) if token else None)


def bench_synthesis(model: IMFCodec, frames: np.ndarray, threads: int, bank_size: int = 2,
                    repeats: int = 15) -> tuple[float, float]:
    """One token frame synthesized from a bank of references (the clip's frames 0, 6, 12...; its
    last where it is shorter), as a decoder shows it, alone: -> (p50, p95) ms over ``repeats``
    frames, after one that makes the bank ready."""
    torch.set_num_threads(threads)
    x = [to_tensor(f) for f in frames[:max(12, 6 * bank_size)]]
    with torch.no_grad():
        bank = [model.reference_from_picture(x[min(6 * i, len(x) - 1)]) for i in range(bank_size)]
        tokens = [model.token_symbols(f).round() for f in x]
        model.synthesize(tokens[-1], bank)
        times = []
        for i in range(repeats):
            start = time.perf_counter()
            model.synthesize(tokens[i % len(tokens)], bank)
            times.append(1000 * (time.perf_counter() - start))
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def bench_x264(frames: np.ndarray, fps: Fraction, threads: int, crf: int = 51) -> Speed:
    round_trip(Anchor.X264, list(frames[:2]), fps, crf, threads)  # warm-up
    result = round_trip(Anchor.X264, list(frames), fps, crf, threads)
    # the last decode call is the flush; it returns no frame of its own
    dec = result.decode_seconds[:-1]
    dec[-1] += result.decode_seconds[-1]
    return _speed("x264", threads, 1, result.bytes, fps, result.encode_seconds, dec,
                  result.encode_cpu_seconds, result.decode_cpu_seconds)
