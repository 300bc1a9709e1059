"""Recovery after a lost keyframe (or AV1 reference), measured: the same call twice on the simulated
clock, once clean and once with one fragment of one reference dropped, compared frame by frame."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from codec.nn.model import IMFCodec
from codec.sender import FrameKind, SenderSettings
from codec.video_io import to_uint8
from entropy import packet as pk
from evaluation.metrics import psnr_rgb
from rtc.impairment import LinkConfig
from rtc.playout import Outcome
from rtc.simulate import SimulatedCall, simulate_call

TOLERANCE_DB = 1.0  # "normal quality": within this of the clean call's PSNR ...
HOLD_FRAMES = 5  # ... for this many frames in a row


@dataclass
class Recovery:
    lost_frame: int  # the frame whose keyframe lost a fragment
    replacement_frames: int | None  # frames until the receiver showed the replacement keyframe
    quality_frames: int | None  # frames until PSNR is back within TOLERANCE_DB of the clean call
    psnr_deficit: float  # mean dB below the clean call over the recovery window (or the rest of the call)


def lose_keyframe(ref: int):
    """A ``drop`` rule for simulate_call: the first fragment of keyframe (or AV1 reference) number
    ``ref`` (0: the first), the first time it is sent (an AV1 reference may be sent again)."""
    dropped = []

    def drop(index: int, data: bytes) -> bool:
        p = pk.from_bytes(data)
        hit = isinstance(p, pk.KeyframeFragment) and p.ref == ref & 0xFF and p.index == 0 and not dropped
        if hit:
            dropped.append(index)
        return hit
    return drop


def measure_recovery(model: IMFCodec, frames: list[Tensor], fps: float, settings: SenderSettings,
                     link: LinkConfig, ref: int) -> tuple[Recovery, SimulatedCall, SimulatedCall]:
    clean = simulate_call(model, frames, fps, settings, link, link)
    lossy = simulate_call(model, frames, fps, settings, link, link, drop=lose_keyframe(ref))
    keyframes = [i for i, k in enumerate(lossy.sent) if k == FrameKind.KEYFRAME]
    if len(keyframes) <= ref:
        raise ValueError(f"the call has {len(keyframes)} keyframes; cannot lose number {ref}")
    lost = keyframes[ref]
    replacement = next((p.frame for p in lossy.played[lost + 1:] if p.outcome == Outcome.KEYFRAME), None)
    source = [to_uint8(x) for x in frames]
    n = min(len(source), len(lossy.played), len(clean.played))
    a = psnr_rgb(np.stack(source[:n]), np.stack([p.image for p in lossy.played[:n]]))
    b = psnr_rgb(np.stack(source[:n]), np.stack([p.image for p in clean.played[:n]]))
    ok = a >= b - TOLERANCE_DB
    back = next((f for f in range(lost, len(ok) - HOLD_FRAMES + 1) if ok[f:f + HOLD_FRAMES].all()), None)
    end = back if back is not None and back > lost else len(a)
    return Recovery(lost, None if replacement is None else replacement - lost,
                    None if back is None else back - lost, float(np.mean(b[lost:end] - a[lost:end]))), clean, lossy
