"""Conventional codecs as anchors: the same frames through libx264, libx265 and SVT-AV1 via PyAV,
in the settings a low-delay video call would use.

Every anchor codes the frames in display order with no B-frames / no future references, one
keyframe at the start (keyframe interval longer than the clip, scene-cut detection off), 4:2:0,
8 bit, constant-quality rate control:

- libx264: preset medium, tune zerolatency (no lookahead, no frame threads), bf 0, CRF.
- libx265: preset medium, tune zerolatency (bframes 0, no lookahead), scenecut 0, CRF.
- SVT-AV1: preset 8 (``CALL_PRESET``, a call's real-time one; the reduced anchors may take
  another), pred-struct 1 (SVT-AV1's low-delay prediction structure: every frame refers only to
  past frames), scd 0; its CRF runs as constant QP in low delay (SVT reports "CQP").

Reduced anchors (`Reduced`, `reduced_round_trip`) are what a call application does when bits run
out: code every K-th frame and hold each decoded frame until the next (the stream at fps / K), or
code at a smaller size and upscale. Their bytes are counted over the whole clip's duration.

Bitrate counts every byte of the raw elementary stream (H.264/H.265 Annex B with in-band
parameter sets, AV1 OBUs with the sequence header), no container overhead: no global header is
requested, so nothing hides in extradata (``round_trip`` adds it anyway should an encoder set it).
"""

from __future__ import annotations

import enum
import os
import time
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from codec.av1_reference import CALL_PRESET, fixed_offset_params
from codec.video_io import Box, crop_resize


class Anchor(enum.Enum):
    X264 = "x264"
    X265 = "x265"
    SVTAV1 = "svtav1"


@dataclass(frozen=True)
class AnchorSpec:
    encoder: str  # FFmpeg encoder name
    decoder: str  # FFmpeg decoder name
    crf_range: tuple[int, int]
    settings: str  # human-readable, for reports


SPECS: dict[Anchor, AnchorSpec] = {
    Anchor.X264: AnchorSpec("libx264", "h264", (0, 51),
                            "libx264 preset medium, tune zerolatency, bf 0, one keyframe (keyint > clip, sc_threshold 0), CRF"),
    Anchor.X265: AnchorSpec("libx265", "hevc", (0, 51),
                            "libx265 preset medium, tune zerolatency, bframes 0, one keyframe (keyint > clip, scenecut 0), CRF"),
    Anchor.SVTAV1: AnchorSpec("libsvtav1", "libdav1d", (1, 63),
                              "SVT-AV1 preset 8, pred-struct 1 (low delay), one keyframe (keyint > clip, scd 0), CRF (CQP in low delay)"),
}


@dataclass
class AnchorResult:
    bytes: int  # the whole elementary stream
    frames: list[np.ndarray]  # decoded (H, W, 3) uint8 RGB, one per input frame
    encode_seconds: list[float]  # wall clock per input frame (send + receive of packets)
    decode_seconds: list[float]  # wall clock per packet decoded (the last entry: the flush)
    encode_cpu_seconds: float  # process CPU time (all threads) of the whole encode
    decode_cpu_seconds: float


def _options(anchor: Anchor, crf: int, frames: int, intra_offset: int | None = None,
             preset: int = CALL_PRESET) -> dict[str, str]:
    keyint = str(frames + 1)  # one keyframe at the start, never another
    if anchor is Anchor.X264:
        return {"crf": str(crf), "preset": "medium", "tune": "zerolatency", "bf": "0", "g": keyint,
                "keyint_min": keyint, "sc_threshold": "0"}
    if anchor is Anchor.X265:
        return {"crf": str(crf), "preset": "medium", "tune": "zerolatency",
                "x265-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0:bframes=0:log-level=error"}
    params = f"pred-struct=1:keyint={keyint}:scd=0" + fixed_offset_params(intra_offset)
    return {"crf": str(crf), "preset": str(preset), "svtav1-params": params}


