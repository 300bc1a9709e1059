"""Where a call's frames come from: a video file, or a camera device through PyAV (v4l2 on
Linux, avfoundation on macOS), cropped to a centered square and resized to the model's size."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np

from codec.video_io import Box, VideoError, center_box, crop_resize, probe, read_frames


@dataclass
class Source:
    frames: Iterator[np.ndarray]  # (R, R, 3) uint8 at the model's resolution
    fps: Fraction
    box: Box
    live: bool  # a camera: frames come at its own pace


def is_camera(spec: str) -> bool:
    return spec.startswith("/dev/video") or spec.startswith("camera:")


def open_source(spec: str, resolution: int, limit: int | None = None, crop: Box | None = None) -> Source:
    if is_camera(spec):
        return _camera(spec.removeprefix("camera:"), resolution, limit, crop)
    info = probe(Path(spec))
    box = crop or center_box(info.width, info.height)
    frames = (crop_resize(f, box, resolution) for f in read_frames(spec, limit))
    return Source(frames, info.fps if info.fps > 0 else Fraction(25), box, live=False)


def _camera(device: str, resolution: int, limit: int | None, crop: Box | None) -> Source:
    fmt = "avfoundation" if sys.platform == "darwin" else "v4l2"
    try:
        container = av.open(device, format=fmt, options={"framerate": "25"})
    except (av.error.FFmpegError, OSError) as e:
        raise VideoError(f"{device}: cannot open camera ({e.__class__.__name__}: {e})") from None
    stream = container.streams.video[0]
    box = crop or center_box(stream.codec_context.width, stream.codec_context.height)
    fps = Fraction(stream.average_rate or 25)

    def frames() -> Iterator[np.ndarray]:
        with container:
            for i, frame in enumerate(container.decode(stream)):
                if limit is not None and i >= limit:
                    return
                yield crop_resize(frame.to_ndarray(format="rgb24"), box, resolution)

    return Source(frames(), fps, box, live=True)
