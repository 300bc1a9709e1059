"""Conventional codecs as anchors: the same frames through libx264 via PyAV, in video-call settings.

libx264 runs with preset medium, tune zerolatency, no B-frames and a single keyframe at the start
(keyint larger than the clip), the settings a low-delay call would use. Bitrate counts every byte
of the raw H.264 stream (Annex B), no container overhead.
"""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np


def x264_round_trip(frames: list[np.ndarray], fps: Fraction, crf: int) -> tuple[int, list[np.ndarray]]:
    """(H, W, 3) uint8 RGB frames -> (bytes of the H.264 stream, decoded RGB frames)."""
    h, w = frames[0].shape[:2]
    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height, codec.pix_fmt = w, h, "yuv420p"
    codec.time_base = 1 / fps
    codec.framerate = fps
    codec.options = {"crf": str(crf), "preset": "medium", "tune": "zerolatency", "bf": "0",
                     "g": str(len(frames) + 1), "keyint_min": str(len(frames) + 1), "sc_threshold": "0"}
    packets = []
    for i, f in enumerate(frames):
        vf = av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p")
        vf.pts = i
        packets += codec.encode(vf)
    packets += codec.encode(None)
    decoder = av.CodecContext.create("h264", "r")
    decoded = []
    for p in packets:
        decoded += [d.to_ndarray(format="rgb24") for d in decoder.decode(p)]
    decoded += [d.to_ndarray(format="rgb24") for d in decoder.decode(None)]
    return sum(p.size for p in packets), decoded