def round_trip(anchor: Anchor, frames: list[np.ndarray], fps: Fraction, crf: int, threads: int = 1,
               intra_offset: int | None = None, preset: int = CALL_PRESET) -> AnchorResult:
    """(H, W, 3) uint8 RGB frames (even H and W) -> stream bytes and decoded RGB frames.
    ``threads`` is the encoder's and the decoder's thread count (0: the library's choice).
    ``intra_offset`` (SVT-AV1 only): fixed qindex offsets, the intra frame this far from the rest;
    ``preset``: SVT-AV1's."""
    if (intra_offset is not None or preset != CALL_PRESET) and anchor is not Anchor.SVTAV1:
        raise ValueError(f"{anchor.value}: intra qindex offsets and presets are SVT-AV1's")
    spec = SPECS[anchor]
    lo, hi = spec.crf_range
    if not lo <= crf <= hi:
        raise ValueError(f"{anchor.value}: CRF must be in {lo}..{hi}, got {crf}")
    if anchor is Anchor.SVTAV1:
        os.environ.setdefault("SVT_LOG", "1")  # errors only: SVT prints its whole config otherwise
    h, w = frames[0].shape[:2]
    encoder = av.CodecContext.create(spec.encoder, "w")
    encoder.width, encoder.height, encoder.pix_fmt = w, h, "yuv420p"
    encoder.time_base = 1 / fps
    encoder.framerate = fps
    encoder.thread_count = threads
    encoder.options = _options(anchor, crf, len(frames), intra_offset, preset)
    packets, encode_seconds = [], []
    cpu = time.process_time()
    for i, f in enumerate(frames):
        start = time.perf_counter()
        vf = av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p")
        vf.pts = i
        packets += encoder.encode(vf)
        encode_seconds.append(time.perf_counter() - start)
    start = time.perf_counter()
    packets += encoder.encode(None)
    encode_seconds[-1] += time.perf_counter() - start  # the flush belongs to the last frame
    encode_cpu = time.process_time() - cpu
    size = sum(p.size for p in packets) + len(encoder.extradata or b"")

    decoder = av.CodecContext.create(spec.decoder, "r")
    decoder.thread_count = threads
    decoder.thread_type = "SLICE"  # frame threading would hold frames back: no place in a call
    decoded, decode_seconds = [], []
    cpu = time.process_time()
    for p in packets + [None]:
        start = time.perf_counter()
        out = [d.to_ndarray(format="rgb24") for d in decoder.decode(p)]
        decode_seconds.append(time.perf_counter() - start)
        decoded += out
    decode_cpu = time.process_time() - cpu
    if len(decoded) != len(frames):
        raise RuntimeError(f"{anchor.value}: {len(frames)} frames in, {len(decoded)} decoded")
    return AnchorResult(size, decoded, encode_seconds, decode_seconds, encode_cpu, decode_cpu)


@dataclass(frozen=True)
class Reduced:
    """An anchor at a reduced frame rate (every ``every``-th frame coded, each decoded frame held
    until the next) and/or resolution (coded at ``size`` x ``size``, resized back with the same
    antialiased bicubic filter imfc's input goes through); ``intra_offset``: SVT-AV1's fixed qindex
    offsets instead of its CRF mode, every inter frame at the CRF's qindex and the intra frame this
    far from it (imfc's own references below 5 kbps, `quantizers_for_kbps`); ``preset``: SVT-AV1's.
    A stream at fps / K codes a frame only every K frames' time, so it can afford a slower preset
    than one coding every frame, as imfc's references do (`codec.av1_reference.DEFAULT_PRESET`)."""

    every: int = 1
    size: int | None = None
    intra_offset: int | None = None
    preset: int = CALL_PRESET

    def __post_init__(self) -> None:
        if self.every < 1 or (self.size is not None and (self.size < 16 or self.size % 2)):
            raise ValueError(f"need every >= 1 and an even size >= 16, got {self}")

    def codec(self, anchor: Anchor) -> str:
        """The label reports give this anchor's curve, e.g. "svtav1 held" or "svtav1 at 128"."""
        fixed = f", intra offset {self.intra_offset}" if self.intra_offset is not None else ""
        preset = f", preset {self.preset}" if self.preset != CALL_PRESET else ""
        return (anchor.value + (f" at {self.size}" if self.size else "") + (" held" if self.every > 1 else "")
                + fixed + preset)

    def setting(self, crf: int) -> str:
        return (f"1 in {self.every}, " if self.every > 1 else "") + f"crf {crf}"


def reduced_round_trip(anchor: Anchor, frames: list[np.ndarray], fps: Fraction, crf: int, reduced: Reduced,
                       threads: int = 1) -> AnchorResult:
    """round_trip of the reduced stream -> one decoded frame per input frame, at the input's size
    (square frames). Timings are the reduced stream's."""
    size = frames[0].shape[0]
    coded = frames[::reduced.every]
    if reduced.size:
        coded = [crop_resize(f, Box(0, 0, size), reduced.size) for f in coded]
    result = round_trip(anchor, coded, fps / reduced.every, crf, threads, reduced.intra_offset, reduced.preset)
    decoded = result.frames
    if reduced.size:
        decoded = [crop_resize(f, Box(0, 0, reduced.size), size) for f in decoded]
    held = [decoded[i // reduced.every] for i in range(len(frames))]
    return AnchorResult(result.bytes, held, result.encode_seconds, result.decode_seconds,
                        result.encode_cpu_seconds, result.decode_cpu_seconds)


def x264_round_trip(frames: list[np.ndarray], fps: Fraction, crf: int) -> tuple[int, list[np.ndarray]]:
    """(H, W, 3) uint8 RGB frames -> (bytes of the H.264 stream, decoded RGB frames)."""
    result = round_trip(Anchor.X264, frames, fps, crf, threads=0)
    return result.bytes, result.frames
