"""Full-reference quality metrics of decoded frames against their source, per frame.

All inputs are (T, H, W, 3) uint8 RGB arrays, the source and a decoded version of the same frames.

- ``psnr_rgb``: PSNR over the three RGB channels, peak 255.
- ``psnr_y``: PSNR of luma, BT.601 studio range (Y = 16 + 65.481 R + 128.553 G + 24.966 B with
  R, G, B in [0, 1], kept in float, no rounding), peak 255: the Y that FFmpeg's default RGB -> YUV
  conversion produces, so it is comparable to codec papers that measure Y of 4:2:0 video.
- ``ssim``, ``ms_ssim``: SSIM (Wang et al. 2004) and MS-SSIM (Wang et al. 2003) on RGB in
  [0, 1], averaged over channels (pytorch-msssim, Gaussian window 11, sigma 1.5), as learned-codec
  papers report them. Frames too small for MS-SSIM's five scales (<= 160 px) use as many scales as
  fit, with the standard weights renormalized.
- ``vmaf``: VMAF v0.6.1 (Netflix), the model built into libvmaf, through the static FFmpeg that
  the imageio-ffmpeg package ships; both videos go through the same RGB -> YUV 4:4:4 conversion.
- ``gmsd``: Gradient Magnitude Similarity Deviation (Xue et al. 2014) from piq, a full-reference
  metric with no learned weights; lower is better (0 = identical).

Per-clip values are means over frames of the per-frame values (for PSNR: the mean of per-frame
PSNR, not the PSNR of the mean error). LPIPS, DISTS and FID are not here: they need network
weights that cannot be downloaded in this environment.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass, fields
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim, ssim
from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
VMAF_MODEL = "vmaf_v0.6.1"
BATCH = 16  # frames per metric call: bounds memory on long clips
MAX_PSNR = 100.0  # what identical frames score, instead of infinity


class MetricError(Exception):
    """A metric could not be computed (e.g. no FFmpeg with libvmaf)."""


@dataclass
class FrameScores:
    """One value per frame for each metric; ``vmaf`` is NaN where VMAF was not computed."""

    psnr_rgb: np.ndarray
    psnr_y: np.ndarray
    ssim: np.ndarray
    ms_ssim: np.ndarray
    vmaf: np.ndarray
    gmsd: np.ndarray

    def means(self) -> dict[str, float]:
        return {f.name: float(np.mean(getattr(self, f.name))) for f in fields(self)}


METRICS = tuple(f.name for f in fields(FrameScores))
HIGHER_IS_BETTER = {"psnr_rgb": True, "psnr_y": True, "ssim": True, "ms_ssim": True, "vmaf": True, "gmsd": False}


def psnr(mse: np.ndarray) -> np.ndarray:
    return np.minimum(10 * np.log10(255.0 ** 2 / np.maximum(mse, 255.0 ** 2 * 10 ** (-MAX_PSNR / 10))), MAX_PSNR)


def luma(frames: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB -> (...) float64 BT.601 studio-range Y in [16, 235]."""
    rgb = frames.astype(np.float64) / 255
    return 16 + rgb @ np.array([65.481, 128.553, 24.966])


def psnr_rgb(x: np.ndarray, x_hat: np.ndarray) -> np.ndarray:
    err = x.astype(np.float64) - x_hat.astype(np.float64)
    return psnr(np.mean(err ** 2, axis=(1, 2, 3)))


def psnr_y(x: np.ndarray, x_hat: np.ndarray) -> np.ndarray:
    return psnr(np.mean((luma(x) - luma(x_hat)) ** 2, axis=(1, 2)))


def _tensor(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div(255)


def ms_ssim_scales(size: int, win_size: int = 11) -> int:
    """How many MS-SSIM scales fit a frame whose smaller side is ``size``: the window must fit
    inside the coarsest scale (5 from 161 px up, pytorch-msssim's and the paper's setting)."""
    scales = len(MS_SSIM_WEIGHTS)
    while scales > 1 and size <= (win_size - 1) * 2 ** (scales - 1):
        scales -= 1
    return scales


def _ms_ssim_few_scales(x: torch.Tensor, y: torch.Tensor, scales: int) -> torch.Tensor:
    """MS-SSIM with the first ``scales`` of the standard weights, renormalized; the same
    computation as pytorch-msssim's ``ms_ssim``, which insists on all five. (T,) per frame."""
    w = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=x.dtype)
    w = w / w.sum()
    win = _fspecial_gauss_1d(11, 1.5).repeat([x.shape[1], 1, 1, 1])
    mcs = []
    for i in range(scales):
        s, cs = _ssim(x, y, win=win, data_range=1.0, size_average=False, K=(0.01, 0.03))
        if i < scales - 1:
            mcs.append(torch.relu(cs))
            padding = [d % 2 for d in x.shape[2:]]
            x, y = F.avg_pool2d(x, 2, padding=padding), F.avg_pool2d(y, 2, padding=padding)
    stack = torch.stack(mcs + [torch.relu(s)])  # (scale, T, C)
    return torch.prod(stack ** w.view(-1, 1, 1), dim=0).mean(1)


