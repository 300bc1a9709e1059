"""Data preparation: crop each clip around the face, resize, and cache it as uint8 frames.

Face-reenactment projects prepare VoxCeleb-style data the same way: one fixed square crop per clip
around the face, enlarged to take in hair and shoulders. The face detector is OpenCV's Haar
cascade, which ships inside the opencv-python-headless package (nothing is downloaded); a clip
where no face is found is center-cropped.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from codec.video_io import Box, VideoError, center_box, crop_resize, probe, read_frames

VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".y4m"}


@dataclass
class ClipMeta:
    name: str
    source: str
    frames: int
    fps: float
    box: tuple[int, int, int]  # left, top, size in source pixels
    crop: str  # "face" or "center"


def find_face_box(frames: list[np.ndarray], enlarge: float = 1.8) -> Box | None:
    """Median face box over sample frames, enlarged and made square; None if no face is found."""
    import cv2  # only data preparation needs OpenCV

    detector = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    boxes = []
    for frame in frames:
        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        min_side = max(24, min(gray.shape) // 10)
        faces = detector.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side))
        if len(faces):
            boxes.append(max(faces, key=lambda f: f[2] * f[3]))  # the largest face
    if len(boxes) < max(1, len(frames) // 3):
        return None
    x, y, w, h = np.median(np.array(boxes), axis=0)
    h_img, w_img = frames[0].shape[:2]
    size = min(int(max(w, h) * enlarge), w_img, h_img)
    cx, cy = x + w / 2, y + h / 2 - 0.1 * h  # a little above the face centre: keep the hair
    left = int(np.clip(cx - size / 2, 0, w_img - size))
    top = int(np.clip(cy - size / 2, 0, h_img - size))
    return Box(left, top, size)


def prepare_clip(path: Path, out_dir: Path, size: int, face: bool = True, samples: int = 12) -> ClipMeta:
    """Decode one clip, crop and resize every frame, save ``<name>.npy`` (T, size, size, 3) uint8."""
    info = probe(path)
    frames = list(read_frames(path))
    if not frames:
        raise VideoError(f"{path}: no frames")
    box = None
    if face:
        idx = np.linspace(0, len(frames) - 1, min(samples, len(frames))).round().astype(int)
        box = find_face_box([frames[i] for i in idx])
    crop = "face" if box else "center"
    box = box or center_box(frames[0].shape[1], frames[0].shape[0])
    data = np.stack([crop_resize(f, box, size) for f in frames])
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / f"{path.stem}.npy", data)
    meta = ClipMeta(path.stem, path.name, len(frames), float(info.fps), (box.left, box.top, box.size), crop)
    (out_dir / f"{path.stem}.json").write_text(json.dumps(asdict(meta)))
    return meta


def list_videos(src: Path) -> list[Path]:
    return sorted(p for p in src.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
