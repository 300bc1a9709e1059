"""References coded by a real codec: one continuous AV1 stream of reference pictures.

The sender codes each new reference with SVT-AV1 in low delay (pred-struct 1, no lookahead): the
packet of a picture comes out of that picture's own encode call, predicted from the previous
reference, so a reference costs tens of bytes where a learned keyframe costs hundreds. Intra
frames come first and when asked for. Both sides decode the packets with libdav1d (the sender
decodes its own), and AV1 decoding is exact integer arithmetic, so they hold bit-identical
pictures. The conversion of the decoded 4:2:0 picture to RGB is done here in integers (BT.601
limited range, the matrix FFmpeg's RGB-to-YUV conversion used on the way in, with centred
bilinear chroma upsampling), not by libswscale, whose SIMD paths may round differently from one
CPU to another.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from entropy.bitstream import BitstreamError

MIN_CRF, MAX_CRF = 1, 63
MIN_INTRA_OFFSET, MAX_INTRA_OFFSET = -64, 63  # SVT-AV1's key-frame-qindex-offset, as imfc allows it
MIN_PRESET, MAX_PRESET = 0, 13  # SVT-AV1's presets: slower searches, fewer bits for the same picture
# SVT-AV1's preset for a file's references (imfc encode --av1-preset): a slower search than a
# real-time encoder's, fewer bytes for the same picture; measured in BENCHMARKS.md ("SVT-AV1's
# preset"). A call keeps the real-time one (CALL_PRESET), as do the anchors: at 256x256 and 1
# thread, preset 4 took 320 ms to open a stream and code its intra frame (a call's refresh after a
# loss opens a new one) and 40 ms at the 95th percentile per inter reference, preset 8 37 and 13.5.
DEFAULT_PRESET = 2
CALL_PRESET = 8
# Each packet SVT-AV1 gives starts with this OBU (type 2, empty), which marks where a temporal unit
# begins in a raw stream. A reference packet is already one temporal unit and libdav1d decodes it
# the same without one, so it is left out: 2 bytes of a 30-90 byte inter reference.
TEMPORAL_DELIMITER = b"\x12\x00"


@dataclass(frozen=True)
class Quantizer:
    """SVT-AV1's quantizer for a reference stream. ``intra_offset`` None: SVT's own CRF mode, which
    spends many bits on the intra frame and then predicts cheaply from it. An offset instead fixes
    the intra frame's qindex that far above the inter frames' (SVT's fixed qindex offsets): a far
    cheaper intra frame, for rates where SVT's own would cost seconds of the budget, paid for by
    dearer inter frames while they repair it (measured on one clip at CRF 63: intra 705 bytes at
    32.6 dB and inter 57 at 29.3 in CRF mode; offset 0, 159 bytes at 25.1 dB and inter 34 at 24.2)."""

    crf: int
    intra_offset: int | None = None
    preset: int = DEFAULT_PRESET

    def __post_init__(self) -> None:
        if not MIN_CRF <= self.crf <= MAX_CRF:
            raise ValueError(f"AV1 reference CRF must be {MIN_CRF} to {MAX_CRF}, not {self.crf}")
        if not MIN_PRESET <= self.preset <= MAX_PRESET:
            raise ValueError(f"SVT-AV1 preset must be {MIN_PRESET} to {MAX_PRESET}, not {self.preset}")
        if self.intra_offset is not None and not MIN_INTRA_OFFSET <= self.intra_offset <= MAX_INTRA_OFFSET:
            raise ValueError(f"intra qindex offset must be {MIN_INTRA_OFFSET} to {MAX_INTRA_OFFSET}, "
                             f"not {self.intra_offset}")

    def options(self) -> dict[str, str]:
        # keyint beyond any stream and no scene-cut detection: intra frames only where the caller asks
        params = "pred-struct=1:lookahead=0:keyint=-1:scd=0" + fixed_offset_params(self.intra_offset)
        return {"crf": str(self.crf), "preset": str(self.preset), "svtav1-params": params}


def fixed_offset_params(intra_offset: int | None) -> str:
    """The svtav1-params suffix for SVT's fixed qindex offsets (every inter frame at the CRF's own
    qindex, the intra frame ``intra_offset`` from it); "" for its CRF mode (None)."""
    if intra_offset is None:
        return ""
    return f":use-fixed-qindex-offsets=1:key-frame-qindex-offset={intra_offset}"


# The intra frame's qindex offsets tried at CRF 63, finest first (intra 665, 527, 392, 291 and 175
# bytes on 6 validation clips at 256x256, 32.5 to 25.0 dB).
INTRA_OFFSETS = (-64, -48, -32, -16, 0)


def crf_for_kbps(kbps: float) -> int:
    """The references' CRF for a rate target. A talking head is better served by coarse references
    often than by fine ones seldom: on the 12 validation clips the held anchor at CRF 63 beats CRF
    55 at every rate up to references every other frame (1 in 4 at CRF 63: 6.5 kbps, MS-SSIM 0.876;
    1 in 12 at CRF 55: 7.8 kbps, 0.811; BENCHMARKS, "AV1 references"). imfc's own references at
    CRF 63 and preset 2 reach about 8 kbps (--kbps 12 spent 7.4 kbps for MS-SSIM 0.913, VMAF 44.5;
    --kbps 16 7.8 kbps for 0.920, 45.9), where CRF 55 at --kbps 12 spent 9.6 kbps for 0.894, 51.0:
    fewer bits for more MS-SSIM, and on the same line in VMAF and PSNR (BENCHMARKS, "SVT-AV1's
    preset"). So CRF 63 below 16 kbps, then finer, to spend more."""
    return 63 if kbps < 16 else 55 if kbps < 20 else 50


# Below this rate target, references with fixed qindex offsets (quantizers_for_kbps).
FIXED_OFFSETS_BELOW_KBPS = 5.0


def quantizers_for_kbps(kbps: float, preset: int = DEFAULT_PRESET) -> tuple[Quantizer, ...]:
    """The quantizers a rate-controlled reference stream may start with, the dearest intra frame
    first: the encoder takes the first whose intra frame fits its budget (the last if none does).

    Below 5 kbps, fixed qindex offsets at CRF 63, not SVT's CRF mode. CRF mode spends its bits on a
    fine intra frame and on inter frames that keep close to it (6 validation clips, a reference
    every 6th frame: intra 765 bytes at 33.2 dB, inter 100 bytes at 28.6 dB); the fixed offsets code
    every inter frame at qindex 255 (52 bytes at 26.5 dB after a 665-byte intra frame at offset -64;
    51 bytes at 25.8 dB after 392 bytes at -32). Half-price references that come twice as often
    win at low rates: held every K-th frame on the 12 training clips (K = 2, 3, 4, 6, 12 against 2,
    4, 6, 12), BD-rate against CRF mode -13% (offset -64) and -28% (-32) in MS-SSIM, -8% and +1% in
    VMAF, but the fixed offsets' curve ends near 5 kbps (references every other frame), where CRF
    mode's begins; imfc at --kbps 6 and 8 reached only 4.8 and 5.3 kbps with them (BENCHMARKS,
    "Fixed qindex offsets"). So from 5 kbps, SVT's CRF mode first, as before."""
    fixed = tuple(Quantizer(MAX_CRF, o, preset) for o in INTRA_OFFSETS)
    return fixed if kbps < FIXED_OFFSETS_BELOW_KBPS else (Quantizer(crf_for_kbps(kbps), None, preset), *fixed)


def _upsample2(c: np.ndarray) -> np.ndarray:
    """(h, w) int64 chroma -> (2h, 2w) at 16 times the scale: each output sample is 3/4 of its
    nearest input and 1/4 of the next one, per axis (chroma sited between luma samples)."""
    def axis(a: np.ndarray, ax: int) -> np.ndarray:
        prev = np.concatenate([a.take([0], ax), a.take(range(a.shape[ax] - 1), ax)], ax)
        nxt = np.concatenate([a.take(range(1, a.shape[ax]), ax), a.take([-1], ax)], ax)
        out = np.stack([3 * a + prev, 3 * a + nxt], ax + 1)
        return out.reshape(*a.shape[:ax], 2 * a.shape[ax], *a.shape[ax + 1:])

    return axis(axis(c, 0), 1)


def yuv420_to_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """8-bit planes, limited-range BT.601, y (H, W), u and v (H/2, W/2) -> (H, W, 3) uint8 RGB, in
    integers: the same on every machine."""
    luma = 76309 * 16 * (y.astype(np.int64) - 16)  # 1.164 * 2^16, times the chroma's scale
    cb = _upsample2(u.astype(np.int64)) - 128 * 16
    cr = _upsample2(v.astype(np.int64)) - 128 * 16
    half = 1 << 19
    rgb = np.stack([luma + 104597 * cr + half,  # 1.596, 0.392, 0.813, 2.017 times 2^16
                    luma - 25675 * cb - 53279 * cr + half,
                    luma + 132201 * cb + half], -1) >> 20
    return rgb.clip(0, 255).astype(np.uint8)


def _to_rgb(frame: av.VideoFrame) -> np.ndarray:
    planes = frame.to_ndarray()  # yuv420p: (3H/2, W), the chroma planes' rows after the luma's
    h, w = frame.height, frame.width
    chroma = planes[h:].reshape(2, h // 2, w // 2)
    return yuv420_to_rgb(planes[:h], chroma[0], chroma[1])


class ReferenceDecoder:
    """AV1 packets -> RGB pictures of the stream's size, one per packet, with libdav1d. Raises
    BitstreamError for a packet that does not decode to exactly one picture of that size; a
    packet that claims a larger picture is refused before anything that size is allocated."""

    def __init__(self, size: int):
        self.size = size
        self._decoder = av.CodecContext.create("libdav1d", "r")
        self._decoder.thread_count = 1
        self._decoder.options = {"max_pixels": str(size * size), "max_frame_delay": "1"}

    def decode(self, packet: bytes) -> np.ndarray:
        if not packet:
            raise BitstreamError("empty AV1 reference packet")
        try:
            frames = self._decoder.decode(av.Packet(packet))
        except av.error.FFmpegError as e:
            raise BitstreamError(f"AV1 reference packet does not decode ({e.strerror or e})") from None
        if len(frames) != 1:
            raise BitstreamError(f"AV1 reference packet decoded to {len(frames)} pictures, not 1")
        frame = frames[0]
        if (frame.width, frame.height) != (self.size, self.size) or frame.format.name != "yuv420p":
            raise BitstreamError(f"AV1 reference picture is {frame.width}x{frame.height} {frame.format.name}, "
                                 f"not {self.size}x{self.size} yuv420p")
        return _to_rgb(frame)


class ReferenceEncoder:
    """RGB pictures (S, S, 3) uint8 -> (AV1 packet, the picture every decoder will hold)."""

    def __init__(self, size: int, fps: Fraction | float, quantizer: Quantizer):
        if size % 2:
            raise ValueError(f"AV1 references need an even size, not {size}")
        os.environ.setdefault("SVT_LOG", "1")  # errors only: SVT prints its whole configuration otherwise
        self.quantizer = quantizer
        self._encoder = av.CodecContext.create("libsvtav1", "w")
        self._encoder.width = self._encoder.height = size
        self._encoder.pix_fmt = "yuv420p"
        fps = Fraction(fps).limit_denominator(1001)  # a float rate has a 2^52 denominator
        self._encoder.time_base = 1 / fps
        self._encoder.framerate = fps
        self._encoder.thread_count = 1
        self._encoder.options = quantizer.options()
        self._decoder = ReferenceDecoder(size)
        self._pts = 0

    def code(self, picture: np.ndarray, intra: bool = False) -> tuple[bytes, np.ndarray]:
        """``intra``: an intra frame, decodable on its own (the first one always is)."""
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24").reformat(format="yuv420p")
        frame.pts = self._pts
        if intra:
            frame.pict_type = av.video.frame.PictureType.I
        self._pts += 1
        packets = self._encoder.encode(frame)
        if len(packets) != 1:  # low delay with no lookahead gives one packet per picture, at once
            raise RuntimeError(f"SVT-AV1 gave {len(packets)} packets for one reference picture")
        packet = bytes(packets[0]).removeprefix(TEMPORAL_DELIMITER)
        return packet, self._decoder.decode(packet)

    def close(self) -> None:
        """End the AV1 stream (SVT-AV1 complains when torn down without it)."""
        if self._encoder is not None:
            self._encoder.encode(None)
            self._encoder = None
