"""A call's measurements: quality against the source, bitrate, delivered frame rate, latency."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from evaluation.metrics import ms_ssim_frames, psnr_rgb
from rtc.playout import Outcome, PlayedFrame


@dataclass
class CallReport:
    frames: int  # source frames; the output has exactly this many
    keyframes: int  # shown, per outcome
    tokens: int
    concealed: int
    held: int  # lost, late, not sent or not rendered in time: the previous picture again
    not_sent: int  # of the held: frames the sender skipped (waiting for its first reference, or busy)
    sender_holds: int  # of the held: frames the sender chose to send nothing for (AV1 references: holding was closer)
    keyframes_sent: int
    keyframe_requests: int
    packets_sent: int
    packets_lost: int  # by the impairment layer (media direction)
    kbps: float  # imfc packets, headers included, sender -> receiver
    feedback_kbps: float  # receiver -> sender
    delivered_fps: float  # new pictures shown per second of source time
    # frames shown as the sender coded them per second of source time: new pictures and the holds the
    # sender chose (at a few kbps most frames are holds by choice); not a frame skipped for time, lost or late
    as_sent_fps: float
    psnr: float  # mean over all frames (held ones included) against the source, at the model's size
    msssim: float | None
    latency_ms_mean: float | None  # capture to display, over shown frames
    latency_ms_p50: float | None
    latency_ms_p95: float | None

    def lines(self) -> str:
        d = asdict(self)
        return "\n".join(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in d.items())


def quality(played: list[PlayedFrame], source: list[np.ndarray]) -> tuple[list[float], list[float]]:
    """Per-frame PSNR and MS-SSIM of the pictures shown against the source frames."""
    n = min(len(played), len(source))
    if n == 0:
        return [], []
    shown, src = np.stack([p.image for p in played[:n]]), np.stack(source[:n])
    return psnr_rgb(src, shown).tolist(), ms_ssim_frames(src, shown).tolist()


def summarize(played: list[PlayedFrame], source: list[np.ndarray], fps: float, captured: list[float],
              *, not_sent: int, sender_holds: int = 0, keyframes_sent: int, keyframe_requests: int, packets_sent: int,
              packets_lost: int, media_bytes: int, feedback_bytes: int) -> CallReport:
    """``captured``: clock time each frame was captured, same clock as ``PlayedFrame.shown_at``."""
    count = {o: sum(p.outcome == o for p in played) for o in Outcome}
    seconds = max(len(played), 1) / fps
    latency = [1000 * (p.shown_at - captured[p.frame]) for p in played
               if p.shown_at is not None and p.frame < len(captured)]
    psnr, msssim = quality(played, source)
    return CallReport(
        frames=len(played), keyframes=count[Outcome.KEYFRAME], tokens=count[Outcome.TOKEN],
        concealed=count[Outcome.CONCEALED], held=count[Outcome.HELD], not_sent=not_sent,
        sender_holds=sender_holds,
        keyframes_sent=keyframes_sent, keyframe_requests=keyframe_requests, packets_sent=packets_sent,
        packets_lost=packets_lost, kbps=8 * media_bytes / 1000 / seconds,
        feedback_kbps=8 * feedback_bytes / 1000 / seconds,
        delivered_fps=(len(played) - count[Outcome.HELD]) / seconds,
        as_sent_fps=(len(played) - count[Outcome.HELD] + min(sender_holds, count[Outcome.HELD])) / seconds,
        psnr=float(np.mean(psnr)) if psnr else float("nan"), msssim=float(np.mean(msssim)) if msssim else None,
        latency_ms_mean=float(np.mean(latency)) if latency else None,
        latency_ms_p50=float(np.percentile(latency, 50)) if latency else None,
        latency_ms_p95=float(np.percentile(latency, 95)) if latency else None,
    )
