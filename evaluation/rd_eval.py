"""Rate-distortion evaluation: the same frames of a clip through imfc at several operating points
and through the conventional anchors at several CRFs, each scored with every metric.

Every codec sees identical input: the first ``frames`` frames of the clip, the centered square
crop that ``imfc encode`` takes (``codec.files``), resized to the model's resolution, at the clip's
own frame rate. imfc's bytes are the whole ``.imfc`` file it would write (header, chunk framing,
keyframes and tokens); its decoded frames are the encoder's closed-loop reconstructions, which a
decoder reproduces bit-exactly (``tests/test_pipeline.py``). Anchor bytes are the whole
elementary stream (``evaluation.anchors``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from evaluation.anchors import Anchor, Reduced, reduced_round_trip, round_trip
from evaluation.metrics import FrameScores, score
from codec.nn.model import IMFCodec
from codec.pipeline import DEFAULT_BANK_SIZE, Encoder, EncoderSettings, pack_token_runs
from codec.av1_reference import DEFAULT_PRESET
from codec.files import stream_version
from codec.video_io import VideoError, center_box, crop_resize, probe, read_frames, to_tensor, to_uint8
from codec.nn.weights import model_id
from entropy.bitstream import REFERENCE_CHUNKS, Header, write_stream
from entropy.coding import bits_to_kbps

IMFC = "imfc"


@dataclass(frozen=True)
class EvalSettings:
    frames: int = 125  # per clip, from the start (5 s at 25 fps)
    # imfc's rate is set by how often it sends a keyframe: on quality (the floor) or on a timer
    imfc: tuple[EncoderSettings, ...] = (
        EncoderSettings(quality_floor=0.0, max_kbps=0.0),  # one keyframe, then tokens only: imfc's lowest rate
        EncoderSettings(max_kbps=8.0),
        EncoderSettings(),  # the shipped default: 24 dB floor, 11 kbps cap, keyframe step 2
        EncoderSettings(max_kbps=16.0),
        EncoderSettings(max_kbps=0.0, max_keyframe_interval=5),  # a keyframe at least every 6th frame
    )
    # CRFs down to each anchor's lowest rate at 256x256 (x264/x265 cannot go below ~10-20 kbps)
    crfs: tuple[tuple[Anchor, tuple[int, ...]], ...] = (
        (Anchor.X264, (51, 45, 39)),
        (Anchor.X265, (51, 45, 39)),
        (Anchor.SVTAV1, (63, 55, 47)),
    )
    # what a call application does when bits run out (issue 15's bar): SVT-AV1 on every K-th frame,
    # held, the same with the fixed qindex offsets imfc's references use below 5 kbps, and
    # SVT-AV1 at 128x128, upscaled
    reduced: tuple[tuple[Anchor, Reduced, tuple[int, ...]], ...] = (
        *((Anchor.SVTAV1, Reduced(every=k), (63, 55)) for k in (2, 4, 6, 12)),
        *((Anchor.SVTAV1, Reduced(every=k, intra_offset=-32), (63,)) for k in (2, 4, 6, 12)),
        (Anchor.SVTAV1, Reduced(size=128), (63, 55)),
    )
    vmaf: bool = True
    samples: int = 3  # frames kept per point for the side-by-side picture


@dataclass
class Clip:
    name: str
    path: Path
    fps: Fraction
    frames: np.ndarray  # (T, R, R, 3) uint8, what every codec codes

    @property
    def samples(self) -> list[int]:
        return sample_indices(len(self.frames))


def sample_indices(frames: int, count: int = 3) -> list[int]:
    """Evenly spread frames, past the first (every codec's keyframe looks alike)."""
    return sorted({min(frames - 1, frames * (k + 1) // (count + 1)) for k in range(count)})


@dataclass
class RDPoint:
    clip: str
    codec: str  # "imfc" or an Anchor value
    setting: str  # e.g. "floor 20 dB, keyint 250" or "crf 47"
    frames: int
    fps: float
    bytes: int
    kbps: float
    keyframes: int
    encode_fps: float  # wall clock, for orientation only (shared CPU): `imfc bench` measures speed
    psnr_rgb: float = 0.0
    psnr_y: float = 0.0
    ssim: float = 0.0
    ms_ssim: float = 0.0
    vmaf: float = 0.0
    gmsd: float = 0.0


@dataclass
class CodedPoint:
    point: RDPoint
    scores: FrameScores
    samples: np.ndarray = field(repr=False)  # (S, R, R, 3) decoded frames at Clip.samples


def load_clip(path: Path, resolution: int, frames: int) -> Clip:
    info = probe(path)
    box = center_box(info.width, info.height)
    x = np.array([crop_resize(f, box, resolution) for f in read_frames(path, limit=frames)])
    if len(x) == 0:
        raise VideoError(f"{path}: contains no frames")
    fps = info.fps if info.fps > 0 else Fraction(25)
    return Clip(Path(path).stem, Path(path), fps, x)


def imfc_setting(s: EncoderSettings) -> str:
    bank = f", bank of {s.bank_size}" if s.bank_size != DEFAULT_BANK_SIZE[s.keyframe_codec] else ""
    if s.keyframe_codec == "av1":
        rate = f"{s.kbps:g} kbps target" if s.kbps else f"every {s.reference_interval}, crf {s.av1_crf}"
        preset = f", preset {s.av1_preset}" if s.av1_preset != DEFAULT_PRESET else ""
        return f"av1 references, {rate}{bank}{preset}"
    cap = f", cap {s.max_kbps:g} kbps" if s.max_kbps > 0 else ""
    repeat = "" if s.repeat_keyframe else ", no repeats"
    step = f", key step {s.keyframe_step:g}"
    return f"floor {s.quality_floor:g} dB, keyint {s.max_keyframe_interval}{cap}{step}{repeat}{bank}"


def code_imfc(model: IMFCodec, clip: Clip, settings: EncoderSettings) -> tuple[int, int, np.ndarray, float]:
    """-> (bytes of the .imfc file, keyframes, decoded (T, R, R, 3) uint8, encoder frames/s)."""
    encoder = Encoder(model, settings, float(clip.fps), len(clip.frames))
    r = model.cfg.resolution
    start = time.perf_counter()
    try:
        coded = [encoder.encode(to_tensor(f)) for f in clip.frames]
    finally:
        encoder.close()
    seconds = time.perf_counter() - start
    version = stream_version([c.chunk for c in coded], encoder.restore)
    header = Header(preset=model.cfg.name, model_id=model_id(model, version), width=r, height=r,
                    fps_num=clip.fps.numerator, fps_den=clip.fps.denominator, frames=len(coded),
                    bank_size=settings.bank_size, source_width=r, source_height=r, crop_left=0, crop_top=0, crop_size=r,
                    version=version)
    size = len(write_stream(header, pack_token_runs(model, [c.chunk for c in coded])))
    keyframes = sum(c.chunk.type in REFERENCE_CHUNKS for c in coded)
    return size, keyframes, np.array([to_uint8(c.x_hat) for c in coded]), len(coded) / seconds


def _point(clip: Clip, codec: str, setting: str, size: int, keyframes: int, x_hat: np.ndarray, encode_fps: float,
           with_vmaf: bool) -> CodedPoint:
    scores = score(clip.frames, x_hat, clip.fps, with_vmaf)
    point = RDPoint(clip.name, codec, setting, len(x_hat), float(clip.fps), size,
                    bits_to_kbps(8 * size, len(x_hat), float(clip.fps)), keyframes, encode_fps, **scores.means())
    return CodedPoint(point, scores, x_hat[clip.samples])


def evaluate_imfc(model: IMFCodec, clip: Clip, settings: EncoderSettings, with_vmaf: bool = True) -> CodedPoint:
    size, keyframes, x_hat, fps = code_imfc(model, clip, settings)
    return _point(clip, IMFC, imfc_setting(settings), size, keyframes, x_hat, fps, with_vmaf)


def evaluate_anchor(anchor: Anchor, clip: Clip, crf: int, with_vmaf: bool = True) -> CodedPoint:
    result = round_trip(anchor, list(clip.frames), clip.fps, crf, threads=1)
    fps = len(clip.frames) / max(sum(result.encode_seconds), 1e-9)
    return _point(clip, anchor.value, f"crf {crf}", result.bytes, 1, np.array(result.frames), fps, with_vmaf)


def evaluate_reduced(anchor: Anchor, reduced: Reduced, clip: Clip, crf: int, with_vmaf: bool = True) -> CodedPoint:
    result = reduced_round_trip(anchor, list(clip.frames), clip.fps, crf, reduced, threads=1)
    fps = len(clip.frames) / max(sum(result.encode_seconds), 1e-9)
    return _point(clip, reduced.codec(anchor), reduced.setting(crf), result.bytes, 1, np.array(result.frames), fps,
                  with_vmaf)


def evaluate_clip(model: IMFCodec, clip: Clip, imfc: list[EncoderSettings], anchors: list[tuple[Anchor, tuple[int, ...]]],
                  with_vmaf: bool = True, after_point: Callable[[str], None] = lambda label: None,
                  reduced: list[tuple[Anchor, Reduced, tuple[int, ...]]] = ()) -> list[CodedPoint]:
    """Every imfc operating point, then every anchor CRF, then every reduced anchor's, on one clip;
    ``after_point`` hears each finished point's label (for a progress bar)."""
    coded = []
    for s in imfc:
        coded.append(evaluate_imfc(model, clip, s, with_vmaf))
        after_point(f"{clip.name} imfc {imfc_setting(s)}")
    for anchor, crfs in anchors:
        for crf in crfs:
            coded.append(evaluate_anchor(anchor, clip, crf, with_vmaf))
            after_point(f"{clip.name} {anchor.value} crf {crf}")
    for anchor, r, crfs in reduced:
        for crf in crfs:
            coded.append(evaluate_reduced(anchor, r, clip, crf, with_vmaf))
            after_point(f"{clip.name} {r.codec(anchor)} {r.setting(crf)}")
    return coded