def _ms_ssim(x: torch.Tensor, x_hat: torch.Tensor, scales: int) -> torch.Tensor:
    if scales == len(MS_SSIM_WEIGHTS):
        return ms_ssim(x_hat, x, data_range=1.0, size_average=False)
    return _ms_ssim_few_scales(x_hat, x, scales)


@torch.no_grad()
def ms_ssim_frames(x: np.ndarray, x_hat: np.ndarray) -> np.ndarray:
    """Per-frame MS-SSIM of (T, H, W, 3) uint8 frames (fewer scales for small frames)."""
    scales = ms_ssim_scales(min(x.shape[1:3]))
    out = [_ms_ssim(_tensor(x[i:i + BATCH]), _tensor(x_hat[i:i + BATCH]), scales) for i in range(0, len(x), BATCH)]
    return torch.cat(out).double().numpy()


@torch.no_grad()
def structural(x: np.ndarray, x_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame (SSIM, MS-SSIM, GMSD) of (T, H, W, 3) uint8 frames."""
    import piq  # here, not at the top: piq imports torchvision (~170 MB), and a call or `imfc bench` that
    # imports this module for its other metrics should not carry it (issue 16's 1 GiB)

    scales = ms_ssim_scales(min(x.shape[1:3]))
    out = ([], [], [])
    for i in range(0, len(x), BATCH):
        a, b = _tensor(x[i:i + BATCH]), _tensor(x_hat[i:i + BATCH])
        out[0].append(ssim(b, a, data_range=1.0, size_average=False))
        out[1].append(_ms_ssim(a, b, scales))
        out[2].append(piq.gmsd(b, a, data_range=1.0, reduction="none"))
    return tuple(torch.cat(o).double().numpy() for o in out)


def ffmpeg_exe() -> str:
    try:
        import imageio_ffmpeg
    except ImportError:
        raise MetricError("VMAF needs the imageio-ffmpeg package (pip install imageio-ffmpeg)") from None
    return imageio_ffmpeg.get_ffmpeg_exe()


def vmaf_available() -> bool:
    try:
        out = subprocess.run([ffmpeg_exe(), "-hide_banner", "-filters"], capture_output=True, text=True, timeout=60, check=False)
    except (MetricError, OSError, subprocess.SubprocessError):
        return False
    return "libvmaf" in out.stdout


def vmaf(x: np.ndarray, x_hat: np.ndarray, fps: Fraction = Fraction(25), threads: int = 1) -> np.ndarray:
    """Per-frame VMAF of (T, H, W, 3) uint8 frames (x the reference, x_hat the distorted)."""
    t, h, w, _ = x.shape
    with tempfile.TemporaryDirectory(prefix="imfc-vmaf-") as tmp:
        ref, dist, log = Path(tmp) / "ref.rgb", Path(tmp) / "dist.rgb", Path(tmp) / "vmaf.json"
        ref.write_bytes(np.ascontiguousarray(x).tobytes())
        dist.write_bytes(np.ascontiguousarray(x_hat).tobytes())
        raw = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", f"{fps.numerator}/{fps.denominator}"]
        # libvmaf takes the distorted video first, the reference second
        graph = (f"[0:v]format=yuv444p[d];[1:v]format=yuv444p[r];[d][r]libvmaf=model=version={VMAF_MODEL}"
                 f":n_threads={threads}:log_fmt=json:log_path={log}")
        cmd = [ffmpeg_exe(), "-hide_banner", "-nostats", "-loglevel", "error", *raw, "-i", str(dist), *raw, "-i", str(ref),
               "-lavfi", graph, "-f", "null", "-"]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not log.exists():
            raise MetricError(f"ffmpeg libvmaf failed: {result.stderr.strip().splitlines()[-1:] or result.returncode}")
        frames = json.loads(log.read_text())["frames"]
    scores = np.array([f["metrics"]["vmaf"] for f in sorted(frames, key=lambda f: f["frameNum"])], dtype=np.float64)
    if len(scores) != t:
        raise MetricError(f"libvmaf scored {len(scores)} of {t} frames")
    return scores


def score(x: np.ndarray, x_hat: np.ndarray, fps: Fraction = Fraction(25), with_vmaf: bool = True) -> FrameScores:
    """Every metric, per frame, of decoded frames ``x_hat`` against the source ``x``."""
    if x.shape != x_hat.shape or x.dtype != np.uint8 or x_hat.dtype != np.uint8:
        raise ValueError(f"need two uint8 arrays of one shape, got {x.shape} {x.dtype} and {x_hat.shape} {x_hat.dtype}")
    s, ms, g = structural(x, x_hat)
    v = vmaf(x, x_hat, fps) if with_vmaf else np.full(len(x), np.nan)
    return FrameScores(psnr_rgb(x, x_hat), psnr_y(x, x_hat), s, ms, v, g)
