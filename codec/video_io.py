"""Reading and writing real video files with PyAV, and the crop/resize that fits them to the model.

Every failure a user can cause (missing file, not a video, no video stream, undecodable data) is
raised as ``VideoError`` with a one-line message.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import torch
import torch.nn.functional as F


class VideoError(Exception):
    pass


@dataclass(frozen=True)
class Box:
    """A square crop in source pixels."""

    left: int
    top: int
    size: int


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: Fraction
    frames: int  # as the container reports it; 0 when unknown


def _open(path: str | Path) -> av.container.InputContainer:
    path = Path(path)
    if not path.exists():
        raise VideoError(f"{path}: no such file")
    if path.is_dir():
        raise VideoError(f"{path}: is a directory, not a video file")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise VideoError(f"{path}: not a video file PyAV can open ({e.__class__.__name__})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: contains no video stream")
    return container


def probe(path: str | Path) -> VideoInfo:
    with _open(path) as container:
        stream = container.streams.video[0]
        fps = stream.average_rate or stream.guessed_rate or Fraction(25)
        return VideoInfo(stream.codec_context.width, stream.codec_context.height, Fraction(fps), stream.frames or 0)


def read_frames(path: str | Path, limit: int | None = None) -> Iterator[np.ndarray]:
    """Decoded frames as (H, W, 3) uint8 RGB arrays, in presentation order."""
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        count = 0
        try:
            for frame in container.decode(stream):
                yield frame.to_ndarray(format="rgb24")
                count += 1
                if limit is not None and count >= limit:
                    return
        except av.error.FFmpegError as e:
            if count == 0:
                raise VideoError(f"{path}: cannot decode video ({e.__class__.__name__})") from None
            # a damaged tail: keep what decoded, like every player does


def center_box(width: int, height: int) -> Box:
    size = min(width, height)
    return Box((width - size) // 2, (height - size) // 2, size)


def crop_resize(frame: np.ndarray, box: Box, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8: the box, resized with antialiasing. Parts of the
    box outside the frame are filled by edge replication."""
    h, w = frame.shape[:2]
    pad = max(0, -box.left, -box.top, box.left + box.size - w, box.top + box.size - h)
    if pad:
        frame = np.pad(frame, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    crop = frame[box.top + pad: box.top + pad + box.size, box.left + pad: box.left + pad + box.size]
    if box.size == size:
        return np.ascontiguousarray(crop)
    x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float()
    y = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return y[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def to_tensor(frame: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(frame).permute(2, 0, 1)[None].float().div(255)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) float in [0, 1] -> (H, W, 3) uint8."""
    return x[0].clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()


class FrameWriter:
    """Writes (H, W, 3) uint8 RGB frames to ``path``, the format chosen by its extension:
    .mp4/.mkv/.mov (H.264, CRF 10, near-lossless), .y4m (lossless, 4:4:4), or a folder of PNGs
    (no extension). Output goes to a temporary name and is renamed on ``close()``; ``abort()``
    removes it, so a failed run never leaves a half-written file."""

    CONTAINERS = {".mp4", ".mkv", ".mov"}

    def __init__(self, path: str | Path, fps: Fraction):
        self.path = Path(path)
        self.fps = fps
        parent = self.path.parent if str(self.path.parent) else Path(".")
        if not parent.is_dir():
            raise VideoError(f"{self.path}: output folder {parent} does not exist")
        suffix = self.path.suffix.lower()
        if suffix and suffix not in self.CONTAINERS | {".y4m"}:
            raise VideoError(f"{self.path}: unsupported output type {suffix!r} (use .mp4, .mkv, .mov, .y4m or a folder)")
        self.tmp = self.path.with_name(f".{self.path.name}.part")
        self.is_folder = not suffix
        if self.is_folder and self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise VideoError(f"{self.path}: exists and is not an empty folder")
        self.count = 0
        self.container = None
        self.stream = None
        try:
            if self.is_folder:
                self.tmp.mkdir(exist_ok=True)
            else:
                self.container = av.open(str(self.tmp), "w", format="yuv4mpegpipe" if suffix == ".y4m" else suffix[1:].replace("mkv", "matroska"))
        except (OSError, av.error.FFmpegError) as e:
            raise VideoError(f"{self.path}: cannot write ({e.__class__.__name__}: {e})") from None

    def write(self, frame: np.ndarray) -> None:
        if self.is_folder:
            from PIL import Image

            Image.fromarray(frame).save(self.tmp / f"{self.count:06d}.png")
        else:
            if self.stream is None:
                self._open_stream(frame.shape[1], frame.shape[0])
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            for packet in self.stream.encode(video_frame):
                self.container.mux(packet)
        self.count += 1

    def _open_stream(self, width: int, height: int) -> None:
        if self.path.suffix.lower() == ".y4m":
            self.stream = self.container.add_stream("rawvideo", rate=self.fps)
            self.stream.pix_fmt = "yuv444p"
        else:
            self.stream = self.container.add_stream("libx264", rate=self.fps)
            self.stream.pix_fmt = "yuv444p" if width % 2 or height % 2 else "yuv420p"
            self.stream.options = {"crf": "10", "preset": "medium"}
        self.stream.width, self.stream.height = width, height

    def close(self) -> None:
        if self.container is not None:
            if self.stream is not None:
                for packet in self.stream.encode():
                    self.container.mux(packet)
            self.container.close()
        if self.is_folder and self.path.exists():
            self.path.rmdir()  # empty, checked on open
        self.tmp.replace(self.path)

    def abort(self) -> None:
        if self.container is not None:
            try:
                self.container.close()
            except Exception:  # closing a broken container must not hide the original error
                pass
        if self.tmp.is_dir():
            import shutil

            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            self.tmp.unlink(missing_ok=True)
