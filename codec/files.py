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
from typing import Iterator

import numpy as np
from torch import Tensor
from tqdm import tqdm

from codec.nn.model import IMFCodec
from codec.pipeline import Decoder, Encoder, EncoderSettings, pack_token_runs
from codec.video_io import Box, FrameWriter, VideoError, center_box, crop_resize, probe, read_frames, to_tensor, to_uint8
from codec.nn.weights import model_id
from entropy.bitstream import (
    AV1_REFERENCES_SINCE, DEFAULT_MAX_FRAMES, MAX_FRAMES, REFERENCE_CHUNKS, RESTORATION_SINCE, VERSION, BitstreamError,
    Chunk, ChunkType, Header, read_file, write_stream,
)
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


def stream_version(chunks: list[Chunk], restored: bool) -> int:
    """The oldest format that holds an encoder's chunks, so that an older imfc still reads what it can:
    8 where references were shown restored, 7 for other AV1 references, 4 for learned keyframes."""
    if restored:
        return RESTORATION_SINCE
    return RESTORATION_SINCE - 1 if any(c.type == ChunkType.AV1_REFERENCES for c in chunks) else AV1_REFERENCES_SINCE - 1


def encode_file(src: Path, dst: Path, model: IMFCodec, settings: EncoderSettings = EncoderSettings(),
                crop: Box | None = None, max_frames: int | None = None, progress: bool = True) -> EncodeSummary:
    info = probe(src)
    box = crop or center_box(info.width, info.height)
    r = model.cfg.resolution
    _check_writable(dst)
    fps = info.fps if info.fps > 0 else Fraction(25)

    def header(frames: int, version: int = VERSION) -> Header:
        return Header(
            preset=model.cfg.name, model_id=model_id(model, version), width=r, height=r, fps_num=fps.numerator,
            fps_den=fps.denominator, frames=frames, bank_size=settings.bank_size, source_width=info.width,
            source_height=info.height, crop_left=max(box.left, 0), crop_top=max(box.top, 0), crop_size=box.size,
            version=version)

    try:  # what no decoder would accept is refused before encoding, not after
        header(1).check()
    except BitstreamError as e:
        raise VideoError(f"{src}: cannot be coded: {e}") from None
    encoder = Encoder(model, settings, float(fps), min(info.frames, max_frames or info.frames) or None)
    chunks: list[Chunk] = []
    quality = []
    start = time.perf_counter()
    frames = read_frames(src, limit=max_frames)
    total = min(info.frames, max_frames or info.frames) or None
    try:
        for frame in tqdm(frames, total=total, desc="encode", unit="frame", disable=None if progress else True,
                          leave=False):
            out = encoder.encode(to_tensor(crop_resize(frame, box, r)))
            chunks.append(out.chunk)
            quality.append(out.psnr)
    finally:
        encoder.close()
    if not chunks:
        raise VideoError(f"{src}: contains no frames")
    seconds = time.perf_counter() - start
    if len(quality) > MAX_FRAMES:
        raise VideoError(f"{src}: {len(quality)} frames, more than a stream holds ({MAX_FRAMES}): use --frames")
    version = stream_version(chunks, encoder.restore)
    data = write_stream(header(len(quality), version), pack_token_runs(model, chunks))
    _write_atomic(dst, data)
    return EncodeSummary(
        frames=len(quality),
        keyframes=sum(c.type in REFERENCE_CHUNKS for c in chunks),
        bytes=len(data),
        kbps=bits_to_kbps(8 * len(data), len(quality), float(fps)),
        psnr=float(np.mean(quality)),
        fps=len(quality) / seconds,
    )


def read_bitstream(path: Path, model: IMFCodec | None = None,
                   max_frames: int = MAX_FRAMES) -> tuple[Header, list[Chunk]]:
    """Parse and check a whole .imfc file (entropy.bitstream.read_file); with ``model``, also that
    the stream was made by it, at its resolution."""
    header, chunks = read_file(path, max_frames)
    if model is not None:
        check_model(Path(path), header, model)
    return header, chunks


def check_model(path: Path, header: Header, model: IMFCodec) -> None:
    expected = model_id(model, header.version)
    if header.model_id != expected or header.preset != model.cfg.name:
        raise BitstreamError(
            f"{path}: made by another model (preset {header.preset!r}, id {header.model_id.hex()}); this model is "
            f"{model.cfg.name!r}, id {expected.hex()}: decode with the weights that encoded it (--weights)")
    if header.version >= RESTORATION_SINCE and model.restoration is None:
        raise BitstreamError(f"{path}: format {header.version} shows restored references, and model "
                             f"{model.cfg.name!r} has no restoration")
    r = model.cfg.resolution
    if (header.width, header.height) != (r, r):
        raise BitstreamError(f"{path}: header: coded size {header.width}x{header.height}, but model "
                             f"{model.cfg.name!r} codes {r}x{r}")


def decode_file(src: Path, dst: Path, model: IMFCodec, upscale: bool = False, progress: bool = True,
                max_frames: int = DEFAULT_MAX_FRAMES) -> DecodeSummary:
    return decode_stream(src, read_file(src, max_frames), dst, model, upscale, progress)  # it checks the model


def decode_stream(src: Path, stream: tuple[Header, list[Chunk]], dst: Path, model: IMFCodec,
                  upscale: bool = False, progress: bool = True) -> DecodeSummary:
    """A stream read by read_bitstream (from ``src``, named in errors) -> a video file. Frames go to
    the writer as they are decoded; a payload that cannot be decoded is an error naming its chunk
    and byte, and removes the partial output."""
    header, chunks = stream
    check_model(Path(src), header, model)
    fps = Fraction(header.fps_num, header.fps_den)
    decoder = Decoder(model, (header.height, header.width), header.bank_size, header.version)
    size = header.crop_size if upscale else header.width
    writer = FrameWriter(dst, fps)
    start = time.perf_counter()
    try:
        with tqdm(total=header.frames, desc="decode", unit="frame", disable=None if progress else True,
                  leave=False) as bar:
            for i, chunk in enumerate(chunks):
                for x_hat in decoded_frames(decoder, chunk, f"{src}: chunk {i}{chunk.where}"):
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


def decoded_frames(decoder: Decoder, chunk: Chunk, where: str) -> Iterator[Tensor]:
    """decoder.decode_frames, with any failure to decode the chunk's payload reported as one
    BitstreamError that says ``where``. The stream was checked before (read_stream), so what fails
    here is a payload that is well-formed and lies: the model's own errors on it count too."""
    try:
        yield from decoder.decode_frames(chunk)
    except BitstreamError as e:
        raise BitstreamError(f"{where}: {e}") from None
    except (RuntimeError, ValueError, IndexError, OverflowError) as e:
        raise BitstreamError(f"{where}: undecodable payload ({e.__class__.__name__})") from None


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
