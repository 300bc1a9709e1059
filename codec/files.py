"""Video file <-> .imfc file, with the crop/resize to the model's resolution and back.

The source is center-cropped to a square (or the crop the caller chooses) and resized to the
model's resolution; the bitstream records the crop so the decoder can upscale back to its size.
Outputs are written under a temporary name and renamed at the end: a failure never leaves a
half-written file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from tqdm import tqdm

from codec.nn.model import IMFCodec
from codec.pipeline import Decoder, Encoder, EncoderSettings, pack_token_runs
from codec.video_io import Box, FrameWriter, VideoError, center_box, crop_resize, probe, read_frames, to_tensor, to_uint8
from codec.nn.weights import model_id
from entropy.bitstream import BitstreamError, Chunk, ChunkType, Header, read_stream, write_stream
from entropy.coding import bits_to_kbps


@dataclass
class EncodeSummary:
    frames: int
    keyframes: int
    bytes: int
    kbps: float
    psnr: float  # mean over frames of the closed-loop reconstruction, at the model's resolution
    fps: float  # frames encoded per second of wall-clock time


@dataclass
class DecodeSummary:
    frames: int
    width: int
    height: int
    fps: float


def encode_file(src: Path, dst: Path, model: IMFCodec, settings: EncoderSettings = EncoderSettings(),
                crop: Box | None = None, max_frames: int | None = None, progress: bool = True) -> EncodeSummary:
    info = probe(src)
    box = crop or center_box(info.width, info.height)
    r = model.cfg.resolution
    _check_writable(dst)
    fps = info.fps if info.fps > 0 else Fraction(25)
    encoder = Encoder(model, settings, float(fps))
    chunks: list[Chunk] = []
    quality = []
    start = time.perf_counter()
    frames = read_frames(src, limit=max_frames)
    total = min(info.frames, max_frames or info.frames) or None
    for frame in tqdm(frames, total=total, desc="encode", unit="frame", disable=None if progress else True, leave=False):
        out = encoder.encode(to_tensor(crop_resize(frame, box, r)))
        chunks.append(out.chunk)
        quality.append(out.psnr)
    if not chunks:
        raise VideoError(f"{src}: contains no frames")
    seconds = time.perf_counter() - start
    header = Header(
        preset=model.cfg.name, model_id=model_id(model), width=r, height=r, fps_num=fps.numerator,
        fps_den=fps.denominator, frames=len(quality), bank_size=settings.bank_size, source_width=info.width,
        source_height=info.height, crop_left=max(box.left, 0), crop_top=max(box.top, 0), crop_size=box.size)
    data = write_stream(header, pack_token_runs(model, chunks))
    _write_atomic(dst, data)
    return EncodeSummary(
        frames=len(quality),
        keyframes=sum(c.type == ChunkType.KEYFRAME for c in chunks),
        bytes=len(data),
        kbps=bits_to_kbps(8 * len(data), len(quality), float(fps)),
        psnr=float(np.mean(quality)),
        fps=len(quality) / seconds,
    )


def read_bitstream(path: Path, model: IMFCodec | None = None) -> tuple[Header, list[Chunk]]:
    path = Path(path)
    if not path.exists():
        raise BitstreamError(f"{path}: no such file")
    if path.is_dir():
        raise BitstreamError(f"{path}: is a directory")
    header, chunks = read_stream(path.read_bytes())
    if model is not None and (header.model_id != model_id(model) or header.preset != model.cfg.name):
        raise BitstreamError(
            f"{path}: made by another model (preset {header.preset!r}, id {header.model_id.hex()}); this model is "
            f"{model.cfg.name!r}, id {model_id(model).hex()}: decode with the weights that encoded it (--weights)")
    return header, chunks


def decode_file(src: Path, dst: Path, model: IMFCodec, upscale: bool = False, progress: bool = True) -> DecodeSummary:
    header, chunks = read_bitstream(src, model)
    fps = Fraction(header.fps_num, max(header.fps_den, 1))
    decoder = Decoder(model, (header.height, header.width), header.bank_size, header.version)
    size = header.crop_size if upscale else header.width
    writer = FrameWriter(dst, fps)
    start = time.perf_counter()
    try:
        with tqdm(total=header.frames, desc="decode", unit="frame", disable=None if progress else True,
                  leave=False) as bar:
            for chunk in chunks:
                for x_hat in decoder.decode_frames(chunk):
                    frame = to_uint8(x_hat)
                    if size != header.width:
                        frame = crop_resize(frame, Box(0, 0, header.width), size)
                    writer.write(frame)
                    bar.update()
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return DecodeSummary(header.frames, size, size, header.frames / (time.perf_counter() - start))


def _check_writable(dst: Path) -> None:
    parent = Path(dst).parent if str(Path(dst).parent) else Path(".")
    if not parent.is_dir():
        raise VideoError(f"{dst}: output folder {parent} does not exist")
    if Path(dst).is_dir():
        raise VideoError(f"{dst}: is a directory")


def _write_atomic(dst: Path, data: bytes) -> None:
    tmp = Path(dst).with_name(f".{Path(dst).name}.part")
    try:
        tmp.write_bytes(data)
        tmp.replace(dst)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise VideoError(f"{dst}: cannot write ({e.strerror or e})") from None
